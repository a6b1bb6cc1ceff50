"""Reading a weights file without running code in it: ``torch.load(weights_only=True)``, whose refusal of a pickle
that would call anything but tensor constructors (a malicious or foreign checkpoint), or a damaged file, becomes
one line naming the file."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import CheckpointError, UserError


def load_weights(path, error: type[UserError] = CheckpointError, what: str = "checkpoint"):
    """The object saved in ``path`` (tensors, dicts, lists, numbers) or ``error`` naming the file."""
    import pickle

    import torch

    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL [\w.]+|[\w.]+ was not an allowed global", str(exc))
        if refused is None:  # junk bytes ("invalid load key", "Unsupported operand"), not a refused global
            junk = re.search(r"Unsupported operand \d+|invalid load key[^.\n]*", str(exc))
            raise error(f"{path}: {what} cannot be read: not a torch.save file "
                        f"({junk.group(0) if junk else _first(exc)[:120]})") from exc
        why = refused.group(0)
        raise error(f"{path}: {what} refused to load: it holds pickled objects, not only weights ({why}); nothing "
                    f"in it was run. Use a file this pipeline wrote (torch.save of a state dict)") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file raises many kinds
        raise error(f"{path}: {what} cannot be read: {type(exc).__name__}: {_first(exc)}") from exc


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
