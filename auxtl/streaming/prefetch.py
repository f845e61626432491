"""Double buffering onto the device: the next batch is put while the current step runs.

`device_prefetch(batches, put)` yields put(batch) for each host batch, keeping `depth`
batches already transferred ahead (JAX dispatch is asynchronous, so the put of batch
t+1 overlaps step t). `items` may yield (batch, extra) pairs: `extra` (e.g. the input
iterator's state after that batch) travels with its batch untouched.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def device_prefetch(items: Iterable[tuple[Any, Any]], put: Callable[[Any], Any], *,
                    depth: int = 2) -> Iterator[tuple[Any, Any]]:
    """(put(batch), extra) for each (batch, extra) of `items`, `depth` puts ahead."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    queue: collections.deque = collections.deque()
    iterator = iter(items)

    def enqueue(count: int) -> None:
        for batch, extra in itertools.islice(iterator, count):
            queue.append((put(batch), extra))

    enqueue(depth)
    while queue:
        yield queue.popleft()
        enqueue(1)
