"""Our shards in timm's WebDataset layout (``_info.json``, ``.json`` sidecars, umask-made folders) on real files."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hub_server import Hub
from pipeline.data import sources
from pipeline.data.shards import load_manifest, verify_shards
from pipeline.data.shard_writer import write_shards

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, umask=None, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.make_shards", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def _timm_samples(root, name, split):
    import timm.data

    ds = timm.data.create_dataset(f"wds/{name}", root=str(root), split=split)
    return [(img, int(target)) for img, target in ds]


def _our_samples(m):
    return [(data, label) for k in range(m.num_shards) for _, _, data, label in m.iter_shard(k)]


def _modes(root):
    dirs = {oct(stat.S_IMODE(os.stat(d).st_mode)) for d, _, _ in os.walk(root)}
    files = {oct(stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode)) for d, _, fs in os.walk(root) for f in fs}
    return dirs, files


def test_timm_opens_our_shards_by_name(tmp_path):
    r = _cli("data=toy", f"workdir={tmp_path}", "data.train_size=70", "data.val_size=20", "data.shard_size=32",
             umask=0o022)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "data" / "shards" / "toy"
    info = json.loads((root / "_info.json").read_text())
    assert info["splits"]["train"] == {"name": "train", "num_samples": 70, "shard_lengths": [32, 32, 6],
                                       "filenames": [f"train/shard-0000{k}.tar" for k in range(3)]}
    assert info["splits"]["validation"]["num_samples"] == info["splits"]["val"]["num_samples"] == 20
    for split in ("train", "val", "validation"):
        m = load_manifest(root / ("val" if split == "validation" else split))
        ours = _our_samples(m)
        got = _timm_samples(root, "toy", split)
        assert [label for _, label in got] == [label for _, label in ours]  # every sample, in order
        for (img, _), (data, _) in zip(got, ours):
            assert isinstance(img, Image.Image) and img.size == (32, 32)
        assert np.array_equal(np.asarray(got[5][0]), np.asarray(Image.open(__import__("io").BytesIO(ours[5][0]))))
    dirs, files = _modes(root)
    assert dirs == {"0o755"} and files == {"0o644"}, (dirs, files)  # umask 022, as any folder the user makes


def test_shard_folders_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        s = sources.toy(0, 10, "train")
        write_shards(s, tmp_path / "out" / "train", shard_size=4, num_classes=10, class_names=s.class_names,
                     source=s.source)
    finally:
        os.umask(old)
    assert _modes(tmp_path / "out" / "train") == ({"0o750"}, {"0o640"})


def _tree(root, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    names = {}
    for split in ("train", "val"):
        for label, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j in range(per_class):
                p = root / split / c / f"{c}_{j}.JPEG"
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(p, format="JPEG")
                names[p.read_bytes()] = (f"{c}/{p.name}", label)
    return names


def test_folder_shards_keep_file_names(tmp_path):
    names = _tree(tmp_path / "tree")
    r = _cli("data=folder", f"data.root={tmp_path / 'tree'}", "data.num_classes=2", "data.shard_size=4",
             f"data.shards={tmp_path / 'shards'}", f"workdir={tmp_path}")
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "shards" / "train")
    verify_shards(m, deep=True)  # our reader takes the .json sidecar
    import webdataset as wds

    seen = 0
    for k in range(m.num_shards):
        for sample in wds.WebDataset(str(m.shard_path(k)), shardshuffle=False):
            name, label = names[sample["jpg"]]
            assert json.loads(sample["json"]) == {"filename": name} and int(sample["cls"]) == label
            seen += 1
    assert seen == 6
    got = _timm_samples(tmp_path / "shards", "tree", "train")
    assert [label for _, label in got] == [label for _, label in _our_samples(m)]


# ------------------------------------------------------------------------------- published shards, in place
PUB_TRAIN, PUB_VAL, PUB_SHARD = 20, 6, 8  # train shards of 8, 8, 4 samples
OWNER, REPO_NAME = "someone", "pubtoy"


def _publish(root):
    """A shard set in timm's published layout: ``<key>.jpg`` + ``.cls`` + ``.json`` under the publisher's keys,
    ``train/`` and ``validation/`` shards and an ``_info.json``. Returns {split: [(jpg bytes, label)]}."""
    import io

    import webdataset as wds

    expected, splits = {}, {}
    for split, ours, n in (("train", "train", PUB_TRAIN), ("validation", "val", PUB_VAL)):
        (root / split).mkdir(parents=True)
        samples, names, lengths = [], [], []
        for i, (png, _, label) in enumerate(sources.toy(7, n, ours)):
            buf = io.BytesIO()
            Image.open(io.BytesIO(png)).save(buf, format="JPEG", quality=90)
            samples.append((buf.getvalue(), label))
        for k, first in enumerate(range(0, n, PUB_SHARD)):
            name = f"{split}/pubtoy-{split}-{k:04d}.tar"
            with wds.TarWriter(str(root / name)) as w:
                for i, (jpg, label) in enumerate(samples[first:first + PUB_SHARD], first):
                    w.write({"__key__": f"n{label:02d}_{split}_{i:04d}", "jpg": jpg, "cls": str(label).encode(),
                             "json": json.dumps({"filename": f"img_{i}.JPEG", "label": label}).encode()})
            names.append(name)
            lengths.append(min(PUB_SHARD, n - first))
        splits[split] = {"name": split, "num_samples": n, "filenames": names, "shard_lengths": lengths}
        expected[ours] = samples
    (root / "_info.json").write_text(json.dumps({"name": "pubtoy", "splits": splits}))
    return expected


def _fingerprint(root, split):
    from pipeline.data.shards import fingerprint_of, sha256_file

    files = sorted((root / split).glob("*.tar"))
    n = PUB_TRAIN if split == "train" else PUB_VAL
    return fingerprint_of([sha256_file(f) for f in files], n, 10, [str(c) for c in range(10)])  # ids: no names


def _tree_state(root):
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The published set on local disk (``local``) and behind a Hub-shaped HTTP server (``hub``)."""
    import shutil
    from types import SimpleNamespace

    top = tmp_path_factory.mktemp("hub")
    local = top / "local"
    expected = _publish(local)
    served = top / "srv" / "datasets" / OWNER / REPO_NAME / "resolve" / "main"
    shutil.copytree(local, served)
    hub = Hub(top / "srv")
    yield SimpleNamespace(local=local, served=served, hub=hub, expected=expected,
                          url=f"hf://datasets/{OWNER}/{REPO_NAME}")
    hub.stop()


