"""What every bench shares: the composed project config, a machine description, JSON output."""

from __future__ import annotations

import json
import os
import platform
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_HYDRA = threading.Lock()  # Hydra's compose API keeps global state: one composition at a time


def compose(overrides: list[str]):
    """conf/config.yaml with Hydra ``overrides``, as the ``python -m pipeline.<stage>`` entries see it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with _HYDRA, initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}"


def save_json(path: Path, res: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
