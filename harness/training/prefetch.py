"""Keep the host ahead of the GPU: plan (split, weigh, lay out, pin) step k+1 in a background
thread while step k runs on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def ahead(make: Callable[[int], T], items: range, background: bool) -> Iterator[tuple[int, T]]:
    """(item, make(item)) for every item in order; with `background`, the next one is made in
    a thread while the caller works on the current one."""
    if not background:
        for item in items:
            yield item, make(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan-ahead") as pool:
        upcoming = iter(items)
        item = next(upcoming, None)
        future = pool.submit(make, item) if item is not None else None
        while future is not None:
            made = future.result()
            following = next(upcoming, None)
            next_future = pool.submit(make, following) if following is not None else None
            yield item, made
            item, future = following, next_future
