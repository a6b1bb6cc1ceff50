"""Shards: sources, writer, manifest, verification and the make_shards CLI, on real files and real tars."""

import gzip
import io
import itertools
import json
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data import shards, sources
from pipeline.data.shards import load_manifest, verify_shards
from pipeline.data.shard_writer import write_shards
from pipeline.errors import ConfigError, ShardError

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _write_toy(out, n, shard_size=32, seed=0, split="train", **kw):
    s = sources.toy(seed, n, split)
    return write_shards(s, out, shard_size=shard_size, num_classes=10, class_names=s.class_names,
                        source=s.source, **kw)


def _snapshot(d):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(d).iterdir())}


def _copy_split(m, dst):
    shutil.copytree(m.split_dir, dst)
    return load_manifest(dst)


def _rewrite_shard(m, k, edit, fix_manifest=True):
    """Rewrite shard k member by member: edit(name, data) -> (name, data) or None to drop. Optionally update
    the manifest's sha256 and fingerprint so that only the deeper checks can catch the change."""
    path = m.shard_path(k)
    with tarfile.open(path) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in members:
            out = edit(ti.name, data)
            if out is not None:
                ti.name, data = out
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    if fix_manifest:
        _fix_manifest(m, k)
    return path


def _fix_manifest(m, k):
    mf = m.split_dir / shards.MANIFEST
    d = json.loads(mf.read_text())
    d["shards"][k]["sha256"] = shards.sha256_file(m.shard_path(k))
    d["fingerprint"] = shards.fingerprint_of([s["sha256"] for s in d["shards"]], d["N"], d["num_classes"],
                                             d["class_names"])
    mf.write_text(json.dumps(d))


