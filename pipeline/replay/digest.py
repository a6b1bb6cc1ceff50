"""The view digest: 32 bits that name a view by everything that determines its pixels (docs/design.md, section 4).

A cache row stores the digest of the view the teacher saw; stage two recomputes it for the view it replays and
refuses any mismatch, so a target can never be attached to another view.
"""

from __future__ import annotations

import hashlib
import json


def view_digest(index: int, params: dict, mix: dict | None = None) -> int:
    """32-bit blake2b over the canonical JSON of everything that determines the view's pixels."""
    blob = json.dumps({"i": int(index), "p": params, "mix": mix}, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(blob.encode(), digest_size=4).digest(), "little")