def _index(tmp_path, root, *extra, env=None, name="idx"):
    return _cli("data=published", f"data.root={root}", "data.num_classes=10", f"data.shards={tmp_path / name}",
                f"workdir={tmp_path}", *extra, env=env)


def _samples_of(m):
    return [(i, data, label) for k in range(m.num_shards) for i, _, data, label in m.iter_shard(k)]


@pytest.mark.slow
def test_published_shards_indexed_in_place(published, tmp_path):
    before = _tree_state(published.local)
    r = _index(tmp_path, published.local)
    assert r.returncode == 0, r.stderr
    assert _tree_state(published.local) == before  # nothing rewritten, nothing added
    for split in ("train", "val"):
        m = load_manifest(tmp_path / "idx" / split)
        files = sorted((published.local / ("validation" if split == "val" else split)).glob("*.tar"))
        assert [s.url for s in m.shards] == [str(f) for f in files]
        assert [s.size for s in m.shards] == [f.stat().st_size for f in files]
        assert m.fingerprint == _fingerprint(published.local, "validation" if split == "val" else split)
        assert sorted(p.name for p in (tmp_path / "idx" / split).iterdir()) == ["manifest.json"]
        got = _samples_of(m)  # global index = position in shard order; the publisher's keys are kept
        assert [(i, d, lab) for i, d, lab in got] == [(i, d, lab) for i, (d, lab) in
                                                       enumerate(published.expected[split])]
    assert [s.count for s in load_manifest(tmp_path / "idx" / "train").shards] == [8, 8, 4]
    again = _index(tmp_path, published.local)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr


