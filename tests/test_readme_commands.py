"""The documented scale-up commands (docs/operations.md, docs/own-data.md), run as written: the ImageNet block (one node, NPROC=2 through stages/launch.sh), the
two-node blocks (static and c10d rendezvous, two "nodes" started at once on this machine), the Slurm script (bash
with fake srun/scontrol), the object-storage block (moto's S3 server) and the own-data block (a timm hub teacher).

Each block is taken from its page by its heading and run with bash in a temporary copy of the checkout, edited
only by (1) an explicit substitution table below (paths, NPROC, addresses and ports, credentials; every entry must
match exactly once, so drift in the docs fails here) and (2) cap overrides appended to every stage command (epochs,
batch sizes, seeds, sample limits, workers). Stand-ins of the same shape (tests/readme_stand_ins.py): a 1000-synset
tree of 500x375 JPEGs, a 3-class PNG + JPEG folder, and random weights in a temporary Hugging Face cache at the repos
timm resolves (HF_HUB_OFFLINE=1: nothing downloads). Outcomes are checked (shard counts, complete stores whose
teacher weights are the cached hub weights, trained students), and hand runs leave the git-tracked metrics/ as it
was. A fast guard checks that every ```bash block of README.md and docs/*.md is run here or by a named test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import readme_stand_ins as stand_ins
from procs import finish, free_port, start_logged
from readme_blocks import (OPERATIONS, OWN_DATA, add_caps, bash_blocks, blocks, copy_checkout, node_script,
                           pages, substitute)

IMAGENET = "ImageNet (or any folder), documented configuration"
IMAGENET_WDS = "ImageNet as timm publishes it, read in place"
MANY = "From one box to many"
BUCKET_SECTION = "Object storage: shards and cache in a bucket"
OWN = "Precompute soft labels for your own data"
HUB_MODELS = ["regnety_160.deit_in1k", "convnext_tiny.fb_in1k"]  # what the documented teacher names resolve to

# Caps only: sample limits (and shards small enough to give every rank one), seeds, epochs, batches, workers.
IMAGENET_CAPS = ("data.train_limit=8 data.val_limit=4 data.shard_size=2 cache.num_seeds=3 cache.batch_size=8 "
                 "cache.num_workers=0 train.epochs=1 train.batch_size=4 train.num_workers=0")
TOY_CAPS = ("data.train_size=128 data.val_size=64 data.shard_size=32 teacher.train.epochs=1 "
            "teacher.train.num_workers=0 cache.num_seeds=1 cache.num_workers=0 train.epochs=1 train.batch_size=32 "
            "train.num_workers=0")
OWN_CAPS = ("teacher.train.epochs=1 teacher.train.batch_size=4 teacher.train.num_workers=0 cache.num_seeds=2 "
            "cache.batch_size=8 cache.num_workers=0")
IMAGENET_STORE = "cache/imagenet-regnety_160.deit_in1k-s3.zarr"  # train=deit: 3 copies, seeds 0-2
WDS_CAPS = ("cache.num_seeds=3 cache.batch_size=8 cache.num_workers=0 train.epochs=1 train.batch_size=4 "
            "train.num_workers=0")  # a published set is read whole: its size is the stand-in's

# ```bash blocks run elsewhere (section, first line) -> the test or script that runs them.
ELSEWHERE = {
    ("Two commands", "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]' && PATH=\"$PWD/.venv/bin:$PATH\" "
                     "dvc repro"): ".ci/run (README command 1, in a fresh clone)",
    ("Two commands", "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]' && .venv/bin/python -m pytest -q"):
        ".ci/run (README command 2)",
    ("Artefacts through a DVC remote", "dvc remote add -d storage s3://my-bucket/dvc && dvc remote modify storage "
                                       "endpointurl https://s3.example.com"):
        "tests/test_dvc_remote.py (the same dvc commands as argument lists, against moto's S3)",
    ("Benchmarks: what the numbers say",
     ".venv/bin/python -m bench.accuracy          # Fashion-MNIST study, 3 seeds x 7 student runs: "
     "~76 min on 2 cores, resumable"):
        "tests/test_bench.py (bench.run_all --quick and bench.accuracy on tiny sizes, not these full runs)",
    ("DeiT's recipe card", "NPROC=8 python -m pipeline.recipe $R distill=hard"): "tests/test_recipe.py",
    ("Our shards, opened by timm by name", "python -m pipeline.make_shards data=toy workdir=."):
        "tests/test_published.py::test_docs_data_commands",
    ("Published shards, read in place", "python -m pipeline.make_shards data=published "
                                        "data.root=hf://datasets/someone/pubtoy data.num_classes=10"):
        "tests/test_published.py::test_docs_data_commands",
    ("Share a cache", "python -m pipeline.push_cache push.repo=someone/toy-cache push.shards=true"):
        "tests/test_remote_cache.py::test_docs_share_a_cache",
    ("What a teacher cache costs and saves", "python -m pipeline.recipe --economics $R"): "tests/test_recipe.py",
    ("Install", "python -m pip install ."): "tests/test_package.py (docs/install.md's blocks, offline, in a fresh venv)",
    ("Install", "python -m pip install -c constraints.txt ."): "tests/test_package.py",
    ("Install", 'cd "$(mktemp -d)" && python -m pipeline.make_shards data.train_size=128 data.val_size=64 && ls '
                'data/shards/toy'): "tests/test_package.py",
}
# Other fenced blocks that are code: the python example (run verbatim by tests/test_api.py).
OTHER_CODE = {("Quickstart: your own training loop", "python"): "tests/test_api.py",
              ("Our shards, opened by timm by name", "python"): "tests/test_published.py::test_docs_data_commands",
              ("The API for your own training loop", "python"): "tests/test_api.py::test_api_doc_runs"}


# ------------------------------------------------------------------------------------------ the blocks


def _first_line(code: str) -> str:
    return code.splitlines()[0] if code.strip() else ""


def imagenet_script(tree: Path, nproc: int = 2) -> tuple[str, list[str]]:
    (code,) = bash_blocks(IMAGENET, OPERATIONS)
    code = substitute(code, {"IMAGENET=/data/imagenet": f"IMAGENET={tree}", "export NPROC=8": f"export NPROC={nproc}"})
    return add_caps(code, IMAGENET_CAPS)


def imagenet_wds_script(tree: Path) -> tuple[str, list[str]]:
    (code,) = bash_blocks(IMAGENET_WDS, OPERATIONS)
    code = substitute(code, {"WDS=/data/imagenet-1k-wds": f"WDS={tree}", "export NPROC=8": "export NPROC=2"})
    return add_caps(code, WDS_CAPS)


def imagenet_lines(tree: Path, make_shards: bool = False) -> str:
    """What the two-node blocks take from the ImageNet block ("$R as in the ImageNet example above"): its variable
    lines; with ``make_shards``, also its make_shards line (capped), run once on one node before them."""
    script, _ = imagenet_script(tree)
    starts = ("IMAGENET=", "R=", *(("python -m pipeline.make_shards ",) if make_shards else ()))
    lines, keep = script.splitlines(), []
    for i, line in enumerate(lines):
        continued = i > 0 and lines[i - 1].endswith("\\") and keep and keep[-1] == lines[i - 1]
        if line.startswith(starts) or continued:
            keep.append(line)
    return "\n".join(keep) + "\n"


def many_blocks() -> tuple[str, str, str]:
    static, c10d, slurm = bash_blocks(MANY, OPERATIONS)
    assert "MASTER_ADDR=10.0.0.1" in static and "RDZV_ENDPOINT" in c10d and slurm.startswith("#!/bin/bash"), MANY
    return static, c10d, slurm


def static_scripts(port: int) -> list[str]:
    code = substitute(many_blocks()[0], {"NPROC=8": "NPROC=1", "MASTER_ADDR=10.0.0.1": "MASTER_ADDR=127.0.0.1",
                                         "MASTER_PORT=29500": f"MASTER_PORT={port}"})
    code, hit = add_caps(code, IMAGENET_CAPS)
    assert hit == ["teacher_cache", "teacher_cache"], hit
    return [node_script(code, node) for node in (0, 1)]


def c10d_script(port: int) -> str:
    code = substitute(many_blocks()[1], {"NPROC=8": "NPROC=1",
                                         "RDZV_ENDPOINT=10.0.0.1:29400": f"RDZV_ENDPOINT=127.0.0.1:{port}"})
    code, hit = add_caps(code, IMAGENET_CAPS)
    assert hit == ["teacher_cache"], hit
    return code


def slurm_script(checkout: Path, tree: Path, port: int) -> str:
    code = substitute(many_blocks()[2], {"cd /shared/pipeline": f"cd {checkout}",
                                         "IMAGENET=/shared/imagenet": f"IMAGENET={tree}", "NPROC=8": "NPROC=1",
                                         "MASTER_PORT=29500": f"MASTER_PORT={port}"})
    code, hit = add_caps(code, IMAGENET_CAPS)
    assert hit == ["make_shards", "teacher_cache", "train_student"], hit
    return code


def bucket_script(endpoint: str) -> str:
    (code,) = bash_blocks(BUCKET_SECTION, OPERATIONS)
    code = substitute(code, {
        "export AWS_ENDPOINT_URL=https://s3.example.com AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=... "
        "AWS_SECRET_ACCESS_KEY=...": f"export AWS_ENDPOINT_URL={endpoint} AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test "
                                     "AWS_SECRET_ACCESS_KEY=test"})
    code, hit = add_caps(code, TOY_CAPS)
    assert hit == ["make_shards", "train_teacher", "teacher_cache", "train_student"], hit
    return code


def own_script(root: Path) -> str:
    (code,) = bash_blocks(OWN, OWN_DATA)
    code, hit = add_caps(substitute(code, {"MINE=/data/mine": f"MINE={root}"}), OWN_CAPS)
    assert hit == ["make_shards", "train_teacher", "teacher_cache"], hit
    return code


# ------------------------------------------------------------------------------------------ running them


def _env(checkout: Path, hf_home: Path, extra_path: Path | None = None, **extra) -> dict:
    """The venv's bin first on PATH (`python` is the venv's), PYTHON set, the checkout copy importable, the stand-in
    Hub cache offline."""
    path = [str(Path(sys.executable).parent), *([str(extra_path)] if extra_path else []), os.environ["PATH"]]
    return {**os.environ, "PATH": os.pathsep.join(path), "PYTHON": sys.executable, "PYTHONPATH": str(checkout),
            "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "30", "OMP_WAIT_POLICY": "PASSIVE",
            **extra}


def start(script: str, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """``bash <script>`` in ``cwd`` (its own process group), output to ``log``."""
    path = log.with_suffix(".sh")
    path.write_text(script)
    return start_logged(["bash", str(path)], cwd, env, log)


def run_script(script: str, cwd: Path, env: dict, log: Path, timeout: float = 600) -> str:
    return finish([start(script, cwd, env, log)], [log], timeout)[0]


def _metrics_files(checkout: Path) -> dict:
    return {str(p.relative_to(checkout)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((checkout / "metrics").rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ outcomes


def check_shards(split_root, train: int, val: int, classes: int) -> None:
    from pipeline.data.shards import load_manifest

    for split, n in (("train", train), ("val", val)):
        m = load_manifest(f"{split_root}/{split}")
        assert m.n == n and sum(s.count for s in m.shards) == n and m.num_classes == classes, (split, m.n)


def check_store(path, *, seeds: int, samples: int, topk: int, classes: int, teacher: str, weights_sha256: str):
    from pipeline.cache.store import CacheStore

    store = CacheStore.open(str(path))
    assert (store.num_seeds, store.num_samples, store.topk, store.num_classes) == (seeds, samples, topk, classes)
    assert store.done_mask().all(), store.pending_units()
    assert store.provenance["teacher"]["name"] == teacher
    assert store.provenance["teacher"]["weights_sha256"] == weights_sha256, "the teacher is not the expected weights"
    return store


def check_student(out_dir: Path, world_size: int, log: str, agreement: bool) -> dict:
    """A trained student with its metrics; with ``agreement``, measured against the cache's own teacher."""
    from pipeline.train.student_run import METRICS, STUDENT

    metrics = json.loads((out_dir / METRICS).read_text())
    assert (out_dir / STUDENT).is_file() and metrics["world_size"] == world_size, metrics
    assert 0 <= metrics["val_acc"] <= 1 and metrics["img_per_s"] > 0 and metrics["epochs"] == 1, metrics
    if agreement:
        assert 0 <= metrics["val_agree_teacher"] <= 1, metrics
        assert "differ from the cache's teacher" not in log, log[-3000:]
    return metrics


