"""The one configuration rule and the one error policy, through the real command lines: every command composes
pipeline/conf/ with its overrides (DVC's stages add --params params.yaml); a user mistake is one line naming the key, file
or option (the closest valid key for a typo), exit 2, also under torchrun; showing the config writes nothing;
a command that reads a finished run finds it or lists the runs that exist."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_size=128", "data.val_size=32", "data.shard_size=64"]


def run(*args, cwd=REPO, env=None, timeout=600):
    e = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)


def stage(module, *overrides, **kw):
    return run(sys.executable, "-m", f"pipeline.{module}", *overrides, **kw)


def one_error_line(proc, *needles):
    """exit 2, and stderr is exactly one line that holds every needle."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("overrides, needles", [
    (["distill.moed=soft"], ["distill.moed", "did you mean distill.mode?"]),
    (["+distill.moed=soft"], ["distill.moed", "did you mean distill.mode?"]),
    (["data=imagent"], ["data=imagent: no such option", "did you mean data=imagenet?"]),
    (["distill.mode=sotf"], ["distill.mode='sotf' is not one of"]),
    (["train.epochs=0"], ["train.epochs=0 must be >= 1"]),
    (["data=folder"], ["data.root", "data.num_classes", "not set"]),
    (["data=folder", "data.num_classes=3"], ["data.root is not set"]),
    (["data=imagenet"], ["data.root is not set"]),
    (["train.epochs=[1"], ["train.epochs=[1"]),
])
def test_a_config_mistake_is_one_line_naming_the_key(overrides, needles, tmp_path):
    one_error_line(stage("train_student", f"workdir={tmp_path}", *overrides), "train_student: error:", *needles)
    assert not any(tmp_path.iterdir())  # nothing created


def test_params_file_refuses_group_overrides_by_name(tmp_path):
    params = tmp_path / "params.yaml"
    assert stage("params", "--write", cwd=tmp_path).returncode == 0 and params.is_file()
    one_error_line(stage("make_shards", "--params", str(params), "data=imagenet"),
                   "data=imagenet", "--params", "without --params")


