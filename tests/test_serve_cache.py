"""serve.cache.BoundedCache: the one bounded cache the app keeps checkpoints, models, batches and folders in."""

from __future__ import annotations

import threading
import time

import pytest

from hf_ema import ConfigError
from serve.cache import BoundedCache


def test_least_recently_used_entries_go_first_by_count():
    evicted = []
    cache: BoundedCache[str, int] = BoundedCache(2, on_evict=lambda k, v: evicted.append((k, v)))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert evicted == [("b", 2)] and cache.keys() == ["a", "c"] and "b" not in cache
    cache.put("a", 10)  # replacing an entry evicts the old value, not another entry
    assert evicted == [("b", 2), ("a", 1)] and cache.keys() == ["c", "a"] and len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and [k for k, _ in evicted] == ["b", "a", "c", "a"]


def test_bounded_by_bytes_keeps_the_newest_even_when_alone_too_big():
    evicted = []
    cache: BoundedCache[str, bytes] = BoundedCache(
        10, max_bytes=100, size=len, on_evict=lambda k, v: evicted.append(k)
    )
    for key in "abc":
        cache.put(key, b"x" * 40)
    assert cache.keys() == ["b", "c"] and cache.total_bytes == 80 and evicted == ["a"]
    cache.put("big", b"x" * 500)  # larger than the bound: kept alone until the next entry comes
    assert cache.keys() == ["big"] and evicted == ["a", "b", "c"]
    cache.put("d", b"x" * 10)
    assert cache.keys() == ["d"]


def test_get_or_build_builds_each_key_once_at_a_time_and_keeps_no_failure():
    builds: list[str] = []
    cache: BoundedCache[str, str] = BoundedCache(4)

    def build(key: str) -> str:
        builds.append(key)
        time.sleep(0.05)
        return key.upper()

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda k=k: results.append(cache.get_or_build(k, lambda: build(k))))
        for k in ["a", "a", "b", "a", "b"]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["A", "A", "A", "B", "B"] and sorted(builds) == ["a", "b"]

    def fail() -> str:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.get_or_build("c", fail)
    assert "c" not in cache and cache.get_or_build("c", lambda: "C") == "C"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_items": 0}, "`cache` must be an int >= 1, got 0"),
        ({"max_items": 2, "max_bytes": 0, "size": len}, "positive number of bytes as its bound, got 0"),
        ({"max_items": 2, "max_bytes": 10}, "needs a `size` function"),
    ],
)
def test_bad_bounds_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BoundedCache(**kwargs, name="cache")