@pytest.mark.slow
def test_published_shards_on_the_hub_and_over_http(published, tmp_path):
    r = _index(tmp_path, published.url, env=published.hub.env(), name="hf")
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "hf" / "train")
    assert m.fingerprint == _fingerprint(published.local, "train")  # the same bytes, wherever they are read
    assert m.shards[0].url == f"{published.url}/train/pubtoy-train-0000.tar" and m.shards[0].etag
    pattern = "'train/pubtoy-train-{0000..0002}.tar'"  # quoted: Hydra reads {...} as a dict otherwise
    r = _index(tmp_path, f"{published.hub.endpoint}/datasets/{OWNER}/{REPO_NAME}/resolve/main",
               f"data.train_shards={pattern}", "data.val_shards=validation/pubtoy-validation-0000.tar",
               env=published.hub.env(), name="http")
    assert r.returncode == 0, r.stderr
    assert load_manifest(tmp_path / "http" / "train").fingerprint == m.fingerprint
    offline = _index(tmp_path, published.url, env={**published.hub.env(), "HF_HUB_OFFLINE": "1"}, name="off")
    assert offline.returncode == 2 and "HF_HUB_OFFLINE" in offline.stderr, offline.stderr
    assert "Traceback" not in offline.stderr and not (tmp_path / "off").exists()


def test_a_published_shard_changed_on_its_server_is_refused_by_name(published, tmp_path, monkeypatch):
    import shutil

    from pipeline.errors import ShardError

    served = published.served.parent / "changed"  # its own revision: the module's other tests keep main
    shutil.copytree(published.served, served)
    url = f"hf://datasets/{OWNER}/{REPO_NAME}@changed"
    r = _index(tmp_path, url, env=published.hub.env())
    assert r.returncode == 0, r.stderr
    for k, v in published.hub.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    m = load_manifest(tmp_path / "idx" / "train")
    assert len(list(m.iter_shard(1))) == 8
    shard = served / "train" / "pubtoy-train-0001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes: a new ETag
    time.sleep(0.01)
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"pubtoy-train-0001\.tar: ETag .* the shard changed since its manifest"):
        next(m.iter_shard(1))
    shard.write_bytes(bytes(data) + bytes(1024))  # a longer file (still a valid tar)
    with pytest.raises(ShardError, match=r"pubtoy-train-0001\.tar: size \d+ bytes, the manifest's \d+"):
        next(m.iter_shard(1))


def test_published_shards_in_a_bucket(published, s3, tmp_path):
    from pipeline import storage

    storage.upload_tree(published.local, storage.as_path(f"{s3}/published"))
    r = _index(tmp_path, f"{s3}/published")
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "idx" / "train")
    assert m.fingerprint == _fingerprint(published.local, "train")
    assert m.shards[2].url == f"{s3}/published/train/pubtoy-train-0002.tar" and m.shards[2].count == 4
    assert [lab for _, _, lab in _samples_of(m)] == [lab for _, lab in published.expected["train"]]


