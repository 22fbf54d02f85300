"""Progress of a long study on stderr: a bar on a terminal, one line per finished unit in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Report finished units of work on ``stream`` (stderr by default).

    On a terminal it draws a ``tqdm`` bar; otherwise (a pipe, a log file, CI)
    it writes one plain line per finished unit, ``[k/total] message (elapsed)``,
    so a log shows what ran and nothing is silent for long.

    Examples
    --------
    >>> import io
    >>> log = io.StringIO()
    >>> with Progress(2, "demo", stream=log) as progress:
    ...     progress.done("first")
    ...     progress.done("second")
    >>> log.getvalue().splitlines()[1].startswith("demo [2/2] second")
    True
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None) -> None:
        self.total, self.label, self.count = total, label, 0
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="run", leave=False, file=self.stream)

    def done(self, message: str, units: int = 1) -> None:
        """Count ``units`` finished units of work, described by ``message``."""
        self.count += units
        if self.bar is not None:
            self.bar.set_postfix_str(message, refresh=False)
            self.bar.update(units)
            return
        elapsed = time.perf_counter() - self.start
        print(f"{self.label} [{self.count}/{self.total}] {message} ({elapsed:.1f} s)",
              file=self.stream, flush=True)

    def write(self, message: str, *, stream: TextIO | None = None) -> None:
        """Print ``message`` (to stdout by default) without breaking the bar."""
        out = sys.stdout if stream is None else stream
        if self.bar is not None:
            self.bar.clear()
            print(message, file=out, flush=True)
            self.bar.refresh()
        else:
            print(message, file=out, flush=True)

    def close(self) -> None:
        """Remove the bar (plain lines stay)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
