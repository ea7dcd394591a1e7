"""DDP averages gradients and splits data correctly: 2 ranks x B == 1 process x 2B.

Real model (`build_model`), our AdamW + warm-up/cosine builders, `distributed.wrap_ddp`,
BCEWithLogits with pos_weight, clipping after unscale; gloo on CPU; BatchNorm frozen
(eval mode) because SyncBN needs CUDA. The 2-rank side runs `tests/ddp_worker.py` under
torchrun; the reference runs the same code here, in one process, on whole batches.
"""

from __future__ import annotations

import subprocess
import sys

import ddp_worker
import pytest
import torch
from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow

# Float32 all-reduce and a different summation order move the last bits, nothing more.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("ddp")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "ddp_worker.py"), str(out)],
        env=cli_env(out), cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return {a: torch.load(out / f"ddp-accum{a}.pt", weights_only=True) for a in (1, 2)}


@pytest.fixture(scope="module")
def single_2b() -> dict:
    return ddp_worker.train(slice(0, 2 * ddp_worker.B), accum=1)


def _assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=ATOL, msg=f"{what}: {key}")


def _max_param_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_ranks_of_batch_b_match_one_process_of_batch_2b(ddp_results, single_2b):
    ddp = ddp_results[1]
    # Clipping was active, so this also checks that ranks clip the same averaged gradient.
    assert max(single_2b["grad_norms"]) > ddp_worker.OPTIM.grad_clip
    assert ddp["grad_norms"] == pytest.approx(single_2b["grad_norms"], rel=1e-4)
    _assert_same_tensors(ddp["model"], single_2b["model"], "parameters")
    for got, want in zip(
        ddp["optimizer"]["state"].values(), single_2b["optimizer"]["state"].values(), strict=True
    ):
        _assert_same_tensors(got, want, "AdamW state")


def test_tolerance_separates_a_wrong_data_split(single_2b):
    """The check above can fail: training on only half of each batch lands far outside it."""
    half = ddp_worker.train(slice(0, ddp_worker.B), accum=1)
    initial = ddp_worker.build()[0].state_dict()
    assert _max_param_diff(single_2b["model"], initial) > 100 * ATOL  # training moved weights
    assert _max_param_diff(half["model"], single_2b["model"]) > 100 * ATOL


def test_accumulation_with_no_sync_matches_one_big_batch(ddp_results, single_2b):
    """2 ranks x 2 micro-batches of B/2, all-reducing once per step == 1 process x 2B."""
    accum = ddp_results[2]
    assert accum["grad_norms"] == pytest.approx(single_2b["grad_norms"], rel=1e-4)
    _assert_same_tensors(accum["model"], single_2b["model"], "parameters")
