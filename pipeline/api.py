"""The cache from your own training loop: replayed views with their cached teacher targets, no Hydra
(docs/api.md; with timm's tasks: pipeline.train.timm_task).

    from pipeline import CachedViews, distillation_targets

    views = CachedViews("data/shards/toy/train", "cache/toy-resnet10t-s6.zarr", batch_size=64)
    for epoch in range(6):
        views.set_epoch(epoch)                      # epoch e reads cached seed index e (or epoch_seeds[e])
        for batch in views:                          # dicts of tensors
            x = batch["image"]                       # uint8 [B, 3, H, W]: the exact views the teacher saw
            soft = distillation_targets(batch, num_classes, mode="soft")   # [B, C] teacher probabilities

A thin layer over what stage two already uses: :class:`pipeline.replay.loader.ViewLoader` (units, workers, rank
split, equal steps per rank) with :class:`pipeline.cache.reader.CacheTargets` as its ``extras`` hook (every view's
digest checked against its replay), after :func:`pipeline.cache.reader.open_cache`'s checks (no writer holding
the store, data fingerprint, augmentation key by key, run seed, class count, shard layout). The augmentation, the view
size, the run seed and the replay backend default to the store's provenance, so they need not be retyped; one
given explicitly must match the store or is refused (ProvenanceMismatch naming the key).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from pipeline.cache.reader import CacheTargets, check_units_done, open_cache
from pipeline.cache.store import CacheStore
from pipeline.cache.targets import FIELDS, TeacherTargets
from pipeline.replay.loader import Seeds, ViewLoader, unit_seeds
from pipeline.data.shards import load_manifest
from pipeline.errors import CacheError, ConfigError, ScheduleError
from pipeline.replay.view_params import AugmentConfig
from pipeline.train.losses import teacher_target

__all__ = ["CachedViews", "ValViews", "distillation_targets", "store_augment"]


def _location(value, what: str) -> str:
    """One path or URL (a split directory, a store); a list of shard files is refused, naming their directory."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        parents = {posixpath.dirname(os.fspath(v).rstrip("/")) for v in value if isinstance(v, (str, os.PathLike))}
        hint = f": pass their directory {parents.pop()!r}" if len(parents) == 1 else ""
        raise ConfigError(f"{what}: expected one path or URL (the split directory holding manifest.json), got a "
                          f"list of {len(value)}{hint}")
    raise ConfigError(f"{what}={value!r}: expected a path or URL")


def _device(device) -> torch.device:
    """``device`` as a torch.device that exists here (a CUDA device without CUDA is refused, not ignored)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine "
                          f"(torch.cuda.is_available() is False): pass device='cpu'")
    return dev


def _transformed(batches, transform: Callable) -> Iterator[dict]:
    """Each batch with ``image`` replaced by ``transform(image)``; closing it closes the loader's epoch."""
    try:
        for batch in batches:
            batch["image"] = transform(batch["image"])
            yield batch
    finally:
        batches.close()


def store_augment(store: CacheStore) -> AugmentConfig:
    """The augmentation (with view size and crop_pct) a store was built with, from its provenance."""
    aug = store.provenance.get("augment")
    if not isinstance(aug, Mapping):
        raise CacheError(f"{store.path}: the store's provenance records no augmentation; pass augment=... "
                         f"(the pipeline/conf/augment keys it was built with) and image_size")
    return AugmentConfig(**dict(aug))


def _augment(augment, store: CacheStore, image_size: int | None) -> AugmentConfig:
    """``augment`` (None, an AugmentConfig, or a dict of pipeline/conf/augment keys) as an AugmentConfig."""
    if augment is None:
        aug = store_augment(store)
        return aug if image_size is None else dataclasses.replace(aug, image_size=int(image_size))
    if isinstance(augment, AugmentConfig):
        return augment if image_size is None else dataclasses.replace(augment, image_size=int(image_size))
    if not isinstance(augment, Mapping):
        raise ConfigError(f"augment={augment!r}: expected None (the store's), an AugmentConfig or a dict of "
                          f"pipeline/conf/augment keys")
    d = dict(augment)
    stored = store.provenance.get("augment") or {}
    size = d.pop("image_size", None) if image_size is None else int(image_size)
    size = size if size is not None else stored.get("image_size")
    if size is None:
        raise ConfigError("augment given as a dict: image_size is needed (the store records none)")
    crop_pct = d.pop("crop_pct", stored.get("crop_pct", 1.0))
    try:
        return AugmentConfig.from_cfg(d, int(size), float(crop_pct))
    except TypeError as exc:  # an unknown key
        raise ConfigError(f"augment: {exc}") from None


