"""The replay contract: a view is a pure function of (run_seed, seed index, sample index) and the shard bytes.

    seeding  counter-based generators          view_params  view parameters (crop, flip, RandAugment, erasing)
    pixels   decode + render params on uint8    mixing       mixup/cutmix pairs inside blocks, soft targets
    digest   32-bit name of a view              views        one block of views: everything above together
    loader   shards -> batches of views, for any workers and any rank/world split

CONTRACT_VERSION names the contract: bump it whenever a change alters which params a (run_seed, s, i) draws or
how they render (draw order, a new draw, a pixel op), since every cache built before is then stale. Stores record
it and refuse to open under another version (tests/test_replay.py pins golden digests to catch a silent change).
"""

CONTRACT_VERSION = 2
