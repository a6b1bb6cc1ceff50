"""The entry modules' shared behaviour: one log format, the config composed by the one rule (pipeline.compose)
and checked against the schema, and one error policy: a user error (pipeline.errors.UserError, or an invalid
config key/value) prints one line naming the file, key or field and exits 2; anything else is a bug and keeps
its traceback.

    python -m pipeline.<stage> [overrides]                      # pipeline/conf/ + overrides
    python -m pipeline.<stage> --params params.yaml [overrides] # what a DVC stage runs
    python -m pipeline.<stage> --help                           # what it does, its main keys"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.errors import UserError
from pipeline.logs import setup_logging

log = logging.getLogger("pipeline")


@contextlib.contextmanager
def stage(name: str):
    """Wrap a stage's body: logging set up, user errors -> `<name>: error: ...` and exit 2, Ctrl-C or SIGTERM -> one
    line and exit 128 + the signal's number, ranks torn down."""
    setup_logging()
    previous = _stop_on_sigterm()
    try:
        yield
    except UserError as exc:
        report(name, one_line(exc))
        raise SystemExit(2) from None
    except OmegaConfBaseException as exc:  # a missing (???), unknown or mistyped config key: names the key
        report(name, f"config: {config_message(exc)}")
        raise SystemExit(2) from None
    except (KeyboardInterrupt, Stopped) as exc:  # not a bug; under pipeline.launch the launcher says it for all ranks
        sig = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        if not launched_rank():
            print(stopped_line(name, sig), file=sys.stderr)
        raise SystemExit(128 + int(sig)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        from pipeline import distributed

        distributed.cleanup()


class Stopped(BaseException):
    """SIGTERM (a scheduler's time limit, torchrun stopping its ranks), raised in the stage's main thread as Ctrl-C
    raises KeyboardInterrupt, so that it ends in one line too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_sigterm():
    """Install the SIGTERM handler (main thread only); the handler it replaces. A process forked later (a
    DataLoader worker) inherits it and ends as SIGTERM's default would."""
    if threading.current_thread() is not threading.main_thread():
        return None
    pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(signum)

    return signal.signal(signal.SIGTERM, stop)


RANK_ERRORS = "PIPELINE_RANK_ERRORS"  # set by pipeline.launch: its ranks leave their error line there


def launched_rank() -> bool:
    """One of several ranks started by pipeline.launch, which reports for all of them."""
    return bool(os.environ.get(RANK_ERRORS)) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def stopped_line(name: str, signum: int, ranks: bool = False) -> str:
    """What a stage (or the launcher, for its ranks too) says when a signal stopped it."""
    who = ", its ranks too; the same command resumes from what they committed" if ranks else \
        "; the same command resumes from what it committed"
    return f"{name}: stopped by {signal.Signals(signum).name}{who}"


def report(name: str, message: str) -> None:
    """``<name>: error: <message>`` on stderr; a rank started by pipeline.launch writes it to a file instead, and
    the launcher prints each distinct line once (not once per rank, under torchrun's failure report)."""
    line = f"{name}: error: {message}"
    if launched_rank():
        with contextlib.suppress(OSError):
            Path(os.environ[RANK_ERRORS], f"rank-{os.environ.get('RANK', '0')}").write_text(line + "\n")
            return
    print(line, file=sys.stderr)


def one_line(exc: BaseException) -> str:
    """The message of a user error; one raised in a DataLoader worker comes back wrapped in the worker's traceback
    ("Caught ShardError in DataLoader worker process 0. Original Traceback ..."): its last line is the message."""
    msg = str(exc)
    if "\nOriginal Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if last.startswith(type(exc).__module__) and ": " in last else last
    return msg


def config_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    missing = re.search(r"Missing mandatory value: ([\w.]+)", str(exc))
    if missing:
        return f"{missing.group(1)} is not set: add {missing.group(1)}=<value>"
    if key and isinstance(exc, ConfigKeyError):
        from pipeline.compose import suggest

        return f"{key}: no such key{suggest(key)}"
    return f"{key}: {msg}" if key and key not in msg else msg


def run(name: str, body, doc: str, keys: tuple[str, ...], argv: list[str] | None = None) -> None:
    """A stage's command line: ``--help`` (or ``-h``) prints what the stage does (``doc``) and its main keys with
    their values under any overrides given beside it; otherwise ``body(cfg)`` on the composed, checked config."""
    from pipeline.compose import compose, split_params
    from pipeline.config import validate

    args = sys.argv[1:] if argv is None else list(argv)
    if "--help" in args or "-h" in args:
        with stage(name):
            print(stage_help(doc, keys, [a for a in args if a not in ("--help", "-h")]))
        return
    with stage(name):
        from pipeline import storage_faults

        params, overrides = split_params(args)
        cfg = validate(compose(overrides, params))
        storage_faults.configure(**cfg.storage)
        body(cfg)


def stage_help(doc: str, keys: tuple[str, ...], args: list[str]) -> str:
    from pipeline.compose import compose, split_params
    from pipeline.config import validate

    cfg = validate(compose(*reversed(split_params(args))))
    width = max(len(k) for k in keys)
    rows = [f"  {k:<{width}}  {OmegaConf.select(cfg, k)}" for k in keys]
    return "\n".join([doc.strip(), "", "Main keys (from pipeline/conf/ and the overrides given; change as key=value, "
                      "groups as group=name):", *rows, "", "Every key: python -m pipeline.params [overrides] prints the composed "
                      "config (nothing written); docs/design.md explains the contract."])
