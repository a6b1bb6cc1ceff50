"""Two torchrun "nodes" on one machine, each started through stages/launch.sh with NNODES/NODE_RANK/RDZV_ENDPOINT
as two real concurrent processes (c10d rendezvous on a free localhost port), against one-node runs.

- Stage one: the two-node store is byte-identical, array for array, to a one-process build (the units' batches
  are the same on any number of ranks here: batch 64 cuts every 128-view unit in two, one thread per rank).
- Stage two: world size 2 legitimately differs from world size 1 (the batch split and the per-rank drop-path
  streams differ; tests/test_student.py compares those approximately), so the two-node run is compared with
  `NPROC=2 stages/launch.sh` (`torchrun --standalone --nproc-per-node=2`): identical metrics, history, per-rank
  sample indices and weights.
- The writer lease: global rank 0 alone takes it; a rank covered by it stops committing once it is gone.

Toy shards from tests/conftest.py (512 train / 128 val, 8 + 2 shards of 64), one OpenMP thread per rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hydra import compose, initialize_config_dir

from procs import finish, free_port, start_logged
from store_env import stage_one_overrides
from pipeline.cache import lease
from pipeline.cache.store import CacheStore
from pipeline.errors import CacheError
from pipeline.train.run_setup import TIMING_KEYS
from pipeline.train.student_run import METRICS, STUDENT

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "stages" / "launch.sh"
SUMMARY = "1024 views written"  # stage one's summary line (2 seeds x 512), printed by global rank 0 only


def _env(**extra) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "TQDM_MININTERVAL": "30", **extra}


def start(module: str, overrides: list[str], cwd: Path, name: str, nodes: int = 1, **env):
    """`stages/launch.sh module overrides` once, or on `nodes` concurrent "nodes" (NNODES, NODE_RANK, a c10d
    rendezvous on a free localhost port); returns (processes, their stdout + stderr files)."""
    rdzv = {"NNODES": str(nodes), "RDZV_ENDPOINT": f"localhost:{free_port()}", "RDZV_ID": name} if nodes > 1 else {}
    procs, logs = [], []
    for node in range(nodes):
        log = cwd / f"{name}-node{node}.log"
        procs.append(start_logged(["bash", str(LAUNCH), module, *overrides], cwd,
                                  _env(**rdzv, NODE_RANK=str(node), **env), log))
        logs.append(log)
    return procs, logs


@pytest.fixture(scope="module")
def built(toy_shards, random_teacher, tmp_path_factory):
    """A fixed (seeded random) regnety_002 teacher; the one-process store, built in this process while the two
    "nodes" build theirs through stages/launch.sh."""
    from pipeline.cache.builder import build_cache

    tmp = tmp_path_factory.mktemp("multinode")
    teacher = random_teacher

    def overrides(store: Path, *extra: str) -> list[str]:
        return stage_one_overrides(toy_shards.root, teacher, store, tmp, "cache.topk=5", "num_threads=1", *extra,
                                   seeds=2, batch=64)

    one, two = tmp / "one.zarr", tmp / "two-nodes.zarr"
    running = start("teacher_cache", overrides(two), tmp, "cache", nodes=2)
    try:
        with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base="1.3"):
            build_cache(compose("config", overrides=overrides(one)))
    finally:
        logs = finish(*running, timeout=240)
    return tmp, overrides, one, two, logs


def _arrays(path: Path) -> tuple[dict, dict]:
    group = zarr.open_group(str(path), mode="r")
    return {name: a[...] for name, a in group.arrays()}, dict(group.attrs)


@pytest.mark.slow
def test_teacher_cache_on_two_nodes_is_byte_identical_to_one_process(built):
    _, _, one, store, logs = built
    ours, our_attrs = _arrays(store)
    theirs, their_attrs = _arrays(one)
    assert sorted(ours) == sorted(theirs) and "topk_values" in ours and "checksums" in ours
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and ours[name].tobytes() == theirs[name].tobytes(), name
    assert our_attrs == their_attrs  # layout and provenance (augmentation, data, teacher, run seed)
    assert ours["done"].all()
    # Global rank 0 alone printed the summary (and took the lease); it released the lease at the end.
    assert sum(SUMMARY in text for text in logs) == 1, [t[-2000:] for t in logs]
    assert lease.lease_path(store).read_text() == "" and lease.probe(store) is None


@pytest.mark.slow
def test_train_student_on_two_nodes_equals_one_node_with_two_ranks(built, tmp_path):
    _, overrides, _, store, _ = built

    def student(out: Path) -> list[str]:
        return overrides(store, "distill=soft", "train.epochs=1", "train.batch_size=32", "train.lr=0.008",
                         "train.warmup_epochs=0", "train.num_workers=0", "++student.kwargs.depth=2",
                         "student.patch_size=4", "train.log_indices=true", f"train.out_dir={out}")

    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    a = start("train_student", student(one_node), tmp_path, "one-node", NPROC="2")
    b = start("train_student", student(two_nodes), tmp_path, "two-nodes", nodes=2)  # concurrently
    finish(a[0] + b[0], a[1] + b[1], timeout=240)

    def untimed(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in TIMING_KEYS}

    a, b = (json.loads((d / METRICS).read_text()) for d in (one_node, two_nodes))
    assert a["world_size"] == b["world_size"] == 2 and a["global_batch"] == 64
    assert untimed(a) == untimed(b)  # exact: train/val loss, val accuracy, every logged metric
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (one_node, two_nodes))
    assert [untimed(h) for h in ha] == [untimed(h) for h in hb]
    for r in range(2):
        assert (one_node / "indices" / f"rank{r}.jsonl").read_text() == \
            (two_nodes / "indices" / f"rank{r}.jsonl").read_text()
    wa, wb = (torch.load(d / STUDENT, weights_only=True) for d in (one_node, two_nodes))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca, cb = (torch.load(d / "checkpoint-last.pt", weights_only=False) for d in (one_node, two_nodes))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])


HOLDER = """
import json, sys, time
from pipeline.cache import lease
print(json.dumps(lease.acquire(sys.argv[1]).record), flush=True)
time.sleep(600)
"""


def _hold(store: Path) -> tuple[subprocess.Popen, dict]:
    """Another process (rank 0 of a job, or a second job) that takes the store's writer lease and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdout=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)
    line = proc.stdout.readline()
    assert line, "the lease holder did not start"
    return proc, json.loads(line)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_covered_rank_commits_only_while_rank_0_holds_the_lease(tmp_path):
    """Ranks on another node can outlive a lost rank 0: they must not commit under a lease it no longer holds,
    neither released (rank 0 gone) nor taken over by another writer."""
    path = tmp_path / "c.zarr"
    CacheStore.create(path, provenance={"topk": 5}, num_seeds=2, shard_counts=[50, 50], shard_size=50,
                      num_classes=10, topk=5).release_lease()
    rng = np.random.default_rng(0)
    logits, digest = rng.normal(0, 3, (50, 10)).astype(np.float32), rng.integers(0, 2**32, 50, dtype=np.uint32)
    rank0, record = _hold(path)
    writer = CacheStore.open(path, "r+")
    try:
        lease.cover(path, record)
        writer.write_unit(0, 0, logits, digest)  # rank 0 holds the lease: a covered rank commits
        _kill(rank0)
        with pytest.raises(CacheError, match=r"covering this rank .* is no longer held by it \(no live writer\)"):
            writer.write_unit(0, 1, logits, digest)
        other, theirs = _hold(path)  # a second job took the stale lease over
        try:
            with pytest.raises(CacheError, match=rf"no longer held by it \(pid {theirs['pid']} "):
                writer.write_unit(1, 1, logits, digest)
        finally:
            _kill(other)
    finally:
        if rank0.poll() is None:
            _kill(rank0)
        lease.release(path)  # drops the cover
    assert writer.pending_units() == [(0, 1), (1, 0), (1, 1)], "refused units were neither written nor marked"
    assert lease.held(path) is None and lease.probe(path) is None


