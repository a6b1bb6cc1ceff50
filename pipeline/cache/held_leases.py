"""This process's writer leases, one per lease file: the registry that the file lease (pipeline.cache.lease) and
the object-storage lease (pipeline.cache.object_lease) enter on acquire and leave on release."""

from __future__ import annotations

import os

from pipeline import storage

_HELD: dict = {}  # by absolute lease file path (or its URL)


def key(path) -> str:
    return str(path) if storage.is_url(path) else os.path.abspath(path)


def get(path):
    return _HELD.get(key(path))


def put(path, lease):
    _HELD[key(path)] = lease
    return lease


def drop(path) -> None:
    _HELD.pop(key(path), None)