class CachedViews(IterableDataset):
    """Batches of one epoch of replayed views with their cached teacher targets, for any training loop.

    Each batch is a dict of tensors: ``image`` (uint8 [B, 3, H, W], the views the teacher saw), ``target``
    (float [B, C]: the label after the view's mixup/cutmix and label smoothing), ``label``, ``index`` (global
    sample index), ``seed`` (seed index), ``digest``, and the cached teacher targets ``argmax`` [B] and, when the
    store holds top-K (cache.topk > 0), ``topk_values`` [B, K] (fp16 logits, descending), ``topk_indices`` [B, K]
    and ``logsumexp`` [B], in the store's dtypes (turn them into a loss target with :func:`distillation_targets`).

    ``shards``: the split directory (``<data.shards>/train``) the cache was built from; ``cache``: the Zarr store.
    ``augment``: None (default: the store's own, from its provenance), an AugmentConfig, or a dict of
    pipeline/conf/augment keys; ``image_size`` replaces the view size. ``run_seed`` defaults to the store's.
    Which seed index an epoch reads: ``seed_index`` (every epoch the same; a tuple of r distinct ones = repeated
    augmentation, every sample r times), else ``epoch_seeds[epoch]`` (each entry an index or an r-tuple), else
    seed index ``epoch`` (epochs beyond the cached S are refused: pass ``epoch_seeds`` to re-use views).
    ``rank``/``world_size`` split the shards with equal step counts on every rank (``len(views)``); call
    :meth:`set_epoch` before each epoch, as with DistributedSampler (it also reshuffles). ``transform``: a
    callable applied to each batch's ``image`` (e.g. torchvision's ``v2.Normalize`` after ``v2.ToDtype``);
    ``device``: where the batched replay backend renders (a CUDA device without CUDA is refused).

    Iterate it directly; it starts its own DataLoader workers (``num_workers``), so do not wrap it in a
    DataLoader with workers (``DataLoader(views, batch_size=None)`` with no workers is fine).
    """

    def __init__(self, shards, cache, *, augment=None, image_size: int | None = None,
                 epoch_seeds: Sequence[Seeds] | None = None, seed_index: Seeds | None = None, batch_size: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle: bool = True, epoch: int = 0,
                 run_seed: int | None = None, pool_blocks: int = 8, pin_memory: bool = False, device="cpu",
                 repeat_mode: str = "local", transform: Callable | None = None):
        super().__init__()
        if seed_index is not None and epoch_seeds is not None:
            raise ConfigError("pass seed_index or epoch_seeds, not both")
        self.shards, self.cache = _location(shards, "shards"), _location(cache, "cache")
        self.transform, device = transform, _device(device)
        manifest = load_manifest(self.shards)
        stored = CacheStore.open(self.cache, "r")
        self.augment = _augment(augment, stored, image_size)
        self.run_seed = int(stored.provenance.get("run_seed", 0) if run_seed is None else run_seed)
        # Every check (writer lease, data fingerprint, augmentation by key, run seed, classes, layout):
        self.store, self.warnings = open_cache(self.cache, manifest=manifest, aug=self.augment,
                                               run_seed=self.run_seed, mode="hard")
        self.fields = tuple(f for f in FIELDS if f in self.store.fields)
        self.num_classes, self.num_seeds = manifest.num_classes, self.store.num_seeds
        self.seed_index = None if seed_index is None else unit_seeds(seed_index)
        self.epoch_seeds = None if epoch_seeds is None else [unit_seeds(s) for s in epoch_seeds]
        if self.epoch_seeds is not None and not self.epoch_seeds:
            raise ConfigError("epoch_seeds is empty")
        plans = [self.seed_index] if self.seed_index is not None else self.epoch_seeds or [(0,)]
        repeats = {len(p) for p in plans}
        if len(repeats) != 1:
            raise ConfigError(f"epoch_seeds {epoch_seeds}: every epoch needs the same number of seed indices")
        self.repeats = repeats.pop()
        if self.seed_index is not None or self.epoch_seeds is not None:
            check_units_done(self.store, [s for p in plans for s in p])  # S and commit markers, up front
        self.loader = ViewLoader(self.shards, self.augment, run_seed=self.run_seed, batch_size=int(batch_size),
                                 num_workers=int(num_workers), train=True, shuffle=bool(shuffle), rank=int(rank),
                                 world_size=int(world_size),
                                 extras=CacheTargets(self.cache, self.fields, self.store.store_id),
                                 pool_blocks=pool_blocks, pin_memory=pin_memory, repeats=self.repeats,
                                 backend=self.store.provenance.get("replay_backend", "per_sample"), device=device,
                                 repeat_mode=repeat_mode)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def seeds(self, epoch: int | None = None) -> tuple[int, ...]:
        """The seed index (or r indices) read in ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        if self.seed_index is not None:
            return self.seed_index
        if self.epoch_seeds is not None:
            if not 0 <= e < len(self.epoch_seeds):
                raise ScheduleError(f"epoch {e}: epoch_seeds lists {len(self.epoch_seeds)} epochs")
            return self.epoch_seeds[e]
        if not 0 <= e < self.num_seeds:
            raise ScheduleError(f"epoch {e} would read seed index {e}, but {self.cache} holds S={self.num_seeds} "
                                f"seeds: pass epoch_seeds=[...] (e.g. [e % {self.num_seeds} for e in range(E)]) "
                                f"to re-use cached views")
        return (e,)

    def __len__(self) -> int:
        """Steps of the current epoch (the same on every rank)."""
        return self.loader.steps_per_epoch(self.epoch)

    def __iter__(self) -> Iterator[dict]:
        seeds = self.seeds()
        check_units_done(self.store, seeds)
        batches = self.loader.epoch(seeds if self.repeats > 1 else seeds[0], self.epoch)
        return batches if self.transform is None else _transformed(batches, self.transform)

    def __repr__(self):
        return (f"CachedViews({self.shards!r}, {self.cache!r}, S={self.num_seeds}, fields={list(self.fields)}, "
                f"augment_hash={self.augment.hash()}, epoch={self.epoch})")


class ValViews(IterableDataset):
    """Batches of the deterministic validation views of a split (resize to ``image_size / crop_pct``, centre
    crop): ``image`` (uint8 [B, 3, H, W], or ``transform(image)``), ``label``, ``target`` (one-hot), ``index``,
    ``digest``, ``seed`` (0). The view size, crop_pct and interpolation: ``augment`` (an AugmentConfig or a dict of
    conf/augment keys), else the store ``cache``'s, else ``AugmentConfig(image_size)``. One pass = one epoch, the
    same views every time; ``rank``/``world_size`` split the shards (every rank the same step count)."""

    def __init__(self, shards, cache=None, *, augment=None, image_size: int | None = None, batch_size: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False, device="cpu",
                 transform: Callable | None = None):
        super().__init__()
        self.shards, self.transform, device = _location(shards, "shards"), transform, _device(device)
        if cache is not None:
            self.augment = _augment(augment, CacheStore.open(_location(cache, "cache"), "r"), image_size)
        elif isinstance(augment, (AugmentConfig, Mapping)):
            d = augment if isinstance(augment, AugmentConfig) else AugmentConfig(**{"image_size": image_size,
                                                                                    **dict(augment)})
            self.augment = d if image_size is None else dataclasses.replace(d, image_size=int(image_size))
        elif image_size is not None:
            self.augment = AugmentConfig(image_size=int(image_size))
        else:
            raise ConfigError("ValViews: pass cache=... (its augmentation), augment=... or image_size=...")
        self.loader = ViewLoader(self.shards, self.augment, run_seed=0, batch_size=int(batch_size),
                                 num_workers=int(num_workers), train=False, rank=int(rank),
                                 world_size=int(world_size), pin_memory=pin_memory, device=device)
        self.num_classes = self.loader.manifest.num_classes

    def __len__(self) -> int:
        return self.loader.steps_per_epoch(0)

    def __iter__(self) -> Iterator[dict]:
        batches = self.loader.epoch(0, 0)
        return batches if self.transform is None else _transformed(batches, self.transform)


def distillation_targets(batch: Mapping, num_classes: int, *, mode: str = "hard", tau: float = 1.0) -> Tensor:
    """The teacher's target for a batch of :class:`CachedViews`.

    ``mode="hard"``: the teacher's class [B] (int64), for ``F.cross_entropy(student_logits, t)``.
    ``mode="soft"``: the teacher's tempered probabilities [B, C] (float32) rebuilt from the stored top-K logits and
    logsumexp (exact when K = C; for K < C the tail mass is spread over the other classes; at ``tau`` = 1 the
    top-K probabilities are exact), for ``SoftTargetCrossEntropy`` or a KL term.
    """
    if mode not in ("hard", "soft"):
        raise ConfigError(f"mode={mode!r}: expected 'hard' or 'soft'")
    t = teacher_target(TeacherTargets.from_batch(dict(batch)), mode, int(num_classes), tau, what="mode")
    return t if mode == "hard" else t.exp()
