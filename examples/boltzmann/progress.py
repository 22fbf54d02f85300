"""Progress reporting: a tqdm bar on a terminal, one plain line every ``every`` steps otherwise."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Counts steps and shows them: ``with Progress(total, "ML") as bar: bar.update(1, loss=x)``.

    Parameters
    ----------
    total : int
        Number of steps expected.
    desc : str
        Label of the bar or line.
    every : int
        Without a terminal, print one line every ``every`` steps (and at the end).
    initial : int
        Steps already done (when resuming from a checkpoint).
    """

    def __init__(self, total: int, desc: str, every: int = 100, initial: int = 0) -> None:
        self.total, self.desc, self.every, self.n = total, desc, max(1, every), initial
        self._bar = None
        self._t0 = time.perf_counter()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True)

    def update(self, steps: int = 1, **figures: float) -> None:
        self.n += steps
        text = ", ".join(f"{k}={v:.4g}" for k, v in figures.items())
        if self._bar is not None:
            self._bar.update(steps)
            if figures:
                self._bar.set_postfix_str(text, refresh=False)
        elif self.n % self.every == 0 or self.n >= self.total:
            elapsed = time.perf_counter() - self._t0
            print(f"{self.desc}: {self.n}/{self.total} ({elapsed:.0f} s) {text}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
