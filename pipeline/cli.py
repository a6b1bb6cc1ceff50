"""The entry modules' shared behaviour: one log format, the config checked against the schema, and one error
policy: a user error (pipeline.errors.UserError, or an invalid config key/value) prints one line naming the
file, key or field and exits 2; anything else is a bug and keeps its traceback.

Hydra's run directory (``hydra.run.dir`` in conf/config.yaml) goes through the ``pipeline_run_dir`` resolver: the
configured ``<workdir>/outputs/hydra/<time>`` when it can be created, else a directory under the system's temporary
directory, so that read-only stages (verify_cache, evaluate with ``eval.out`` elsewhere) run on a read-only
workdir."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import UserError
from pipeline.logs import setup_logging

log = logging.getLogger("pipeline")


@contextlib.contextmanager
def stage(name: str):
    """Wrap a stage's body: logging set up, user errors -> `<name>: error: ...` and exit 2, ranks torn down."""
    setup_logging()
    try:
        yield
    except UserError as exc:
        print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except OmegaConfBaseException as exc:  # a missing (???), unknown or mistyped config key: names the key
        print(f"{name}: error: config: {_config_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        from pipeline import distributed

        distributed.cleanup()


def one_line(exc: BaseException) -> str:
    """The message of a user error; one raised in a DataLoader worker comes back wrapped in the worker's traceback
    ("Caught ShardError in DataLoader worker process 0. Original Traceback ..."): its last line is the message."""
    msg = str(exc)
    if "\nOriginal Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if last.startswith(type(exc).__module__) and ": " in last else last
    return msg


def run_dir(configured: str) -> str:
    """Hydra's run directory: ``configured`` when it can be created, else one under the temporary directory."""
    path = Path(configured)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if os.access(probe, os.W_OK | os.X_OK):
        return configured
    return str(Path(tempfile.gettempdir()) / "pipeline-hydra" / f"{path.name}-{os.getpid()}")


if not OmegaConf.has_resolver("pipeline_run_dir"):
    OmegaConf.register_new_resolver("pipeline_run_dir", run_dir)


def _config_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"{key}: {msg}" if key and key not in msg else msg


def main(hydra_main, doc: str, keys: tuple[str, ...]) -> None:
    """Run a stage's ``hydra_main``; ``--help`` (or ``-h``) prints what the stage does (``doc``), its main keys
    with their defaults under any overrides given beside it, and how to change them, instead of Hydra's generic
    help and its full config dump."""
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print(stage_help(doc, keys, [a for a in args if a not in ("--help", "-h")]))
        raise SystemExit(0)
    hydra_main()


def stage_help(doc: str, keys: tuple[str, ...], overrides: list[str]) -> str:
    from omegaconf import OmegaConf

    from pipeline.params import composed

    cfg = OmegaConf.create(composed(overrides))
    width = max(len(k) for k in keys)
    rows = [f"  {k:<{width}}  {OmegaConf.select(cfg, k)}" for k in keys]
    return "\n".join([doc.strip(), "", "Main keys (defaults from conf/; override as key=value, groups as group=name):",
                      *rows, "", "Every key: python -m pipeline.params [overrides] writes the composed config to "
                      "params.yaml; docs/design.md explains the contract."])
