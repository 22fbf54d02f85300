r"""One timing helper for every study: interleaved chunks, median per call.

Timing several functions side by side, in chunks that alternate between them
(in a rotating order), makes slow drifts of a shared machine hit all of them
alike; the median over repetitions discards the occasional stall. Studies
report ratios of these medians, never absolute times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["interleaved_median"]


def interleaved_median(
    functions: Mapping[str, Callable[[], object]],
    *,
    calls: int = 10,
    repeats: int = 7,
    warmup: int | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved chunks.

    Parameters
    ----------
    functions : mapping of str to callable
        The functions to time (called without arguments), by name.
    calls : int
        Calls per timed chunk (e.g. one merge interval of training steps, so
        that merges are amortized inside each chunk).
    repeats : int
        Chunks per function; repetition ``r`` starts the round at function
        ``r mod len(functions)``.
    warmup : int, optional
        Untimed calls of each function first (default ``calls``): allocator,
        kernels, lazy imports and optimizer state.

    Returns
    -------
    dict of str to float
        Median over the ``repeats`` chunks of (chunk seconds / ``calls``).

    Examples
    --------
    >>> times = interleaved_median({"a": lambda: None, "b": lambda: sum(range(100))},
    ...                            calls=3, repeats=3)
    >>> sorted(times), all(t >= 0 for t in times.values())
    (['a', 'b'], True)
    """
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be an int >= 1, got {calls!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    named = list(functions.items())
    for _, fn in named:
        for _ in range(calls if warmup is None else warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name, _ in named}
    for r in range(repeats):
        shift = r % max(len(named), 1)
        for name, fn in named[shift:] + named[:shift]:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}
