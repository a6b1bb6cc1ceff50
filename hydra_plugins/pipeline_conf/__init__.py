"""Loaded by Hydra's plugin scan, and by DVC before it composes pipeline/conf/ for `dvc exp run -S ...` (DVC adds the repo
root, its default `hydra.plugins_path`, to sys.path for that scan): registers the ``pipeline_checked`` resolver,
so a composition with an invalid value fails there, before DVC writes params.yaml or runs any stage. Inside the
`dvc` command it also installs `under_dvc` (refuse experiments that would delete what DVC cannot restore; config
errors in one line)."""

import sys

import pipeline.config  # noqa: F401  (registers ${pipeline_checked:...})

if "dvc.cli" in sys.modules:
    from hydra_plugins.pipeline_conf.under_dvc import install

    install()
