"""Share a cache like a dataset: a finished store and the manifests of the shards it was built from, pushed to a
Hugging Face Hub dataset repo in one commit (huggingface_hub: ``create_repo`` + ``create_commit``; large files go
by LFS/Xet as the Hub decides). Stage two then reads the store in place, read-only, with every check a local store
gets (``cache.path=hf://datasets/<repo>/<store>.zarr``, pipeline.storage.zarr_store).

What lands in the repo:

- ``<store>.zarr/...``: every file of the store, as built;
- ``shards/<data.name>/{train,val}/manifest.json``: the manifests stage two loads (``data.shards`` points at
  that folder). Published shards are named in them by URL (hf://, https://) and read in place; our own shards
  are named relative to the manifest: ``push.shards=true`` uploads them beside it, else a user makes the same
  shards (``make_shards`` with the same data keys) and keeps their own ``data.shards``: the data fingerprint in
  the store's provenance tells whether their views are this store's.

Refused by name before anything is uploaded: a store a writer holds, a unit not done or damaged (every unit is
checked as ``verify_cache`` does), a store that is not this configuration's (provenance, pixels, shard layout).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline import storage
from pipeline.cache.integrity import check_store
from pipeline.cache.reader import open_cache
from pipeline.config import split_dir
from pipeline.data.shards import MANIFEST, load_manifest
from pipeline.errors import CacheError, ConfigError, StorageError
from pipeline.replay.view_params import augment_config

log = logging.getLogger("pipeline")
SPLITS = ("train", "val")


def push_cache(cfg: DictConfig) -> dict:
    """Check the store at ``cache.path`` and push it with its manifests to ``push.repo``; returns what to use."""
    repo = _repo(cfg.push.repo)
    path = storage.as_path(cfg.cache.path)
    if storage.is_url(path):
        raise ConfigError(f"cache.path={path}: push_cache uploads a store from a local folder; copy it here first")
    manifests = {split: load_manifest(split_dir(cfg, split)) for split in SPLITS}
    store, _ = open_cache(path, manifest=manifests["train"], aug=augment_config(cfg), run_seed=int(cfg.run_seed),
                          mode="hard")
    require_finished(store)
    data = f"shards/{cfg.data.name}"
    files = [(Path(path) / rel, f"{path.name}/{rel}") for rel in sorted(storage.relative_files(path))]
    for split, m in manifests.items():
        files.append((m.split_dir / MANIFEST, f"{data}/{split}/{MANIFEST}"))
        if bool(cfg.push.shards):
            files += [(m.split_dir / s.name, f"{data}/{split}/{s.name}") for s in m.shards if not s.url]
        if any(s.url and not storage.is_url(s.url) for s in m.shards):
            log.warning(f"warning: {m.split_dir / MANIFEST} names its shards by local paths ({m.shards[0].url}): "
                        f"users of the pushed store need them there; index them from their published URL instead")
    size = sum(src.stat().st_size for src, _ in files)
    log.info(f"pushing {store.path} ({len(files)} files, {size / 1e6:.1f} MB, the shards' manifests"
             f"{' and shards' if cfg.push.shards else ''}) to hf://datasets/{repo}")
    _upload(repo, files, f"Cache store {path.name} and the manifests of its shards")
    base = f"hf://datasets/{repo}"
    return {"repo": repo, "files": len(files), "bytes": size,
            "cache.path": f"{base}/{path.name}", "data.shards": f"{base}/{data}"}


def require_finished(store) -> None:
    """CacheError naming the first unit not done or damaged, after every unit's bytes are checked."""
    report = check_store(store, bar=True)
    if report["array_problems"]:
        raise CacheError(f"{store.path}: {report['array_problems'][0]}: not pushed")
    if report["incomplete"]:
        first = report["incomplete"][0]
        raise CacheError(f"{store.path}: unit (seed {first['seed']}, shard {first['shard']}) is not done "
                         f"({len(report['incomplete'])} of {report['units_total']} pending): finish stage one "
                         f"(python -m pipeline.teacher_cache) before pushing")
    if report["damaged"]:
        d = report["damaged"][0]
        raise CacheError(f"{store.path}: unit (seed {d['seed']}, shard {d['shard']}) is damaged "
                         f"({d['problems'][0]}; {len(report['damaged'])} damaged): repair it (python -m "
                         f"pipeline.teacher_cache cache.resume_check=full) before pushing")


def _repo(value) -> str:
    repo = str(value or "")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"push.repo={'null' if value is None else value}: expected <owner>/<name> of a Hugging "
                          f"Face Hub dataset repo")
    return repo


def _upload(repo: str, files: list[tuple], message: str) -> None:
    """One commit of ``files`` ((local path or URL, path in the repo)) to dataset repo ``repo``, created when
    missing."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from pipeline.web import hub_offline

    where = f"hf://datasets/{repo}"
    offline = ConfigError(f"{where}: HF_HUB_OFFLINE is set; unset it to push to the Hub")
    if hub_offline():
        raise offline
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=src.read_bytes() if storage.is_url(src)
                                  else str(src)) for src, dest in files]  # a manifest or shard on s3:// or hf://
        api.create_commit(repo, ops, commit_message=message, repo_type="dataset")
    except OfflineModeIsEnabled:
        raise offline from None
    except HfHubHTTPError as e:
        raise StorageError(f"{where} at {api.endpoint}: the Hub refused the push: {str(e).splitlines()[0]} (a "
                           f"login with write access: HF_TOKEN or `hf auth login`)") from None
    except (*_transport_errors(), OSError) as e:
        raise StorageError(f"{where}: cannot reach the Hub at {api.endpoint}: {e}") from None


def _transport_errors() -> tuple[type, ...]:
    """The HTTP client's own errors (a refused connection, a timeout): huggingface_hub's client is httpx, or
    httpx2 in its newer releases."""
    import importlib

    out = []
    for name in ("httpx2", "httpx"):
        try:
            out.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(out)
