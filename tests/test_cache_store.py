"""The Zarr v3 teacher-target store (pipeline.cache): layout, round trip, resume, concurrency, size."""

import json
import multiprocessing as mp
import os

import numpy as np
import pytest

from bench.bench_storage import synthetic_logits  # a trained teacher's logit shape (10 / 1000 classes)
from pipeline.cache.provenance import library_versions
from pipeline.cache.store import CacheStore
from pipeline.cache.targets import soft_probs
from pipeline.errors import CacheError, ProvenanceMismatch

VERSIONS = {"torch": "2.14.1", "torchvision": "0.29.1", "timm": "1.0.20", "pillow": "11.0.0", "numpy": "2.4.0",
            "zarr": "3.1.6"}


def provenance(**over):
    p = {
        "teacher": {"name": "regnety_toy", "weights_sha256": "ab" * 32, "num_classes": 10, "resolution": (32, 32)},
        "data_fingerprint": "f" * 16, "N": 250,
        "augment": {"rand_n": 2, "rand_m": 9, "mean": (0.5, 0.5, 0.5)}, "augment_hash": "a1b2c3",
        "run_seed": 0, "num_seeds": 2, "topk": 5, "versions": dict(VERSIONS), "project_version": "0.1.0",
    }
    p.update(over)
    return p


LAYOUT = dict(num_seeds=2, shard_counts=[100, 100, 50], shard_size=100, num_classes=10, topk=5)


def make(path, prov=None, **over):
    kw = {**LAYOUT, **over}
    return CacheStore.create(path, provenance=prov or provenance(num_seeds=kw["num_seeds"], topk=kw["topk"],
                                                                   N=sum(kw["shard_counts"])), **kw)


def unit_data(s, k, count, classes=10, seed=0):
    rng = np.random.default_rng([seed, s, k])
    logits = rng.normal(0, 3, (count, classes)).astype(np.float32)
    digest = rng.integers(0, 2**32, count, dtype=np.uint32)
    return logits, digest


