"""Loaded by Hydra's plugin scan, and by DVC before it composes conf/ for `dvc exp run -S ...` (DVC adds the repo
root, its default `hydra.plugins_path`, to sys.path for that scan): registers the ``pipeline_checked`` resolver,
so a composition with an invalid value fails there, before DVC writes params.yaml or runs any stage."""

import pipeline.config  # noqa: F401  (registers ${pipeline_checked:...})
