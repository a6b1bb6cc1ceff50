"""The replay contract's version: a view is a pure function of (run_seed, seed index, sample index) and the
shard bytes (pipeline.replay).

Bump CONTRACT_VERSION whenever a change alters which params a (run_seed, s, i) draws or how they render (draw
order, a new draw, a pixel op), or how a shard's bytes are read into images (pipeline.data): every cache built
before is then stale. Stores record it and refuse to open under another version; tests/test_replay.py pins golden
digests to catch a change that forgot the bump. dvc.yaml's stages depend on this file, not on the rooms' code:
a change that keeps the views (a comment, a refactor, a faster kernel) re-runs nothing.
"""

CONTRACT_VERSION = 2
