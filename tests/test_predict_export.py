"""predict and export round-trip a real trained checkpoint on real shards.

One tiny model is trained once for the module through the real CLI; predict runs as real
subprocesses (and under torchrun), export writes real TorchScript and ONNX files that are
run by torch.jit and onnxruntime and compared with the eager model on real shard batches.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.format import UNKNOWN_LABEL, expand_shards, write_split
from pipeline.data.loader import read_blocks
from pipeline.data.problems import ProblemLog
from pipeline.errors import ConfigError, DataError
from pipeline.export import export
from pipeline.inference import eval_transform, load_trained
from pipeline.model import as_logits
from pipeline.predict import output_format
from tests.conftest import TINY, cli_env, run_cli, run_torchrun


@pytest.fixture(scope="module")
def trained(tiny_shards: Path, tmp_path_factory) -> dict:
    """One checkpoint with stored operating points, trained by `pipeline train`."""
    tmp = tmp_path_factory.mktemp("predict_export")
    args = [
        "train",
        "--config",
        str(TINY),
        f"data.train={tiny_shards}/train-*.tar",
        f"data.val={tiny_shards}/val-*.tar",
        f"run.dir={tmp / 'run'}",
        "train.max_steps=10",
        "train.eval_every=10",
    ]
    done = run_cli(args, cli_env(tmp))
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = tmp / "run" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    return {
        "tmp": tmp,
        "ckpt": str(ckpt),
        "val": f"{tiny_shards}/val-*.tar",
        "thresholds": state["thresholds"],
        "val_samples": manifest["splits"]["val"]["samples"],
    }


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def predict(trained: dict, out: Path, *extra: str, nproc: int = 1):
    args = ["predict", "--checkpoint", trained["ckpt"], "--shards", trained["val"]]
    args += ["--out", str(out), *extra]
    env = cli_env(trained["tmp"])
    return run_cli(args, env) if nproc == 1 else run_torchrun(nproc, args, env)


def test_predict_writes_one_row_per_sample_with_sigmoid_probabilities_and_named_threshold(
    trained,
):
    out = trained["tmp"] / "by-name.csv"
    done = predict(trained, out, "predict.threshold=f1")  # the config key, by name
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_csv(out)
    columns = ["id", "group", "x", "y", "logit", "probability", "predicted", "label"]
    assert list(rows[0]) == columns
    assert len(rows) == trained["val_samples"]
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["group"] for r in rows)  # the synthetic shards carry scan ids
    # Every row carries its candidate: group and pixel coordinates as the shard meta says.
    meta = {
        i: (g, c)
        for block in read_blocks(expand_shards(trained["val"]), "raise", ProblemLog())
        for i, g, c in zip(block.ids, block.groups, block.coords, strict=True)
    }
    for r in rows:
        group, (x, y) = meta[r["id"]]
        assert (r["group"], float(r["x"]), float(r["y"])) == (group, x, y)
    logits = np.array([float(r["logit"]) for r in rows])
    probs = np.array([float(r["probability"]) for r in rows])
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=0, atol=1e-6)
    threshold = trained["thresholds"]["f1"]
    assert [int(r["predicted"]) for r in rows] == [int(p >= threshold) for p in probs]
    assert {r["label"] for r in rows} == {"0", "1"}
    assert f"threshold f1 = {threshold:.6g}" in done.stdout


def test_predict_scores_unlabelled_candidates_and_leaves_their_label_empty(trained, tmp_path):
    # New detector candidates have no label yet: the writer stores 255 (unknown).
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 256, (40, 1, 48, 48), dtype=np.uint8)
    label = np.full(40, UNKNOWN_LABEL, np.uint8)
    label[:10] = [0, 1] * 5  # a few already reviewed
    write_split(tmp_path, "new", patch, label, [f"c{i}" for i in range(40)], block_size=16)
    out = tmp_path / "new.csv"
    args = ["predict", "--checkpoint", trained["ckpt"], "--shards", f"{tmp_path}/new-*.tar"]
    done = run_cli([*args, "--out", str(out)], cli_env(trained["tmp"]))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["id"]: r for r in read_csv(out)}
    assert len(rows) == 40
    assert [rows[f"c{i}"]["label"] for i in range(10)] == ["0", "1"] * 5
    assert all(rows[f"c{i}"]["label"] == "" for i in range(10, 40))
    assert all(0 < float(r["probability"]) < 1 for r in rows.values())
    assert "30 unlabelled" in done.stdout

    # Training and evaluation need labels: unknown ones are bad records, with the reason.
    problems = ProblemLog()
    shards = expand_shards(f"{tmp_path}/new-*.tar")
    assert not list(read_blocks(shards, "skip", problems))
    with pytest.raises(DataError, match=r"labels must be 0 or 1 \(255 = unknown is only for"):
        list(read_blocks(shards, "fail", ProblemLog()))


def test_luna16_format_needs_world_coordinates_and_says_so_in_one_line(trained):
    out = trained["tmp"] / "luna16.csv"
    done = predict(trained, out, "--format", "luna16")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1:] == [
        "pipeline predict: error: --format luna16 needs a seriesuid and world x, y, z per "
        "sample; these shards have groups and 2-D coordinates (convert CT volumes with "
        "`pipeline convert volumes`)"
    ]
    assert not out.exists()


def test_predict_threshold_by_number_splits_the_predictions(trained):
    first = read_csv(trained["tmp"] / "by-name.csv")
    median = float(np.median([float(r["probability"]) for r in first]))
    out = trained["tmp"] / "by-number.csv"
    done = predict(trained, out, "--threshold", repr(median))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_csv(out)
    predicted = [int(r["predicted"]) for r in rows]
    assert predicted == [int(float(r["probability"]) >= median) for r in rows]
    assert 0 < sum(predicted) < len(rows)  # a number that can fail: both classes occur


def test_unknown_threshold_name_is_one_line_naming_the_available_ones(trained):
    done = predict(trained, trained["tmp"] / "never.csv", "--threshold", "sens99")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "'sens99'" in lines[0] and "available:" in lines[0]
    for name in ("youden", "f1", "sens90", "sens95"):
        assert f"{name}=" in lines[0]
    assert not (trained["tmp"] / "never.csv").exists()


def test_parquet_needs_pyarrow_else_a_clear_error_before_any_work(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install pyarrow"):
            output_format(str(tmp_path / "preds.parquet"))
    else:
        assert output_format(str(tmp_path / "preds.parquet")) == "parquet"
    assert output_format("preds.csv") == "csv"
    with pytest.raises(ConfigError, match=r"must end in .csv or .parquet"):
        output_format("preds.tsv")


@pytest.mark.slow
def test_predict_under_torchrun_gives_the_same_rows_as_one_process(trained):
    out = trained["tmp"] / "two-ranks.csv"
    done = predict(trained, out, "predict.threshold=f1", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes
    single = trained["tmp"] / "one-rank.csv"
    assert predict(trained, single, "predict.threshold=f1").returncode == 0
    one = sorted(read_csv(single), key=lambda r: r["id"])
    two = sorted(read_csv(out), key=lambda r: r["id"])
    assert [r["id"] for r in two] == [r["id"] for r in one]
    for key in ("group", "label", "predicted"):
        assert [r[key] for r in two] == [r[key] for r in one]
    np.testing.assert_allclose(
        [float(r["logit"]) for r in two], [float(r["logit"]) for r in one], rtol=0, atol=1e-5
    )


# --- export -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_batch(trained) -> dict:
    """The eager model's outputs on the first 64 real validation samples."""
    cfg, model, _ = load_trained(trained["ckpt"])
    block = next(read_blocks(expand_shards(trained["val"]), "fail", ProblemLog()))
    patch = torch.from_numpy(block.patch)
    crops = [c.contiguous() for c in eval_transform(cfg)(patch, train=False)]
    with torch.no_grad():
        logits = as_logits(model(*crops)).float()
    assert logits.min() < logits.max()  # a constant output would make the comparison blind
    return {"patch": patch, "crops": crops, "logits": logits, "scales": cfg.data.scales}


