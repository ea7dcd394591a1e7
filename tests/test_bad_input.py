"""Bad input at the edges: each case exits 2 with exactly one stderr line naming the problem.

One table, run through the real CLI in subprocesses. The cases run two at a time in a
module fixture (each process pays the torch import), and each row asserts on its own.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import TINY, cli_env, run_cli
from tests.faults import small_shards
from tests.reliability import record


def _train(*extra: str) -> list[str]:
    """`pipeline train` on the tiny config and good shards, plus `extra`."""
    return ["train", "--config", str(TINY), "data.train={data}/train-*.tar",
            "data.val={data}/val-*.tar", *extra]  # fmt: skip


# id -> (CLI arguments, words the one line must contain[, environment]); {tmp} and {data}
# are filled in.
CASES: dict[str, tuple] = {
    "unknown option": (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
    "unknown command": (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    "override without '='": (["train", "optim.lr"], ["override 'optim.lr'", "key=value"]),
    "config file missing": (
        ["train", "--config", "{tmp}/nope.yaml"],
        ["config file not found: {tmp}/nope.yaml"],
    ),
    "yaml syntax error": (["train", "--config", "{tmp}/broken.yaml"], ["{tmp}/broken.yaml"]),
    "wrong type": (["train", "train.max_steps=many"], ["train.max_steps", "many"]),
    "not a bool": (
        ["train", "train.keep_freed_memory=maybe"],
        ["train.keep_freed_memory", "maybe", "bool"],
    ),
    "unknown key": (["train", "train.max_stepz=5"], ["unknown key", "train.max_stepz"]),
    "value out of range": (["train", "train.batch_size=0"], ["train.batch_size", "> 0"]),
    "bad wandb.mode": (
        ["train", "wandb.mode=sometimes"],
        ["wandb.mode", "online|offline|disabled"],
    ),
    "bad WANDB_MODE": (
        _train("run.dir={tmp}/run-wandb"),
        ["WANDB_MODE", "bogus"],
        {"WANDB_MODE": "bogus"},
    ),
    "missing shard pattern": (
        ["train", "data.train={tmp}/none-*.tar", "data.val={tmp}/none-*.tar"],
        ["data.train", "{tmp}/none-*.tar", "matches no shard files"],
    ),
    "unwritable run dir": (
        # Tests run as root, which chmod does not stop; a path under a regular file fails.
        _train("run.dir={tmp}/a-file/run"),
        ["run.dir", "{tmp}/a-file/run"],
    ),
    "model target that does not import": (
        _train("run.dir={tmp}/run-target", "model.target=no_such_module:Net"),
        ["model.target", "no_such_module"],
    ),
    "resume from a missing checkpoint": (
        _train("run.dir={tmp}/run-resume", "checkpoint.resume={tmp}/gone.pt"),
        ["checkpoint not found: {tmp}/gone.pt"],
    ),
    "evaluate a missing checkpoint": (
        ["evaluate", "--checkpoint", "{tmp}/gone.pt"],
        ["checkpoint not found: {tmp}/gone.pt"],
    ),
    "evaluate a file that is not a checkpoint": (
        ["evaluate", "--checkpoint", "{tmp}/not-a-checkpoint.pt"],
        ["{tmp}/not-a-checkpoint.pt", "corrupt or not ours"],
    ),
    "predict output that cannot be written": (
        # Checked before the checkpoint is even read: no scoring hours lost at the end.
        [
            "predict",
            "--checkpoint",
            "{tmp}/gone.pt",
            "--shards",
            "{data}/val-*.tar",
            "--out",
            "{tmp}/a-file/preds.csv",
        ],
        ["--out {tmp}/a-file/preds.csv", "cannot write there"],
    ),  # fmt: skip
    "export output that is a directory": (
        ["export", "--checkpoint", "{tmp}/gone.pt", "--format", "onnx", "--out", "{tmp}"],
        ["--out {tmp}", "is a directory"],
    ),
    # -- engineer A (run state): best-checkpoint metric and its direction ---------------
    "checkpoint.metric typo": (
        ["train", "checkpoint.metric=aucroc"],
        ["checkpoint.metric", "unknown metric 'aucroc'", "auroc", "loss"],
    ),
    "checkpoint.mode not max or min": (
        ["train", "checkpoint.mode=up"],
        ["checkpoint.mode", "auto|max|min", "'up'"],
    ),
    # -- engineer B (issue 16 §2): balance is a fraction strictly inside (0, 1) ----------
    **{
        f"data.balance={value}": (
            ["train", f"data.balance={value}"],
            ["data.balance", "strictly inside (0, 1)", value],
        )
        for value in ("0", "1", "-0.1", "1.5")
    },
    "data.balance leaving no fresh samples in a batch": (
        _train("run.dir={tmp}/run-balance", "data.balance=0.99", "train.batch_size=4"),
        ["data.balance=0.99 with train.batch_size=4", "all 4 samples", "from the reservoir"],
    ),
    # -- engineer S (recipes): the synthetic demo's difficulty ----------------------------
    "data.synthetic.difficulty unknown": (
        ["train", "data.synthetic.difficulty=medium"],
        ["data.synthetic.difficulty", "easy|hard", "'medium'"],
    ),
    "make-synthetic --positive-fraction outside (0, 1) with --difficulty hard": (
        ["make-synthetic", "--out", "{tmp}/syn-bad", "--difficulty", "hard"]
        + ["--positive-fraction", "0"],
        ["make-synthetic: positive_fraction", "must be in (0, 1), got 0.0"],
    ),
}

# -- engineer B's rows (issue 14 §3, §6, §7): shards vs config, checkpoints vs overrides,
# -- a run dir in use, make-synthetic over shards. Set up by _b_inputs().
_CKPT = "{tmp}/run-ckpt/checkpoints/last.pt"
_B_CASES = {
    "data.dims=3 on 2D shards": (
        _train("run.dir={tmp}/run-dims", "data.dims=3"),
        ["data.train", "data.dims=3 but the shards hold 2D patches", "manifest.json"],
    ),
    "data.channels=3 on 1-channel shards": (
        _train("run.dir={tmp}/run-channels", "data.channels=3"),
        ["data.channels=3 but the shards hold 1-channel patches"],
    ),
    "data.scales beyond the stored patch": (
        _train("run.dir={tmp}/run-scales", "data.scales=[16,32,64]"),
        ["data.scales=[16, 32, 64]", "stored patch size 48"],
    ),
    "data.dims=3 on shards without a manifest": (
        ["train", "--config", str(TINY), "data.train={tmp}/bare/train-*.tar",
         "data.val={tmp}/bare/val-*.tar", "run.dir={tmp}/run-bare", "data.dims=3"],
        ["data.dims=3", "first record of {tmp}/bare/train-"],
    ),
    "run dir in use by a live job": (
        _train("run.dir={tmp}/run-locked"),
        ["run.dir {tmp}/run-locked is in use by pid", "started"],
    ),
    "evaluate with another model.width": (
        ["evaluate", "--checkpoint", _CKPT, "model.width=16"],
        [_CKPT, "model.width=16 (checkpoint: 4)"],
    ),
    "predict with another model.width": (
        ["predict", "--checkpoint", _CKPT, "--shards", "{data}/val-*.tar", "--out",
         "{tmp}/preds.csv", "model.width=16"],
        [_CKPT, "model.width=16 (checkpoint: 4)"],
    ),
    "export with another model.depth and data.channels": (
        ["export", "--checkpoint", _CKPT, "--format", "torchscript", "--out", "{tmp}/m.pt",
         "model.depth=3", "data.channels=3"],
        ["data.channels=3 (checkpoint: 1)", "model.depth=3 (checkpoint: 2)"],
    ),
    "make-synthetic into a non-empty --out": (
        ["make-synthetic", "--out", "{data}", "--train", "16", "--val", "16"],
        ["--out {data}: not empty", "--overwrite"],
    ),
}  # fmt: skip
CASES.update(_B_CASES)

# -- engineer T's rows (issue 16 §3): EMA decay, fine-tuning sources.
CASES.update({
    "model.ema_decay=1.0": (["train", "model.ema_decay=1.0"], ["model.ema_decay", "[0, 1)", "1.0"]),
    "model.ema_decay=-0.1": (["train", "model.ema_decay=-0.1"], ["model.ema_decay", "-0.1"]),
    "init_from a missing checkpoint": (
        _train("run.dir={tmp}/run-init-missing", "model.init_from={tmp}/gone.pt"),
        ["model.init_from={tmp}/gone.pt", "checkpoint not found"],
    ),
    "init_from a checkpoint of another width (strict)": (
        _train("run.dir={tmp}/run-init-wide", f"model.init_from={_CKPT}", "model.width=8"),
        [f"model.init_from={_CKPT}", "shape differs", "branches.0.net.0.weight [4, 1, 3, 3] vs [8, 1, 3, 3]"],
    ),
})  # fmt: skip

# -- engineer O's rows (issue 16 §3): losses, optimizers, schedules, presets, TTA.
CASES.update({
    "unknown loss name": (["train", "loss.name=hinge"], ["loss.name", "bce|focal", "'hinge'"]),
    "unknown optimizer": (["train", "optim.name=adam"], ["optim.name", "adamw|sgd", "'adam'"]),
    "unknown schedule": (
        ["train", "optim.schedule=linear"],
        ["optim.schedule", "cosine|step|constant", "'linear'"],
    ),
    "warm-up not shorter than max_steps": (
        ["train", "optim.warmup_steps=50", "train.max_steps=50"],
        ["optim.warmup_steps", "50 must be < train.max_steps (50)"],
    ),
    "focal_alpha out of [0, 1]": (
        ["train", "loss.name=focal", "loss.focal_alpha=1.5"],
        ["loss.focal_alpha", "[0, 1]", "1.5"],
    ),
    "label_smoothing out of [0, 0.5)": (
        ["train", "loss.label_smoothing=0.6"],
        ["loss.label_smoothing", "[0, 0.5)", "0.6"],
    ),
    "unknown model preset": (
        ["train", "model.preset=huge"],
        ["model.preset", "small|base|large", "'huge'"],
    ),
    "model preset with a conflicting width": (
        ["train", "model.preset=small", "model.width=16"],
        ["model.width", "16 conflicts with model.preset=small (which sets 4)"],
    ),
    "evaluate with an unknown tta": (
        ["evaluate", "--checkpoint", _CKPT, "predict.tta=rotate"],
        ["predict.tta", "none|flips|dihedral", "'rotate'"],
    ),
})  # fmt: skip


def _b_inputs(tmp, data, env) -> None:
    """A trained checkpoint, shards without a manifest, a live lock."""
    import json
    import shutil

    from pipeline.run_lock import LOCK_NAME, holder_record

    trained = run_cli([*(a.replace("{data}", str(data)) for a in _train()),
                       f"run.dir={tmp}/run-ckpt", "train.max_steps=2"], env, 180)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    (tmp / "bare").mkdir()
    for shard in data.glob("*.tar"):
        shutil.copy(shard, tmp / "bare" / shard.name)
    (tmp / "run-locked").mkdir()
    (tmp / "run-locked" / LOCK_NAME).write_text(json.dumps(holder_record()))  # us: alive


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bad_input")
    data = small_shards(tmp / "data", n_train=64, n_val=32)
    (tmp / "broken.yaml").write_text("train:\n  max_steps: [1, 2\n")
    (tmp / "a-file").write_text("a regular file, not a directory\n")
    (tmp / "not-a-checkpoint.pt").write_bytes(b"PK\x03\x04 truncated zip")
    env = cli_env(tmp)
    _b_inputs(tmp, data, env)

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp)).replace("{data}", str(data))

    def run(case: str):
        args, words, *extra = CASES[case]
        result = run_cli([fill(a) for a in args], {**env, **(extra[0] if extra else {})}, 180)
        return result, [fill(w) for w in words]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CASES, pool.map(run, CASES), strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_naming_the_problem(outcomes, case):
    result, words = outcomes[case]
    lines = result.stderr.strip().splitlines()
    if case in _B_CASES:  # the README's reliability table lists these faults
        record(case, exit_code=result.returncode, seconds=None, lines=len(lines),
               checkpoint_ok=None, launcher="cli")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("pipeline"), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