# ------------------------------------------------------------------------------------------- round trip
def test_toy_round_trip(toy_shards):
    for split, n in (("train", toy_shards.train_size), ("val", toy_shards.val_size)):
        m = load_manifest(toy_shards.root / split)
        assert (m.n, m.num_classes, m.key_width, m.shard_size) == (n, 10, 6, toy_shards.shard_size)
        assert m.num_shards == -(-n // toy_shards.shard_size)
        assert m.class_names == sources.TOY_CLASSES and m.image_exts == ["png"]
        verify_shards(m, deep=True)
        expected = list(sources.toy(toy_shards.seed, n, split))
        seen = []
        for k in range(m.num_shards):
            for index, key, data, label in m.iter_shard(k):
                assert m.shard_of(index) == k and key == f"{index:06d}"
                assert (data, "png", label) == expected[index]
                seen.append(index)
        assert seen == list(range(n))  # every key exactly once, in order
    # plain WebDataset reads the same samples
    m = toy_shards.val
    got = list(wds.DataPipeline(wds.SimpleShardList([str(m.shard_path(1))]),
                                wds.tarfile_to_samples(handler=wds.reraise_exception)))
    assert [s["__key__"] for s in got] == [m.key(i) for i in m.indices(1)]
    assert all(set(s) >= {"png", "cls"} and 0 <= int(s["cls"]) < 10 for s in got)


def test_toy_source_deterministic_and_mixed():
    a, b = list(sources.toy(0, 64, "train")), list(sources.toy(0, 64, "train"))
    assert a == b
    assert list(sources.toy(0, 16, "train")) == a[:16]  # a prefix: sample i only depends on (seed, split, i)
    assert list(sources.toy(0, 16, "val")) != a[:16] and list(sources.toy(1, 16, "train")) != a[:16]
    labels = [lab for _, _, lab in sources.toy(0, 400, "train")]
    assert set(Counter(labels)) == set(range(10)) and min(Counter(labels).values()) > 20
    assert len(set(labels[:8])) > 3  # class-mixed blocks of consecutive indices
    im = Image.open(io.BytesIO(a[0][0]))
    assert (im.mode, im.size, im.format) == ("RGB", (32, 32), "PNG")


def test_toy_generation_rate():
    t = time.perf_counter()
    n = sum(1 for _ in sources.toy(0, 500, "train"))
    rate = n / (time.perf_counter() - t)
    print(f"toy generation: {rate:.0f} img/s")
    assert rate > 300  # 5k images in well under 20 s even on a busy 2-core machine (measured ~2.5k img/s)


def test_rerun_is_identical_and_skipped(tmp_path, capsys):
    m1 = _write_toy(tmp_path / "a" / "train", 100)
    before = _snapshot(m1.split_dir)
    m2 = _write_toy(tmp_path / "a" / "train", 100)
    assert "up to date" in capsys.readouterr().out
    assert _snapshot(m1.split_dir) == before  # not rewritten (same mtimes)
    assert m2.fingerprint == m1.fingerprint
    m3 = _write_toy(tmp_path / "b" / "train", 100)  # elsewhere: byte-identical shards
    assert [s.sha256 for s in m3.shards] == [s.sha256 for s in m1.shards]
    assert (m3.split_dir / "shard-00000.tar").read_bytes() == (m1.split_dir / "shard-00000.tar").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train"]  # no temp dirs left behind


def test_different_set_refused_then_overwritten(tmp_path):
    out = tmp_path / "train"
    m1 = _write_toy(out, 100)
    before = _snapshot(out)
    m_new = None
    with pytest.raises(ShardError) as e:
        _write_toy(out, 101)
    msg = str(e.value)
    assert str(out) in msg and m1.fingerprint in msg and "overwrite" in msg
    assert _snapshot(out) == before  # nothing lost
    m_new = _write_toy(out, 101, overwrite=True)
    assert m_new.n == 101 and m_new.fingerprint != m1.fingerprint
    assert load_manifest(out).fingerprint == m_new.fingerprint
    verify_shards(load_manifest(out), deep=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_foreign_dir_refused(tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ShardError, match="manifest"):
        _write_toy(out, 10)
    assert (out / "precious.txt").read_text() == "keep me"


def test_manifest_helpers(toy_shards):
    m = toy_shards.train
    assert m.shard_of(0) == 0 and m.shard_of(63) == 0 and m.shard_of(64) == 1 and m.shard_of(511) == 7
    with pytest.raises(IndexError):
        m.shard_of(512)
    assert m.shard_path(2) == toy_shards.root / "train" / "shard-00002.tar"
    assert m.indices(7) == range(448, 512)


# --------------------------------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.make_shards", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_make_shards_cli(tmp_path):
    args = ["data=toy", f"workdir={tmp_path}", "data.train_size=96", "data.val_size=40", "data.shard_size=32"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "data" / "shards" / "toy"
    train, val = load_manifest(root / "train"), load_manifest(root / "val")
    assert (train.n, train.num_shards, val.n, val.num_shards) == (96, 3, 40, 2)
    assert (root / "train" / "shard-00002.tar").is_file()
    assert train.source["kind"] == "toy" and train.split == "train"
    r = _cli(*args[:-3], "data.train_size=97", "data.val_size=40", "data.shard_size=32")
    assert r.returncode == 2 and "refusing" in r.stderr and "Traceback" not in r.stderr
    r = _cli(*args[:-3], "data.train_size=97", "data.val_size=40", "data.shard_size=32", "overwrite=true")
    assert r.returncode == 0, r.stderr
    assert load_manifest(root / "train").n == 97
    r = _cli("data=fashion_mnist", f"workdir={tmp_path}", f"data.root={tmp_path}/nowhere")
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("source,root", [
    ("folder", None),  # pipeline/conf/data/folder.yaml: root ???
    ("folder", "null"),
    ("folder", "{tmp}/missing"),
    ("fashion_mnist", "null"),
    ("fashion_mnist", "{tmp}/missing"),
])
def test_missing_data_root_is_one_line_naming_it(tmp_path, source, root):
    args = [f"data={source}", f"workdir={tmp_path}"] + (["data.num_classes=3"] if source == "folder" else [])
    r = _cli(*args, *([f"data.root={root.format(tmp=tmp_path)}"] if root else []))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("make_shards: error: data.root") and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr
    assert ("no such directory" if root and "missing" in root else "is not set") in r.stderr
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------------ Fashion-MNIST
@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} absent (Debian package dataset-fashion-mnist)")
def test_fashion_mnist(tmp_path):
    t = time.perf_counter()
    ms = {}
    for split, n in (("train", 60000), ("val", 10000)):
        s = sources.fashion_mnist(FMNIST, split)
        assert len(s) == n and s.class_names[0] == "T-shirt/top" and s.class_names[9] == "Ankle boot"
        ms[split] = write_shards(s, tmp_path / split, shard_size=1000, num_classes=10, class_names=s.class_names,
                                 source=s.source)
    print(f"fashion-mnist 70k samples sharded in {time.perf_counter() - t:.1f} s")
    assert (ms["train"].n, ms["train"].num_shards, ms["val"].n, ms["val"].num_shards) == (60000, 60, 10000, 10)
    m = ms["val"]
    verify_shards(m, deep=False)  # all sha256
    for k in (0, m.num_shards - 1):  # deep checks of a first and a last shard
        for _, key, data, label in m.iter_shard(k):
            im = Image.open(io.BytesIO(data))
            assert (im.mode, im.size) == ("L", (28, 28))
    counts = Counter(label for k in range(m.num_shards) for _, _, _, label in m.iter_shard(k))
    assert counts == {c: 1000 for c in range(10)}  # t10k is balanced


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} absent (Debian package dataset-fashion-mnist)")
def test_train_limit_is_a_prefix(tmp_path):
    """data.train_limit keeps the first N samples of the source order, and enters the fingerprint."""
    cfg = {"name": "fashion_mnist", "source": "fashion_mnist", "root": str(FMNIST), "num_classes": 10}
    full = sources.from_config(cfg, "train")
    part = sources.from_config({**cfg, "train_limit": 300}, "train")
    assert len(part) == 300 and list(part) == list(itertools.islice(iter(full), 300))
    assert len(sources.from_config({**cfg, "train_limit": 300}, "val")) == 10000  # val untouched
    m_part = write_shards(part, tmp_path / "part", shard_size=100, num_classes=10, class_names=part.class_names,
                          source=part.source)
    assert m_part.n == 300 and m_part.source["limit"] == 300
    m_other = write_shards(sources.from_config({**cfg, "train_limit": 200}, "train"), tmp_path / "other",
                           shard_size=100, num_classes=10, class_names=part.class_names,
                           source=sources.from_config({**cfg, "train_limit": 200}, "train").source)
    assert m_other.fingerprint != m_part.fingerprint
    r = _cli("data=fashion_mnist", f"workdir={tmp_path}", "data.train_limit=70000")
    assert r.returncode == 2 and "data.train_limit=70000" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()


def test_train_label_noise(tmp_path):
    """data.train_label_noise: that fraction of train labels moved to another class, the same on every run, a
    prefix keeps its labels, the images and the val split untouched, the rate in the fingerprint."""
    cfg = {"name": "toy", "source": "toy", "seed": 0, "train_size": 2000, "val_size": 300, "num_classes": 10}
    clean, noisy = list(sources.from_config(cfg, "train")), sources.from_config({**cfg, "train_label_noise": 0.25},
                                                                                 "train")
    got = list(noisy)
    assert got == list(sources.from_config({**cfg, "train_label_noise": 0.25}, "train"))  # deterministic
    assert [(d, e) for d, e, _ in got] == [(d, e) for d, e, _ in clean]  # images unchanged
    changed = [(a[2], b[2]) for a, b in zip(clean, got) if a[2] != b[2]]
    assert 0.21 < len(changed) / len(got) < 0.29  # every flip lands on another class (none is a no-op)
    assert len(Counter(new for _, new in changed)) == 10  # symmetric: flips reach every class
    part = list(sources.from_config({**cfg, "train_size": 500, "train_label_noise": 0.25}, "train"))
    assert part == got[:500]
    assert list(sources.from_config({**cfg, "train_label_noise": 0.25}, "val")) == list(
        sources.from_config(cfg, "val"))  # accuracy is measured against clean labels
    assert noisy.source["label_noise"] == 0.25
    m = write_shards(noisy, tmp_path / "noisy", shard_size=500, num_classes=10, class_names=noisy.class_names,
                     source=noisy.source)
    c = sources.from_config(cfg, "train")
    assert m.fingerprint != write_shards(c, tmp_path / "clean", shard_size=500, num_classes=10,
                                         class_names=c.class_names, source=c.source).fingerprint
    with pytest.raises(ConfigError, match=r"data.train_label_noise must be in \[0, 1\), got 1.0"):
        sources.label_noise(c, 1.0, 0)
    r = _cli(f"workdir={tmp_path / 'w'}", "data.train_label_noise=1.5")
    assert r.returncode == 2 and "data.train_label_noise=1.5" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w" / "data").exists()


def test_fashion_mnist_bad_idx(tmp_path):
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (3).to_bytes(4, "big") + bytes([1, 2, 3]))  # image magic on labels
    with pytest.raises(ShardError, match="t10k-labels-idx1-ubyte.gz.*magic"):
        sources.fashion_mnist(tmp_path, "val")
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes([1, 2, 3]))  # count says 5, holds 3
    with pytest.raises(ShardError, match="t10k-labels-idx1-ubyte.gz.*5"):
        sources.fashion_mnist(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="train-labels"):
        sources.fashion_mnist(tmp_path, "train")


