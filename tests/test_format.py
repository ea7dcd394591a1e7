import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pipeline.data.format import (
    decode_block,
    encode_block,
    expand_shards,
    manifest_counts,
    write_split,
)
from pipeline.errors import DataError


def _samples(path):
    return list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))


def test_shard_round_trip_keeps_every_sample_dtype_and_meta(tmp_path):
    rng = np.random.default_rng(0)
    patch = rng.integers(-1000, 400, (300, 1, 48, 48), dtype=np.int16)
    label = (rng.random(300) < 0.1).astype(np.uint8)
    ids = [f"c{i}" for i in range(300)]
    groups = [f"scan{i % 7}" for i in range(300)]
    infos = write_split(tmp_path, "train", patch, label, ids, groups, num_shards=3, block_size=64)
    assert sum(i.samples for i in infos) == 300
    shards = expand_shards(str(tmp_path / "train-{000000..000002}.tar"))
    seen = {}
    for shard in shards:
        for sample in _samples(shard):
            block = decode_block(sample)
            assert block.patch.dtype == np.int16 and block.patch.shape[1:] == (1, 48, 48)
            for i, sid in enumerate(block.ids):
                seen[sid] = (block.patch[i], block.label[i], block.groups[i])
    assert sorted(seen) == sorted(ids)
    for i in (0, 17, 299):
        stored, lab, grp = seen[f"c{i}"]
        assert np.array_equal(stored, patch[i]) and lab == label[i] and grp == groups[i]
    counts = manifest_counts(shards)
    assert sum(c.positives for c in counts.values()) == int(label.sum())


def test_writer_shuffles_before_blocking(tmp_path):
    patch = np.zeros((512, 1, 4, 4), np.uint8)
    label = np.zeros(512, np.uint8)
    write_split(tmp_path, "train", patch, label, [str(i) for i in range(512)], block_size=64)
    first = decode_block(_samples(tmp_path / "train-000000.tar")[0])
    assert [int(i) for i in first.ids] != list(range(64))


def _tar_with(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_pickled_members_and_object_arrays_are_refused(tmp_path):
    meta = json.dumps({"version": 1, "ids": ["a"]}).encode()
    good_patch, good_label = _npy(np.zeros((1, 1, 4, 4), np.uint8)), _npy(np.zeros(1, np.uint8))
    _tar_with(
        tmp_path / "p.tar",
        {
            "k.patch.npy": good_patch,
            "k.label.npy": good_label,
            "k.meta.json": meta,
            "k.extra.pyd": b"x",
        },
    )
    with pytest.raises(DataError, match="pickle"):
        decode_block(_samples(tmp_path / "p.tar")[0])
    objects = np.array([{"evil": 1}], dtype=object)
    _tar_with(
        tmp_path / "o.tar",
        {"k.patch.npy": _npy(objects), "k.label.npy": good_label, "k.meta.json": meta},
    )
    with pytest.raises(DataError, match="without pickle"):
        decode_block(_samples(tmp_path / "o.tar")[0])


def test_pattern_that_matches_nothing_names_key_and_pattern(tmp_path):
    with pytest.raises(DataError, match=r"data.train: pattern '.*nothing-\*.tar' matches no shard"):
        expand_shards(str(tmp_path / "nothing-*.tar"), "data.train")


def _flip_pixel(record: dict) -> dict:
    patch = bytearray(record["patch.npy"])
    patch[-1] ^= 1
    return {**record, "patch.npy": bytes(patch)}


def test_v2_checksum_catches_a_flipped_pixel_whichever_way_meta_is_read():
    rng = np.random.default_rng(0)
    record = encode_block("k", rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8),
                          np.array([0, 1, 0, 1], np.uint8), list("abcd"))  # fmt: skip
    assert json.loads(record["meta.json"])["version"] == 2
    for meta in (True, False):
        decode_block(record, meta=meta)  # intact: fine
        with pytest.raises(DataError, match="k: checksum mismatch"):
            decode_block(_flip_pixel(record), meta=meta)
    # Another writer's key order: the checksum is found by a full parse instead.
    reordered = json.loads(record["meta.json"])
    reordered = {"ids": reordered["ids"], "crc32": reordered["crc32"], "version": 2}
    other = {**_flip_pixel(record), "meta.json": json.dumps(reordered).encode()}
    with pytest.raises(DataError, match="checksum mismatch"):
        decode_block(other, meta=False)


def test_v1_records_without_a_checksum_are_still_read():
    rng = np.random.default_rng(0)
    record = encode_block("k", rng.integers(0, 256, (2, 1, 8, 8), dtype=np.uint8),
                          np.array([0, 1], np.uint8), ["a", "b"])  # fmt: skip
    v1 = {
        **_flip_pixel(record),
        "meta.json": json.dumps({"version": 1, "ids": ["a", "b"]}).encode(),
    }
    for meta in (True, False):
        assert len(decode_block(v1, meta=meta)) == 2
