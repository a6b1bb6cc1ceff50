"""Cache provenance: what a store records about how its targets were made, and how two records are compared.

A store's attributes hold the teacher (name, weights sha256, classes, resolution, mean/std), the data fingerprint
and N, the augmentation (canonical dict and hash), the run seed, S, K, the replay contract version, library
versions and the project version. Opening a store for a run compares the fields that decide the views and the
targets and names the first that differs (ProvenanceMismatch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from importlib import metadata

import numpy as np

from pipeline.errors import ProvenanceMismatch, as_text
from pipeline.replay.contract import CONTRACT_VERSION
from pipeline.replay.view_params import IMPLIED
from pipeline.version import __version__

VERSION_LIBS = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "pillow": "pillow",
                 "numpy": "numpy", "zarr": "zarr"}
MISSING = "<missing>"


def library_versions() -> dict:
    """Installed versions of the libraries that decide pixels and numerics (None where not installed)."""
    out = {}
    for key, dist in VERSION_LIBS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise TypeError(f"provenance value of type {type(x).__name__} is not JSON-serialisable: {x!r}")


def canonical(x):
    """JSON round trip: tuples become lists, numpy scalars plain numbers; what the store's attrs hold."""
    return json.loads(json.dumps(x, default=_json_default, allow_nan=True))


def store_key(layout: dict, provenance: dict) -> str:
    """sha256 of a store's layout and provenance (canonical JSON, sorted keys): what its unit tags bind to. Two
    builds of one configuration share it; another teacher, data set, augmentation or layout changes it."""
    text = json.dumps({"layout": layout, "provenance": provenance}, sort_keys=True, default=_json_default,
                      allow_nan=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def first_difference(a, b, prefix: str = ""):
    """(dotted field, a value, b value) of the first difference between two canonical JSON values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(key, MISSING), b.get(key, MISSING), f"{prefix}{key}.")
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return None if all(first_difference(x, y) is None for x, y in zip(a, b)) else (prefix[:-1], a, b)
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return prefix[:-1], a, b
    if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return None
    return prefix[:-1], a, b


def lookup(d: dict, dotted: str):
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return MISSING
        cur = cur[part]
    return cur


def check_consistent(prov: dict, layout: dict) -> None:
    """Provenance keys that restate a layout value must agree with it (a caller bug otherwise)."""
    for field, key in (("num_seeds", "num_seeds"), ("topk", "topk"), ("N", "N"), ("num_classes", "num_classes"),
                       ("teacher.num_classes", "num_classes")):
        v = lookup(prov, field)
        if v is not MISSING and v != layout[key]:
            raise ValueError(f"provenance {field}={v} contradicts the store layout {key}={layout[key]}")


def augment_differences(stored: Mapping, ours: Mapping) -> list[tuple[str, object, object]]:
    """(``augment.<key>``, store value, config value) for every augmentation key that differs, in key order; keys
    a canonical dict leaves out at their implied value (replay.view_params.IMPLIED) compare as that value."""
    a, b = canonical({**IMPLIED, **stored}), canonical({**IMPLIED, **ours})
    out = []
    for key in sorted(set(a) | set(b)):
        diff = first_difference(a.get(key, MISSING), b.get(key, MISSING))
        if diff is not None:
            out.append((f"augment.{key}", diff[1], diff[2]))
    return out


def check_augment(path, stored, aug) -> None:
    """Refuse a store whose recorded augmentation (``stored``: its provenance ``augment``) differs from the run's
    AugmentConfig ``aug``, naming every key that differs (the hash alone says only that something does). A store
    that records no augmentation dict is left to the hash check."""
    if not isinstance(stored, Mapping):
        return
    diffs = augment_differences(stored, aug.canonical())
    if diffs:
        field, theirs, ours = diffs[0]
        also = "; ".join(f"{f}: store has {as_text(t)}, config has {as_text(o)}" for f, t, o in diffs[1:])
        raise ProvenanceMismatch(path, field, theirs, ours,
                                 (f"also {also}; " if also else "") + "the cache holds other views: run with the "
                                 "cache.s augmentation, or rebuild it with python -m pipeline.teacher_cache")


def without(d: dict, dotted_fields) -> dict:
    """Copy of a nested dict without the given dotted keys."""
    d = json.loads(json.dumps(d))
    for field in dotted_fields:
        parts = field.split(".")
        cur = d
        for part in parts[:-1]:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(parts[-1], None)
    return d


def build_provenance(cfg, manifest, aug, teacher) -> dict:
    """The provenance stage one records for a store built from ``cfg`` (and checks when resuming)."""
    from pipeline.models.teacher import teacher_provenance

    return {
        "teacher": teacher_provenance(cfg.teacher, teacher, manifest.num_classes),
        "data_fingerprint": manifest.fingerprint,
        "N": manifest.n,
        "augment": aug.canonical(),
        "augment_hash": aug.hash(),
        "run_seed": int(cfg.run_seed),
        "num_seeds": int(cfg.cache.num_seeds),
        "topk": min(int(cfg.cache.topk), manifest.num_classes),  # K = all classes when C < cache.topk
        "num_classes": manifest.num_classes,
        "contract_version": CONTRACT_VERSION,
        "replay_backend": str(cfg.replay.backend),  # pixels may differ between backends (reduced-DCT decode)
        "versions": library_versions(),
        "project_version": __version__,
    }


def expected_provenance(manifest, aug, run_seed: int) -> dict:
    """The provenance fields stage two checks, from its own config."""
    return {"data_fingerprint": manifest.fingerprint, "augment_hash": aug.hash(), "run_seed": int(run_seed),
            "num_classes": int(manifest.num_classes)}
