"""Counter-based generators: every random draw of a view comes from (run_seed, seed index, sample, stream).

Nothing here depends on worker id, rank, batch size, shuffle buffer or process history, so any loader layout
replays the same views (docs/design.md, section 2).
"""

import numpy as np

# Stream ids: one independent generator per purpose, so adding draws to one purpose never shifts another.
AUGMENT = 0     # per-sample geometric/photometric parameters
MIX_PERM = 1    # per-block mixup partner permutation
MIX_PAIR = 2    # per-pair mode, lambda and box
SHUFFLE = 3     # loader order (order only, never content)
FILL = 4        # erasing noise (seeded from a number stored in the params)


def generator(*words: int) -> np.random.Generator:
    """A Philox generator keyed by a tuple of non-negative integers."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(w) for w in words])))


def view_rng(run_seed: int, seed_index: int, index: int) -> np.random.Generator:
    return generator(run_seed, seed_index, index, AUGMENT)
