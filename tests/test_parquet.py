"""`pipeline predict --out x.parquet` writes the same rows as CSV, read back with pyarrow."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.predict import COLUMNS, output_format, write_rows
from tests.test_predict_export import read_csv


def test_parquet_rows_match_the_csv_rows_exactly(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50)
    probs = 1 / (1 + np.exp(-logits))
    columns = {
        "id": [f"c{i}" for i in range(50)],
        "group": [f"scan{i // 5}" for i in range(50)],
        "logit": logits.tolist(),
        "probability": probs.tolist(),
        "predicted": (probs >= 0.5).astype(int).tolist(),
        "label": [None if i % 7 == 0 else i % 2 for i in range(50)],  # None = unknown
    }
    assert output_format(str(tmp_path / "p.parquet")) == "parquet"  # pyarrow is installed
    write_rows(columns, tmp_path / "p.parquet", "parquet")
    write_rows(columns, tmp_path / "p.csv", "csv")
    table = pq.read_table(tmp_path / "p.parquet")
    assert tuple(table.column_names) == COLUMNS
    back = table.to_pydict()
    assert back == columns  # floats bit-exact, unknown labels stay null
    rows = read_csv(tmp_path / "p.csv")
    assert [float(r["logit"]) for r in rows] == back["logit"]
    assert [r["label"] for r in rows] == ["" if v is None else str(v) for v in back["label"]]
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file
