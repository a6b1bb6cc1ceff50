"""What a resume re-checks (pipeline.cache.integrity.repair), on disk and on a real S3 server (moto): by default
every committed unit's checksum record, its tag and its files, and the bytes of a sample; cache.resume_check=full
every committed unit's bytes. Units whose record is gone, whose record belongs to another unit (a unit copied over
another) or whose file is gone are recomputed either way; damage inside a unit's bytes is found by the sample only
when drawn (then by the reader's checksums, verify_cache, or a full resume)."""

import numpy as np
import pytest

from cache_files import chunk, flip_chunk_byte, put_chunk
from pipeline import storage
from pipeline.cache import integrity
from pipeline.cache.store import CacheStore

SEEDS, SHARDS, N = 10, 6, 5  # 60 units; a per-view file packs seeds 0-7 or 8-9 of a shard


def create(path, **kw) -> CacheStore:
    return CacheStore.create(path, provenance={"topk": 3}, num_seeds=SEEDS, shard_counts=[N] * SHARDS, shard_size=N,
                             num_classes=10, topk=3, **kw)


def filled(path, seed: int):
    """A store with every unit committed (random targets)."""
    store = create(path)
    rng = np.random.default_rng(seed)
    for s in range(SEEDS):
        for k in range(SHARDS):
            store.write_unit(s, k, rng.normal(0, 3, (N, 10)).astype(np.float32),
                             rng.integers(0, 2**32, N, dtype=np.uint32))
    return store


def remove(path) -> None:
    if isinstance(path, storage.ObjectPath):
        import obstore

        obstore.delete(path.store, path.key)
    else:
        path.unlink()


def resume(path, caplog, **kw) -> tuple[list, str]:
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        store = create(path, **kw)
    pending = store.pending_units()
    store.release_lease()
    return pending, caplog.text


@pytest.fixture(params=["disk", "s3"])
def where(request, tmp_path):
    if request.param == "disk":
        return tmp_path / "c.zarr"
    pytest.importorskip("moto.server")
    return f"{request.getfixturevalue('s3')}/resume/{tmp_path.name}.zarr"


def test_resume_checks_every_record_and_file_and_a_sample_of_bytes(where, caplog, monkeypatch):
    store = filled(where, seed=0)
    store._arrays["checksums"][2, 1] = 0                            # its record gone
    for name in store.fields:                                       # unit (4, 2) copied over unit (4, 3)
        put_chunk(store, name, 4, 3, chunk(store, name, 4, 2))
    store._arrays["checksums"][4, 3] = store._arrays["checksums"][4, 2]
    remove(store.unit_file("topk_indices", 8, 5))                   # the file of units (8, 5) and (9, 5)
    flip_chunk_byte(store, "logsumexp", 0, 0)                       # bytes only: the record and file intact
    store.release_lease()
    by_metadata = [(2, 1), (4, 3), (8, 5), (9, 5)]

    monkeypatch.setattr(integrity, "RESUME_SAMPLE", 0)  # no unit's bytes drawn: what the metadata alone finds
    pending, log = resume(where, caplog)
    assert pending == by_metadata, log
    assert f"{where}: 60 committed unit(s) checked: the checksum records and files of each, the bytes of 4" in log
    assert (f"{where}: unit (seed 4, shard 3) is damaged (field 'checksums': the record belongs to unit (seed 4, "
            f"shard 2)") in log
    assert f"{where}: unit (seed 2, shard 1) is damaged (field 'checksums': no checksum record" in log
    assert f"{where}: unit (seed 8, shard 5) is damaged (field 'topk_indices': chunk file missing" in log
    assert "(seed 0, shard 0)" not in log

    pending, log = resume(where, caplog, resume_check="full")  # every committed unit's bytes
    assert pending == [(0, 0)] + by_metadata, log
    assert f"{where}: 56 committed unit(s) checked: the bytes of each" in log
    assert f"{where}: unit (seed 0, shard 0) is damaged (field 'logsumexp': chunk fails its crc32c" in log


def test_the_default_sample_covers_a_small_store(where, caplog):
    """Fewer committed units than the sample: every unit's bytes are checked, as the full check does."""
    store = filled(where, seed=1)
    flip_chunk_byte(store, "argmax", 9, 4)
    store.release_lease()
    assert integrity.RESUME_SAMPLE >= SEEDS * SHARDS
    pending, log = resume(where, caplog)
    assert pending == [(9, 4)] and "the bytes of 60" in log, log
