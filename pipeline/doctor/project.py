"""Doctor checks of the project: the config, the shards and manifests, the model and guard."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline import config as config_module
from pipeline import distributed
from pipeline.config import Config
from pipeline.doctor import FAIL, OK, WARN, Check
from pipeline.errors import PipelineError

SHARDS_TO_DECODE = 3


def load_config(path: str | None, overrides: list[str]) -> tuple[Config | None, Check]:
    where = path or "built-in defaults"
    extra = f" + {len(overrides)} override(s)" if overrides else ""
    try:
        cfg = config_module.load(path, overrides)
    except PipelineError as exc:
        return None, Check(
            FAIL,
            "config",
            f"{where}{extra}: {exc}",
            "fix the key or file named above (defaults: configs/default.yaml)",
        )
    return cfg, Check(OK, "config", f"{where}{extra}: loads and validates")


def shards(cfg: Config) -> Iterator[Check]:
    from pipeline.data.sources import synthetic_dir

    data = cfg.data
    if data.train is None:
        root = synthetic_dir(data)
        if not (root / "manifest.json").exists():
            yield Check(OK, "data", f"synthetic demo; `pipeline train` generates it in {root}")
            return
        patterns = {
            "data.train": str(root / "train-*.tar"),
            "data.val": data.val or str(root / "val-*.tar"),
        }
    else:
        patterns = {"data.train": data.train, "data.val": data.val}
    for key, pattern in patterns.items():
        if pattern is None:
            yield Check(
                WARN,
                key,
                "not set: no validation, no best.pt, no thresholds",
                "set data.val to held-out shards",
            )
            continue
        yield from _split(cfg, key, pattern)


def _split(cfg: Config, key: str, pattern: str) -> Iterator[Check]:
    from pipeline.data.format import MANIFEST_NAME, expand_shards, manifest_counts

    try:
        paths = expand_shards(pattern, key)
    except PipelineError as exc:
        yield Check(
            FAIL,
            key,
            str(exc).removeprefix(f"{key}: "),
            f"point {key} at existing .tar shards (globs and {{000..009}} work), or write them with `pipeline convert`",
        )
        return
    readers = distributed.detect_env().world_size * max(cfg.data.num_workers, 1)
    if key == "data.train" and len(paths) < readers:
        yield Check(
            FAIL,
            key,
            f"{len(paths)} shards cannot feed {readers} readers (ranks x data.num_workers)",
            "write more shards or lower data.num_workers",
        )
    else:
        yield Check(OK, key, f"{len(paths)} shards match {pattern!r}")
    counts = manifest_counts(paths)
    total = sum(c.samples for c in counts.values()) if len(counts) == len(paths) else None
    yield _decode(cfg, key, paths[:SHARDS_TO_DECODE], len(paths), total)
    if len(counts) == len(paths):
        samples = sum(c.samples for c in counts.values())
        positives = sum(c.positives for c in counts.values())
        yield Check(OK, f"{key} manifest", f"{samples} samples, {positives} positive")
    elif key == "data.train" and cfg.loss.pos_weight == "auto":
        yield Check(
            FAIL,
            f"{key} manifest",
            f"{MANIFEST_NAME} lists {len(counts)} of {len(paths)} shards; loss.pos_weight=auto needs all",
            "write shards with `pipeline convert` (it writes the manifest) or set loss.pos_weight to a number",
        )
    else:
        yield Check(
            WARN,
            f"{key} manifest",
            f"{MANIFEST_NAME} lists {len(counts)} of {len(paths)} shards; sample counts unknown",
            "write shards with `pipeline convert`, which writes the manifest",
        )


def _decode(cfg: Config, key: str, paths: list[str], shards: int, samples: int | None) -> Check:
    """The first record of each of `paths` decodes, matches its checksum and fits
    data.dims/channels/scales; says how much of the `shards` (`samples`) that sampled."""
    from pipeline.data.loader import read_blocks
    from pipeline.data.problems import ProblemLog

    name = f"{key} records"
    shapes = set()
    sampled = 0
    for path in paths:
        try:
            block = next(read_blocks([path], "fail", ProblemLog()), None)
        except PipelineError as exc:
            return Check(
                FAIL,
                name,
                f"{path}: {exc}",
                "rewrite the shard; `pipeline convert` writes valid records",
            )
        if block is None:
            return Check(
                FAIL,
                name,
                f"{path}: holds no records",
                "rewrite the shard or drop it from the pattern",
            )
        patch = block.patch
        dims, channels, size = patch.ndim - 2, patch.shape[1], patch.shape[-1]
        problem = None
        if dims != cfg.data.dims:
            problem = (
                f"data.dims={cfg.data.dims} but the patches are {dims}D {tuple(patch.shape[1:])}"
            )
        elif channels != cfg.data.channels:
            problem = f"data.channels={cfg.data.channels} but the patches have {channels}"
        elif size != cfg.data.stored_size:
            problem = f"data.patch_size/data.scales expect stored patches of {cfg.data.stored_size}, the shards hold {size}"
        if problem:
            return Check(
                FAIL, name, f"{path}: {problem}", "match data.dims/channels/scales to the shards"
            )
        shapes.add(f"{list(patch.shape[1:])} {patch.dtype}")
        sampled += len(block)
    share = f", {100 * sampled / samples:.1f}% of {samples}" if samples else ""
    return Check(
        OK,
        name,
        f"sampled the first record of {len(paths)} of {shards} shard(s) ({sampled} samples"
        f"{share}; `pipeline check-shards` reads all): decodes: {', '.join(sorted(shapes))}",
    )


def model(cfg: Config) -> Iterator[Check]:
    from pipeline import guard
    from pipeline.model import build_model

    what = (
        f"model.target={cfg.model.target}" if cfg.model.target else f"model.name={cfg.model.name}"
    )
    try:
        net = build_model(
            dims=cfg.data.dims,
            in_channels=cfg.data.channels,
            scales=cfg.data.scales,
            **{k: getattr(cfg.model, k) for k in ("name", "target", "kwargs", "width", "depth")},
            **{k: getattr(cfg.model, k) for k in ("features", "hidden", "dropout")},
        )
    except PipelineError as exc:
        importing = "cannot import" in str(exc) or "has no callable" in str(exc)
        fix = (
            "model.target must be package.module:ClassOrFactory, importable from the "
            "working directory or PYTHONPATH"
            if importing
            else "forward(x16, x32, x48) must return raw logits [B] or [B, 1]"
        )
        yield Check(FAIL, "model", str(exc), fix)
        return
    params = sum(p.numel() for p in net.parameters())
    yield Check(OK, "model", f"{what}: builds ({params:,} parameters) and returns logits [B]")
    crops = [torch.randn((2, cfg.data.channels) + (s,) * cfg.data.dims) for s in cfg.data.scales]
    try:
        finding = guard.check_static(net, crops, cfg.guard.allow_bounded_head)
    except PipelineError as exc:
        yield Check(FAIL, "guard", str(exc))  # the message carries its own fix
        return
    if finding is not None:
        yield Check(
            WARN,
            "guard",
            f"bounded head allowed by guard.allow_bounded_head=true: {finding.op} in {finding.where}",
            "return the raw logit of the last Linear",
        )
    else:
        yield Check(
            OK,
            "guard",
            "the output is a raw logit (no ReLU/sigmoid/... after the last affine layer)",
        )