@pytest.mark.parametrize("env, nproc, expected", [
    ({}, 2, ["--nnodes=1", "--nproc-per-node=2", "--standalone"]),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"}, 1,
     ["--nnodes=2", "--nproc-per-node=1", "--rdzv-id=pipeline-teacher_cache", "--master-addr=node0",
      "--master-port=29500", "--node-rank=1"]),
    ({"NNODES": "2", "RDZV_ENDPOINT": "node0:29400", "RDZV_ID": "job7"}, 8,
     ["--nnodes=2", "--nproc-per-node=8", "--rdzv-id=job7", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400"]),
])
def test_launch_passes_nodes_and_rendezvous_to_torchrun(env, nproc, expected):
    from pipeline.launch import torchrun_args

    assert torchrun_args(env, nproc, "teacher_cache", ["run_seed=3"]) == [
        *expected, "-m", "pipeline.teacher_cache", "run_seed=3"]


def test_launch_refuses_many_nodes_without_a_rendezvous(tmp_path):
    env = {k: v for k, v in _env(NNODES="2").items() if k not in ("MASTER_ADDR", "RDZV_ENDPOINT")}
    proc = subprocess.run(["bash", str(LAUNCH), "teacher_cache"], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "MASTER_ADDR" in proc.stderr and "RDZV_ENDPOINT" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
