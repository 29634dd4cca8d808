"""Races on purpose: run one function in several threads released at the same instant."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_together(fn: Callable[[int], T], n: int) -> list[T | BaseException]:
    """`fn(0)` .. `fn(n - 1)`, each in its own thread, all started at one barrier; joined. Each
    thread's result, or the exception it raised (a thread's exception is otherwise lost)."""
    barrier = threading.Barrier(n)
    results: list[T | BaseException | None] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's assertions
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results  # type: ignore[return-value]


def raised(results: list) -> list[BaseException]:
    """The exceptions among `run_together`'s results."""
    return [r for r in results if isinstance(r, BaseException)]
