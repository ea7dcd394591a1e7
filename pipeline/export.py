"""`pipeline export`: a checkpoint as a TorchScript or ONNX graph that runs without us.

Two input contracts:
- three crops (default): float tensors already normalised, smallest first, as the model
  sees them in training (`x16`, `x32`, `x48` for scales 16/32/48);
- `--single-input`: the largest patch in its stored dtype; the graph casts, windows,
  normalises and centre-crops with the checkpoint's settings, as validation does.
The output is the raw logit [B], or the probability [B] with `--probabilities`.

Tracing records one forward, so a model with data-dependent control flow would be baked
to one branch: after writing, the file is reloaded and checked against the eager model on
a second, differently sized batch, and a mismatch is an error rather than a silent export.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.format import ALLOWED_DTYPES
from pipeline.data.transforms import DeviceTransform
from pipeline.errors import ConfigError, ModelContractError
from pipeline.finetune import weights_of
from pipeline.model import as_logits

log = logging.getLogger("pipeline")

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4


class ExportedModel(nn.Module):
    """The model with the pipeline's pre- and post-processing fixed into one graph."""

    def __init__(
        self,
        model: nn.Module,
        transform: DeviceTransform | None,
        patch_size: int,
        probabilities: bool,
    ) -> None:
        super().__init__()
        self.model = model
        self.transform = transform  # None: the inputs are the crops already
        # Crop offsets are constants of the graph: the patch size is fixed at export.
        self.windows = [((patch_size - s) // 2, s) for s in (transform.scales if transform else [])]
        self.probabilities = probabilities

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        crops = list(inputs)
        if self.transform is not None:
            x = self.transform.normalise(inputs[0])  # cast, window, mean/std as validation
            crops = [x[(...,) + (slice(a, a + s),) * (x.ndim - 2)] for a, s in self.windows]
        logits = as_logits(self.model(*crops)).float()
        return torch.sigmoid(logits) if self.probabilities else logits


def example_inputs(
    cfg: Config, single_input: bool, dtype: str, patch_size: int, batch: int, seed: int
) -> list[torch.Tensor]:
    """Random inputs of the graph's input contract (values in a realistic range)."""
    gen = torch.Generator().manual_seed(seed)
    spatial = (cfg.data.dims,)
    if not single_input:
        return [
            torch.randn((batch, cfg.data.channels) + (s,) * spatial[0], generator=gen)
            for s in cfg.data.scales
        ]
    shape = (batch, cfg.data.channels) + (patch_size,) * spatial[0]
    torch_dtype = getattr(torch, dtype)
    if torch_dtype.is_floating_point:
        low, high = cfg.data.window or (-3.0, 3.0)
        return [(torch.rand(shape, generator=gen) * (high - low) + low).to(torch_dtype)]
    info = torch.iinfo(torch_dtype)
    low, high = cfg.data.window or (info.min, info.max)
    low, high = max(int(low), info.min), min(int(high), info.max)
    return [torch.randint(low, high + 1, shape, generator=gen).to(torch_dtype)]


def input_names(cfg: Config, single_input: bool) -> list[str]:
    return ["patch"] if single_input else [f"x{s}" for s in cfg.data.scales]


def export_torchscript(wrapper: nn.Module, inputs: list[torch.Tensor], out: Path) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, tuple(inputs), check_trace=False)
    torch.jit.save(traced, str(out))


def export_onnx(
    wrapper: nn.Module, inputs: list[torch.Tensor], names: list[str], output: str, out: Path
) -> None:
    axes = {name: {0: "batch"} for name in [*names, output]}
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13's default exporter (dynamo=True) needs onnxscript; the TorchScript-based
        # one needs nothing beyond torch and is still supported, only deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            tuple(inputs),
            str(out),
            dynamo=False,
            input_names=names,
            output_names=[output],
            dynamic_axes=axes,
        )


