"""`python -m pipeline.verify_cache [cache.verify_fraction=0.05]`: check without the teacher that every unit of the
cache is committed and every committed unit intact (its checksum record tagged with this unit of this store, chunks,
checksums, shapes, dtypes, invariants), and that the store belongs to this configuration; with
`cache.verify_fraction > 0` also replay that fraction of units, rerun the teacher and compare argmax, top-K logits,
logsumexp and digests. Prints the damaged units and, per seed index, the units not committed (stderr) and a JSON
report (stdout); exit 1 unless the store is complete and all is well, 2 for a user error (no store, an older
format, another configuration's store, a writer holding it).

    python -m pipeline.verify_cache                              # integrity of every unit, no teacher
    python -m pipeline.verify_cache cache.verify_fraction=0.05   # plus the teacher on 5% of the units
    python -m pipeline.verify_cache replay.backend=batched cache.verify_fraction=0.05   # agreement across backends
"""

import json
import sys

from omegaconf import DictConfig

from pipeline import cli


def main(cfg: DictConfig) -> None:
    from pipeline.cache.audit import format_damage, verify_cache
    from pipeline.finished import require_store

    require_store(cfg)
    result = verify_cache(cfg, float(cfg.cache.verify_fraction))
    for line in format_damage(result):
        print(line, file=sys.stderr)
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        raise SystemExit(1)


KEYS = ('cache.path', 'cache.verify_fraction', 'cache.tolerance', 'teacher.checkpoint', 'data.shards', 'run_seed')

if __name__ == "__main__":
    cli.run("verify_cache", main, __doc__, KEYS)