def test_round_trip_exact_targets(tmp_path):
    store = make(tmp_path / "c.zarr")
    assert store.num_shards == 3 and store.unit_rows(2) == slice(200, 250)
    assert store.pending_units() == [(s, k) for s in range(2) for k in range(3)]
    written = {}
    for s, k in [(0, 0), (0, 2), (1, 1)]:
        written[s, k] = unit_data(s, k, store.shard_counts[k])
        store.write_unit(s, k, *written[s, k])
    assert store.pending_units() == [(0, 1), (1, 0), (1, 2)]

    r = CacheStore.open(tmp_path / "c.zarr")
    for (s, k), (x, dig) in written.items():
        got = r.read_unit(s, k)
        assert set(got) == {"topk_values", "topk_indices", "logsumexp", "argmax", "digest"}
        assert got["topk_values"].dtype == np.float16 and got["topk_indices"].dtype == np.int16
        assert got["argmax"].shape == (len(x),)
        np.testing.assert_array_equal(got["argmax"], x.argmax(1))
        np.testing.assert_array_equal(got["digest"], dig)
        order = np.argsort(-x, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(got["topk_indices"], order)
        true_top = np.take_along_axis(x, order, 1)
        np.testing.assert_array_equal(got["topk_values"], true_top.astype(np.float16))  # exactly fp16-rounded
        assert (np.diff(got["topk_values"].astype(np.float32), axis=1) <= 0).all()  # descending
        lse = np.log(np.exp(x.astype(np.float64)).sum(1))
        np.testing.assert_allclose(got["logsumexp"], lse, rtol=1e-5)
        p = soft_probs(got["topk_values"], got["logsumexp"])
        full = np.exp(x - lse[:, None])
        # equal to the full softmax on those classes up to fp16 rounding of the logit (half an ulp: |v| 2^-11)
        bound = np.expm1(np.abs(true_top) * 2.0**-11) + 1e-6
        assert (np.abs(p / np.take_along_axis(full, order, 1) - 1) <= bound).all()
        assert (p.sum(1) <= 1 + bound.max()).all() and (p.sum(1) <= full.sum(1) * (1 + bound.max())).all()
    with pytest.raises(CacheError, match="not done"):
        r.read_unit(1, 2)
    assert np.isnan(r.read_unit(1, 2, require_done=False)["logsumexp"]).all()  # sentinel fill
    with pytest.raises(CacheError, match="read-only"):
        r.write_unit(1, 2, *unit_data(1, 2, 50))
    # selected fields, rewrite of a done unit, shape validation
    assert set(r.read_unit(0, 2, fields=["argmax"])) == {"argmax"}
    with pytest.raises(KeyError, match="logits"):
        r.read_unit(0, 2, fields=["logits"])
    with pytest.raises(ValueError, match=r"\(50, 10\)"):
        store.write_unit(1, 2, np.zeros((100, 10), np.float32), np.zeros(100, np.uint32))
    with pytest.raises(ValueError, match="digests"):
        store.write_unit(1, 2, np.zeros((50, 10), np.float32), np.zeros(49, np.uint32))
    with pytest.raises(IndexError):
        store.write_unit(2, 0, *unit_data(2, 0, 100))
    with pytest.raises(ValueError, match="non-finite"):
        store.write_unit(1, 2, np.full((50, 10), np.nan, np.float32), np.zeros(50, np.uint32))
    assert not store.is_done(1, 2)


def test_all_zero_argmax_unit_is_stored(tmp_path):
    store = make(tmp_path / "c.zarr")
    x = np.zeros((100, 10), np.float32)
    x[:, 0] = 5.0  # argmax all 0, class ids 0..4
    store.write_unit(0, 1, x, np.zeros(100, np.uint32))  # digests all 0 == fill value: still written
    got = CacheStore.open(store.path).read_unit(0, 1)
    assert (got["argmax"] == 0).all() and (got["digest"] == 0).all() and (got["topk_indices"][:, 0] == 0).all()
    np.testing.assert_array_equal(got["topk_indices"][0], [0, 1, 2, 3, 4])  # ties: class id ascending
    for name in ("argmax", "digest", "topk_indices"):
        assert store.unit_file(name, 0, 1).is_file()


def test_resume_mismatch_and_overwrite(tmp_path):
    path = tmp_path / "c.zarr"
    store = make(path)
    x, d = unit_data(0, 1, 100)
    store.write_unit(0, 1, x, d)
    before = sorted((str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*") if p.is_file())

    # same provenance after a JSON round trip (tuples vs lists): resume keeps the data
    again = make(path, prov=json.loads(json.dumps(provenance())))
    assert again.pending_units() == [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)]
    np.testing.assert_array_equal(again.read_unit(0, 1)["digest"], d)

    for over, field, a, b in [({"augment_hash": "zzz"}, "augment_hash", "a1b2c3", "zzz"),
                              ({"run_seed": 7}, "run_seed", "0", "7"),
                              ({"augment": {"rand_n": 2, "rand_m": 10, "mean": [0.5] * 3}}, "augment.rand_m", "9",
                               "10")]:
        with pytest.raises(ProvenanceMismatch) as e:
            make(path, prov=provenance(**over))
        msg = str(e.value)
        assert f"'{field}'" in msg and f"store has {a}," in msg and f"config has {b}" in msg and str(path) in msg
        assert e.value.field == field
    with pytest.raises(ProvenanceMismatch, match="'shard_counts'"):
        make(path, shard_counts=[100, 100, 49], prov=provenance(N=249))
    with pytest.raises(ProvenanceMismatch, match="'versions.timm'"):
        make(path, prov=provenance(versions={**VERSIONS, "timm": "1.0.99"}))
    make(path, prov=provenance(versions={**VERSIONS, "timm": "1.0.99"}), ignore_fields=("versions.timm",))
    after = sorted((str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*") if p.is_file())
    assert after == before  # nothing touched

    fresh = make(path, prov=provenance(run_seed=7), overwrite=True)
    assert fresh.provenance["run_seed"] == 7 and len(fresh.pending_units()) == 6
    # overwrite never removes a directory that is not a cache store
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(CacheError, match="notastore"):
        make(other, overwrite=True)
    assert (other / "keep.txt").exists()


def _writer(path, units):
    store = CacheStore.open(path, "r+")
    for s, k in units:
        store.write_unit(s, k, *unit_data(s, k, store.shard_counts[k]))


@pytest.mark.slow
def test_two_processes_write_disjoint_shards(tmp_path):
    """Two writers, each owning whole shards as stage one's ranks do (a shard's seeds share its files)."""
    from pipeline.cache.layout import column_owner

    path = str(tmp_path / "c.zarr")
    store = make(path)
    units = [(s, k) for s in range(2) for k in range(3)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, [u for u in units if column_owner(u[1], 2) == r]))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert store.pending_units() == []
    for s, k in units:
        x, d = unit_data(s, k, store.shard_counts[k])
        got = store.read_unit(s, k)
        np.testing.assert_array_equal(got["digest"], d)
        np.testing.assert_array_equal(got["argmax"], x.argmax(1))


def test_hard_only_and_logits(tmp_path):
    hard = make(tmp_path / "h.zarr", topk=0, prov=provenance(topk=0))
    assert hard.fields == ("argmax", "digest")
    x, d = unit_data(1, 2, 50)
    hard.write_unit(1, 2, x, d)
    got = CacheStore.open(hard.path).read_unit(1, 2)
    assert set(got) == {"argmax", "digest"}
    np.testing.assert_array_equal(got["argmax"], x.argmax(1))
    assert not (hard.path / "topk_values").exists()

    full = make(tmp_path / "l.zarr", topk=10, store_logits=True, prov=provenance(topk=10))
    full.write_unit(0, 0, *unit_data(0, 0, 100))
    x, _ = unit_data(0, 0, 100)
    got = full.read_unit(0, 0, fields=["logits", "topk_values", "topk_indices", "logsumexp"])
    np.testing.assert_array_equal(got["logits"], x.astype(np.float16))
    assert (np.sort(got["topk_indices"], axis=1) == np.arange(10)).all()
    p = soft_probs(got["topk_values"], got["logsumexp"])  # K == C: a full distribution
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=3e-3)
    assert "logits" not in full.read_unit(0, 0)  # not a default field


def test_open_and_create_errors(tmp_path):
    with pytest.raises(CacheError, match="missing.zarr"):
        CacheStore.open(tmp_path / "missing.zarr")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x").write_text("1")
    with pytest.raises(CacheError, match="plain"):
        CacheStore.open(plain)
    import zarr
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")  # a Zarr group, but not a cache store
    with pytest.raises(CacheError, match="g.zarr.*not a teacher cache"):
        CacheStore.open(tmp_path / "g.zarr")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CacheError, match="afile/c.zarr"):
        make(afile / "c.zarr")  # parent is a regular file: unwritable even for root
    with pytest.raises(CacheError, match="afile"):
        make(afile)  # exists and is a file
    with pytest.raises(ValueError, match="shard_counts .* shard 1 has 150"):
        make(tmp_path / "bad.zarr", shard_counts=[100, 150, 100])  # a shard over shard_size
    with pytest.raises(ValueError, match="contradicts"):
        make(tmp_path / "bad.zarr", prov=provenance(topk=3))
    assert not (tmp_path / "bad.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no stray temp dirs


def test_check_compatible_and_pickle(tmp_path):
    import pickle
    store = make(tmp_path / "c.zarr")
    want = {"data_fingerprint": "f" * 16, "augment_hash": "a1b2c3", "run_seed": 0, "num_classes": 10,
            "versions": dict(VERSIONS)}
    assert store.check_compatible(want) == []
    with pytest.raises(ProvenanceMismatch, match="'run_seed' differs: store has 0, config has 3"):
        store.check_compatible({**want, "run_seed": 3})
    with pytest.raises(ProvenanceMismatch, match="'num_classes' differs: store has 10, config has 100"):
        store.check_compatible({**want, "num_classes": 100})
    with pytest.raises(ProvenanceMismatch, match="'data_fingerprint'"):
        store.check_compatible({**want, "data_fingerprint": "0" * 16})
    warns = store.check_compatible({**want, "versions": {**VERSIONS, "pillow": "12.0.0", "torch": "2.15.0"}})
    assert len(warns) == 2 and all("pipeline.verify_cache" in w for w in warns)
    assert "pillow" in " ".join(warns) and "11.0.0" in " ".join(warns) and "12.0.0" in " ".join(warns)
    assert set(library_versions()) == set(VERSIONS)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.provenance == store.provenance and clone.mode == store.mode


@pytest.mark.parametrize("classes", [10, 1000])
def test_bytes_per_view_goals(tmp_path, classes):
    """Measured on disk: <= 40 B/view for K=10 soft, <= 8 B/view hard-only (shard_size 1000)."""
    rng = np.random.default_rng(classes)
    shards = 2
    logits = [synthetic_logits(rng, 1000, classes) for _ in range(shards)]
    digests = [rng.integers(0, 2**32, 1000, dtype=np.uint32) for _ in range(shards)]
    res = {}
    for topk in (10, 0):
        prov = provenance(topk=topk, num_seeds=1, N=1000 * shards,
                          teacher={"name": "t", "weights_sha256": "0", "num_classes": classes, "resolution": 224})
        store = CacheStore.create(tmp_path / f"k{topk}.zarr", provenance=prov, num_seeds=1,
                                  shard_counts=[1000] * shards, shard_size=1000, num_classes=classes, topk=topk)
        for k in range(shards):
            store.write_unit(0, k, logits[k], digests[k])
        res[topk] = store.bytes_per_view()
        assert res[topk]["digest"] == pytest.approx(4.0, abs=0.03)  # raw, plus its file's chunk index (20 B)
        assert res[topk]["total"] == pytest.approx(sum(v for n, v in res[topk].items() if n != "total"))
    print(classes, {k: {n: round(v, 2) for n, v in r.items()} for k, r in res.items()})
    assert res[10]["total"] <= 40
    assert res[0]["total"] <= 8
    assert os.path.getsize(store.path / "zarr.json") > 0


def test_compute_targets_tie_order():
    """Ties (common with bf16 teacher logits) break by class id ascending, also at the K-th place."""
    from pipeline.cache.targets import stored_arrays
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(0, 2, (200, 50)) * 2) / 2  # coarse grid: many ties
    for k in (1, 5, 50):
        t = stored_arrays(x.astype(np.float32), k, np.dtype(np.int16))
        ref = np.lexsort((np.broadcast_to(np.arange(50), x.shape), -x), axis=1)[:, :k]
        np.testing.assert_array_equal(t["topk_indices"], ref)
        np.testing.assert_array_equal(t["topk_indices"][:, 0], t["argmax"])


def test_a_store_of_another_contract_version_is_refused(tmp_path):
    """A store built under another replay contract holds targets of other views: opening it names both versions."""
    from pipeline.replay.contract import CONTRACT_VERSION

    store = CacheStore.create(tmp_path / "c.zarr", provenance={"contract_version": CONTRACT_VERSION + 1},
                              num_seeds=1, shard_counts=[4], shard_size=4, num_classes=3, topk=2)
    with pytest.raises(CacheError, match=f"version {CONTRACT_VERSION + 1}.*version {CONTRACT_VERSION}"):
        CacheStore.open(store.path)
    # overwrite=true may still replace it (it is a cache store)
    CacheStore.create(tmp_path / "c.zarr", provenance={"contract_version": CONTRACT_VERSION}, num_seeds=1,
                      shard_counts=[4], shard_size=4, num_classes=3, topk=2, overwrite=True)
    assert CacheStore.open(store.path).provenance["contract_version"] == CONTRACT_VERSION


def test_cache_and_online_targets_agree_with_ties(tmp_path):
    """The cache writer and the online teacher use one top-K function: tied logits (common in bf16) give the same
    argmax, indices, values and logsumexp on both paths, through a real store."""
    import torch

    from pipeline.cache.targets import teacher_targets

    rng = np.random.default_rng(5)
    logits = (np.round(rng.normal(0, 2, (64, 12)) * 2) / 2).astype(np.float32)  # coarse grid: many ties
    logits[:, 3] = logits[:, 7] = logits.max(axis=1) + 1  # a tie at the top in every row
    for k in (1, 4, 12):
        store = CacheStore.create(tmp_path / f"t{k}.zarr", provenance={}, num_seeds=1, shard_counts=[64],
                                  shard_size=64, num_classes=12, topk=k)
        store.write_unit(0, 0, logits, np.arange(64, dtype=np.uint32))
        got = store.read_unit(0, 0)
        online = teacher_targets(torch.from_numpy(logits), k)
        np.testing.assert_array_equal(got["argmax"], online.argmax.numpy())
        np.testing.assert_array_equal(got["argmax"], 3)  # the lower class id of the tie
        np.testing.assert_array_equal(got["topk_indices"], online.topk_indices.numpy())
        np.testing.assert_array_equal(got["topk_values"], online.topk_values.numpy())
        np.testing.assert_array_equal(got["logsumexp"], online.logsumexp.numpy())


def test_units_are_packed_per_shard_and_plain_zarr_reads_them_bit_identically(tmp_path):
    """Format 4: the chunks of 8 seed indices of a shard share one file per per-view array, the markers and records
    of all seed indices of a shard one file each; zarr-python alone (no pipeline code) reads every array as
    read_unit does, byte for byte."""
    import zarr

    S, counts = 16, [40, 40, 25]
    store = make(tmp_path / "c.zarr", num_seeds=S, shard_counts=counts, shard_size=40)
    for s in range(S):
        for k, n in enumerate(counts):
            store.write_unit(s, k, *unit_data(s, k, n))
    files = [p for p in store.path.rglob("*") if p.is_file() and p.name != "zarr.json"]
    units = S * len(counts)
    per_shard_file = len(store.fields) * (S // 8) + 2  # per-view arrays: 2 files of 8 seed indices; done; checksums
    assert len(files) == per_shard_file * len(counts) and len(files) / units == 0.75
    assert {p.relative_to(store.path).parts[0] for p in files} == set(store.fields) | {"done", "checksums"}
    group = zarr.open_group(str(store.path), mode="r")
    assert np.asarray(group["done"][...]).all()
    for s in range(S):
        for k in range(len(counts)):
            got, rows = store.read_unit(s, k, store.fields), store.unit_rows(k)
            for name in store.fields:
                plain = np.asarray(group[name][s, rows])
                assert plain.dtype == got[name].dtype and plain.tobytes() == got[name].tobytes(), (name, s, k)
