"""CUDA-only behaviour: mixed precision on the real model, the BCELoss rule, channels_last,
and a real `pipeline train` on the GPU. Skipped without CUDA; `scripts/gpu_check.sh` runs
them on a lent GPU machine (CI has none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.data.transforms import DeviceTransform
from pipeline.model import build_model
from tests.conftest import cli_env, run_cli

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model_and_batch(dims: int, channels_last: bool = False, batch: int = 8):
    torch.manual_seed(0)
    model = build_model(dims=dims, in_channels=1, scales=[16, 32, 48], width=4, depth=2)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    model = model.cuda().to(memory_format=fmt if channels_last else torch.contiguous_format)
    patch = torch.randint(0, 256, (batch, 1) + (48,) * dims, dtype=torch.uint8).cuda()
    transform = DeviceTransform([16, 32, 48], [0.0, 255.0], 0.0, 1.0, True, channels_last)
    generator = torch.Generator("cuda").manual_seed(0)
    crops = transform(patch, train=True, generator=generator)
    label = torch.randint(0, 2, (batch,), device="cuda").float()
    return model, crops, label


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward_gives_finite_float32_grads(dims, dtype):
    model, crops, label = _model_and_batch(dims)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    with torch.autocast("cuda", dtype=dtype):
        logits = model(*crops)
    assert logits.dtype == dtype  # the last Linear ran in reduced precision
    loss = nn.BCEWithLogitsLoss()(logits.float(), label)
    scaler.scale(loss).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bceloss_on_probabilities_raises_under_cuda_autocast_but_logits_loss_works():
    # The project's rule (and why heads return logits): CUDA autocast refuses BCELoss.
    model, crops, label = _model_and_batch(2)
    with torch.autocast("cuda", dtype=torch.float16):
        logits = model(*crops)
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            nn.BCELoss()(torch.sigmoid(logits), label)
        loss = nn.BCEWithLogitsLoss()(logits, label)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_model_gives_the_same_logits_as_contiguous(dims):
    plain, crops, _ = _model_and_batch(dims, channels_last=False)
    fast, crops_cl, _ = _model_and_batch(dims, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert all(c.is_contiguous(memory_format=fmt) for c in crops_cl)
    plain.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(*crops_cl), plain(*crops), rtol=1e-3, atol=1e-3)


def test_tiny_cli_training_run_on_cuda_logs_gpu_memory(tiny_args, tmp_path):
    env = cli_env(tmp_path, CUDA_VISIBLE_DEVICES="0")
    result = run_cli(
        ["train", *tiny_args, "train.device=cuda", "train.precision=bf16", "data.num_workers=2"],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next(a.split("=", 1)[1] for a in tiny_args if a.startswith("run.dir="))
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [r for r in records if r["event"] == "train"]
    assert train and all(r["train/gpu_mem_gb"] > 0 for r in train)
    evals = [r for r in records if r["event"] == "eval"]
    assert evals and evals[-1]["step"] == 20


def test_fp16_non_finite_loss_counts_towards_max_bad_steps(tiny_args, tmp_path):
    # GradScaler alone would lower its scale forever; a NaN loss must still stop the run.
    env = cli_env(tmp_path, CUDA_VISIBLE_DEVICES="0")
    overrides = [
        "train.device=cuda",
        "train.precision=fp16",
        "model.target=tests.faults:FaultyNet",
        "model.kwargs={fault: nan, at: 6}",
        "train.batch_size=8",
        "train.max_steps=20",
        "train.eval_every=0",
        "train.max_bad_steps=3",
        "checkpoint.every_steps=5",
    ]
    result = run_cli(["train", *tiny_args, *overrides], env)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline train: error: 3 consecutive non-finite steps; ")
    assert "last good step 5" in last and "loss scale" in last


def test_steady_state_training_steps_never_sync_with_the_host():
    """Issue 18 §5: `set_sync_debug_mode("error")` around steady-state steps of the real step.

    The real `pipeline.step.train_step` on the real model, fused AdamW and bf16 autocast,
    from pinned host batches as the loader delivers them. The non-finite skip is decided on
    the device (fused AdamW's found_inf); tests/test_step_syncs.py counts host reads on CPU.
    """
    import contextlib

    from pipeline.config import OptimConfig
    from pipeline.optim import build_optimizer, build_scheduler
    from pipeline.runtime import autocast
    from pipeline.step import StepParts, train_step

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(dims=2, in_channels=1, scales=(16, 32, 48), width=4, depth=2,
                        features=16, hidden=16).to(device, memory_format=torch.channels_last)  # fmt: skip
    optim = OptimConfig(lr=1e-3, warmup_steps=2, grad_clip=1.0)
    optimizer = build_optimizer(model, optim, device)
    parts = StepParts(
        model, None, optimizer, build_scheduler(optimizer, optim, 100),
        torch.amp.GradScaler("cuda", enabled=False),
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0, device=device)),
        DeviceTransform([16, 32, 48], [0.0, 255.0], 0.0, 1.0, True, True),
        lambda: autocast("bf16", device) if torch.cuda.is_bf16_supported() else contextlib.nullcontext(),
        torch.Generator(device).manual_seed(0), device, grad_accum=1, grad_clip=1.0,
        precision="bf16" if torch.cuda.is_bf16_supported() else "fp32",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    batches = iter(
        [
            {
                "patch": torch.randint(0, 256, (32, 1, 48, 48), dtype=torch.uint8, generator=gen).pin_memory(),
                "label": torch.tensor([0, 1] * 16, dtype=torch.uint8).pin_memory(),
            }
            for _ in range(8)
        ]
    )  # fmt: skip
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator growth
        train_step(parts, batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            train_step(parts, batches)  # raises RuntimeError on a synchronising call
    finally:
        torch.cuda.set_sync_debug_mode("default")
