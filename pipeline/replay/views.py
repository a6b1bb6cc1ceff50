"""Views of one block: decode, params, pixels, mixing partner, smoothed target and digest per sample.

`group_views` renders one block under several seed indices at once (stage one's seed groups, stage two's
repeats): each image's header is read once and each distinct decode scale decoded once for all of them, and
every view is bit-identical to the one `block_views` renders for its seed index alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pipeline.replay import seeding
from pipeline.replay.digest import view_digest
from pipeline.replay.mixing import block_mixes, mix_images, smooth_one_hot, soft_target
from pipeline.replay.view_params import AugmentConfig, eval_params, sample_params
from pipeline.replay.pixels import SourceImage, apply


def block_views(items: list[tuple[int, bytes, int]], *, run_seed: int, seed_index: int, cfg: AugmentConfig,
                num_classes: int, train: bool = True, sources: list[SourceImage] | None = None,
                keep: set[int] | None = None) -> list[dict]:
    """Render every view of one block. items: (global index, image bytes, label), consecutive indices.

    sources: the items' SourceImage, when the caller renders the block under several seed indices and shares
    the decodes between them (group_views); pixels do not depend on it.
    keep: only the views of these global indices (train), rendering only them and their mixup partners; each
    is bit-identical to the full block's."""
    imgs = sources if sources is not None else [SourceImage(data) for _, data, _ in items]
    if not train:
        out = []
        for (index, _, label), img in zip(items, imgs):
            params = eval_params((img.size[1], img.size[0]), cfg)
            image, scale = img.decode()
            out.append({"index": index, "image": apply(image, params, cfg, scale), "label": label,
                        "target": smooth_one_hot(label, num_classes, 0.0),
                        "digest": view_digest(index, params)})
        return out

    params = [sample_params(seeding.view_rng(run_seed, seed_index, index), (img.size[1], img.size[0]), cfg)
              for (index, _, _), img in zip(items, imgs)]
    partner, mixes = block_mixes(items, run_seed=run_seed, seed_index=seed_index, cfg=cfg)
    wanted = [a for a, item in enumerate(items) if keep is None or item[0] in keep]
    need = set(wanted) | {partner[a] for a in wanted}
    views = [img.render(p, cfg) if a in need else None for a, (img, p) in enumerate(zip(imgs, params))]
    out = []
    for a in wanted:
        (index, _, label), b, mix = items[a], partner[a], mixes[a]
        target = soft_target(label, items[b][2], mix, num_classes, cfg.label_smoothing)
        if mix is None:
            image, mix_record = views[a], None
        else:
            image = mix_images(views[a], views[b], mix)
            mix_record = {"j": items[b][0], "pj": params[b], **mix}
        out.append({"index": index, "image": image, "label": label, "target": target,
                    "digest": view_digest(index, params[a], mix_record), "params": params[a],
                    "mix": mix_record})
    return out


def group_views(items: list[tuple[int, bytes, int]], *, run_seed: int, seed_indices: Sequence[int],
                cfg: AugmentConfig, num_classes: int, train: bool = True,
                keep: dict[int, set[int]] | None = None) -> Iterator[list[dict]]:
    """block_views for each seed index in turn (a generator: one seed's views at a time), decoding each image
    once per distinct scale for all of them.

    Memory: the decoded images of one block (one per distinct scale per image) live until the generator ends,
    plus one seed index's views; neither grows with the number of seed indices.
    keep: seed index -> the global indices whose views it renders (block_views' keep); None: all."""
    sources = [SourceImage(data) for _, data, _ in items]
    for s in seed_indices:
        yield block_views(items, run_seed=run_seed, seed_index=int(s), cfg=cfg, num_classes=num_classes, train=train,
                          sources=sources, keep=None if keep is None else keep.get(int(s), set()))