# ------------------------------------------------------------------------------------------------ folder
def _jpeg(rng, size=(20, 16)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _tree(root, classes=("cat", "dog", "eel"), per_class=6):
    rng = np.random.default_rng(0)
    files = {}
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for j in range(per_class if split == "train" else 2):
                p = d / (f"img{j}.JPEG" if j == 0 else f"img{j}.jpg")
                p.write_bytes(_jpeg(rng))
                files[p] = classes.index(c)
            (d / "notes.txt").write_text("not an image")
    return files


def test_folder_source(tmp_path):
    files = _tree(tmp_path / "tree")
    s = sources.folder(tmp_path / "tree", "train", seed=0)
    assert s.class_names == ["cat", "dog", "eel"] and len(s) == 18
    m = write_shards(s, tmp_path / "out" / "train", shard_size=4, num_classes=3, class_names=s.class_names,
                     source=s.source)
    verify_shards(m, deep=True)
    assert m.image_exts == ["jpg"]
    by_bytes = {p.read_bytes(): (p, lab) for p, lab in files.items() if "/train/" in str(p)}
    got = [(data, label) for k in range(m.num_shards) for _, _, data, label in m.iter_shard(k)]
    assert len(got) == 18 and {d for d, _ in got} == set(by_bytes)  # stored as-is: a permutation of the files
    assert all(by_bytes[d][1] == label for d, label in got)
    order = [by_bytes[d][0] for d, _ in got]
    assert order != sorted(order, key=lambda p: (p.parent.name, p.name))  # not class-sorted
    assert len({lab for _, lab in got[:6]}) > 1  # class-mixed blocks
    assert [d for d, *_ in sources.folder(tmp_path / "tree", "train", seed=0)] == [d for d, _ in got]
    assert [d for d, *_ in sources.folder(tmp_path / "tree", "train", seed=1)] != [d for d, _ in got]
    v = sources.folder(tmp_path / "tree", "val", seed=0)
    assert len(v) == 6 and v.class_names == s.class_names


def test_folder_bad_inputs(tmp_path):
    _tree(tmp_path / "tree")
    bad = tmp_path / "tree" / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ShardError, match="broken.png"):
        list(sources.folder(tmp_path / "tree", "train"))
    (tmp_path / "tree" / "val" / "yak").mkdir()
    with pytest.raises(ShardError, match="yak"):
        sources.folder(tmp_path / "tree", "val")
    with pytest.raises(FileNotFoundError):
        sources.folder(tmp_path / "nothing", "train")