def hub_sha256(hf_home: Path, repo: str) -> str:
    """weights_sha256 of the random weights placed at ``repo`` (what a teacher loaded from the Hub records)."""
    from safetensors.torch import load_file

    from pipeline.models.teacher import weights_sha256

    (snap,) = (hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    return weights_sha256(load_file(str(snap / "model.safetensors")))


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """(HF_HOME holding random weights for every hub teacher README names, {model name: Hub repo})."""
    home = tmp_path_factory.mktemp("hf_home")
    return home, stand_ins.hf_cache(home, HUB_MODELS)


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory):
    return stand_ins.imagenet_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture
def work(tmp_path):
    """A copy of this checkout; afterwards, its git-tracked metrics/ must be as it was (hand runs never write it)."""
    work = copy_checkout(tmp_path / "checkout")
    metrics = _metrics_files(work)
    yield work
    assert _metrics_files(work) == metrics, "a hand run changed the git-tracked metrics/ folder"


# ------------------------------------------------------------------------------------------ tests


def test_every_readme_bash_block_is_run_by_a_test(tmp_path):
    """Fast guard: every ```bash block of README.md and docs/*.md is run here or named in ELSEWHERE; every block
    here still substitutes and caps cleanly (drift in a page fails this test without running anything)."""
    here = {(OPERATIONS.name, IMAGENET): 1, (OPERATIONS.name, IMAGENET_WDS): 1, (OPERATIONS.name, MANY): 3, (OPERATIONS.name, BUCKET_SECTION): 1,
            (OWN_DATA.name, OWN): 1}
    seen = {}
    for b in (b for page in pages() for b in blocks(page=page)):
        where = f"{b.page} line {b.line}"
        if b.lang == "bash":
            if (b.page.split("/")[-1], b.section) in here:
                key = (b.page.split("/")[-1], b.section)
                seen[key] = seen.get(key, 0) + 1
            else:
                assert (b.section, _first_line(b.code)) in ELSEWHERE, (
                    f"{where}: a ```bash block under {b.section!r} that no test runs: run it in "
                    f"tests/test_readme_commands.py or name the test that runs it in ELSEWHERE")
        elif b.lang not in ("", "text"):
            assert (b.section, b.lang) in OTHER_CODE, f"{where}: a ```{b.lang} block no test runs"
    assert seen == here, seen
    # Every substitution matches once and every stage command gets the caps (asserted inside).
    imagenet_script(tmp_path)
    imagenet_wds_script(tmp_path)
    assert "make_shards" in imagenet_lines(tmp_path, make_shards=True) and "R=" in imagenet_lines(tmp_path)
    static_scripts(1)
    c10d_script(1)
    slurm_script(tmp_path, tmp_path, 1)
    bucket_script("http://127.0.0.1:1")
    own_script(tmp_path)