def run_exported(path: Path, fmt: str, inputs: list[torch.Tensor], names: list[str]):
    """Outputs of the written file (None for ONNX without onnxruntime)."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path))(*inputs)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def export(
    checkpoint: str,
    fmt: str,
    out: str | Path,
    probabilities: bool = False,
    single_input: bool = False,
    dtype: str = "uint8",
    patch_size: int | None = None,
    overrides: list[str] | None = None,
) -> float | None:
    """Write the graph; returns the max |exported - eager| on a check batch (None: unchecked)."""
    from pipeline.inference import eval_transform, load_trained

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: must be one of {'|'.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch's exporter needs it to write the file)
        except ImportError:
            raise ConfigError(
                "--format onnx needs the onnx package: pip install 'pipeline[onnx]' "
                "(onnx, plus onnxruntime to verify the file)"
            ) from None
    if dtype not in ALLOWED_DTYPES:
        raise ConfigError(f"--dtype {dtype}: must be one of {'|'.join(ALLOWED_DTYPES)}")
    cfg, model, state = load_trained(checkpoint, overrides)
    # One set of weights goes into the graph: the EMA ones when the checkpoint has them
    # (load_trained logged that); say so for the raw ones too.
    if weights_of(state)[1] == "raw":
        log.info("export: the raw weights of %s (it holds no EMA)", checkpoint)
    size = patch_size or cfg.data.stored_size
    if size < cfg.data.scales[-1]:
        raise ConfigError(
            f"--patch-size {size}: smaller than the largest scale {cfg.data.scales[-1]}"
        )
    transform = eval_transform(cfg) if single_input else None
    wrapper = ExportedModel(model, transform, size, probabilities)
    wrapper.eval()
    names = input_names(cfg, single_input)
    output = "probability" if probabilities else "logit"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        export_torchscript(wrapper, example_inputs(cfg, single_input, dtype, size, 2, 0), out)
    else:
        export_onnx(
            wrapper, example_inputs(cfg, single_input, dtype, size, 2, 0), names, output, out
        )

    # A different batch size and values: catches baked-in shapes and traced-away branches.
    check = example_inputs(cfg, single_input, dtype, size, 3, 1)
    got = run_exported(out, fmt, check, names)
    if got is None:
        return None
    with torch.no_grad():
        want = wrapper(*check)
    error = float((got.float() - want).abs().max())
    if not error <= TOLERANCE:
        raise ModelContractError(
            f"export: {out} disagrees with the model by {error:.3g} (> {TOLERANCE}) on a check "
            "batch; data-dependent control flow in forward cannot be traced"
        )
    return error


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as a TorchScript or ONNX graph",
        description="Export a trained checkpoint; the file is checked against PyTorch after writing.",
    )
    parser.add_argument("--checkpoint", required=True, help="path to a .pt checkpoint")
    parser.add_argument("--format", required=True, choices=FORMATS, help="torchscript | onnx")
    parser.add_argument("--out", required=True, help="output file (.pt / .onnx)")
    parser.add_argument(
        "--probabilities", action="store_true", help="output sigmoid probabilities, not logits"
    )
    parser.add_argument(
        "--single-input",
        action="store_true",
        help="take the largest patch in its stored dtype; normalise and crop inside the graph",
    )
    parser.add_argument(
        "--dtype",
        default="uint8",
        choices=ALLOWED_DTYPES,
        help="stored dtype of the patch (--single-input; fixed in ONNX graphs)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        help="stored patch size (--single-input; default: the largest scale)",
    )
    parser.add_argument("overrides", nargs="*", help="dotlist overrides applied to the config")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from pipeline.runtime import check_output_file, setup_logging

    setup_logging(0)
    out = check_output_file(args.out, "--out")
    error = export(
        args.checkpoint,
        args.format,
        out,
        probabilities=args.probabilities,
        single_input=args.single_input,
        dtype=args.dtype,
        patch_size=args.patch_size,
        overrides=args.overrides,
    )
    checked = (
        f"max |exported - PyTorch| = {error:.2g} on a check batch"
        if error is not None
        else "not checked: install onnxruntime (pip install 'pipeline[onnx]') to verify"
    )
    inputs = "one stored-dtype patch" if args.single_input else "three normalised crops"
    output = "probabilities" if args.probabilities else "logits"
    print(f"wrote {args.format} to {out}: {inputs} -> {output} [B]; {checked}", flush=True)
    return 0
