"""Shards of unequal size (published sets): every shard keeps shard_size rows in the cache, the smaller ones padded
(pipeline.cache.layout); the manifest maps a global index to its shard by the shards' first indices."""

import json
import shutil

import numpy as np
import pytest
import zarr

from pipeline.cache.integrity import check_store
from pipeline.cache.layout import num_rows
from pipeline.cache.store import CacheStore
from pipeline.data.shards import MANIFEST, load_manifest
from pipeline.errors import ShardError

COUNTS, SIZE = [5, 8, 3, 7], 8  # rows 0-4, 8-15, 16-18, 24-30


def _store(path, counts=COUNTS, size=SIZE, seeds=2):
    return CacheStore.create(path, provenance={"topk": 3, "N": sum(counts), "num_seeds": seeds}, num_seeds=seeds,
                             shard_counts=counts, shard_size=size, num_classes=10, topk=3)


def _unit(s, k, n):
    rng = np.random.default_rng([s, k])
    return rng.normal(0, 3, (n, 10)).astype(np.float32), rng.integers(1, 2**32, n, dtype=np.uint32)


def test_uneven_units_round_trip_and_padding_stays_empty(tmp_path):
    store = _store(tmp_path / "c.zarr")
    assert store.num_samples == 23 and num_rows(store.layout) == 31
    assert [store.unit_rows(k) for k in range(4)] == [slice(0, 5), slice(8, 16), slice(16, 19), slice(24, 31)]
    for s in range(2):
        for k, n in enumerate(COUNTS):
            store.write_unit(s, k, *_unit(s, k, n))
    again = CacheStore.open(store.path)
    for s in range(2):
        for k, n in enumerate(COUNTS):
            logits, digest = _unit(s, k, n)
            got = again.read_unit(s, k)
            assert (got["digest"] == digest).all() and (got["argmax"] == logits.argmax(1)).all()
    report = check_store(again)
    assert report["ok"] and report["units_checked"] == 8, report
    plain = zarr.open_group(str(store.path), mode="r")  # padding rows: never written, the fill value
    pad = np.r_[5:8, 19:24]
    assert plain["digest"].shape == (2, 31) and (plain["digest"][:, pad] == 0).all()
    assert (plain["argmax"][:, pad] == -1).all() and np.isnan(plain["logsumexp"][:, pad]).all()


def test_layout_refuses_a_shard_larger_than_shard_size(tmp_path):
    with pytest.raises(ValueError, match=r"shard 2 has 9"):
        _store(tmp_path / "c.zarr", counts=[5, 8, 9])
    assert not (tmp_path / "c.zarr").exists()


def _published_manifest(tmp_path, toy_shards, counts):
    """toy_shards' manifest recast as a published set of the given shard counts (the checks read only its JSON)."""
    d = json.loads((toy_shards.train.split_dir / MANIFEST).read_text())
    firsts = np.cumsum([0] + counts[:-1]).tolist()
    d["shards"] = [{**d["shards"][k % len(d["shards"])], "first": f, "count": c, "name": f"pub-{k}.tar"}
                   for k, (f, c) in enumerate(zip(firsts, counts))]
    d.update(N=sum(counts), shard_size=max(counts), source={"kind": "published", "name": "pub"})
    out = tmp_path / "pub"
    out.mkdir()
    return out, d


def test_manifest_maps_indices_to_uneven_shards(tmp_path, toy_shards):
    from pipeline.data.shards import fingerprint_of

    out, d = _published_manifest(tmp_path, toy_shards, COUNTS)
    d["fingerprint"] = fingerprint_of((s["sha256"] for s in d["shards"]), d["N"], d["num_classes"], d["class_names"])
    (out / MANIFEST).write_text(json.dumps(d))
    m = load_manifest(out)
    expect = [k for k, n in enumerate(COUNTS) for _ in range(n)]
    assert [m.shard_of(i) for i in range(23)] == expect
    assert m.shards_of(np.arange(23)).tolist() == expect
    with pytest.raises(IndexError):
        m.shard_of(23)


@pytest.mark.parametrize("case,want", [
    ("gap", "shard 2 (pub-2.tar) covers first=14 count=3, expected first=13"),
    ("too_big", "shard 1 (pub-1.tar) covers first=5 count=9, expected first=5 and a count in [1, shard_size=8]"),
    ("sum", "the shards hold 23 samples, N=24"),
    ("own_uneven", "shard 1 (pub-1.tar) covers first=8 count=5, expected first=8 and count=8")])
def test_manifest_refuses_shards_that_do_not_tile_the_split(tmp_path, toy_shards, case, want):
    """Published shards may differ in size but must tile 0..N-1 in order; our own keep shard_size each."""
    out, d = _published_manifest(tmp_path, toy_shards, [8, 5, 8, 8] if case == "own_uneven" else COUNTS)
    if case == "gap":
        d["shards"][2]["first"] += 1
    elif case == "too_big":
        d["shards"][1]["count"] = 9
    elif case == "sum":
        d["N"] = 24
    else:
        d["source"] = {"kind": "folder", "name": "pub"}
    (out / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(ShardError, match="invalid manifest") as e:
        load_manifest(out)
    assert want in str(e.value), str(e.value)
    shutil.rmtree(out)