def test_a_class_missing_from_a_split_is_refused_by_name_unless_allowed(tmp_path):
    tree = tmp_path / "tree"
    _tree(tree)
    shutil.rmtree(tree / "val" / "eel")
    with pytest.raises(ShardError) as info:
        sources.folder(tree, "val")
    assert str(info.value) == (f"{tree / 'val' / 'eel'}: class 'eel' of {tree / 'train'} has no folder in val/; "
                               f"add it, or set data.allow_empty_classes=true to keep the class without val samples")
    v = sources.folder(tree, "val", allow_empty_classes=True)
    assert v.class_names == ["cat", "dog", "eel"] and len(v) == 4
    (tree / "val" / "yak").mkdir()  # the reverse: a val class that train does not have
    with pytest.raises(ShardError, match=rf"{tree / 'val' / 'yak'}: class folder not present in {tree / 'train'}"):
        sources.folder(tree, "val", allow_empty_classes=True)


def test_a_symlink_that_does_not_resolve_is_refused_by_path(tmp_path):
    tree = tmp_path / "tree"
    _tree(tree)
    good = tree / "train" / "cat" / "img1.jpg"
    (tree / "train" / "cat" / "alias.jpg").symlink_to(good)  # a symlink that resolves is an image like any other
    assert len(sources.folder(tree, "train")) == 19
    for link, target, why in [(tree / "train" / "dog" / "gone.jpg", tree / "nowhere.jpg", "No such file"),
                              (tree / "val" / "eel" / "loop.jpg", tree / "val" / "eel" / "loop.jpg", "symbolic links"),
                              (tree / "train" / "fox", tmp_path / "no-such-folder", "No such file")]:
        link.symlink_to(target)
        with pytest.raises(ShardError, match=rf"^{link}: symlink does not resolve \(.*{why}.*\): fix or remove it$"):
            sources.folder(tree, link.relative_to(tree).parts[0])
        link.unlink()