def run_file(path: Path, fmt: str, inputs: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path))(*inputs)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names
    return torch.from_numpy(
        session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
    )


# Pairwise: every format meets both input contracts and both outputs (4 of the 8 cases;
# the CLI test below adds ONNX single-input probabilities).
@pytest.mark.parametrize(
    ("fmt", "single_input", "probabilities"),
    [
        ("torchscript", False, False),
        ("torchscript", True, True),
        ("onnx", False, True),
        ("onnx", True, False),
    ],
    ids=[
        "torchscript-crops-logits",
        "torchscript-patch-probs",
        "onnx-crops-probs",
        "onnx-patch-logits",
    ],
)
def test_exported_graph_matches_pytorch_on_real_shard_batches(
    trained, real_batch, tmp_path, fmt, single_input, probabilities
):
    out = tmp_path / f"model.{fmt}"
    export(trained["ckpt"], fmt, out, probabilities=probabilities, single_input=single_input)
    if single_input:
        inputs, names = [real_batch["patch"]], ["patch"]  # uint8, as stored in the shard
    else:
        inputs, names = real_batch["crops"], [f"x{s}" for s in real_batch["scales"]]
    got = run_file(out, fmt, inputs, names)
    want = real_batch["logits"]
    want = torch.sigmoid(want) if probabilities else want
    assert got.shape == (len(real_batch["patch"]),)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-4)
    if probabilities:
        assert float(got.min()) >= 0 and float(got.max()) <= 1


