"""`--checkpoint wandb:ENTITY/PROJECT/NAME:ALIAS`: a model artifact version, fetched once.

The artifact is downloaded into the pipeline cache and its one checkpoint file returned,
so `evaluate` and `predict` then read a local file like any other (weights_only loading
included). W&B must be reachable: offline that is one line, exit 2, not a hang.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import ConfigError

PREFIX = "wandb:"
_NAME = re.compile(r"[^/:\s]+/[^/:\s]+/[^/:\s]+:[^/:\s]+")
API_TIMEOUT_S = 30


def is_reference(checkpoint: str) -> bool:
    return str(checkpoint).startswith(PREFIX)


def fetch(reference: str, cache_dir: Path) -> Path:
    """Download the artifact version (cached) and return its checkpoint file."""
    from pipeline.tracking.wandb_sink import _one_line

    name = reference[len(PREFIX) :]
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"--checkpoint {reference}: expected wandb:ENTITY/PROJECT/NAME:ALIAS "
            "(e.g. wandb:my-team/pipeline/model-abc123:best)"
        )
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise ConfigError(
            f"--checkpoint {reference}: needs W&B online (WANDB_MODE={mode}); download the "
            "artifact where W&B is reachable and pass the .pt file"
        )
    import wandb

    try:
        artifact = wandb.Api(timeout=API_TIMEOUT_S).artifact(name, type="model")
        folder = Path(
            artifact.download(root=str(cache_dir / "wandb-artifacts" / name.replace(":", "/")))
        )
    except Exception as exc:  # unreachable host, bad key, unknown artifact: one line
        raise ConfigError(f"--checkpoint {reference}: {_one_line(exc)}") from None
    files = sorted(folder.glob("*.pt"))
    if len(files) != 1:
        raise ConfigError(
            f"--checkpoint {reference}: expected one .pt file in the artifact, found {len(files)}"
        )
    return files[0]