def test_fake_srun_runs_a_copy_per_node_and_kills_on_bad_exit(tmp_path):
    """The Slurm stand-in itself: one copy per node with SLURM_NODEID; with --kill-on-bad-exit=1 a failing node
    stops the other at once, and srun exits with its status."""
    bin_dir = stand_ins.fake_slurm(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "2"}
    ok = subprocess.run(["srun", "bash", "-c", 'echo "node $SLURM_NODEID"'], env=env, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and sorted(ok.stdout.split("\n")[:2]) == ["node 0", "node 1"], ok
    assert subprocess.run(["scontrol", "show", "hostnames", "n[0-1]"], env=env, capture_output=True, text=True,
                          check=True).stdout == "localhost\nlocalhost\n"
    t0 = time.monotonic()
    bad = subprocess.run(["srun", "--kill-on-bad-exit=1", "bash", "-c",
                          '[[ $SLURM_NODEID == 1 ]] && exit 3; exec sleep 120'], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 3 and time.monotonic() - t0 < 30 and "task 1 exited 3" in bad.stderr, bad


@pytest.mark.slow
def test_imagenet_block_on_one_node_with_two_ranks(work, imagenet_tree, hub, tmp_path):
    hf_home, repos = hub
    script, hit = imagenet_script(imagenet_tree)
    assert hit == ["params", "make_shards", "teacher_cache", "train_student"], hit
    out = run_script(script, work, _env(work, hf_home), tmp_path / "imagenet.log")
    assert "name: regnety_160.deit_in1k" in out  # pipeline.params printed the composed config
    check_shards(work / "data/shards/imagenet", 8, 4, 1000)
    check_store(work / IMAGENET_STORE, seeds=3, samples=8, topk=10, classes=1000, teacher="regnety_160.deit_in1k",
                weights_sha256=hub_sha256(hf_home, repos["regnety_160.deit_in1k"]))
    check_student(work / "runs/student/imagenet-hard-cache", 2, out, agreement=True)


@pytest.mark.slow
def test_imagenet_wds_block_reads_timm_shards_in_place(work, hub, tmp_path):
    """timm's published ImageNet layout (unequal shards, its own keys, .json sidecars) through every stage of the
    block: nothing is copied, the classes are the synsets, the cache pads the short shards."""
    hf_home, repos = hub
    tree = stand_ins.imagenet_wds_tree(tmp_path / "imagenet-1k-wds")
    before = {p.name: p.read_bytes() for p in tree.iterdir()}
    script, hit = imagenet_wds_script(tree)
    assert hit == ["make_shards", "teacher_cache", "train_student"], hit
    out = run_script(script, work, _env(work, hf_home), tmp_path / "wds.log")
    from pipeline.data.shards import load_manifest

    shards = work / "data/shards/imagenet-1k-wds"
    check_shards(shards, 10, 4, 1000)
    train = load_manifest(shards / "train")
    assert [s.count for s in train.shards] == [3, 4, 3] and train.shard_size == 4
    assert train.class_names[:2] == ["n01440764", "n01443537"] and train.shards[0].url.startswith(str(tree))
    assert sorted(p.name for p in shards.rglob("*") if p.is_file()) == ["manifest.json", "manifest.json"]
    store = check_store(work / "cache/imagenet-1k-wds-regnety_160.deit_in1k-s3.zarr", seeds=3, samples=10, topk=10,
                        classes=1000, teacher="regnety_160.deit_in1k",
                        weights_sha256=hub_sha256(hf_home, repos["regnety_160.deit_in1k"]))
    assert store.unit_rows(2) == slice(8, 11)  # shard k starts at row 4k
    check_student(work / "runs/student/imagenet-1k-wds-hard-cache", 2, out, agreement=True)
    assert {p.name: p.read_bytes() for p in tree.iterdir()} == before  # read in place, nothing written there


def _two_nodes(scripts: list[str], work: Path, tree: Path, hf_home: Path, tmp: Path) -> list[str]:
    """The ImageNet block's shards once, then one script per "node", all started at once, each after $R."""
    env = _env(work, hf_home)
    run_script(imagenet_lines(tree, make_shards=True), work, env, tmp / "shards.log")
    logs = [tmp / f"node{k}.log" for k in range(len(scripts))]
    return finish([start(imagenet_lines(tree) + s, work, env, log) for s, log in zip(scripts, logs)], logs)


@pytest.mark.slow
def test_two_node_block_static_rendezvous(work, imagenet_tree, hub, tmp_path):
    hf_home, repos = hub
    logs = _two_nodes(static_scripts(free_port()), work, imagenet_tree, hf_home, tmp_path)
    check_store(work / IMAGENET_STORE, seeds=3, samples=8, topk=10, classes=1000, teacher="regnety_160.deit_in1k",
                weights_sha256=hub_sha256(hf_home, repos["regnety_160.deit_in1k"]))
    assert sum(": 24 views written" in text for text in logs) == 1, [t[-2000:] for t in logs]  # global rank 0 only


@pytest.mark.slow
def test_two_node_block_c10d_rendezvous(work, imagenet_tree, hub, tmp_path):
    hf_home, repos = hub
    script = c10d_script(free_port())
    logs = _two_nodes([script, script], work, imagenet_tree, hf_home, tmp_path)
    check_store(work / IMAGENET_STORE, seeds=3, samples=8, topk=10, classes=1000, teacher="regnety_160.deit_in1k",
                weights_sha256=hub_sha256(hf_home, repos["regnety_160.deit_in1k"]))
    assert sum(": 24 views written" in text for text in logs) == 1, [t[-2000:] for t in logs]


@pytest.mark.slow
def test_slurm_script_with_fake_srun(work, imagenet_tree, hub, tmp_path):
    hf_home, repos = hub
    bin_dir = stand_ins.fake_slurm(tmp_path / "slurm-bin")
    env = _env(work, hf_home, bin_dir, SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="deit-distill", SLURM_JOB_NODELIST="node[0-1]", SLURM_SUBMIT_DIR=str(tmp_path))
    out = run_script(slurm_script(work, imagenet_tree, free_port()), tmp_path, env, tmp_path / "slurm.log")
    check_shards(work / "data/shards/imagenet", 8, 4, 1000)
    check_store(work / IMAGENET_STORE, seeds=3, samples=8, topk=10, classes=1000, teacher="regnety_160.deit_in1k",
                weights_sha256=hub_sha256(hf_home, repos["regnety_160.deit_in1k"]))
    check_student(work / "runs/student/imagenet-hard-cache", 2, out, agreement=True)
    assert out.count(": 24 views written") == 1, out[-3000:]


@pytest.mark.slow
def test_object_storage_block_against_s3(work, s3, hub, tmp_path):
    import boto3

    from pipeline.models.teacher import weights_sha256

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="my-bucket")  # the documented bucket name
    out = run_script(bucket_script(endpoint), work, _env(work, hub[0]), tmp_path / "s3.log")
    check_shards("s3://my-bucket/toy", 128, 64, 10)
    teacher = work / "runs/teacher/toy-regnety_002/teacher.pt"
    check_store("s3://my-bucket/cache/toy.zarr", seeds=1, samples=128, topk=10, classes=10, teacher="regnety_002",
                weights_sha256=weights_sha256(teacher))
    check_student(work / "runs/student/toy-hard-cache", 1, out, agreement=True)
    assert not (work / "data").exists() and not (work / "cache").exists()  # shards and cache only in the bucket


@pytest.mark.slow
def test_own_data_block_with_a_hub_teacher(work, hub, tmp_path):
    import torch

    from pipeline.models.teacher import read_state_dict, weights_sha256

    hf_home, repos = hub
    root = stand_ins.own_folder(tmp_path / "mine", train=2, val=1)
    run_script(own_script(root), work, _env(work, hf_home), tmp_path / "own.log")
    check_shards(work / "data/shards/mine", 6, 3, 3)
    teacher = work / "runs/teacher/mine-convnext_tiny.fb_in1k/teacher.pt"
    check_store(work / "cache/mine-convnext_tiny.fb_in1k-s2.zarr", seeds=2, samples=6, topk=3, classes=3,
                teacher="convnext_tiny.fb_in1k", weights_sha256=weights_sha256(teacher))
    # train_teacher fine-tuned the hub weights (one epoch from them), not a random init.
    from safetensors.torch import load_file

    (snap,) = (hf_home / "hub" / f"models--{repos['convnext_tiny.fb_in1k'].replace('/', '--')}" / "snapshots").iterdir()
    hub_w = load_file(str(snap / "model.safetensors"))["stem.0.weight"].flatten()
    tuned = read_state_dict(teacher)["stem.0.weight"].flatten()
    assert torch.nn.functional.cosine_similarity(hub_w, tuned, dim=0) > 0.9