def test_export_cli_reports_the_check_and_onnx_takes_any_batch_size(trained, tmp_path):
    out = tmp_path / "m.onnx"
    args = ["export", "--checkpoint", trained["ckpt"], "--format", "onnx", "--out", str(out)]
    done = run_cli([*args, "--single-input", "--probabilities"], cli_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "one stored-dtype patch -> probabilities" in done.stdout
    error = float(done.stdout.split("max |exported - PyTorch| = ")[1].split()[0])
    assert math.isfinite(error) and error <= 1e-4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        patch = np.random.default_rng(batch).integers(0, 256, (batch, 1, 48, 48), np.uint8)
        assert session.run(None, {"patch": patch})[0].shape == (batch,)


def test_evaluate_with_tta_scores_the_mean_logit_over_the_flips(trained, real_batch):
    """`pipeline evaluate ... predict.tta=flips`: its saved logits are the mean of the
    model's logits on the four flipped patches (computed here from the shard itself)."""
    out_dir = Path(trained["ckpt"]).parent.parent / "eval"
    done = run_cli(["evaluate", "--checkpoint", trained["ckpt"], "predict.tta=flips"],
                   cli_env(trained["tmp"]))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout)
    assert 0.0 <= metrics["auroc"] <= 1.0
    saved = np.load(out_dir / "predictions-last.npz")
    by_id = dict(zip(saved["ids"].tolist(), saved["logits"].tolist(), strict=True))
    assert len(by_id) == trained["val_samples"]
    cfg, model, _ = load_trained(trained["ckpt"])
    block = next(read_blocks(expand_shards(trained["val"]), "fail", ProblemLog()))
    patch = torch.from_numpy(block.patch)
    with torch.no_grad():
        views = [patch, patch.flip(-1), patch.flip(-2), patch.flip(-2, -1)]
        each = [as_logits(model(*eval_transform(cfg)(v, train=False))).float() for v in views]
    want = torch.stack(each).mean(0)
    got = torch.tensor([by_id[i] for i in block.ids])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert not torch.allclose(got, real_batch["logits"], atol=1e-4)  # not the plain pass
