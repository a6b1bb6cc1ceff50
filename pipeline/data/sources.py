"""Sample sources: deterministic streams of ``(image_bytes, ext, label)`` that the shard writer numbers.

Each source function returns a :class:`SampleSet`: a sized, re-iterable, pure description of a split.
Iterating it yields ``(image_bytes: bytes, ext: str, label: int)``, or with a fourth item, a dict the shard keeps
as the sample's ``.json`` (``folder``: the original file name), in the order that fixes the global
sample indices (docs/design.md, section 1). Orders are class-mixed (mixup pairs partners inside blocks of
consecutive indices): ``toy`` is random by construction, Fashion-MNIST's file order is already mixed, and
``folder`` applies a seeded permutation to its sorted file list.
"""

from __future__ import annotations

import gzip
import itertools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.data.images import capped, encode_png, normalised  # noqa: F401 - encode_png: part of this module's API
from pipeline.data.tar_samples import IMAGE_EXTS
from pipeline.errors import ConfigError, MissingInput, ShardError

Sample = tuple  # (bytes, str, int) or (bytes, str, int, dict)

TOY_CLASSES = [
    "stripes_h", "stripes_v", "checker", "grid", "rings",
    "disk", "square", "cross", "triangle", "x",
]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
SPLITS = ("train", "val")


@dataclass
class SampleSet:
    """A split of a source: ``len()`` samples, iterated afresh each time (deterministic)."""

    n: int
    class_names: list[str]
    source: dict
    _iterate: Callable[[], Iterator[Sample]] = field(repr=False)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Sample]:
        return self._iterate()


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
    return SPLITS.index(split)


# ----------------------------------------------------------------------------------------------- toy
TOY_SIZE = 32
_TOY_STREAM = 0x70F  # keeps the toy generators apart from any other use of (seed, split, i)
_NOISE_STREAM = 0x1AB  # and the label-noise draws apart from both
_YY, _XX = np.mgrid[0:TOY_SIZE, 0:TOY_SIZE].astype(np.float32) + 0.5


