"""SLURM nodelists: our parser on a table of real-world lists, and SLURM's own reading."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pipeline.distributed.nodelist import _hostnames, expand_nodelist, first_host, hostnames
from tests.conftest import ROOT
from tests.slurm_helpers import PARTITION, requires_slurm

# Nodelists as SLURM writes them on real clusters (schemes seen on Cray, Lenovo, AWS
# ParallelCluster, Jülich, and site InfiniBand suffixes), with their expansion.
TABLE = {
    "node7": ["node7"],
    "x,y": ["x", "y"],
    "gpu[03-05,09],login1": ["gpu03", "gpu04", "gpu05", "gpu09", "login1"],
    "a-b[1-2]": ["a-b1", "a-b2"],
    "gpu[01-02]-ib": ["gpu01-ib", "gpu02-ib"],
    "rack[1-2]-node[01-02]": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
    "nid[001234-001236]": ["nid001234", "nid001235", "nid001236"],
    "jwb[0098-0101]": ["jwb0098", "jwb0099", "jwb0100", "jwb0101"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "r1i0n[0-1],r1i1n[5,7]": ["r1i0n0", "r1i0n1", "r1i1n5", "r1i1n7"],
    "queue1-dy-c5xlarge-[1-3]": ["queue1-dy-c5xlarge-1", "queue1-dy-c5xlarge-2",
                                 "queue1-dy-c5xlarge-3"],
    "hpc-gpu[10-11].cluster.local": ["hpc-gpu10.cluster.local", "hpc-gpu11.cluster.local"],
    "c[1-2]-[3-4],login": ["c1-3", "c1-4", "c2-3", "c2-4", "login"],
    "node[1,3,5-6]": ["node1", "node3", "node5", "node6"],
}  # fmt: skip


@pytest.mark.parametrize("nodelist", list(TABLE))
def test_parser_expands_real_world_nodelists(nodelist):
    assert expand_nodelist(nodelist) == TABLE[nodelist]


@requires_slurm
def test_scontrol_agrees_with_the_parser_wherever_it_reads_the_list():
    refused = []
    for nodelist, expected in TABLE.items():
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        if not out.stdout.split():  # slurm 22.05: "Invalid hostlist: gpu[01-02]-ib", rc 0
            refused.append(nodelist)
            _hostnames.cache_clear()
            assert hostnames(nodelist) == expected, nodelist  # then the parser answers
            continue
        assert out.stdout.split() == expected, nodelist
    # Only one bracket followed by a suffix is beyond some SLURM versions.
    assert len(refused) <= 2 and all(n.split("]")[-1] for n in refused), refused


@requires_slurm
def test_hostnames_asks_scontrol_where_it_exists(tmp_path, monkeypatch):
    # The real scontrol, behind a wrapper that notes each call.
    calls, real = tmp_path / "calls", shutil.which("scontrol")
    wrapper = tmp_path / "bin" / "scontrol"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    _hostnames.cache_clear()
    try:
        assert hostnames("rack[1-2]-node[01-02]") == TABLE["rack[1-2]-node[01-02]"]
        assert calls.read_text().split() == ["show", "hostnames", "rack[1-2]-node[01-02]"]
        monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no SLURM client: the parser
        assert first_host("gpu[01-02]-ib") == "gpu01-ib"
        assert len(calls.read_text().splitlines()) == 1
    finally:
        _hostnames.cache_clear()


@requires_slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_srun_tasks_on_two_nodes_agree_on_the_first_host():
    code = "from pipeline.distributed import detect_env; print(detect_env().master_addr)"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        ["srun", f"--partition={PARTITION}", "-N2", "-n2", "--time=00:02:00",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    nodes = subprocess.run(["sinfo", "-h", "-o", "%N", f"--partition={PARTITION}"],
                           capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
    assert out.stdout.split() == [expand_nodelist(nodes)[0]] * 2, (out.stdout, nodes)