@pytest.mark.parametrize("break_it, needle", [
    (lambda tree: (tree / "train" / "dog" / "gone.jpg").symlink_to(tree / "nowhere.jpg"),
     "train/dog/gone.jpg: symlink does not resolve (No such file or directory): fix or remove it"),
    (lambda tree: shutil.rmtree(tree / "val" / "dog"), "val/dog: class 'dog' of"),  # val is listed before any decode
])
def test_make_shards_refuses_a_broken_tree_in_one_line_and_writes_nothing(tmp_path, break_it, needle):
    tree = tmp_path / "tree"
    _tree(tree)
    break_it(tree)
    r = _cli("data=folder", f"data.root={tree}", "data.num_classes=3", f"workdir={tmp_path / 'w'}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]
    assert lines[0].startswith("make_shards: error: ")
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.tar"))


def test_class_names_are_part_of_the_fingerprint(tmp_path):
    m = _write_toy(tmp_path / "train", 64)
    mf = m.split_dir / shards.MANIFEST
    d = json.loads(mf.read_text())
    assert d["version"] == 2
    names = list(d["class_names"])
    assert shards.fingerprint_of([s.sha256 for s in m.shards], m.n, m.num_classes, names) == m.fingerprint
    swapped = [names[1], names[0], *names[2:]]
    assert shards.fingerprint_of([s.sha256 for s in m.shards], m.n, m.num_classes, swapped) != m.fingerprint
    mf.write_text(json.dumps({**d, "class_names": swapped}))  # two names swapped by hand
    with pytest.raises(ShardError, match=rf"{mf}: invalid manifest: fingerprint does not match the shard hashes and "
                                         rf"class_names \['{swapped[0]}', '{swapped[1]}'"):
        load_manifest(m.split_dir)
    mf.write_text(json.dumps({**d, "version": 1}))  # written by an earlier version: refused with the fix
    with pytest.raises(ShardError, match=rf"{mf}: manifest version 1, .*pipeline.make_shards overwrite=true"):
        load_manifest(m.split_dir)


# -------------------------------------------------------------------------------------------- bad input
def test_label_out_of_range_at_write(tmp_path):
    png = sources.encode_png(np.zeros((4, 4, 3), np.uint8))
    samples = [(png, "png", 1), (png, "png", 10)]
    with pytest.raises(ShardError, match="key 000001: label 10 out of range"):
        write_shards(samples, tmp_path / "train", shard_size=4, num_classes=10,
                     class_names=[str(i) for i in range(10)], source={})
    assert not any(tmp_path.iterdir())  # temp dir removed, nothing installed


def test_source_shorter_or_longer_than_announced(tmp_path):
    """A source that ends early (mid-shard or on a shard boundary) or runs on is refused; nothing installed."""
    png = sources.encode_png(np.zeros((4, 4, 3), np.uint8))
    names = [str(i) for i in range(10)]
    for got, announced, why in [(5, 6, "yielded 5 samples, announced 6"), (4, 6, "yielded 4 samples, announced 6"),
                                (7, 6, "yields more than the announced 6")]:
        with pytest.raises(ShardError, match=why):
            write_shards(iter([(png, "png", 1)] * got), tmp_path / "train", shard_size=4, num_classes=10,
                         class_names=names, source={}, n=announced)
        assert not any(tmp_path.iterdir())  # temp dir removed, nothing installed


def test_tampered_label(toy_shards, tmp_path):
    m = _copy_split(toy_shards.val, tmp_path / "val")
    path = _rewrite_shard(m, 1, lambda name, d: (name, b"12") if name == "000070.cls" else (name, d))
    m = load_manifest(m.split_dir)
    for check in (lambda: verify_shards(m, deep=True), lambda: list(m.iter_shard(1))):
        with pytest.raises(ShardError, match=rf"{path}: key 000070: label 12 out of range"):
            check()


def test_missing_and_misordered_keys(toy_shards, tmp_path):
    m = _copy_split(toy_shards.val, tmp_path / "val")
    path = _rewrite_shard(m, 0, lambda name, d: None if name.startswith("000005.") else (name, d))
    with pytest.raises(ShardError, match=rf"{path}: key 000006: expected key 000005"):
        list(load_manifest(m.split_dir).iter_shard(0))
    path = _rewrite_shard(m, 1, lambda name, d: None if name == "000099.cls" else (name, d))
    with pytest.raises(ShardError, match=rf"{path}: key 000099: missing cls"):
        list(load_manifest(m.split_dir).iter_shard(1))


def test_undecodable_image(toy_shards, tmp_path):
    m = _copy_split(toy_shards.val, tmp_path / "val")
    path = _rewrite_shard(m, 0, lambda name, d: (name, d[:40] + b"\x00" * 60 + d[100:]) if name == "000003.png"
                          else (name, d))
    m = load_manifest(m.split_dir)
    assert len(list(m.iter_shard(0))) == 64  # hot path: no decode
    with pytest.raises(ShardError, match=rf"{path}: key 000003: image does not decode"):
        verify_shards(m, deep=True)


def test_sha_mismatch(toy_shards, tmp_path):
    m = _copy_split(toy_shards.val, tmp_path / "val")
    # a valid shard, but not the one the manifest describes (one label changed)
    path = _rewrite_shard(m, 1, lambda name, d: (name, b"3" if d != b"3" else b"4") if name == "000070.cls"
                          else (name, d), fix_manifest=False)
    with pytest.raises(ShardError, match=rf"{path}: sha256 .* does not match"):
        verify_shards(m, deep=False)
    path.unlink()
    with pytest.raises(ShardError, match=rf"{path}: shard file missing"):
        verify_shards(m, deep=False)


def test_truncated_tar(toy_shards, tmp_path):
    m = _copy_split(toy_shards.val, tmp_path / "val")
    path = m.shard_path(0)
    raw = path.read_bytes()
    for cut in (len(raw) // 2 + 100, len(raw) // 2 // 512 * 512):  # inside a member / at a header boundary
        path.write_bytes(raw[:cut])
        with pytest.raises(ShardError, match=rf"{path}: sha256"):
            verify_shards(m, deep=False)
        with pytest.raises(ShardError, match=rf"{path}: (corrupt or truncated tar|holds \d+ samples)"):
            list(m.iter_shard(0))
        _fix_manifest(m, 0)
        with pytest.raises(ShardError, match=rf"{path}: (corrupt or truncated tar|holds \d+ samples)"):
            verify_shards(load_manifest(m.split_dir), deep=True)
    path.write_bytes(b"")
    with pytest.raises(ShardError, match=rf"{path}"):
        list(m.iter_shard(0))


def test_corrupt_bytes_in_tar(toy_shards, tmp_path):
    m = _copy_split(toy_shards.val, tmp_path / "val")
    path = m.shard_path(0)
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        members = {ti.name: ti for ti in tf.getmembers()}
    # a header (checksum breaks) and the middle of an image's data
    for offset in (members["000010.png"].offset + 20, members["000020.png"].offset_data + 200):
        bad = bytearray(raw)
        bad[offset:offset + 16] = b"\xff" * 16
        path.write_bytes(bytes(bad))
        _fix_manifest(m, 0)
        with pytest.raises(ShardError, match=rf"{path}"):
            verify_shards(load_manifest(m.split_dir), deep=True)


def test_missing_or_invalid_manifest(toy_shards, tmp_path):
    with pytest.raises(ShardError, match=rf"{tmp_path / 'manifest.json'}: missing manifest"):
        load_manifest(tmp_path)
    m = _copy_split(toy_shards.val, tmp_path / "val")
    mf = m.split_dir / "manifest.json"
    mf.write_text("{not json")
    with pytest.raises(ShardError, match=rf"{mf}: invalid manifest"):
        load_manifest(m.split_dir)
    d = toy_shards.val.to_json()
    d["shards"][0]["count"] = 63
    mf.write_text(json.dumps(d))
    with pytest.raises(ShardError, match=rf"{mf}: invalid manifest: shard 0"):
        load_manifest(m.split_dir)
    d = toy_shards.val.to_json()
    d["shards"][0]["sha256"] = "0" * 64
    mf.write_text(json.dumps(d))
    with pytest.raises(ShardError, match="fingerprint"):
        load_manifest(m.split_dir)
