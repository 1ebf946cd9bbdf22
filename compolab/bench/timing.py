"""How every benchmark times: calls between two device synchronisations, best-of-N or median of
interleaved rounds, on a set number of CPU threads.

CUDA runs asynchronously, so a call is timed from a synchronisation before it to one after it (a
no-op on the CPU). Measurements of several functions are interleaved (round-robin), so that a slow
spell of a shared machine hits all of them alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch

__all__ = ["sync", "timed", "best_time", "best_of_rounds", "median_of_rounds", "threads"]

T = TypeVar("T")
CPU = torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device = CPU) -> tuple[float, T]:
    """``(seconds, fn())`` of one call, timed between two synchronisations of ``device``.

    Examples:
        >>> seconds, out = timed(lambda: 1 + 1)
        >>> out, seconds >= 0
        (2, True)
    """
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def best_time(fn: Callable[[], object], repeats: int, device: torch.device = CPU) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, after one warm-up call."""
    fn()
    return min((timed(fn, device)[0] for _ in range(repeats)), default=float("inf"))


def best_of_rounds(
    fns: Mapping[str, Callable[[], object]], repeats: int, rounds: int = 3
) -> dict[str, float]:
    """``key -> seconds``: the best :func:`best_time` of each function over ``rounds`` interleaved rounds.

    Examples:
        >>> sorted(best_of_rounds({"a": lambda: None, "b": lambda: None}, repeats=2))
        ['a', 'b']
    """
    seconds = {key: float("inf") for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            seconds[key] = min(seconds[key], best_time(fn, repeats))
    return seconds


def median_of_rounds(
    fns: Mapping[str, Callable[[], T]], repeats: int, device: torch.device = CPU
) -> tuple[dict[str, float], dict[str, T]]:
    """Median seconds of each function over ``repeats`` round-robin rounds after a warm-up round.

    Returns:
        ``(key -> median seconds, key -> output of its last call)``.

    Examples:
        >>> med, out = median_of_rounds({"one": lambda: 1}, repeats=3)
        >>> out, med["one"] >= 0
        ({'one': 1}, True)
    """
    times: dict[str, list[float]] = {key: [] for key in fns}
    outputs: dict[str, T] = {}
    for rep in range(repeats + 1):  # round 0 is the warm-up
        for key, fn in fns.items():
            seconds, outputs[key] = timed(fn, device)
            if rep:
                times[key].append(seconds)
    return {key: statistics.median(t) for key, t in times.items()}, outputs


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` CPU threads (None: leave torch's setting); the setting is restored after.

    On a shared machine, 1 thread gives the steadiest timings.

    Examples:
        >>> before = torch.get_num_threads()
        >>> with threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