def _toy_mask(label: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pattern of class ``label`` in object coordinates (u, v; 1 unit = 4 px), random period and phase.

    Every class is its own mirror image (a horizontal flip, which the augmentation applies, keeps the class).
    """
    period = rng.uniform(0.9, 1.3)  # ~4-5 px
    phase = rng.uniform(0, 1)
    bands = lambda a: np.floor(a / period + phase) % 2 == 0  # noqa: E731
    lines = lambda a: (a / period + phase) % 1 < 0.3  # noqa: E731
    box, r = np.maximum(np.abs(u), np.abs(v)), np.hypot(u, v)
    size = rng.uniform(2.4, 3.4)  # half-size of a shape: 10-14 px
    if label == 0:  # horizontal stripes
        return bands(v)
    if label == 1:  # vertical stripes
        return bands(u)
    if label == 2:  # checkerboard
        return bands(u) ^ bands(v)
    if label == 3:  # grid lines
        return lines(u) | lines(v)
    if label == 4:  # concentric rings
        return bands(r)
    if label == 5:  # disk
        return r < size
    if label == 6:  # square
        return box < size * 0.85
    if label == 7:  # cross (a plus sign)
        return ((np.abs(u) < size * 0.28) | (np.abs(v) < size * 0.28)) & (box < size)
    if label == 8:  # triangle, apex up
        return (v < size * 0.85) & (np.abs(u) < (size * 0.85 - v) * 0.55) & (v > -size * 0.95)
    if label == 9:  # X
        p, q = (u + v) * 0.7071, (u - v) * 0.7071
        return ((np.abs(p) < size * 0.24) | (np.abs(q) < size * 0.24)) & (box < size * 0.9)
    raise ValueError(label)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    while True:
        fg, bg = rng.uniform(0, 255, size=(2, 3))
        if np.abs(fg - bg).sum() > 160:
            return fg, bg


def toy_image(rng: np.random.Generator, label: int) -> np.ndarray:
    """One 32x32 RGB uint8 image of class ``label``: a patch of the class's pattern (or a plain disk/square) at a
    random place, small rotation, random colours, pixel noise. Textures: what a small ViT on 8 px patches learns within
    CPU minutes (on shapes it stayed near chance), and a small CNN faster still."""
    fg, bg = _colour_pair(rng)
    img = np.broadcast_to(bg, (TOY_SIZE, TOY_SIZE, 3)).astype(np.float32).copy()
    cx, cy = rng.uniform(12, 20, 2)
    rot = rng.uniform(-0.2, 0.2)
    dx, dy = (_XX - cx) / 4, (_YY - cy) / 4
    u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
    mask = _toy_mask(label, u, v, rng)
    if label < 5:  # textures fill a square patch of random size
        mask &= np.maximum(np.abs(u), np.abs(v)) < rng.uniform(2.4, 3.6)
    img[mask] = fg
    img += rng.normal(0, rng.uniform(2, 8), img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def toy(seed: int, n: int, split: str) -> SampleSet:
    """``n`` synthetic RGB 32x32 PNGs of 10 texture/shape classes (:data:`TOY_CLASSES`).

    Sample ``i`` comes from its own generator keyed by (seed, split, i): train and val are different
    streams, and a smaller ``n`` gives a prefix of a larger one.
    """
    sid, seed, n = _split_id(split), int(seed), int(n)
    if n <= 0:
        raise ConfigError(f"toy: n must be positive, got {n}")

    def iterate() -> Iterator[Sample]:
        for i in range(n):
            rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, sid, i, _TOY_STREAM])))
            label = int(rng.integers(len(TOY_CLASSES)))
            yield encode_png(toy_image(rng, label)), "png", label

    return SampleSet(n, list(TOY_CLASSES), {"kind": "toy", "seed": seed, "split": split, "n": n}, iterate)


# ------------------------------------------------------------------------------------- Fashion-MNIST
_FMNIST_FILES = {"train": "train", "val": "t10k"}
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise MissingInput(f"{path}: no such file (Fashion-MNIST; Debian package dataset-fashion-mnist)")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ShardError(f"{path}: cannot read gzip IDX file: {exc}") from exc
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ShardError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    got = struct.unpack(">I", raw[:4])[0]
    if got != magic:
        raise ShardError(f"{path}: bad IDX magic number 0x{got:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    expected = int(np.prod(dims))
    if len(raw) - head != expected:
        raise ShardError(f"{path}: IDX header says {dims} = {expected} bytes of data, file has {len(raw) - head}")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def fashion_mnist(root: str | os.PathLike, split: str) -> SampleSet:
    """Fashion-MNIST from gz IDX files: 60000 train, 10000 val (t10k); 28x28 grayscale PNGs (mode L),
    in file order."""
    _split_id(split)
    root = Path(root)
    stem = _FMNIST_FILES[split]
    img_path = root / f"{stem}-images-idx3-ubyte.gz"
    lab_path = root / f"{stem}-labels-idx1-ubyte.gz"
    labels = _read_idx(lab_path, _IDX_LABELS, 1)
    images = _read_idx(img_path, _IDX_IMAGES, 3)
    if images.shape[0] != labels.shape[0]:
        raise ShardError(f"{img_path}: {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels")
    if images.shape[1:] != (28, 28):
        raise ShardError(f"{img_path}: images are {images.shape[1:]}, expected (28, 28)")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        bad = int(np.argmax(labels >= len(FASHION_MNIST_CLASSES)))
        raise ShardError(f"{lab_path}: label {int(labels[bad])} at position {bad} is out of range [0, 10)")

    def iterate() -> Iterator[Sample]:
        for img, lab in zip(images, labels):
            yield encode_png(img), "png", int(lab)

    return SampleSet(
        int(labels.shape[0]), list(FASHION_MNIST_CLASSES),
        {"kind": "fashion_mnist", "root": str(root), "split": split}, iterate,
    )


# ------------------------------------------------------------------------------------------- folder
def entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted, hidden ones left out; a symlink that does not resolve (dangling, or a loop) is a
    ShardError naming it: skipping it would drop a sample or a class without a word."""
    out = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for p in out:
        if p.is_symlink():
            try:
                p.stat()
            except OSError as exc:
                raise ShardError(f"{p}: symlink does not resolve ({exc.strerror}): fix or remove it") from None
    return out


def folder_classes(root: str | os.PathLike) -> list[str]:
    """Class names of a folder tree: the sorted subfolder names of ``<root>/train``."""
    train = Path(root) / "train"
    if not train.is_dir():
        raise MissingInput(f"{train}: no such directory (expected <root>/train/<class>/*)")
    names = [p.name for p in entries(train) if p.is_dir()]
    if not names:
        raise ShardError(f"{train}: no class subfolders")
    return names


def folder(root: str | os.PathLike, split: str, seed: int = 0, allow_empty_classes: bool = False) -> SampleSet:
    """Images under ``<root>/<split>/<class>/*`` (jpg/jpeg/png/webp/bmp, any case).

    Classes are the sorted subfolders of ``<root>/train`` (so train and val agree on label ids; a val
    class folder unknown to train is an error). A class folder without images, or missing from val, is refused by
    name unless ``allow_empty_classes`` (``data.allow_empty_classes``): then it stays a class, with no samples in
    that split. A symlink that does not resolve is refused by name. The global order is a permutation, seeded by
    ``seed``, of the file list sorted by (class, file name). Every file is decoded in full once as it is read (a
    truncated or corrupt one is a ShardError naming it); bytes are kept as they are (JPEG stays JPEG) unless the
    image is not 8-bit (16-bit, float): then an 8-bit PNG is stored (pipeline.data.images.normalised). Each
    sample carries its file name, ``{"filename": "<class>/<file>"}`` (the shard's ``.json`` sidecar).
    """
    _split_id(split)
    root = Path(root)
    classes = folder_classes(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise MissingInput(f"{split_dir}: no such directory")
    subs = [p for p in entries(split_dir) if p.is_dir()]
    _check_split_classes(root, split, classes, [p.name for p in subs], allow_empty_classes)
    files: list[tuple[Path, str, int]] = []
    for sub in subs:
        label = classes.index(sub.name)
        found = len(files)
        for f in entries(sub):
            ext = IMAGE_EXTS.get(f.suffix[1:].lower())
            if ext is not None and f.is_file():
                files.append((f, ext, label))
        if len(files) == found and not allow_empty_classes:
            raise ShardError(f"{sub}: class folder holds no images (jpg/jpeg/png/webp/bmp); remove it, or set "
                             f"data.allow_empty_classes=true to keep it as a class without {split} samples")
    if not files:
        raise ShardError(f"{split_dir}: no images (jpg/jpeg/png/webp/bmp) in class subfolders")
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([int(seed), _split_id(split), 0xF01])))
    order = rng.permutation(len(files))

    def iterate() -> Iterator[Sample]:
        for j in order:
            path, ext, label = files[j]
            data, ext = normalised(path.read_bytes(), ext, str(path))  # decoded in full once
            yield data, ext, label, {"filename": f"{path.parent.name}/{path.name}"}

    return SampleSet(
        len(files), classes, {"kind": "folder", "root": str(root), "split": split, "seed": int(seed)}, iterate
    )


