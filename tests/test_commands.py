"""Small rules of the command layer."""

from __future__ import annotations

import pytest

from pipeline.commands import eval_dir


def test_evaluate_writes_into_the_run_dir_or_beside_a_moved_checkpoint(tmp_path):
    run_checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    assert eval_dir(run_checkpoint) == tmp_path / "run" / "eval"
    # A checkpoint copied out of its run must not write into the parent of its folder.
    loose = tmp_path / "models" / "best.pt"
    assert eval_dir(loose) == tmp_path / "models" / "eval"


def test_output_check_probes_the_folder_and_leaves_nothing_behind(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.runtime import check_output_file

    target = tmp_path / "new" / "sub" / "preds.csv"
    assert check_output_file(target, "--out") == target
    assert not (tmp_path / "new").exists()  # a later error (bad shards) leaves no folders
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"--out .*a-file/p.csv: cannot write there"):
        check_output_file(tmp_path / "a-file" / "p.csv", "--out")
    with pytest.raises(ConfigError, match="is a directory"):
        check_output_file(tmp_path, "--out")
