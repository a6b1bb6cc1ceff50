"""Miniature stand-ins of the same shape for what the documented scale-up commands expect: an ImageNet tree (all 1000
synset folders, ImageNet's file names, 500x375 JPEGs), an own-data folder (PNG and JPEG), a Hugging Face cache
holding random weights for timm's hub repos (so nothing downloads), and fake Slurm commands (srun, scontrol)."""

from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGENET_SIZE = (500, 375)


def synsets() -> list[str]:
    """ImageNet-1k's 1000 synsets in timm's (sorted) class order."""
    import timm.data

    names = timm.data.ImageNetInfo("imagenet-1k").label_names()
    assert len(names) == 1000 and names[0] == "n01440764", names[:3]
    return list(names)


@functools.lru_cache(maxsize=4)
def _noise(h: int, w: int) -> np.ndarray:
    """One fixed texture per size (rolled per image): drawing fresh noise for 2000 photo-size images is slow."""
    return np.random.default_rng(0).normal(0, 12, (h, w, 3)).astype(np.int16)


def class_image(label: int, variant: int, size: tuple[int, int], classes: int) -> Image.Image:
    """An image a CNN could tell apart by class: a class hue and shape on a textured background; ``variant`` moves,
    scales and re-noises it."""
    rng = np.random.default_rng([label, variant])
    w, h = size
    hue = (label * 0.618034) % 1.0
    base = np.array([np.sin(2 * np.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)]) * 255
    noise = np.roll(_noise(h, w), (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
    img = Image.fromarray(np.clip(noise + (base * 0.35 + 40).astype(np.int16), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.2, 0.35))
    cx, cy = int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.35, 0.65))
    colour = tuple(int(v) for v in 255 - base)
    shape = (label * 7 // max(classes, 1)) % 4 if classes > 4 else label % 4
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    elif shape == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        for k in range(-r, r, max(r // 4, 2)):
            draw.line([(cx + k, cy - r), (cx + k, cy + r)], fill=colour, width=max(r // 8, 1))
    return img


def _jpeg(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    path.write_bytes(buf.getvalue())


def imagenet_tree(root: Path) -> Path:
    """``root/train/<synset>/<synset>_<n>.JPEG`` and ``root/val/<synset>/ILSVRC2012_val_<8 digits>.JPEG``: one
    500x375 image per class per split, all 1000 synsets."""
    names = synsets()
    val_number = 0
    for label, syn in enumerate(names):
        for split in ("train", "val"):
            (root / split / syn).mkdir(parents=True)
        _jpeg(class_image(label, 0, IMAGENET_SIZE, len(names)), root / "train" / syn / f"{syn}_{10026 + label}.JPEG")
        val_number += 1
        _jpeg(class_image(label, 1, IMAGENET_SIZE, len(names)),
              root / "val" / syn / f"ILSVRC2012_val_{val_number:08d}.JPEG")
    return root


def imagenet_wds_tree(root: Path, train=(3, 4, 3), val=(3, 1)) -> Path:
    """timm/imagenet-1k-wds's layout in miniature: ``imagenet1k-{train,validation}-<k>.tar`` of ``<key>.jpg`` +
    ``.cls`` + ``.json`` (500x375 JPEGs, labels spread over the 1000 classes, shards of unequal size) and the
    ``_info.json`` naming them."""
    import json

    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    names, splits = synsets(), {}
    for split, counts, digits in (("train", train, 4), ("validation", val, 2)):
        files, index = [], 0
        for k, count in enumerate(counts):
            files.append(f"imagenet1k-{split}-{k:0{digits}d}.tar")
            with wds.TarWriter(str(root / files[-1])) as w:
                for _ in range(count):
                    label = (index * 337 + (split == "validation") * 101) % len(names)
                    buf = io.BytesIO()
                    class_image(label, index, IMAGENET_SIZE, len(names)).save(buf, format="JPEG", quality=90)
                    key = f"{names[label]}_{1000 + index}" if split == "train" else f"ILSVRC2012_val_{index + 1:08d}"
                    w.write({"__key__": key, "jpg": buf.getvalue(), "cls": str(label).encode(),
                             "json": json.dumps({"filename": f"{key}.JPEG", "label": label,
                                                 "class_name": names[label]}).encode()})
                    index += 1
        splits[split] = {"name": split, "num_samples": index, "filenames": files, "shard_lengths": list(counts)}
    (root / "_info.json").write_text(json.dumps({"name": "imagenet-1k", "splits": splits}))
    return root


def own_folder(root: Path, classes=("cat", "dog", "fox"), train: int = 4, val: int = 2) -> Path:
    """``root/{train,val}/<class>/`` with PNG and JPEG images of assorted sizes."""
    for label, name in enumerate(classes):
        for split, n in (("train", train), ("val", val)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(n):
                img = class_image(label, 100 * (split == "val") + j, (320 + 16 * j, 240), len(classes))
                if j % 2:
                    img.save(folder / f"{name}_{j}.png")
                else:
                    _jpeg(img, folder / f"{name}_{j}.jpg")
    return root


def hf_cache(hf_home: Path, model_names: list[str]) -> dict[str, str]:
    """Random (seeded) weights for each timm ``model_names`` entry, at the Hub repo timm resolves it to
    (pretrained_cfg.hf_hub_id), in huggingface_hub's cache layout under ``hf_home/hub``: blobs/<sha256>,
    snapshots/<commit>/model.safetensors -> the blob, refs/main = <commit>. Returns {name: repo id}."""
    import timm
    import torch
    from safetensors.torch import save_file

    repos = {}
    for name in model_names:
        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
        assert repo, f"timm resolves {name} to no Hub repo"
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
        (folder / "blobs").mkdir(parents=True)
        tmp = folder / "blobs" / "incoming"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"format": "pt"})
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        tmp.rename(folder / "blobs" / digest)
        commit = hashlib.sha1(f"{repo}@readme-test".encode()).hexdigest()
        snap = folder / "snapshots" / commit
        snap.mkdir(parents=True)
        os.symlink(f"../../blobs/{digest}", snap / "model.safetensors")
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
        repos[name] = repo
    return repos


SRUN = '''#!/usr/bin/env python3
"""Fake srun: SLURM_NNODES copies of its command (one task per node), each with SLURM_NODEID/SLURM_PROCID;
--kill-on-bad-exit: the first copy that fails stops the others (SIGTERM, then SIGKILL). Exits with that copy's
status (without the option: the first non-zero status, 128 + N for a signal)."""
import os, signal, subprocess, sys, time

args, kill = sys.argv[1:], False
while args and args[0].startswith("-"):
    opt = args.pop(0)
    if opt.startswith("--kill-on-bad-exit"):
        kill = opt.partition("=")[2] not in ("0",)
n = int(os.environ["SLURM_NNODES"])
procs = [subprocess.Popen(args, env={**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i),
                                     "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": str(n)}) for i in range(n)]
failed = None
while any(p.poll() is None for p in procs):
    bad = [p for p in procs if p.poll() not in (None, 0)]
    if bad and kill and failed is None:
        failed = bad[0]
        print(f"srun: error: task {procs.index(failed)} exited {failed.returncode}: terminating the job step",
              file=sys.stderr)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.2)
codes = [p.returncode for p in procs]
bad = failed.returncode if failed is not None else next((c for c in codes if c), 0)
sys.exit(bad if bad > 0 else (128 - bad if bad < 0 else 0))
'''

SCONTROL = '''#!/usr/bin/env bash
# Fake scontrol: `scontrol show hostnames <nodelist>` prints one host per node (all this machine).
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: only 'show hostnames'" >&2; exit 1; }
for ((i = 0; i < SLURM_NNODES; i++)); do echo localhost; done
'''


def fake_slurm(bin_dir: Path) -> Path:
    """``bin_dir`` with executable ``srun`` and ``scontrol`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir
