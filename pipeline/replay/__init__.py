"""The replay contract: a view is a pure function of (run_seed, seed index, sample index) and the shard bytes.

    seeding  counter-based generators          view_params  view parameters (crop, flip, RandAugment, erasing)
    pixels   decode + render params on uint8    mixing       mixup/cutmix pairs inside blocks, soft targets
    digest   32-bit name of a view              views        one block of views: everything above together
    loader   shards -> batches of views, for any workers and any rank/world split
    contract CONTRACT_VERSION: stores record it, dvc.yaml's stages depend on it; bump it when views change
"""