@pytest.mark.slow
def test_showing_the_config_writes_nothing(tmp_path):
    shown = stage("params", "data=imagenet", "data.root=/data/imagenet", "teacher=regnety_160", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    cfg = yaml.safe_load(shown.stdout)
    assert cfg["data"]["num_classes"] == 1000 and cfg["teacher"]["name"] == "regnety_160.deit_in1k"
    assert not any(tmp_path.iterdir())
    helped = stage("params", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--write" in helped.stdout and not helped.stderr
    for module in ("make_shards", "teacher_cache", "train_student", "export"):
        helped = stage(module, "--help", "data=imagenet", "data.root=/x", cwd=tmp_path)
        assert helped.returncode == 0 and "Main keys" in helped.stdout, helped.stderr
    assert not any(tmp_path.iterdir())
    written = stage("params", "--write", cwd=tmp_path)
    assert written.returncode == 0
    on_disk = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert on_disk["cache"]["metrics"].endswith("metrics/cache.json")  # DVC's params: the tracked metrics paths
    assert "/runs/" in cfg["cache"]["metrics"]  # a command by hand: beside its own outputs


def test_folder_names_from_model_names_are_sanitised():
    from pipeline.params import composed

    cfg = composed(["data=folder", "data.root=/data/My Photos/", "data.num_classes=3",
                    "teacher.name=local-dir:runs/export/toy-hard-cache"])
    assert cfg["data"]["name"] == "My-Photos"
    for path in (cfg["cache"]["path"], cfg["teacher"]["checkpoint"], cfg["teacher"]["train"]["out_dir"]):
        assert ":" not in path and "My-Photos-local-dir-runs-export-toy-hard-cache" in path, path


@pytest.mark.slow
def test_group_overrides_and_user_errors_through_launch_sh_under_torchrun(tmp_path):
    """NPROC=2: a group override composes (teacher=regnety_002); a typo is refused before torchrun starts; a user
    error raised in both ranks is one line, exit 2, not torchrun's failure report."""
    launch = ["bash", str(REPO / "stages" / "launch.sh")]
    data = [f"workdir={tmp_path}", *TINY]
    assert stage("make_shards", *data).returncode == 0
    two = {"NPROC": "2"}
    built = run(*launch, "teacher_cache", *data, "teacher=regnety_002", "teacher.checkpoint=null",
                "cache.num_seeds=1", "cache.num_workers=0", "teacher.input_size=32", env=two)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "cache" / "toy-regnety_002-s1.zarr" / "zarr.json").is_file()
    one_error_line(run(*launch, "teacher_cache", *data, "cache.nmu_seeds=1", env=two), "cache.nmu_seeds",
                   "did you mean cache.num_seeds?")
    line = one_error_line(run(*launch, "train_student", *data, f"cache.path={tmp_path}/none.zarr", env=two),
                          "train_student: error:", "none.zarr", "stores here:", "toy-regnety_002-s1.zarr")
    assert "Traceback" not in line
    one_error_line(run(*launch, "train_student", *data, env={"NNODES": "2"}), "NNODES=2 needs MASTER_ADDR")


@pytest.mark.slow
@pytest.mark.parametrize("sig, nproc", [("SIGTERM", 2), ("SIGINT", 2), ("SIGTERM", 1), ("SIGINT", 1)])
def test_a_signal_to_the_launcher_stops_its_ranks_in_one_line(tmp_path, sig, nproc):
    """SIGTERM (a scheduler's time limit) or SIGINT (Ctrl-C) to launch.sh, under torchrun (which starts each rank
    in a session of its own, out of reach of the launcher's process group) or one process: every rank stops, one
    line says so, exit 128 + the signal's number."""
    import signal
    import time

    from procs import process_tree, start_logged

    data = [f"workdir={tmp_path}", *TINY]
    assert stage("make_shards", *data).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "NPROC": str(nproc)}
    proc = start_logged(["bash", str(REPO / "stages" / "launch.sh"), "train_student", *data, "distill=none",
                         "train.epochs=100", "cache.num_seeds=100", "train.val=false", "train.dvclive=false", "train.num_workers=0",
                         "++student.kwargs.depth=1", f"train.out_dir={tmp_path / 'run'}"], REPO, env,
                        tmp_path / "log")
    deadline = time.monotonic() + 120
    while "distill.mode=" not in (tmp_path / "log").read_text():  # rank 0 says what it trains: every rank is up
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.1)
    tree = process_tree(proc.pid)
    assert len(tree) == 1 + (nproc if nproc > 1 else 0), tree  # the launcher and its ranks
    os.kill(proc.pid, signal.Signals[sig])
    assert proc.wait(timeout=120) == 128 + signal.Signals[sig]
    time.sleep(1)
    assert not [p for p in tree if Path(f"/proc/{p}").exists()], "a rank outlived the launcher"
    log = (tmp_path / "log").read_text()
    last = log.strip().splitlines()[-1]
    assert last == (f"train_student: stopped by {sig}, its ranks too; the same command resumes from what they "
                    "committed" if nproc > 1 else f"train_student: stopped by {sig}; the same command resumes from "
                    "what it committed") and "Traceback" not in log, log


@pytest.mark.slow
def test_a_command_reading_a_finished_run_lists_the_runs_that_exist(tmp_path):
    """export (distill=hard by default) after a distill=none run: names that run and the override that selects it;
    with the override it exports."""
    data = [f"workdir={tmp_path}", *TINY]
    assert stage("make_shards", *data).returncode == 0
    small = ["++student.kwargs.depth=1", "train.epochs=1", "train.batch_size=32", "train.num_workers=0",
             "train.dvclive=false"]
    trained = stage("train_student", *data, *small, "distill=none")
    assert trained.returncode == 0, trained.stderr[-3000:]
    line = one_error_line(stage("export", *data, *small), "export: error:", "toy-hard-cache/student.pt",
                          "toy-none-cache", "distill.mode=none")
    assert "train.epochs" not in line  # the same in both: not an override to add
    exported = stage("export", *data, *small, "distill.mode=none")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "runs" / "export" / "toy-none-cache" / "model.safetensors").is_file()
    assert not (tmp_path / "metrics").exists()  # runs by hand never write the tracked metrics/
    shutil.rmtree(tmp_path / "runs")
