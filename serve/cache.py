"""One small bounded cache for everything the app keeps: loaded checkpoints, loaded variant models, built batches and
the variant folders written to disk.

[`BoundedCache`] keeps the most recently used entries, at most `max_items` of them and, when entries have a size, at
most `max_bytes` in all; the least recently used entry goes first (its `on_evict` callback runs, e.g. removing a
folder). [`BoundedCache.get_or_build`] builds a missing entry once, however many requests ask for it at the same
time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from hf_ema import ConfigError

__all__ = ["BoundedCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int


class BoundedCache(Generic[K, V]):
    """The least recently used entries are evicted once more than `max_items` are kept, or once their sizes add up to
    more than `max_bytes`. The entry just added is never evicted by its own arrival, so one entry larger than
    `max_bytes` is kept until the next one comes. Safe to use from several threads.

    Args:
        max_items (`int`): How many entries are kept, at least 1.
        max_bytes (`int`, *optional*): The most the entries' sizes may add up to; no bound when `None`.
        size (`Callable[[V], int]`, *optional*): An entry's size (needed with `max_bytes`); 0 when not given.
        on_evict (`Callable[[K, V], None]`, *optional*): Called with each evicted entry, outside the cache's lock.
        name (`str`, *optional*, defaults to `"cache"`): The argument that sets the bound, named in error messages.
    """

    def __init__(
        self,
        max_items: int,
        *,
        max_bytes: int | None = None,
        size: Callable[[V], int] | None = None,
        on_evict: Callable[[K, V], None] | None = None,
        name: str = "cache",
    ) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ConfigError(f"`{name}` must be an int >= 1, got {max_items!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ConfigError(f"`{name}` needs a positive number of bytes as its bound, got {max_bytes!r}")
        if max_bytes is not None and size is None:
            raise ConfigError(f"`{name}` is bounded by bytes, so it needs a `size` function")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size = size
        self._on_evict = on_evict
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._lock = threading.Lock()
        # Per key being built: its lock and how many threads hold or wait for it (the entry goes with the last one).
        self._building: dict[K, tuple[threading.Lock, list[int]]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def total_bytes(self) -> int:
        """The entries' sizes added up."""
        with self._lock:
            return sum(entry.size for entry in self._entries.values())

    def get(self, key: K) -> V | None:
        """The entry for `key` (now the most recently used), or `None`.

        Args:
            key (`Hashable`): The key.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.value

    def put(self, key: K, value: V) -> None:
        """Keep `value` under `key` as the most recently used entry, then evict what no longer fits.

        Args:
            key (`Hashable`): The key.
            value: The entry.
        """
        size = self._size(value) if self._size is not None else 0
        evicted: list[tuple[K, V]] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None and old.value is not value:
                evicted.append((key, old.value))
            self._entries[key] = _Entry(value, size)
            while len(self._entries) > 1 and (
                len(self._entries) > self.max_items
                or (self.max_bytes is not None and sum(e.size for e in self._entries.values()) > self.max_bytes)
            ):
                first, entry = self._entries.popitem(last=False)
                evicted.append((first, entry.value))
        self._evicted(evicted)

    def get_or_build(self, key: K, build: Callable[[], V]) -> V:
        """The entry for `key`, built by `build()` and kept when missing. Requests for the same key wait for one
        build; requests for other keys build at the same time. An exception from `build` reaches its caller and
        nothing is kept.

        Args:
            key (`Hashable`): The key.
            build (`Callable[[], V]`): Makes the entry.
        """
        value = self.get(key)
        if value is not None:
            return value
        lock = self._enter_build(key)
        try:
            with lock:
                value = self.get(key)
                if value is None:
                    value = build()
                    self.put(key, value)
                return value
        finally:
            self._leave_build(key)

    def clear(self) -> None:
        """Evict every entry."""
        with self._lock:
            evicted = list((key, entry.value) for key, entry in self._entries.items())
            self._entries.clear()
        self._evicted(evicted)

    def _enter_build(self, key: K) -> threading.Lock:
        with self._lock:
            lock, users = self._building.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
            return lock

    def _leave_build(self, key: K) -> None:
        with self._lock:
            _, users = self._building[key]
            users[0] -= 1
            if not users[0]:
                del self._building[key]

    def _evicted(self, evicted: list[tuple[K, V]]) -> None:
        if self._on_evict is not None:
            for key, value in evicted:
                self._on_evict(key, value)