def _check_split_classes(root: Path, split: str, classes: list[str], present: list[str], allow_missing: bool) -> None:
    """Every class folder of ``split`` is a class of train/, and every class of train/ has a folder in ``split``
    (unless ``allow_missing``: data.allow_empty_classes)."""
    unknown = [name for name in present if name not in classes]
    if unknown:
        raise ShardError(f"{root / split / unknown[0]}: class folder not present in {root / 'train'} (the classes "
                         f"are train/'s subfolders)")
    missing = [name for name in classes if name not in present]
    if missing and not allow_missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})" \
            if len(missing) > 1 else ""
        raise ShardError(f"{root / split / missing[0]}: class {missing[0]!r} of {root / 'train'} has no folder in "
                         f"{split}/{more}; add it, or set data.allow_empty_classes=true to keep the class without "
                         f"{split} samples")


# ------------------------------------------------------------------------------------------- config
def prefix(samples: SampleSet, n: int, field_name: str = "limit") -> SampleSet:
    """The first ``n`` samples of ``samples`` (a smaller, still class-mixed split: every source's order is
    mixed). The limit enters ``source`` and so the shard fingerprint."""
    if not 0 < n <= len(samples):
        raise ConfigError(f"{field_name}={n}: must be in [1, {len(samples)}] (the split has {len(samples)} samples)")

    def iterate() -> Iterator[Sample]:
        return itertools.islice(iter(samples), n)

    return SampleSet(n, samples.class_names, {**samples.source, "limit": n}, iterate)


