"""`--checkpoint wandb:...` where W&B cannot be used: one line, exit 2, no secret printed.

No W&B server runs here, so only the refusals are tested; the download itself is
`wandb.Api().artifact(...).download()`, W&B's own client.
"""

from __future__ import annotations

import socket

import pytest

from tests.conftest import cli_env, run_cli

SECRET = "s3cr3t" * 7  # 42 characters: looks like a W&B key, must never be printed


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once the socket is: connections are refused


CASES = {
    "malformed": ("evaluate", "wandb:just-a-name", {}, ["expected wandb:ENTITY/PROJECT/NAME:ALIAS"]),
    "offline": ("evaluate", "wandb:team/proj/model-x:best", {"WANDB_MODE": "offline"}, ["needs W&B online", "offline"]),
    "unreachable": ("evaluate", "wandb:team/proj/model-x:best", None, ["wandb:team/proj/model-x:best"]),
    "unreachable predict": ("predict", "wandb:team/proj/model-x:best", None, ["wandb:team/proj/model-x:best"]),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_wandb_checkpoint_that_cannot_be_fetched_is_one_line(tmp_path, case):
    command, reference, env, words = CASES[case]
    if env is None:  # a W&B host that refuses connections, with a key that must stay secret
        env = {"WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}", "WANDB_API_KEY": SECRET}
    args = [command, "--checkpoint", reference]
    if command == "predict":  # predict checks its shards first: give it one that exists
        (tmp_path / "x.tar").write_bytes(b"")
        args += ["--shards", str(tmp_path / "x.tar"), "--out", str(tmp_path / "p.csv")]
    result = run_cli(args, cli_env(tmp_path, **env), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip()
    assert "\n" not in line and all(w in line for w in words), line
    assert SECRET not in result.stderr + result.stdout
