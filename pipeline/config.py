"""Structured config: one dataclass per section, loaded from YAML plus dotlist overrides.

The dataclass defaults *are* the built-in 2D demo (`configs/default.yaml` mirrors them), so
`pipeline train` with no arguments needs no file. Validation happens in `__post_init__`,
which OmegaConf runs when `load()` converts the merged config back to dataclasses, so every
override is checked before any heavy work starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.data.remote import scrub_tree
from pipeline.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOG_CHECKPOINTS = ("none", "best", "all")
WANDB_MODES = ("online", "offline", "disabled")
LOSSES = ("bce", "focal")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
TTA = ("none", "flips", "dihedral")
# model.preset -> the architecture keys it sets; `base` is the dataclass defaults.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "small": {"width": 4, "depth": 2, "features": 64, "hidden": 32},
    "base": {"width": 8, "depth": 3, "features": 128, "hidden": 64},
    "large": {"width": 16, "depth": 4, "features": 256, "hidden": 128},
}
# Validation metrics `checkpoint.metric` may name, with the direction that is better.
# `cpm_candidate` and `froc_candidate_*` exist when validation samples carry a scan id.
METRIC_MODES = {
    **dict.fromkeys(
        ("auroc", "ap", "accuracy", "sensitivity", "specificity", "precision", "f1"), "max"
    ),
    "cpm_candidate": "max",
    **{f"sens_at_fpr_{pct}pct": "max" for pct in (1, 5, 10)},
    **{f"froc_candidate_{rate:g}": "max" for rate in (0.125, 0.25, 0.5, 1, 2, 4, 8)},
    "loss": "min",
}
# Keys a resume may change freely (everything else recorded in a checkpoint's resume
# contract is refused unless listed in checkpoint.accept_changes).
RESUME_FREE = ("train.max_steps",)


def metric_mode(metric: str) -> str:
    """`max` or `min`: the direction in which `metric` improves."""
    return METRIC_MODES[metric]


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key}: {problem}")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {'|'.join(choices)}, got {value!r}")


def default_cache_dir() -> Path:
    """Where the built-in synthetic demo shards live (`PIPELINE_CACHE` overrides)."""
    return Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "pipeline"))


@dataclass
class SyntheticConfig:
    """Built-in synthetic data, used only when `data.train` is null."""

    dir: str | None = None
    """Where to write/read the demo shards; null = `$PIPELINE_CACHE/synthetic-<dims>d-<seed>-...`."""
    train: int = 24576
    """Number of training candidates to generate."""
    val: int = 4096
    """Number of validation candidates to generate."""
    difficulty: str = "easy"
    """`easy` (centred structures, the demo) or `hard` (centres 2-6 px/voxels off as a
    detector's are, 1:100 positives; see pipeline/data/synthetic.py)."""
    positive_fraction: float | None = None
    """Fraction of positives; null = the difficulty's (easy 0.25, hard 0.01). Real data is
    far more skewed than easy; the demo keeps it learnable fast."""
    seed: int = 0
    """Generator seed; the same seed gives byte-identical shards."""
    block_size: int = 256
    """Samples per block record (K)."""
    shards: int = 8
    """Training shards to write (validation gets a quarter, at least 2)."""

    def __post_init__(self) -> None:
        _require(self.train > 0, "data.synthetic.train", "must be > 0")
        _require(self.val > 0, "data.synthetic.val", "must be > 0")
        _choice(self.difficulty, "data.synthetic.difficulty", ("easy", "hard"))
        _require(
            self.positive_fraction is None or 0.0 < self.positive_fraction < 1.0,
            "data.synthetic.positive_fraction",
            "must be in (0, 1) or null",
        )
        _require(self.block_size > 0, "data.synthetic.block_size", "must be > 0")
        _require(self.shards > 0, "data.synthetic.shards", "must be > 0")


@dataclass
class AugmentConfig:
    """Training-time augmentation: on the device, batch-wise, off for validation.

    Deterministic per `train.seed` (each rank draws from its own generator, saved in every
    checkpoint), so resumes stay bit-exact. `data.augment=false` turns all of it off.
    """

    enabled: bool = True
    """Master switch (`data.augment=true|false` sets only this)."""
    flips: bool = True
    """Random flips along every axis and 90-degree rotations (all symmetries of the grid)."""
    translate: int = 0
    """Largest shift of the crop centre per axis, in pixels/voxels (integer shifts). Needs a
    stored margin: at most (data.patch_size - largest scale) // 2."""
    rotate: float = 0.0
    """Largest rotation in degrees, any angle up to it (2D: in plane; 3D: about a random axis)."""
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Zoom factor range [lo, hi] (> 1 zooms in); [1, 1] = off."""
    affine_p: float = 1.0
    """Probability per sample of the translation/rotation/zoom above."""
    intensity_scale: float = 0.0
    """Multiply by 1 + U(-a, a) (after the window and normalisation)."""
    intensity_shift: float = 0.0
    """Add U(-b, b), in normalised units."""
    intensity_p: float = 0.5
    """Probability per sample of the intensity change."""
    noise_std: float = 0.0
    """Standard deviation of additive Gaussian noise, in normalised units; 0 = off."""
    noise_p: float = 0.5
    """Probability per sample of the noise."""

    def __post_init__(self) -> None:
        _require(self.translate >= 0, "data.augment.translate", "must be >= 0")
        _require(0 <= self.rotate <= 180, "data.augment.rotate", "must be in [0, 180] degrees")
        _require(
            len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1],
            "data.augment.scale",
            "must be [lo, hi] with 0 < lo <= hi",
        )
        for name in ("affine_p", "intensity_p", "noise_p"):
            _require(0 <= getattr(self, name) <= 1, f"data.augment.{name}", "must be in [0, 1]")
        for name in ("intensity_scale", "intensity_shift", "noise_std"):
            _require(getattr(self, name) >= 0, f"data.augment.{name}", "must be >= 0")
        _require(self.intensity_scale < 1, "data.augment.intensity_scale", "must be < 1")

    @property
    def affine(self) -> bool:
        """Whether any translation, rotation or zoom is configured."""
        return bool(self.translate or self.rotate or list(self.scale) != [1.0, 1.0])


@dataclass
class DataConfig:
    """Where samples come from and how they reach the model."""

    train: str | None = None
    """Training shard pattern (brace expansion `{000..009}` and globs); null = synthetic demo."""
    val: str | None = None
    """Validation shard pattern; null with `train` null = synthetic demo validation shards."""
    dims: int = 2
    """2 for images (crops S x S), 3 for volumes (S x S x S)."""
    scales: list[int] = field(default_factory=lambda: [16, 32, 48])
    """Crop sizes fed to the model, smallest first (concentric, around the patch centre)."""
    patch_size: int | None = None
    """Stored patch size S of the shards; null = the largest scale. A larger S leaves a
    margin of (S - largest scale) // 2 for `data.augment.translate`."""
    channels: int = 1
    """Channels per stored patch."""
    mean: float = 0.0
    """Subtracted after the optional window (in stored units when no window is set)."""
    std: float = 1.0
    """Divides after `mean`. The default window maps to [0, 1]; mean/std then standardise."""
    window: list[float] | None = field(default_factory=lambda: [0.0, 255.0])
    """Intensity window [lo, hi]: clip then scale to [0, 1] (e.g. HU [-1000, 400]); null = off."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation (see `data.augment.*`); `data.augment=false` turns it off."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = read in the training process)."""
    prefetch_factor: int = 4
    """Batches each worker keeps ready."""
    shuffle_blocks: int = 48
    """Shuffle buffer, in block records; a worker holds 1-2 buffers of shuffle_blocks x K samples.

    A batch draws from at most this many storage blocks, and two samples of one buffer tend
    to share a batch again next epoch: 48 keeps that below 3 % of same-batch pairs for 2D
    (27 MiB at K=256, 48x48 uint8). Fewer blocks: less memory, a coarser shuffle. Speed and
    shuffle quality per size: BENCHMARKS.md (scripts/bench_loader.py)."""
    balance: float | None = None
    """Target fraction of positives per training batch, in (0, 1); null = off.

    Each batch is B - k fresh stream samples (every label, as without balance) plus k
    positives drawn with replacement from a reservoir the stream feeds (pipeline/data/
    balance.py); k = round(B (f - p) / (1 - p)) for the data's positive fraction p (from the
    manifest). f <= p does nothing (a warning). An epoch stays one pass over every sample,
    so it takes about B / (B - k) times the batches; `train/epoch` counts it so. With
    `loss.pos_weight=auto`, pos_weight is (1 - f) / f (capped by `loss.max_pos_weight`):
    the balanced batches, not the data set, are what the loss sees."""
    balance_reservoir: int = 1024
    """Positives a reader keeps for `balance`; it holds two windows (this epoch's and the
    last), so up to 2 x this x bytes per sample per loader worker (2D 48x48 uint8: 4.5 MiB;
    3D 48^3 int16: 432 MiB), allocated as positives arrive."""
    on_error: str = "skip"
    """Bad records: `skip` (counted and logged) or `fail`."""
    reader: str = "fast"
    """Tar reader: `fast` (seek + one read per member) or `webdataset` (the library's; slower,
    see BENCHMARKS.md), same records and batches."""
    cache_dir: str | None = None
    """Node-local cache for remote shards (http(s)://, s3://, gs://, pipe:); null = `$PIPELINE_CACHE/shards`."""
    cache_limit_gb: float = 50.0
    """Cache size limit; least recently used shards not being read are deleted (0 = no limit)."""
    prefetch_shards: int = 2
    """Remote shards each loader worker downloads ahead of the one it reads (0 = off)."""
    remote_timeout_s: float = 60.0
    """Per-request timeout (connect, and each read) for remote shards."""
    remote_retries: int = 5
    """Retries, with exponential backoff from 0.5 s, for transient faults (5xx, resets, truncation)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _require(self.dims in (2, 3), "data.dims", f"must be 2 or 3, got {self.dims}")
        _require(len(self.scales) >= 1, "data.scales", "must list at least one crop size")
        _require(all(s > 0 for s in self.scales), "data.scales", "crop sizes must be > 0")
        _require(
            list(self.scales) == sorted(self.scales), "data.scales", "must be in increasing order"
        )
        _require(
            self.patch_size is None or self.patch_size >= self.scales[-1],
            "data.patch_size",
            f"must be >= the largest scale {self.scales[-1]} (or null), got {self.patch_size}",
        )
        margin = (self.stored_size - self.scales[-1]) // 2
        _require(
            self.augment.translate <= margin,
            "data.augment.translate",
            f"{self.augment.translate} exceeds the stored margin {margin} (data.patch_size "
            f"{self.stored_size} - largest scale {self.scales[-1]}) / 2; store larger patches "
            "(make-synthetic --size, convert --size) and set data.patch_size, or lower it",
        )
        _require(self.channels > 0, "data.channels", "must be > 0")
        _require(self.std > 0, "data.std", "must be > 0")
        if self.window is not None:
            _require(
                len(self.window) == 2 and self.window[0] < self.window[1],
                "data.window",
                "must be [lo, hi] with lo < hi, or null",
            )
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        _require(self.shuffle_blocks >= 1, "data.shuffle_blocks", "must be >= 1")
        _require(
            self.balance is None or 0 < self.balance < 1,
            "data.balance",
            f"must be a fraction strictly inside (0, 1), or null, got {self.balance}",
        )
        _require(self.balance_reservoir >= 1, "data.balance_reservoir", "must be >= 1")
        _choice(self.on_error, "data.on_error", ("skip", "fail"))
        _choice(self.reader, "data.reader", ("fast", "webdataset"))
        _require(self.cache_limit_gb >= 0, "data.cache_limit_gb", "must be >= 0 (0 = no limit)")
        _require(self.prefetch_shards >= 0, "data.prefetch_shards", "must be >= 0")
        _require(self.remote_timeout_s > 0, "data.remote_timeout_s", "must be > 0")
        _require(self.remote_retries >= 0, "data.remote_retries", "must be >= 0")

    @property
    def stored_size(self) -> int:
        """The stored patch side S: `patch_size`, or the largest scale when that is null."""
        return self.patch_size if self.patch_size is not None else self.scales[-1]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, S, S) or (C, S, S, S): what every stored sample must be."""
        return (self.channels,) + (self.stored_size,) * self.dims


@dataclass
class ModelConfig:
    """Which network turns (x16, x32, x48) into one raw logit."""

    name: str = "xception_like"
    """Built-in model name; ignored when `target` is set."""
    target: str | None = None
    """Your own model, `package.module:ClassOrFactory`, called with `kwargs`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `target`."""
    width: int = 8
    """Channels after the stem of each branch; doubles at every block."""
    depth: int = 3
    """Residual separable blocks per branch (each halves the resolution)."""
    features: int = 128
    """Pooled features per branch (three branches are concatenated)."""
    hidden: int = 64
    """Width of the hidden layer of the head."""
    dropout: float = 0.0
    """Dropout before the last layer."""
    channels_last: bool = True
    """Use channels_last / channels_last_3d (faster convolutions on CUDA and on x86 CPUs)."""
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm under DDP."""
    compile: bool = False
    """Wrap the model in `torch.compile`."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (and BatchNorm statistics), updated after
    every optimizer step that was not skipped: `ema = decay * ema + (1 - decay) * weights`.
    0 = off. With EMA on, validation, `best.pt`, evaluate, predict and export use the EMA
    weights; checkpoints hold both. Typical: 0.999 (about the last 1000 steps)."""
    init_from: str | None = None
    """Fine-tuning: start a fresh run from these weights (a checkpoint file, a run dir or its
    `checkpoints/` dir: best.pt, else last.pt); their EMA weights when they have them. Only
    the weights: step, optimizer, schedule and RNG start fresh. Ignored on resume."""
    init_strict: bool = True
    """`init_from`: every key must match in name and shape (else one-line error, exit 2);
    false = load the keys that match and log the missing, unexpected and reshaped ones."""
    freeze_steps: int = 0
    """Fine-tuning: the branches (`model.branches`) do not learn for the first N steps (only
    the head does); then everything trains. 0 = off."""
    preset: str | None = None
    """Size preset that sets width, depth, features and hidden: small | base | large
    (base = the defaults above); null = use those keys as given. A key given with a
    preset must equal the preset's value or the default (a default counts as not given)."""

    def __post_init__(self) -> None:
        _choice(self.name, "model.name", ("xception_like",))
        if self.preset is not None:
            _choice(self.preset, "model.preset", tuple(MODEL_PRESETS))
            _require(
                self.target is None,
                "model.preset",
                "sizes the built-in model only; drop it with model.target (use model.kwargs)",
            )
            for key, value in MODEL_PRESETS[self.preset].items():
                given = getattr(self, key)
                _require(
                    given in (value, MODEL_PRESETS["base"][key]),
                    f"model.{key}",
                    f"{given} conflicts with model.preset={self.preset} (which sets {value}); "
                    "drop one of them",
                )
                setattr(self, key, value)
        if self.target is not None:
            _require(
                ":" in self.target, "model.target", "must look like package.module:ClassOrFactory"
            )
        _require(self.width > 0, "model.width", "must be > 0")
        _require(self.depth > 0, "model.depth", "must be > 0")
        _require(self.features > 0, "model.features", "must be > 0")
        _require(self.hidden > 0, "model.hidden", "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _require(
            0.0 <= self.ema_decay < 1.0,
            "model.ema_decay",
            f"must be in [0, 1) (0 = off, e.g. 0.999), got {self.ema_decay}",
        )
        _require(self.freeze_steps >= 0, "model.freeze_steps", "must be >= 0 (0 = off)")


@dataclass
class OptimConfig:
    """AdamW or SGD; linear warm-up, then a cosine, step or constant schedule."""

    name: str = "adamw"
    """adamw | sgd (SGD with `momentum`, optionally Nesterov)."""
    lr: float = 3e-3
    """Peak learning rate for the global batch (see README: scale it with the global batch)."""
    weight_decay: float = 1e-4
    """Weight decay, not applied to norms and biases (AdamW: decoupled; SGD: L2 in the gradient)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD: Nesterov momentum (needs momentum > 0)."""
    warmup_steps: int = 30
    """Linear warm-up steps from 0 to `lr`; must be < `train.max_steps`."""
    schedule: str = "cosine"
    """After the warm-up: cosine (to `lr * min_lr_ratio` at `train.max_steps`) | step
    (times `step_gamma` at each of `step_milestones`) | constant."""
    min_lr_ratio: float = 0.02
    """Cosine decays to `lr * min_lr_ratio` at `train.max_steps`."""
    step_milestones: list[float] = field(default_factory=lambda: [0.6, 0.85])
    """Step schedule: where the lr drops, as increasing fractions of `train.max_steps` in (0, 1)."""
    step_gamma: float = 0.1
    """Step schedule: the lr is multiplied by this at each milestone."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off). Clipped after unscaling."""

    def __post_init__(self) -> None:
        _choice(self.name, "optim.name", OPTIMIZERS)
        _choice(self.schedule, "optim.schedule", SCHEDULES)
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            "must be two numbers in [0, 1)",
        )
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _require(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        _require(
            not (self.name == "sgd" and self.nesterov and self.momentum == 0),
            "optim.nesterov",
            "needs optim.momentum > 0 (or set optim.nesterov=false)",
        )
        marks = list(self.step_milestones)
        _require(
            all(0 < m < 1 for m in marks) and marks == sorted(set(marks)),
            "optim.step_milestones",
            f"must be increasing fractions of train.max_steps in (0, 1), got {marks}",
        )
        _require(0 < self.step_gamma <= 1, "optim.step_gamma", "must be in (0, 1]")


@dataclass
class LossConfig:
    """The training loss on raw logits: BCEWithLogits or sigmoid focal loss (pipeline/losses.py)."""

    name: str = "bce"
    """bce (BCEWithLogits with pos_weight) | focal (sigmoid focal loss on logits)."""
    focal_gamma: float = 2.0
    """Focal loss: the focusing exponent gamma (0 = BCE)."""
    focal_alpha: float | None = None
    """Focal loss: weight of positives in [0, 1] (negatives get 1 - alpha), used instead of
    pos_weight; null = weigh positives by pos_weight as BCE does."""
    label_smoothing: float = 0.0
    """Targets y -> y (1 - eps) + eps / 2 for the training loss (validation loss uses the raw
    labels); in [0, 0.5)."""
    pos_weight: Any = "auto"
    """Weight of positives: a number, or `auto` = negatives/positives from the train manifest."""
    max_pos_weight: float = 100.0
    """Cap for `auto`, so a 1:600 imbalance does not make steps explode."""

    def __post_init__(self) -> None:
        if isinstance(self.pos_weight, str):
            _require(self.pos_weight == "auto", "loss.pos_weight", "must be a number or 'auto'")
        else:
            _require(
                isinstance(self.pos_weight, (int, float)) and self.pos_weight > 0,
                "loss.pos_weight",
                f"must be a positive number or 'auto', got {self.pos_weight!r}",
            )
        _require(self.max_pos_weight > 0, "loss.max_pos_weight", "must be > 0")
        _choice(self.name, "loss.name", LOSSES)
        _require(self.focal_gamma >= 0, "loss.focal_gamma", "must be >= 0")
        _require(
            self.focal_alpha is None or 0 <= self.focal_alpha <= 1,
            "loss.focal_alpha",
            f"must be in [0, 1] or null, got {self.focal_alpha}",
        )
        _require(
            0 <= self.label_smoothing < 0.5,
            "loss.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )


@dataclass
class TrainConfig:
    """The loop: how long, how big, how precise."""

    max_steps: int = 300
    """Optimizer steps in total (resume continues to this number)."""
    batch_size: int = 128
    """Samples per process per micro-step; global batch = batch_size * world_size * grad_accum."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    precision: str = "auto"
    """`auto` (bf16 on CUDA when supported, else fp32) | fp32 | bf16 | fp16 (with GradScaler)."""
    seed: int = 0
    """Seeds model init, data order and augmentation; each rank derives its own stream."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    eval_every: int = 50
    """Validate every N steps (and at the end); 0 = only at the end."""
    log_every: int = 10
    """Log step metrics every N steps."""
    max_bad_steps: int = 20
    """Stop after this many consecutive non-finite steps."""
    stop_at_step: int = 0
    """Stop as if RUN_DIR/STOP appeared after this step (checkpoint, exit 0); 0 = off. The
    LR schedule still follows `max_steps`, so a rerun without it resumes exactly where the
    uninterrupted run would be (cut a long run into pieces; tests of bit-exact resume)."""
    threads: int = 0
    """torch intra-op threads per process on CPU (0 = torch's default)."""
    early_stop_patience: int = 0
    """Stop (checkpoint, exit 0) after this many validations in a row without a new best
    `checkpoint.metric` (in its mode); 0 = off. A resume of an early-stopped run stops at
    once unless this is raised (or set to 0)."""
    keep_freed_memory: bool = True
    """glibc: reuse freed host buffers instead of faulting them back in every step (fewer
    page faults, a little more peak RSS; the speed effect depends on the machine:
    BENCHMARKS.md; MALLOC_*_THRESHOLD_ env vars win)."""

    def __post_init__(self) -> None:
        _require(self.max_steps > 0, "train.max_steps", f"must be > 0, got {self.max_steps}")
        _require(self.batch_size > 0, "train.batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.grad_accum > 0, "train.grad_accum", "must be > 0")
        _choice(self.precision, "train.precision", PRECISIONS)
        _choice(self.device, "train.device", ("auto", "cpu", "cuda"))
        _require(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _require(self.log_every > 0, "train.log_every", "must be > 0")
        _require(self.max_bad_steps > 0, "train.max_bad_steps", "must be > 0")
        _require(self.stop_at_step >= 0, "train.stop_at_step", "must be >= 0 (0 = off)")
        _require(self.threads >= 0, "train.threads", "must be >= 0")
        _require(
            self.early_stop_patience >= 0, "train.early_stop_patience", "must be >= 0 (0 = off)"
        )


@dataclass
class CheckpointConfig:
    """What is saved, how often, and how runs resume."""

    every_steps: int = 100
    """Save `last.pt` every N steps (and always at the end)."""
    keep_last: int = 2
    """Step checkpoints (`step-XXXXXXXX.pt`) kept besides `last.pt` and `best.pt`."""
    metric: str = "auroc"
    """Validation metric that decides `best.pt`: auroc, ap, loss (validation loss), cpm,
    accuracy, sensitivity, specificity, precision, f1, sens_at_fpr_{1,5,10}pct, froc_<rate>."""
    mode: str = "auto"
    """`max` or `min`: which direction of `metric` is better; `auto` = the metric's own
    (min for loss, max for every other)."""
    resume: str = "auto"
    """`auto` (resume from RUN_DIR/checkpoints/last.pt when present), `never`, or a path."""
    accept_changes: list[str] = field(default_factory=list)
    """Keys of the resume contract (e.g. `[optim.lr]`) that this resume may change; any
    other changed key is refused. `train.max_steps` may always grow."""

    def __post_init__(self) -> None:
        _require(self.every_steps > 0, "checkpoint.every_steps", "must be > 0")
        _require(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
        # Validation has no annotations: its CPM is per candidate. A silent miss here would
        # leave best.pt unwritten for the whole run.
        _require(
            self.metric != "cpm",
            "checkpoint.metric",
            "validation reports cpm_candidate (per candidate); the LUNA16 cpm needs "
            "annotations (pipeline evaluate --annotations)",
        )
        _require(
            self.metric in METRIC_MODES,
            "checkpoint.metric",
            f"unknown metric {self.metric!r}; one of {', '.join(METRIC_MODES)}",
        )
        _choice(self.mode, "checkpoint.mode", ("auto", "max", "min"))


@dataclass
class WandbConfig:
    """Weights & Biases. `WANDB_*` environment variables override these, as W&B users expect."""

    mode: str = "offline"
    """online | offline | disabled. Offline needs no account; `wandb sync` uploads later."""
    project: str = "pipeline"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    group: str | None = None
    """Run group (e.g. one per sweep or per preempted job)."""
    name: str | None = None
    """Run name; null = the run directory's name."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""
    notes: str | None = None
    """Free-text notes."""
    init_timeout: float = 90.0
    """Seconds to wait for W&B to start before continuing with local logging only."""
    log_checkpoints: str = "best"
    """Checkpoints as W&B model artifacts: `none`; `best` (best.pt when it improves, and
    last.pt once at the end); `all` (also last.pt at every save). Bounds the upload size."""

    def __post_init__(self) -> None:
        _choice(self.mode, "wandb.mode", WANDB_MODES)
        _choice(self.log_checkpoints, "wandb.log_checkpoints", LOG_CHECKPOINTS)
        _require(self.init_timeout > 0, "wandb.init_timeout", "must be > 0")


@dataclass
class DistConfig:
    """Process group settings (the environment itself comes from torchrun or SLURM)."""

    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU) | nccl | gloo."""
    timeout_s: float = 300.0
    """Collective timeout: a dead rank makes the others exit after this, instead of hanging."""

    def __post_init__(self) -> None:
        _choice(self.backend, "dist.backend", ("auto", "nccl", "gloo"))
        _require(self.timeout_s > 0, "dist.timeout_s", "must be > 0")


@dataclass
class GuardConfig:
    """The logit guard against a non-negative/bounded head (the ReLU->sigmoid bug)."""

    allow_bounded_head: bool = False
    """Expert override: train even if the output passes through ReLU/sigmoid/... (warns)."""
    dynamic: str = "warn"
    """On a bounded head seen at run time (the range probe at train start, or a batch whose
    logits pile up exactly at a bound): warn | error."""
    check_every: int = 100
    """Re-check the logits of a training batch every N steps (0 = only the first batch)."""

    def __post_init__(self) -> None:
        _choice(self.dynamic, "guard.dynamic", ("warn", "error"))
        _require(self.check_every >= 0, "guard.check_every", "must be >= 0")


@dataclass
class RunConfig:
    """Where everything of one run goes."""

    dir: str | None = None
    """Run directory; null = runs/<SLURM_JOB_ID or timestamp>. Reusing it resumes the run."""


@dataclass
class PredictConfig:
    """Decision threshold for `pipeline predict` and the reported accuracy."""

    threshold: str = "0.5"
    """A probability, or a named operating point: youden | f1 | sens90 | sens95 | fpr01."""
    tta: str = "none"
    """Test-time augmentation in `evaluate` and `predict`: none | flips | dihedral, the mean
    logit over the transformed patches (pipeline/tta.py; 2D: 4 | 8 views, 3D: 8 | 16)."""

    def __post_init__(self) -> None:
        _choice(self.tta, "predict.tta", TTA)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    run: RunConfig = field(default_factory=RunConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)


def _describe(exc: OmegaConfBaseException) -> str:
    """One line from an OmegaConf error: the key and the problem, without its debug block."""
    key = getattr(exc, "full_key", None) or ""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Key '" in first_line and "not in" in first_line:
        return f"config: unknown key '{key}'"
    prefix = f"config: {key}: " if key else "config: "
    return prefix + first_line


def _legacy_overrides(overrides: list[str]) -> list[str]:
    """`data.augment=true|false` (before augmentation became a section) -> `.enabled`."""
    return [
        f"data.augment.enabled={item.split('=', 1)[1]}"
        if item.split("=", 1)[0] == "data.augment"
        else item
        for item in overrides
    ]


def _legacy_mapping(values: Any) -> Any:
    """A config mapping (YAML file, old checkpoint) with `data.augment: bool` as a section."""
    data = values.get("data") if hasattr(values, "get") else None
    if data is not None and hasattr(data, "get") and isinstance(data.get("augment"), bool):
        data["augment"] = {"enabled": data["augment"]}
    return values


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotlist overrides, validated; raises ConfigError on bad input."""
    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            file_cfg = OmegaConf.load(path)
            if not isinstance(file_cfg, DictConfig):
                raise ConfigError(f"config file {path}: must be a mapping of sections")
            merged = OmegaConf.merge(merged, _legacy_mapping(file_cfg))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override '{item}': expected key=value (e.g. optim.lr=3e-4)")
        if overrides:
            dotlist = OmegaConf.from_dotlist(_legacy_overrides(list(overrides)))
            merged = OmegaConf.merge(merged, dotlist)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    except Exception as exc:  # YAML syntax errors and friends
        where = f"config file {path}" if path else "config"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: {message}") from None
    assert isinstance(cfg, Config)
    _check_cross_section(cfg)
    return cfg


def _check_cross_section(cfg: Config) -> None:
    if isinstance(cfg.loss.pos_weight, float) and not math.isfinite(cfg.loss.pos_weight):
        raise ConfigError("config: loss.pos_weight: must be finite")
    _require(
        cfg.optim.warmup_steps < cfg.train.max_steps,
        "optim.warmup_steps",
        f"{cfg.optim.warmup_steps} must be < train.max_steps ({cfg.train.max_steps}): "
        "the warm-up would never finish",
    )


def to_saved(cfg: Config) -> dict[str, Any]:
    """What a run writes down (config.yaml, checkpoints, W&B): the resolved config with
    every URL's user:password@ and signed query values replaced by *** (`scrub`); a later
    read of such a URL is refused with one line (`pipeline.data.urls`)."""
    return scrub_tree(to_dict(cfg))


def to_yaml(cfg: Config) -> str:
    """`to_saved` as YAML: the run dir's `config.yaml`."""
    return OmegaConf.to_yaml(OmegaConf.create(to_saved(cfg)))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain containers (checkpoint- and W&B-safe)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(container, dict)
    return container


def from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's), with optional overrides."""
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(Config), _legacy_mapping(OmegaConf.create(values))
        )
        if overrides:
            dotlist = OmegaConf.from_dotlist(_legacy_overrides(list(overrides)))
            merged = OmegaConf.merge(merged, dotlist)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    assert isinstance(cfg, Config)
    return cfg
