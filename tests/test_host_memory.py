"""train.keep_freed_memory: with glibc keeping freed buffers, a real training step of our
model stops faulting its activation memory back in from the kernel every step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.host_memory import glibc_defaults, running_glibc
from tests.conftest import ROOT, cli_env

pytestmark = pytest.mark.skipif(
    not running_glibc(), reason="mallopt thresholds are a glibc feature"
)

# Separate processes: the setting is process-wide and cannot be undone.
STEPS = r"""
import json, resource, sys
import torch
from pipeline.host_memory import keep_freed_memory
from pipeline.model import build_model

applied = keep_freed_memory() if sys.argv[1] == "kept" else False
torch.manual_seed(0)
model = build_model(dims=2, in_channels=1, scales=[16, 32, 48], width=8, depth=3)
model = model.to(memory_format=torch.channels_last)
optimizer = torch.optim.AdamW(model.parameters())
x = torch.rand(128, 1, 48, 48).to(memory_format=torch.channels_last)
crops = (x[:, :, 16:32, 16:32], x[:, :, 8:40, 8:40], x)
y = (torch.rand(128) < 0.25).float()

def step():
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(*crops), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

for _ in range(int(sys.argv[2])):  # warm-up: the first steps size the heap
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[3])):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _steps(tmp_path, variant: str, warm: int, measured: int, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", STEPS, variant, str(warm), str(measured)],
        cwd=ROOT,
        env={**glibc_defaults(cli_env(tmp_path)), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(_huge_pages_always(), reason="2 MB pages hide most of the faults counted")
def test_kept_memory_stops_the_page_faults_of_every_step(tmp_path):
    kept = _steps(tmp_path, "kept", 3, 8)
    default = _steps(tmp_path, "default", 3, 8)
    assert kept["applied"] is True
    # Five runs each on the 2-core dev VM (8 steps, batch 128): 39,000-87,000 faults by
    # default, 2-5,600 kept; the margin leaves room for a noisier machine.
    assert default["faults"] > 8 * 1000
    assert kept["faults"] * 4 < default["faults"], (kept, default)


def test_the_users_own_malloc_settings_win(tmp_path):
    for env in (
        {"MALLOC_TRIM_THRESHOLD_": "1000000"},
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
    ):
        assert _steps(tmp_path, "kept", 0, 0, **env)["applied"] is False
