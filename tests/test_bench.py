"""Benchmarks: the one bench command end to end (smoke profile), the FLOP accounting, and the accuracy study on
real Fashion-MNIST through the real stage commands (tiny sizes). Numbers are checked for consistency, never
for speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import accuracy, bench_flops, run_all

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
PNG = b"\x89PNG\r\n\x1a\n"


def _bench(module, *args, timeout=900):
    r = subprocess.run([sys.executable, "-m", f"bench.{module}", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_run_all_quick(tmp_path):
    out = tmp_path / "bench"
    r = _bench("run_all", "--quick", "--out", out, "--accuracy", tmp_path / "none.json")
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    for section in ("Student step rate", "end to end vs pure teacher forward", "Replay loader vs timm",
                    "Cache storage", "Teacher FLOPs saved"):
        assert section in md and section in r.stdout
    for name in ("bench_speed.png", "bench_storage_flops.png"):
        assert (out / "img" / name).read_bytes()[:8] == PNG
    assert not (out / "img" / "accuracy.png").exists()  # no study results given

    toy = res["student"]["settings"]["toy32"]
    assert set(toy["modes"]) == {"none", "cache-hard", "cache-soft", "online-hard"}
    assert all(m["img_per_s"] > 0 and m["steps_timed"] >= 1 for m in toy["modes"].values())
    assert res["cache"]["settings"][0]["views"] == 128  # 128 toy samples x 1 seed, every view cached
    assert set(res["replay"]["ratios"]) == {"500x375", "1000x750"}

    # storage: real stores; more logits kept costs more, hard-only is the floor, K=all at 10 classes = K=10
    for name, s in res["storage"]["sources"].items():
        rows = s["rows"]
        soft = sorted((r["K"], r["total"]) for r in rows.values() if r["K"] > 0)
        assert [b for _, b in soft] == sorted(b for _, b in soft), name
        assert rows["hard-only"]["total"] < soft[0][1]
        assert rows["hard-only"]["digest"] == pytest.approx(4.0, abs=0.2)  # uint32 digests do not compress
        for r in rows.values():
            assert r["imagenet_gb_per_seed"] == pytest.approx(r["total"] * 1_281_167 / 1e9)
    assert res["storage"]["sources"]["synthetic-1000"]["rows"]["soft K=10"]["total"] <= 40  # the target: 40 bytes per view
    assert res["storage"]["sources"]["synthetic-1000"]["rows"]["hard-only"]["total"] <= 8

    # the report is rebuilt from the JSON files alone; a run compares itself with a published one
    before = md
    _bench("run_all", "--quick", "--report-only", "--out", out, "--accuracy", tmp_path / "none.json")
    assert (out / "results.md").read_text() == before
    table = run_all.compare(res, res)
    heads = run_all.headline(res)
    assert len(heads) >= 10 and table.count("+0.0%") == len(heads)

    fl = res["flops"]
    assert 25 < fl["teacher"]["forward_gflops"] < 40  # regnety_160: 15.9 GMACs = 31.8 GFLOPs (timm's figure)
    for row in fl["sweep"]["deit_tiny"]:
        assert row["teacher_saved"] == pytest.approx(1 - row["S"] / (row["R"] * row["E"]))


def test_flop_counter_and_sweep():
    lin = torch.nn.Linear(64, 32, bias=False)

    class Net(torch.nn.Module):
        def forward(self, x):
            return lin(x.flatten(1)[:, :64])

    assert bench_flops.count_flops(Net(), train=False, size=8) == 2 * 64 * 32
    # forward + backward: the weight gradient costs one more matmul (the input needs no gradient)
    assert bench_flops.count_flops(Net(), train=True, size=8) == 2 * (2 * 64 * 32)
    rows = bench_flops.sweep(f_teacher=30.0, f_student=10.0, n=1000, runs=[1, 4], epochs=100, seeds=[100, 25])
    one = {(r["R"], r["S"]): r for r in rows}
    assert one[(1, 100)]["teacher_saved"] == 0 and one[(1, 100)]["total_saved"] == 0
    assert one[(4, 25)]["teacher_saved"] == pytest.approx(1 - 25 / 400)
    online = 4 * 100 * 1000 * (30 + 10)
    cached = 25 * 1000 * 30 + 4 * 100 * 1000 * 10
    assert one[(4, 25)]["total_saved"] == pytest.approx(1 - cached / online)


def test_cycle_points():
    assert accuracy.cycle_points(8) == [(1, "hard-S1"), (2, "hard-S2"), (4, "hard-S4"), (8, "hard")]
    assert accuracy.cycle_points(2) == [(1, "hard-S1"), (2, "hard")]


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} absent (Debian package dataset-fashion-mnist)")
def test_accuracy_study_smoke(tmp_path):
    """Real Fashion-MNIST through the real stage commands, 2 seeds, tiny sizes: the report holds every variant;
    the online teacher gives the very same student as the cache (same views, same argmax targets); a re-run
    resumes (runs nothing) and reproduces the report."""
    out = tmp_path / "acc"
    args = ["--out", out, "--seeds", "0", "1", "--train-limit", "128", "--epochs", "2", "--teacher-epochs", "1",
            "--variants", "none", "hard", "hard-online", "hard-S1", "--set", "data.val_limit=128",
            "--set", "data.shard_size=64", "--set", "train.batch_size=32"]
    _bench("accuracy", *args)
    res = json.loads((out / "accuracy.json").read_text())
    assert set(res["students"]) == {"none", "hard", "hard-online", "hard-S1"}
    assert res["meta"]["val_samples"] == 128 and res["teacher"]["val_acc"]["n"] == 2
    hard, online = res["students"]["hard"], res["students"]["hard-online"]
    for key in ("student_acc_avg", "student_acc_cls", "student_acc_dist", "teacher_agreement"):
        assert hard[key]["values"] == online[key]["values"], key
    assert [p["S"] for p in res["seed_cycling"]] == [1, 2]
    assert res["seed_cycling"][1]["mean"] == hard["student_acc_avg"]["mean"]
    # S=1 replays seed 0's views twice: a different run from S=2 (at least one seed's model differs)
    assert res["students"]["hard-S1"]["student_acc_avg"]["values"] != hard["student_acc_avg"]["values"] or \
        res["students"]["hard-S1"]["teacher_agreement"]["values"] != hard["teacher_agreement"]["values"]
    run = json.loads((out / "seed0/runs/student/hard-S1/metrics.json").read_text())
    assert run["seed_schedule"] == [0, 0]
    assert (out / "accuracy.png").read_bytes()[:8] == PNG and "| student, hard |" in (out / "accuracy.md").read_text()
    logs = {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    r = _bench("accuracy", *args)
    assert "start" not in r.stdout  # every stage was done: nothing re-run
    assert {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()} == logs
    assert json.loads((out / "accuracy.json").read_text())["students"] == res["students"]


@pytest.mark.slow
def test_gpu_bench_runs_every_path_on_cpu(tmp_path):
    """`python -m bench.gpu` is meant for a GPU box; --smoke runs each of its rows (pure step, cached per-sample,
    cached batched, online, stage one) on CPU at toy sizes, so the command is known to work before a GPU run."""
    out = tmp_path / "gpu.json"
    r = _gpu_smoke(out, "--workers", "1", "--teacher", "regnety_002")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["students"]["deit_tiny"]
    assert set(rows) == {"pure", "cached, per-sample", "cached, batched", "online"}
    assert all(v > 0 for v in rows.values())
    for key in ("stage_one", "stage_one_batched"):  # teacher_cache with each backend, one pure forward for both
        assert res[key]["views"] > 0 and res[key]["ratio"] > 0
    assert res["stage_one_batched"]["pure_forward_img_s"] == res["stage_one"]["pure_forward_img_s"]
    assert res["failed"] == []
    assert "best cached / online" in r.stdout and "teacher_cache (batched) end to end" in r.stdout


def test_gpu_bench_keeps_the_rows_that_ran_when_one_fails(tmp_path):
    """A GPU session is one short call: a row that breaks (here the online teacher and stage one, given a model timm
    does not know) is reported with its traceback and the exit status, while the other rows still run and land in
    the JSON and the table."""
    out = tmp_path / "gpu.json"
    r = _gpu_smoke(out, "--workers", "0", "--teacher", "no_such_net")
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "Unknown model (no_such_net)" in r.stderr
    res = json.loads(out.read_text())
    rows = res["students"]["deit_tiny"]
    assert rows["online"] is None and res["stage_one"] is None and res["stage_one_batched"] is None
    assert all(rows[k] > 0 for k in ("pure", "cached, per-sample", "cached, batched"))
    assert [f.split(":")[0] for f in res["failed"]] == ["online", "stage_one", "stage_one_batched"]
    assert "| failed |" in r.stdout and "teacher_cache (per-sample): failed" in r.stdout


def _gpu_smoke(out, *args):
    return subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--device", "cpu", "--batch", "4", "--steps",
                           "1", "--warmup", "1", "--students", "deit_tiny", "--out", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