def max_side(samples: SampleSet, side: int, quality: int) -> SampleSet:
    """``samples`` with every image's longer side capped at ``side`` (pipeline.data.images.capped). The cap and
    quality enter ``source`` and so the shard fingerprint."""
    name = samples.source.get("name", samples.source.get("kind"))

    def iterate() -> Iterator[Sample]:
        for j, (data, ext, label, *meta) in enumerate(samples):
            yield (*capped(data, ext, side, quality, f"{name} sample {j} (data.max_side={side})"), label, *meta)

    return SampleSet(len(samples), samples.class_names,
                     {**samples.source, "max_side": int(side), "max_side_quality": int(quality)}, iterate)


def label_noise(samples: SampleSet, rate: float, seed: int) -> SampleSet:
    """``samples`` with each label replaced, with probability ``rate``, by a uniformly drawn *other* class
    (symmetric noise, like web-scraped labels); the images are unchanged. Sample ``i``'s draw comes from its own
    generator keyed by (seed, i), so the noise is the same on every run and a prefix keeps its labels. The rate
    enters ``source`` and so the shard fingerprint."""
    rate, seed, c = float(rate), int(seed), len(samples.class_names)
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"data.train_label_noise must be in [0, 1), got {rate}")

    def iterate() -> Iterator[Sample]:
        for i, (data, ext, label, *meta) in enumerate(samples):
            rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, i, _NOISE_STREAM])))
            if rng.random() < rate:
                label = (int(label) + 1 + int(rng.integers(c - 1))) % c
            yield data, ext, label, *meta

    return SampleSet(len(samples), samples.class_names, {**samples.source, "label_noise": rate}, iterate)


_ROOT_HOLDS = {"fashion_mnist": "the Fashion-MNIST gz IDX files (Debian package dataset-fashion-mnist)",
               "folder": "train/<class>/* and val/<class>/* image folders"}


def data_root(data_cfg) -> Path:
    """``data.root`` of a source that reads one: unset, or not a directory, is one error naming data.root."""
    kind, root = data_cfg["source"], data_cfg.get("root")
    if root is None or str(root) in ("", "???"):
        raise ConfigError(f"data.root is not set: data.source={kind} reads {_ROOT_HOLDS[kind]} from it; "
                          f"set data.root=<directory>")
    if not Path(root).is_dir():
        raise MissingInput(f"data.root={root}: no such directory (data.source={kind} reads {_ROOT_HOLDS[kind]} "
                           f"from it)")
    return Path(root)


def from_config(data_cfg, split: str) -> SampleSet:
    """The :class:`SampleSet` for ``split`` of a ``pipeline/conf/data/*.yaml`` config (a mapping)."""
    kind = data_cfg["source"]
    if kind == "toy":
        n = data_cfg["train_size"] if split == "train" else data_cfg["val_size"]
        s = toy(data_cfg["seed"], n, split)
    elif kind == "fashion_mnist":
        s = fashion_mnist(data_root(data_cfg), split)
    elif kind == "folder":
        s = folder(data_root(data_cfg), split, data_cfg.get("seed", 0), bool(data_cfg.get("allow_empty_classes")))
    else:
        raise ConfigError(f"data.source: unknown data source {kind!r} (toy, fashion_mnist, folder; published shards "
                          f"are indexed, not read as samples: pipeline.data.published)")
    limit = data_cfg.get(f"{split}_limit")
    if limit is not None:
        s = prefix(s, int(limit), f"data.{split}_limit")
    if data_cfg.get("max_side"):
        quality = data_cfg.get("max_side_quality") or 90
        s = max_side(s, int(data_cfg["max_side"]), int(quality))
    if split == "train" and data_cfg.get("train_label_noise"):  # val labels stay clean: accuracy is against truth
        s = label_noise(s, data_cfg["train_label_noise"], int(data_cfg.get("seed") or 0))
    if len(s.class_names) != int(data_cfg["num_classes"]):
        raise ShardError(
            f"data.num_classes={data_cfg['num_classes']} but source {kind} has {len(s.class_names)} classes: "
            f"{s.class_names}"
        )
    s.source = {"name": data_cfg.get("name", kind), **s.source}
    return s
