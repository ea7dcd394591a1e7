"""`pipeline convert images|volumes` on real files: crops centred, labels right, splits leak-free."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.convert import add_parser
from pipeline.convert.crop import crop_patch
from pipeline.convert.images import convert_images
from pipeline.convert.volumes import convert_volumes
from pipeline.data.format import UNKNOWN_LABEL, decode_block
from pipeline.errors import DataError

S = 16  # patch side used throughout: small keeps each test well under a second of work
C = S // 2


def read_split(out: Path, split: str) -> dict[str, dict]:
    """Every sample of a split, by id: patch, label, group, coords (through webdataset)."""
    samples = {}
    for shard in sorted(out.glob(f"{split}-*.tar")):
        # webdataset's own tar reader and key grouping, on a stream we close ourselves.
        with open(shard, "rb") as stream:
            members = ({**m, "__url__": str(shard)} for m in tar_file_iterator(stream))
            records = list(group_by_keys(members))
        for record in records:
            block = decode_block(record, allow_unknown=True)  # labels are asserted per test
            for k, sample_id in enumerate(block.ids):
                samples[sample_id] = {
                    "patch": block.patch[k],
                    "label": int(block.label[k]),
                    "group": block.groups[k] if block.groups else None,
                    "coords": block.coords[k] if block.coords else None,
                }
    return samples


def read_all(out: Path) -> dict[str, dict]:
    return {**read_split(out, "train"), **read_split(out, "val")}


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def dot_image(height: int, width: int, x: int, y: int, dtype=np.uint8, value=200) -> np.ndarray:
    image = np.full((height, width), 10, dtype=dtype)
    image[y, x] = value
    return image


def save_image(path: Path, image: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, image)
    elif path.suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, image)
    else:
        from PIL import Image

        Image.fromarray(image).save(path)


# ---------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("suffix", "dtype", "value"),
    [
        (".png", np.uint8, 200),
        (".png", np.uint16, 40000),
        (".tif", np.uint16, 50000),
        (".npy", np.int16, -300),
    ],
)
def test_image_crops_are_centred_on_the_dot_and_keep_bit_depth(tmp_path, suffix, dtype, value):
    rows = []
    for i, (x, y) in enumerate([(20, 9), (3, 30), (35, 2)]):
        save_image(tmp_path / f"im{i}{suffix}", dot_image(33, 40, x, y, dtype, value))
        rows.append([f"im{i}{suffix}", x, y, 1])
        rows.append([f"im{i}{suffix}", (x + 9) % 40, (y + 9) % 33, 0])  # a negative elsewhere
    write_csv(tmp_path / "labels.csv", ["path", "x", "y", "label"], rows)

    summary = convert_images(
        csv=tmp_path / "labels.csv",
        out=tmp_path / "out",
        x_col="x",
        y_col="y",
        size=S,
        val_fraction=0,
        workers=1,
    )

    samples = read_split(tmp_path / "out", "train")
    assert summary["splits"]["train"]["samples"] == len(samples) == 6
    for line, row in enumerate(rows, start=2):
        sample = samples[f"row{line}"]
        assert sample["patch"].dtype == dtype and sample["patch"].shape == (1, S, S)
        assert sample["label"] == row[3]
        assert sample["coords"] == [row[1], row[2]] and sample["group"] == row[0]
        centre_is_dot = sample["patch"][0, C, C] == value
        assert centre_is_dot == (row[3] == 1)
        if row[3] == 1:  # and the dot is nowhere else in the patch
            assert (sample["patch"] == value).sum() == 1


def test_rgb_jpeg_gives_three_channels_and_channels_flag_makes_gray(tmp_path):
    from PIL import Image

    image = np.zeros((30, 30, 3), dtype=np.uint8)
    image[12:15, 16:19] = (250, 120, 20)  # a 3x3 block survives JPEG's blur
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    write_csv(tmp_path / "labels.csv", ["path", "x", "y", "label"], [["a.jpg", 17, 13, 1]])

    convert_images(
        csv=tmp_path / "labels.csv",
        out=tmp_path / "rgb",
        x_col="x",
        y_col="y",
        size=S,
        val_fraction=0,
        workers=1,
    )
    convert_images(
        csv=tmp_path / "labels.csv",
        out=tmp_path / "gray",
        x_col="x",
        y_col="y",
        size=S,
        val_fraction=0,
        workers=1,
        channels=1,
    )

    rgb = read_split(tmp_path / "rgb", "train")["row2"]["patch"]
    gray = read_split(tmp_path / "gray", "train")["row2"]["patch"]
    assert rgb.shape == (3, S, S) and gray.shape == (1, S, S)
    assert np.unravel_index(rgb[0].argmax(), (S, S)) == (C, C)
    assert (
        abs(int(gray[0, C, C]) - round(0.299 * 250 + 0.587 * 120 + 0.114 * 20)) <= 6
    )  # JPEG error


def test_border_crops_are_padded_constant_or_reflect(tmp_path):
    image = (np.arange(20)[:, None] * 10 + np.arange(24)[None, :]).astype(np.uint8)
    save_image(tmp_path / "g.png", image)
    write_csv(tmp_path / "labels.csv", ["path", "x", "y", "label"], [["g.png", 0, 19, 1]])

    for pad in ("constant", "reflect"):
        convert_images(
            csv=tmp_path / "labels.csv",
            out=tmp_path / pad,
            x_col="x",
            y_col="y",
            size=S,
            pad=pad,
            pad_value=7,
            val_fraction=0,
            workers=1,
        )
    constant = read_split(tmp_path / "constant", "train")["row2"]["patch"][0]
    reflect = read_split(tmp_path / "reflect", "train")["row2"]["patch"][0]
    # Candidate at row 19, column 0: the patch covers rows 11..26 and columns -8..7.
    assert (constant[C + 1 :, :] == 7).all() and (constant[:, :C] == 7).all()
    np.testing.assert_array_equal(constant[: C + 1, C:], image[11:20, 0:8])
    expected = np.pad(image, S, mode="reflect")[S + 11 : S + 27, S - 8 : S + 8]
    np.testing.assert_array_equal(reflect, expected)


def test_reflect_padding_wider_than_the_image_still_mirrors():
    line = np.arange(3, dtype=np.uint8)[None, None, :].repeat(3, axis=1)  # [1, 3, 3]
    patch = crop_patch(line, (1, 1), 9, pad="reflect")
    np.testing.assert_array_equal(patch[0, 0], np.pad(np.arange(3), 3, mode="reflect"))


def test_whole_images_are_resized_then_centred(tmp_path):
    image = np.full((32, 64), 50, dtype=np.uint8)
    image[12:20, 28:36] = 255  # a block at the centre
    save_image(tmp_path / "wide.png", image)
    write_csv(tmp_path / "labels.csv", ["path", "label"], [["wide.png", 1]])

    convert_images(
        csv=tmp_path / "labels.csv",
        out=tmp_path / "out",
        size=S,
        resize_to=S,
        val_fraction=0,
        workers=1,
    )

    patch = read_split(tmp_path / "out", "train")["row2"]["patch"][0]
    assert patch.shape == (S, S)
    # 64x32 -> 16x8, padded with 0 to 16x16; the centre block, shrunk to 2x2, stays centred.
    assert (patch[:4] == 0).all() and (patch[-4:] == 0).all() and patch[4:12].min() >= 45
    assert patch[7:9, 7:9].min() > 150 and np.unravel_index(patch.argmax(), patch.shape) in {
        (7, 7),
        (7, 8),
        (8, 7),
        (8, 8),
    }


def test_probability_labels_use_threshold_and_uncertain_rows_are_dropped(tmp_path):
    save_image(tmp_path / "a.png", dot_image(20, 20, 5, 5))
    probabilities = [0.95, 0.6, 0.5, 0.1, 0.31, 0.75]
    write_csv(tmp_path / "labels.csv", ["path", "p"], [["a.png", p] for p in probabilities])

    summary = convert_images(
        csv=tmp_path / "labels.csv",
        out=tmp_path / "out",
        label_col="p",
        label_threshold=0.5,
        drop_uncertain=(0.3, 0.7),
        size=S,
        val_fraction=0,
        workers=1,
    )

    labels = {k: s["label"] for k, s in read_split(tmp_path / "out", "train").items()}
    assert labels == {"row2": 1, "row5": 0, "row7": 1}  # 0.6, 0.5, 0.31 are uncertain
    assert summary["dropped"] == {"uncertain label": 3}


def test_groups_never_span_splits_and_split_is_reproducible_by_seed(tmp_path):
    rows = []
    for i in range(24):
        save_image(tmp_path / f"im{i}.png", dot_image(20, 20, 5, 5))
        rows += [
            [f"im{i}.png", f"patient{i // 2}", int(i % 5 == 0)],
            [f"im{i}.png", f"patient{i // 2}", 0],
        ]
    write_csv(tmp_path / "labels.csv", ["path", "patient", "label"], rows)

    def val_groups(seed: int, name: str) -> set[str]:
        convert_images(
            csv=tmp_path / "labels.csv",
            out=tmp_path / name,
            group_col="patient",
            size=S,
            val_fraction=0.25,
            seed=seed,
            workers=1,
        )
        train, val = read_split(tmp_path / name, "train"), read_split(tmp_path / name, "val")
        assert len(train) + len(val) == len(rows)
        assert not {s["group"] for s in train.values()} & {s["group"] for s in val.values()}
        assert any(s["label"] for s in val.values())  # positives go to both sides
        return {s["group"] for s in val.values()}

    first = val_groups(seed=1, name="a")
    assert len(first) == 3  # a quarter of 12 patients
    assert val_groups(seed=1, name="b") == first
    assert any(val_groups(seed=s, name=f"c{s}") != first for s in (2, 3))


def test_missing_column_is_one_line_listing_the_columns_present(tmp_path):
    write_csv(tmp_path / "labels.csv", ["file", "target"], [["a.png", 1]])
    with pytest.raises(DataError) as error:
        convert_images(csv=tmp_path / "labels.csv", out=tmp_path / "out", workers=1)
    assert "'path'" in str(error.value) and "columns present: file, target" in str(error.value)

    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "convert", "images", "--csv", str(tmp_path / "labels.csv"),
         "--out", str(tmp_path / "out"), "--label-col", "target"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"pipeline convert: error: {tmp_path / 'labels.csv'}: no column 'path'; columns present: file, target"
    ]


def bad_rows_csv(tmp_path: Path) -> Path:
    save_image(tmp_path / "ok.png", dot_image(20, 20, 5, 5))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return write_csv(
        tmp_path / "labels.csv",
        ["path", "x", "y", "label"],
        [
            ["ok.png", 5, 5, 1],  # line 2
            ["ok.png", 5, 5, "maybe"],  # line 3: bad label
            ["ok.png", 6, 6, 0],  # line 4
            ["gone.png", 5, 5, 0],  # line 5: missing file
            ["ok.png", 25, 5, 0],  # line 6: outside the image
            ["broken.png", 5, 5, 0],  # line 7: unreadable
        ],
    )


def test_bad_rows_are_skipped_and_reported_with_their_row_numbers(tmp_path, capsys):
    csv_path = bad_rows_csv(tmp_path)
    summary = convert_images(
        csv=csv_path, out=tmp_path / "out", x_col="x", y_col="y", size=S, val_fraction=0, workers=1
    )

    reasons = {p["row"]: p["reason"] for p in summary["problems"]}
    assert reasons == {3: "bad label", 5: "missing file", 6: "outside image", 7: "unreadable image"}
    assert set(read_split(tmp_path / "out", "train")) == {"row2", "row4"}
    printed = capsys.readouterr().out
    assert "row 5: missing file: gone.png not found" in printed and "dropped 4 rows" in printed


def test_a_bad_row_fails_the_run_under_on_error_fail(tmp_path):
    csv_path = bad_rows_csv(tmp_path)
    with pytest.raises(DataError, match=r"labels.csv row 3: bad label"):
        convert_images(
            csv=csv_path,
            out=tmp_path / "out",
            x_col="x",
            y_col="y",
            size=S,
            on_error="fail",
            workers=1,
        )
    (tmp_path / "labels.csv").write_text("path,x,y,label\nok.png,5,5,1\ngone.png,5,5,0\n")
    with pytest.raises(DataError, match=r"row 3: missing file: gone.png"):
        convert_images(
            csv=csv_path,
            out=tmp_path / "out",
            x_col="x",
            y_col="y",
            size=S,
            on_error="fail",
            val_fraction=0,
            overwrite=True,
            workers=1,
        )
    assert (
        not list((tmp_path / "out").glob("*.tar"))
        and not (tmp_path / "out" / ".convert-tmp").exists()
    )


def test_mixed_bit_depths_are_refused_and_existing_output_needs_overwrite(tmp_path):
    save_image(tmp_path / "a.png", dot_image(20, 20, 5, 5, np.uint8))
    save_image(tmp_path / "b.png", dot_image(20, 20, 5, 5, np.uint16, 3000))
    write_csv(tmp_path / "labels.csv", ["path", "label"], [["a.png", 1], ["b.png", 0]])
    with pytest.raises(DataError, match=r"uint8 \[1, 16, 16\] \(1 rows, e.g. row 2\); uint16"):
        convert_images(
            csv=tmp_path / "labels.csv", out=tmp_path / "out", size=S, val_fraction=0, workers=1
        )

    write_csv(tmp_path / "labels.csv", ["path", "label"], [["a.png", 1]])
    convert_images(
        csv=tmp_path / "labels.csv", out=tmp_path / "out", size=S, val_fraction=0, workers=1
    )
    with pytest.raises(DataError, match="--overwrite"):
        convert_images(
            csv=tmp_path / "labels.csv", out=tmp_path / "out", size=S, val_fraction=0, workers=1
        )


def cli(argv: list[str]) -> int:
    """`pipeline convert ...` through the real command-line entry point, in this process."""
    from pipeline.cli import main

    return main(argv)


def test_cli_converts_images_with_worker_processes(tmp_path):
    rows = []
    for i in range(8):
        save_image(tmp_path / f"im{i}.png", dot_image(24, 24, 3 + 2 * i, 20 - 2 * i))
        rows.append([f"im{i}.png", 3 + 2 * i, 20 - 2 * i, i % 2, f"g{i // 2}"])
    write_csv(tmp_path / "labels.csv", ["path", "x", "y", "label", "g"], rows)

    code = cli(
        ["convert", "images", "--csv", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out"),
         "--x-col", "x", "--y-col", "y", "--group-col", "g", "--size", str(S), "--val-fraction", "0.25",
         "--workers", "2", "--shard-size", "2", "--block-size", "1"]
    )  # fmt: skip

    assert code == 0
    train, val = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")
    assert (
        len(train) == 6 and len(val) == 2 and len(list((tmp_path / "out").glob("train-*.tar"))) == 3
    )
    for line, row in enumerate(rows, start=2):
        sample = {**train, **val}[f"row{line}"]
        assert sample["patch"][0, C, C] == 200 and sample["label"] == row[3]


# ---------------------------------------------------------------- volumes

# A non-identity direction: index axes permuted and one flipped (det = -1 is legal in ITK).
PERMUTED_FLIPPED = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
MARKER = np.array([7.0, -6.0, 9.0])  # mm from the nodule: fixes orientation on every axis


IDENTITY = np.eye(3)
SIZE, SPACING, ORIGIN = (40, 36, 24), (0.8, 0.9, 2.0), (-120.5, 33.25, -410.0)


def voxel_to_world(index, direction, spacing, origin) -> np.ndarray:
    return np.asarray(origin) + (np.asarray(index) * np.asarray(spacing)) @ np.asarray(direction).T


def write_scan(
    path: Path, centre_world, direction=IDENTITY, size=SIZE, spacing=SPACING, origin=ORIGIN
) -> None:
    """A .mhd CT scan: -1000 HU air, a 400 HU sphere (r 4 mm) at `centre_world`, a marker beside it."""
    import SimpleITK as sitk

    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    world = voxel_to_world(
        np.stack([i, j, k], axis=-1), direction, spacing, origin
    )  # ITK: o + D (s * idx)
    hu = np.full(world.shape[:-1], -1000, dtype=np.int16)
    hu[np.linalg.norm(world - centre_world, axis=-1) <= 4.0] = 400
    hu[np.linalg.norm(world - (centre_world + MARKER), axis=-1) <= 3.0] = 400
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))  # writes the .mhd header and its .raw beside it


def bright_centroid(patch: np.ndarray, around, radius: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in patch.shape), indexing="ij"), axis=-1)
    near = np.linalg.norm(grid - np.asarray(around), axis=-1) <= radius
    weights = np.where(near, patch.astype(float) - patch.min(), 0.0)
    return (grid * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()


@pytest.mark.parametrize("dtype", ["uint8", "int16"])
def test_volume_crops_are_centred_on_world_positions_under_oblique_geometry(tmp_path, dtype):
    rows = []
    for uid, direction in (
        ("1.2.826.0.1.plain", np.eye(3)),
        ("1.2.826.0.1.oblique", PERMUTED_FLIPPED),
    ):
        middle = voxel_to_world([(n - 1) / 2 for n in SIZE], direction, SPACING, ORIGIN)
        nodule = middle + np.array([-2.3, 1.7, -3.1])  # off the voxel grid on purpose
        write_scan(tmp_path / "scans" / "subset0" / f"{uid}.mhd", nodule, direction)
        rows.append([uid, *nodule.round(3), 1])
        rows.append([uid, *(nodule + [0, 0, -12]).round(3), 0])
    write_csv(
        tmp_path / "candidates.csv", ["seriesuid", "coordX", "coordY", "coordZ", "class"], rows
    )

    convert_volumes(
        candidates=tmp_path / "candidates.csv",
        scans=tmp_path / "scans",
        out=tmp_path / "out",
        size=2 * S,
        dtype=dtype,
        val_fraction=0,
        workers=1,
    )

    samples = read_split(tmp_path / "out", "train")
    for line, row in enumerate(rows, start=2):
        sample = samples[f"row{line}"]
        assert sample["group"] == row[0] and sample["coords"] == pytest.approx(row[1:4])
        patch = sample["patch"][0]
        assert patch.dtype == dtype and patch.shape == (2 * S,) * 3
        if row[4] == 1:
            # Patch axes are (z, y, x) in world orientation: the marker sits at +9, -6, +7 voxels.
            np.testing.assert_allclose(bright_centroid(patch, (S, S, S), 5), (S, S, S), atol=1.0)
            np.testing.assert_allclose(
                bright_centroid(patch, S + MARKER[::-1], 4), S + MARKER[::-1], atol=1.0
            )
            assert patch.max() == (255 if dtype == "uint8" else 400)
        else:
            assert patch[S, S, S] == patch.min() == (0 if dtype == "uint8" else -1000)


def test_volume_split_is_leak_free_by_seriesuid_across_folds(tmp_path):
    rows = []
    for n in range(6):
        uid = f"1.3.6.1.4.{n}"
        nodule = np.array([10.0 + n, -20.0, 30.0])
        write_scan(tmp_path / "scans" / f"subset{n % 2}" / f"{uid}.mhd", nodule, size=(16, 16, 8), spacing=(1.5, 1.5, 3.0),
                   origin=tuple(nodule - [12, 12, 12]))  # fmt: skip
        rows += [[uid, *nodule, 1], [uid, *(nodule + 5), 0], [uid, *(nodule - 5), 0]]
    rows.append(["1.3.6.1.4.absent", 0, 0, 0, 0])  # line 20: no such scan
    rows.append(["1.3.6.1.4.0", 500, 0, 0, 0])  # line 21: far outside its scan
    write_csv(
        tmp_path / "candidates.csv", ["seriesuid", "coordX", "coordY", "coordZ", "class"], rows
    )

    val_sets = []
    for fold in range(3):
        out = tmp_path / f"fold{fold}"
        assert cli(
            ["convert", "volumes", "--candidates", str(tmp_path / "candidates.csv"), "--scans", str(tmp_path / "scans"),
             "--out", str(out), "--size", "8", "--window=-1000,400", "--folds", "3", "--val-fold", str(fold),
             "--workers", "2" if fold == 0 else "1"]
        ) == 0  # fmt: skip
        train, val = read_split(out, "train"), read_split(out, "val")
        assert len(train) + len(val) == 18
        assert not {s["group"] for s in train.values()} & {s["group"] for s in val.values()}
        val_sets.append({s["group"] for s in val.values()})
        report = (out / "convert_report.json").read_text()
        assert '"row": 20' in report and '"missing scan"' in report and '"outside scan"' in report
    assert all(len(v) == 2 for v in val_sets) and set.union(*val_sets) == {
        f"1.3.6.1.4.{n}" for n in range(6)
    }


def test_unlabelled_candidates_go_to_predict_shards_with_unknown_labels(tmp_path, capsys):
    nodule = np.array([4.0, -20.0, 30.0])
    for n in range(2):
        write_scan(tmp_path / "scans" / f"1.2.{n}.mhd", nodule, size=(16, 16, 8), spacing=(1.5, 1.5, 3.0),
                   origin=tuple(nodule - [12, 12, 12]))  # fmt: skip
    # A detector's output on new scans: no class column at all.
    rows = [
        [f"1.2.{n}", *(nodule + shift), f"c{n}{k}"]
        for n in range(2)
        for k, shift in enumerate((0, 4, -4))
    ]
    table = write_csv(tmp_path / "new.csv", ["seriesuid", "coordX", "coordY", "coordZ", "cid"], rows)  # fmt: skip
    base = ["convert", "volumes", "--candidates", str(table), "--scans", str(tmp_path / "scans"),
            "--size", "8", "--window=-1000,400", "--id-col", "cid", "--workers", "1"]  # fmt: skip
    out = tmp_path / "out"

    assert cli([*base, "--out", str(out), "--unlabelled"]) == 0
    assert "6 samples  unlabelled (score them with pipeline predict)" in capsys.readouterr().out
    assert not list(out.glob("train-*")) and not list(out.glob("val-*"))
    samples = read_split(out, "predict")
    assert sorted(samples) == sorted(r[-1] for r in rows)
    assert {s["label"] for s in samples.values()} == {UNKNOWN_LABEL}
    assert samples["c10"]["group"] == "1.2.1" and samples["c10"]["coords"] == list(nodule)
    assert samples["c10"]["patch"][0, 4, 4, 4] == 255  # the bright sphere, centred
    manifest = json.loads((out / "manifest.json").read_text())["splits"]
    assert list(manifest) == ["predict"] and manifest["predict"]["samples"] == 6
    from pipeline.convert import store
    from pipeline.data import format as shard_format

    assert store.PREDICT_SPLIT == shard_format.PREDICT_SPLIT  # spelled twice (import cost)
    assert manifest["predict"]["positives"] == 0

    # check-shards counts them as unlabelled, not as problems or positives.
    from pipeline.check_shards import check_shards, format_table

    (report,) = check_shards([str(p) for p in out.glob("predict-*.tar")])
    assert (report.samples, report.positives, report.unlabelled, report.problems) == (6, 0, 6, [])
    assert "6 unlabelled samples (label 255)" in format_table([report])
    # The same records under a training shard's name are what training would skip: flagged,
    # unless the caller says the shards are meant for predict.
    elsewhere = tmp_path / "elsewhere" / "train-000000.tar"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(next(out.glob("predict-*.tar")).read_bytes())
    (flagged,) = check_shards([str(elsewhere)])
    assert flagged.unlabelled == 0 and "255 = unknown is only for" in flagged.problems[0]
    (admitted,) = check_shards([str(elsewhere)], unlabelled=True)
    assert (admitted.samples, admitted.unlabelled, admitted.problems) == (6, 6, [])

    # Label and split flags make no sense without labels: one line each, exit 2, nothing written.
    for extra, words in (
        (["--label-col", "cid"], "--label-col and --unlabelled contradict"),
        (["--folds", "2", "--val-fold", "0"], "--folds does not apply to --unlabelled"),
        (["--val-fraction", "0.3"], "--val-fraction does not apply to --unlabelled"),
        (["--label-threshold", "0.5"], "--label-threshold does not apply to --unlabelled"),
        (["--drop-uncertain", "0.2,0.8"], "--drop-uncertain does not apply to --unlabelled"),
    ):
        assert cli([*base, "--out", str(tmp_path / "refused"), "--unlabelled", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err and "Traceback" not in err, err
    # Without --unlabelled the missing class column is the usual one-line error.
    assert cli([*base, "--out", str(tmp_path / "labelled")]) == 2
    assert "no column 'class'; columns present: seriesuid" in capsys.readouterr().err


def test_window_flag_accepts_both_spellings():
    from pipeline.convert import _window

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    base = ["convert", "volumes", "--candidates", "c.csv", "--scans", "s", "--out", "o"]
    assert _window(parser.parse_args([*base, "--window=-1000,400"]).window) == (-1000.0, 400.0)
    assert _window(parser.parse_args([*base, "--window", "-160", "240"]).window) == (-160.0, 240.0)


def test_auto_shard_count_feeds_many_ranks_but_caps_shard_bytes():
    from pipeline.convert.store import shard_count

    assert shard_count(16000, (1, 48, 48), "uint8", None, 256) == 62  # one block each, at least
    assert shard_count(100, (1, 48, 48), "uint8", None, 256) == 1
    assert shard_count(754_000, (1, 48, 48, 48), "uint8", None, 256) == 622  # <= 128 MiB each
    assert shard_count(1000, (1, 48, 48), "uint8", 300, 256) == 4


def test_documented_commands_parse():
    from pipeline.cli import build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    docs = readme.split("## Bring your own data", 1)[1].split("\n## ", 1)[0]
    commands = [
        line
        for block in docs.split("```\n")
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("pipeline ")
    ]
    assert sum(c.startswith("pipeline convert") for c in commands) == 3
    for command in commands:
        args = build_parser().parse_args(command.split()[1:])
        assert callable(args.func)


def test_missing_reader_package_names_the_extra(tmp_path, monkeypatch):
    from pipeline.errors import ConfigError

    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'pipeline\[convert\]'"):
        convert_volumes(candidates=tmp_path / "c.csv", scans=tmp_path, out=tmp_path / "out")
