"""scripts/benchmarks_md.py: a section is replaced in place, others are kept, new ones appended."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from benchmarks_md import machine_line, table, write_section  # noqa: E402


def test_sections_are_replaced_in_place_and_carry_date_machine_and_command(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    write_section(
        "a",
        "First",
        table(["x", "y"], [["r", 1234.5]]),
        command="c1",
        machine="m1",
        date="2026-01-01",
        path=md,
    )
    write_section("b", "Second", "text b", command="c2", machine="m2", date="2026-01-02", path=md)
    write_section(
        "a",
        "First",
        table(["x", "y"], [["r", 0.123456]]),
        command="c3",
        machine="m3",
        date="2026-01-03",
        path=md,
    )
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert text.count("<!-- bench:a:begin -->") == 1 and text.index("bench:a:") < text.index(
        "bench:b:"
    )
    assert "| r | 0.123 |" in text and "1,234" not in text  # the old table is gone
    assert "Measured 2026-01-03 on m3." in text and "Command: `c3`" in text and "c1" not in text
    assert "Measured 2026-01-02 on m2." in text and "text b" in text
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_section_names_are_refused_and_the_machine_line_names_cores_and_gpu(tmp_path):
    with pytest.raises(ValueError, match="section name"):
        write_section("a b", "t", "x", command="c", machine="m", path=tmp_path / "B.md")
    line = machine_line(shared=True)
    assert "-core " in line and ("no GPU" in line or "GPU" not in line) and "torch " in line
    assert "shared with other work (load " in line
