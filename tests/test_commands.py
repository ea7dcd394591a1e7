"""Small rules of the command layer."""

from __future__ import annotations

from pipeline.commands import eval_dir


def test_evaluate_writes_into_the_run_dir_or_beside_a_moved_checkpoint(tmp_path):
    run_checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    assert eval_dir(run_checkpoint) == tmp_path / "run" / "eval"
    # A checkpoint copied out of its run must not write into the parent of its folder.
    loose = tmp_path / "models" / "best.pt"
    assert eval_dir(loose) == tmp_path / "models" / "eval"
