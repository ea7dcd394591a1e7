"""A small synthetic LUNA16-style data set, to try the LUNA16 workflow end to end offline.

Writes, under OUT:
- scans/subset0/<seriesuid>.mhd (+ .raw): CT-like volumes, -1000 HU air with noise, soft
  tissue blobs (hard negatives), nodules (spheres of -200..400 HU) and small irrelevant
  findings (150 HU);
- candidates.csv (seriesuid,coordX,coordY,coordZ,class): several candidates per nodule
  (class 1), one on each irrelevant finding and each blob, random ones elsewhere (class 0); the
  last scans get no candidates at all;
- annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm): the nodules;
- annotations_excluded.csv: the irrelevant findings, diameter_mm -1 as in LUNA16;
- seriesuids.csv: every scan, with or without candidates.

    python scripts/luna16_case.py --out luna16_demo [--scans 12] [--seed 0]

Prints a JSON summary of what it wrote. Needs SimpleITK (pip install 'pipeline[convert]').
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

SIZE = (44, 44, 32)  # voxels along x, y, z
SPACING = (0.9, 0.9, 1.25)  # mm: anisotropic, as CT is, so the converter must resample
UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001.9"


def _world_grid(origin: np.ndarray) -> np.ndarray:
    """[z, y, x, 3] world (x, y, z) mm of every voxel centre (identity direction)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in SIZE[::-1]), indexing="ij")
    return origin + np.stack([i, j, k], axis=-1) * np.asarray(SPACING)


def _inner_point(rng: np.random.Generator, origin: np.ndarray, margin: float) -> np.ndarray:
    extent = (np.asarray(SIZE) - 1) * np.asarray(SPACING)
    return origin + rng.uniform(margin, extent - margin)


def make_case(out: Path, scans: int = 12, empty: int = 2, seed: int = 0) -> dict:
    """Write the data set (see module doc); the last `empty` scans get no candidates."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    candidates, nodules, excluded, uids = [], [], [], []
    for n in range(scans):
        uid = f"{UID_ROOT}{n:04d}"
        uids.append(uid)
        origin = np.array([-120.0 + 3 * n, 40.0, -300.0 - 5 * n])
        world = _world_grid(origin)
        hu = rng.normal(-1000, 40, world.shape[:-1])
        blobs = []
        for _ in range(3):  # tissue blobs as bright as faint nodules: hard negatives
            c = _inner_point(rng, origin, 6)
            hu[np.linalg.norm(world - c, axis=-1) <= rng.uniform(2, 4)] = rng.uniform(-300, 250)
            blobs.append(c)
        found = []
        for _ in range(rng.integers(1, 3)):
            c, d = _inner_point(rng, origin, 10), float(rng.uniform(5, 9))
            hu[np.linalg.norm(world - c, axis=-1) <= d / 2] = rng.uniform(-200, 400)
            found.append((c, d))
            nodules.append([uid, *c.round(2), round(d, 2)])
        c_ex = _inner_point(rng, origin, 8)
        hu[np.linalg.norm(world - c_ex, axis=-1) <= 1.5] = 150
        excluded.append([uid, *c_ex.round(2), -1])
        image = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
        image.SetSpacing(SPACING)
        image.SetOrigin(origin.tolist())
        path = out / "scans" / "subset0" / f"{uid}.mhd"
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path))
        if n >= scans - empty:
            continue  # a scan of the set without candidates: its nodules can only be missed
        for c, d in found:  # several candidates per nodule, all inside its radius
            for _ in range(rng.integers(2, 4)):
                offset = rng.normal(size=3)
                offset *= rng.uniform(0, d / 4) / np.linalg.norm(offset)
                candidates.append([uid, *(c + offset).round(2), 1])
        candidates.append([uid, *c_ex.round(2), 0])
        candidates += [[uid, *c.round(2), 0] for c in blobs]
        for _ in range(rng.integers(3, 7)):
            candidates.append([uid, *_inner_point(rng, origin, 4).round(2), 0])
    columns = ["seriesuid", "coordX", "coordY", "coordZ"]
    for name, header, rows in (
        ("candidates.csv", [*columns, "class"], candidates),
        ("annotations.csv", [*columns, "diameter_mm"], nodules),
        ("annotations_excluded.csv", [*columns, "diameter_mm"], excluded),
        ("seriesuids.csv", ["seriesuid"], [[u] for u in uids]),
    ):
        with open(out / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    return {
        "out": str(out),
        "scans": scans,
        "scans_without_candidates": empty,
        "candidates": len(candidates),
        "nodules": len(nodules),
        "excluded": len(excluded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scans", type=int, default=12, help="number of scans (default 12)")
    parser.add_argument("--empty", type=int, default=2, help="scans without candidates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(make_case(Path(args.out), args.scans, args.empty, args.seed)))


if __name__ == "__main__":
    main()
