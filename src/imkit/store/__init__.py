"""
Storage backends, and the one string that picks one (``--store sqlite:imkit.db``).

Each scheme is a row of ``_SCHEMES``: adding a backend is adding a row.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from imkit.store.interface import IStore, NotAMember, StoreError, UnknownUser, UserExists
from imkit.store.memory import MemoryStore
from imkit.store.sqlite import SchemaVersionError, SQLiteStore, StoreClosed

__all__ = [
    "IStore",
    "MemoryStore",
    "NotAMember",
    "SQLiteStore",
    "SchemaVersionError",
    "StoreClosed",
    "StoreError",
    "StoreStringError",
    "UnknownUser",
    "UserExists",
    "store_from_string",
]


class StoreStringError(ValueError):
    """A store description string that names no known backend, or names one badly."""


def _memory(argument: str, description: str, reactor: Any) -> IStore:
    if argument:
        raise StoreStringError(
            f"the memory store takes no argument in {description!r}: use memory:"
        )
    return MemoryStore()


def _sqlite(argument: str, description: str, reactor: Any) -> IStore:
    if not argument:
        raise StoreStringError(f"no file named in {description!r}: use sqlite:PATH")
    return SQLiteStore(os.path.abspath(argument), reactor=reactor)


# scheme -> (how it is written, how to build it from the text after the colon)
_SCHEMES: dict[str, tuple[str, Callable[[str, str, Any], IStore]]] = {
    "sqlite": ("sqlite:PATH", _sqlite),
    "memory": ("memory:", _memory),
}


def store_from_string(description: str, reactor: Any = None) -> IStore:
    """
    Build the (unopened) store a description names: ``memory:`` or ``sqlite:PATH``.

    A relative PATH is taken from the current directory now, so the store's own description is
    absolute.  Anything else raises StoreStringError with a one-line message saying what to write.
    """
    scheme, colon, argument = description.partition(":")
    entry = _SCHEMES.get(scheme) if colon else None
    if entry is None:
        usage = " or ".join(usage for usage, _ in _SCHEMES.values())
        raise StoreStringError(f"unknown store {description!r}: use {usage}")
    return entry[1](argument, description, reactor)