@pytest.mark.slow
def test_stages_one_and_two_on_published_shards_from_the_hub(published, tmp_path):
    """teacher_cache and train_student replay the published shards read from the (local) Hub: the cache keys on
    the manifest's fingerprint as for our own shards, and the student trains from it."""
    env = published.hub.env()
    r = _index(tmp_path, published.url, env=env)
    assert r.returncode == 0, r.stderr
    common = ["data=published", f"data.root={published.url}", "data.num_classes=10", "data.image_size=32",
              f"data.shards={tmp_path / 'idx'}", f"workdir={tmp_path}", f"cache.path={tmp_path / 'pub.zarr'}",
              "teacher=regnety_002", "teacher.checkpoint=null", "teacher.input_size=32", "cache.num_seeds=1",
              "cache.num_workers=0", "cache.batch_size=8", "num_threads=1", "augment.mix_block=4"]
    out = {}
    for module, extra in (("teacher_cache", []),
                          ("train_student", ["train.epochs=1", "train.batch_size=8", "train.num_workers=1",
                                             "++student.kwargs.depth=1"])):  # a DataLoader worker reads the Hub
        proc = subprocess.run([sys.executable, "-m", f"pipeline.{module}", *common, *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{module}:\n{proc.stderr[-3000:]}"
        out[module] = proc.stdout
    assert "20 views written" in out["teacher_cache"], out["teacher_cache"]
    from pipeline.cache.store import CacheStore

    store = CacheStore.open(tmp_path / "pub.zarr")
    assert store.done_mask().all()
    assert store.provenance["data_fingerprint"] == _fingerprint(published.local, "train")
    (run,) = (tmp_path / "runs" / "student").iterdir()
    assert (run / "checkpoint-last.pt").is_file()


@pytest.mark.slow
def test_uneven_published_shards_cache_and_replay_exactly(published, tmp_path):
    """Shards of 4, 8 and 8 samples (a short one first): the cache pads the short shard's rows, the teacher's
    re-check on every unit agrees with the store, and a student trained from the cache equals one trained with the
    teacher online on the same views, weight for weight."""
    import torch

    from pipeline.cache.store import CacheStore

    order = "data.train_shards='train/pubtoy-train-0002.tar,train/pubtoy-train-0000.tar,train/pubtoy-train-0001.tar'"
    r = _index(tmp_path, published.local, order)
    assert r.returncode == 0, r.stderr
    common = ["data=published", f"data.root={published.local}", "data.num_classes=10", "data.image_size=32", order,
              f"data.shards={tmp_path / 'idx'}", f"cache.path={tmp_path / 'pub.zarr'}", "teacher=regnety_002",
              "teacher.checkpoint=null", "teacher.input_size=32", "cache.num_seeds=2", "cache.num_workers=0",
              "cache.batch_size=6", "num_threads=1", "augment.mix_block=4"]
    student = ["train.epochs=2", "train.batch_size=6", "train.num_workers=0", "++student.kwargs.depth=1",
               "distill=hard"]

    def stage(module, *extra):
        proc = subprocess.run([sys.executable, "-m", f"pipeline.{module}", *common, *extra], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{module}:\n{proc.stderr[-3000:]}"
        return proc.stdout

    assert "40 views written" in stage("teacher_cache", f"workdir={tmp_path}")
    store = CacheStore.open(tmp_path / "pub.zarr")
    assert store.shard_counts == [4, 8, 8] and store.shard_size == 8 and store.unit_rows(1) == slice(8, 16)
    report = json.loads(stage("verify_cache", f"workdir={tmp_path}", "cache.verify_fraction=1.0"))
    assert report["ok"] and report["units_checked"] == 6, report
    weights = {}
    for source in ("cache", "online"):
        stage("train_student", f"workdir={tmp_path / source}", f"distill.source={source}", *student)
        (run,) = (tmp_path / source / "runs" / "student").iterdir()
        weights[source] = torch.load(run / "checkpoint-last.pt", map_location="cpu", weights_only=True)["model"]
    assert weights["cache"].keys() == weights["online"].keys()
    for name, w in weights["cache"].items():
        assert torch.equal(w, weights["online"][name]), name


def _doc_blocks(path):
    """``(heading, lang, code)`` of every fenced block of a docs page."""
    out, heading, lines, i = [], "", path.read_text().splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        elif lines[i].startswith("```"):
            lang, start = lines[i][3:].strip(), i + 1
            i += 1
            while not lines[i].startswith("```"):
                i += 1
            out.append((heading, lang, "\n".join(lines[start:i])))
        i += 1
    return out


@pytest.mark.slow
def test_docs_data_commands(published, tmp_path):
    """docs/data.md's commands, as written, in a fresh directory: the Hub is the local server (HF_ENDPOINT) and
    https://example.org/pubtoy the same set on it."""
    import shlex

    env = {**published.hub.env(), "PYTHONPATH": str(REPO)}
    web = f"{published.hub.endpoint}/datasets/{OWNER}/{REPO_NAME}/resolve/main"
    blocks = [b for b in _doc_blocks(REPO / "docs" / "data.md") if b[0] != "Share a cache"]  # test_remote_cache
    assert [(h, lang) for h, lang, _ in blocks] == [("Our shards, opened by timm by name", "bash"),
                                                     ("Our shards, opened by timm by name", "python"),
                                                     ("Published shards, read in place", "bash")]
    outputs = []
    for _, lang, code in blocks:
        if lang == "python":
            cmds = [[sys.executable, "-c", code]]
        else:
            cmds = [shlex.split(line.replace("https://example.org/pubtoy", web).replace("python", sys.executable, 1))
                    for line in code.splitlines() if line.strip()]
        for cmd in cmds:
            proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{cmd}:\n{proc.stderr[-3000:]}"
            outputs.append(proc.stdout)
    n, size, label = outputs[1].split(" ", 1)[0], outputs[1].split("(")[1].split(")")[0], outputs[1].split()[-1]
    assert (n, size) == ("4096", "32, 32") and 0 <= int(label) < 10, outputs[1]
    assert json.loads((tmp_path / "data/shards/toy/_info.json").read_text())["splits"]["train"]["num_samples"] == 4096
    hub, web_m = (load_manifest(tmp_path / "data/shards" / d / "train") for d in ("pubtoy", "pubtoy-web"))
    assert hub.fingerprint == web_m.fingerprint == _fingerprint(published.local, "train")
    assert hub.shards[0].url.startswith("hf://datasets/someone/pubtoy/") and web_m.shards[0].url.startswith(web)


@pytest.mark.parametrize("case", ["no_info", "lengths", "label", "server_down"])
def test_published_set_refused_by_name(published, tmp_path, case):
    """Each fault: exit 2, one line naming the file (and key), and no manifest folder left behind."""
    import shutil

    root, extra, env = published.local, [], None
    if case == "no_info":
        root = tmp_path / "bare"
        shutil.copytree(published.local / "train", root / "train")
        want = f"{root}/_info.json or {root}/_info.yaml: no such file"
    elif case == "lengths":
        root = tmp_path / "lying"
        shutil.copytree(published.local, root)
        info = json.loads((root / "_info.json").read_text())
        info["splits"]["train"]["shard_lengths"][1] = 7
        (root / "_info.json").write_text(json.dumps(info))
        want = "pubtoy-train-0001.tar: holds 8 samples, _info.json says 7"
    elif case == "label":  # labels 0..9 against 3 classes
        want = "out of range [0, 3)"
    else:
        root, env = published.url, {**published.hub.env(), "HF_ENDPOINT": "http://127.0.0.1:9"}
        want = "_info.json: cannot read"
    r = _cli("data=published", f"data.root={root}", f"data.num_classes={3 if case == 'label' else 10}", *extra,
             f"data.shards={tmp_path / 'idx'}", f"workdir={tmp_path}", env=env)
    errors = [line for line in r.stderr.splitlines() if "error" in line]  # the rest: the progress bar
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith("make_shards: error: ") and want in errors[0], r.stderr
    if case == "label":
        assert "pubtoy-train-0000.tar: key n" in r.stderr  # the shard and the publisher's key
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("stage,location", [("make_shards", "data.shards=https://127.0.0.1:9/shards"),
                                            ("teacher_cache", "cache.path=hf://datasets/someone/pubtoy/c.zarr"),
                                            ("teacher_cache", "cache.path=http://127.0.0.1:9/c.zarr")])
def test_http_and_hf_locations_are_read_only(toy_shards, tmp_path, stage, location):
    """Shards and cache stores are written to a folder or s3:// only: an http(s):// or hf:// destination is one
    line naming it, before any request (HF_HUB_OFFLINE=1 here: none could be made). Stage two reads a store there
    (tests/test_remote_cache.py)."""
    args = [f"workdir={tmp_path}", "teacher.checkpoint=null"] if stage != "make_shards" else [f"workdir={tmp_path}"]
    if stage != "make_shards":
        args.append(f"data.shards={toy_shards.root}")
    proc = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *args, location], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert location.split("=", 1)[1] in errors[0] and "read-only locations for published shards" in errors[0]
    assert not (tmp_path / "https:").exists() and not (tmp_path / "data").exists()
