"""Strict decoding of our own msgpack files: a map of exactly the known keys, one of them a long array.

The partial stream's header and the salvage store share this shape. Both are read from files anyone
may have written (hostile or damaged), so every key must be known and appear once, and the array is
read item by item (never materialised whole by msgpack) under a count bounded by the file's size.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import msgpack


def read_fixed_map(
    unpacker: msgpack.Unpacker,
    keys: Collection[str],
    array_key: str,
    take_item: Callable[[Any], None],
    *,
    max_items: int,
    what: str,
) -> dict[str, Any]:
    """Read a map holding exactly ``keys``; ``array_key``'s items go one by one to ``take_item``.

    Returns the other keys' values (``array_key`` maps to True). ValueError names ``what`` when the map
    is not of this shape; ``take_item`` raises ValueError for an item it refuses.
    """
    n = unpacker.read_map_header()
    if n != len(keys):
        raise ValueError(f"not a {what}")
    raw: dict[str, Any] = {}
    for _ in range(n):
        key = unpacker.unpack()
        if key not in keys or key in raw:
            raise ValueError(f"unexpected key {key!r}")
        if key == array_key:
            count = unpacker.read_array_header()
            if count > max_items:
                raise ValueError(f"{array_key} declares {count} entries")
            for _ in range(count):
                take_item(unpacker.unpack())
            raw[key] = True
        else:
            raw[key] = unpacker.unpack()
    return raw
