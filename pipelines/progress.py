"""Progress of a long conversion on stderr: rows done, rows/s, and the time
left where the total is known; one line every few seconds, so a log file
stays short."""

import sys
import time
from typing import Optional, TextIO


class Progress:
  """Counts rows and reports them now and then.

  Args:
    what: what is being done, e.g. "train: writing" (starts each line).
    total: the rows there will be, when known (gives the time left).
    stream: where lines go (default: sys.stderr, looked up when printing).
    every: seconds between lines.
  """

  def __init__(self, what: str, total: Optional[int] = None,
               stream: Optional[TextIO] = None, every: float = 5.0):
    self.what, self.total, self.every = what, total, every
    self._stream = stream
    self.rows = 0
    self.start = self._last = time.perf_counter()

  def add(self, rows: int) -> None:
    """Counts `rows` more; prints a line if the last was `every` seconds ago."""
    self.rows += rows
    now = time.perf_counter()
    if now - self._last >= self.every:
      self._last = now
      self._print(now)

  def done(self) -> None:
    """Prints the final line: rows, seconds, rows/s."""
    seconds = time.perf_counter() - self.start
    print(f"{self.what} {self.rows:,} rows in {seconds:.1f}s "
          f"({self.rows / max(seconds, 1e-9):,.0f} rows/s)", file=self._out(), flush=True)

  def _print(self, now: float) -> None:
    rate = self.rows / max(now - self.start, 1e-9)
    line = f"{self.what} {self.rows:,}"
    if self.total:
      line += f" of {self.total:,} rows ({self.rows / self.total:.0%}"
      left = (self.total - self.rows) / rate if rate else float("inf")
      line += f", {rate:,.0f} rows/s, {_duration(left)} left)"
    else:
      line += f" rows ({rate:,.0f} rows/s)"
    print(line, file=self._out(), flush=True)

  def _out(self) -> TextIO:
    return self._stream or sys.stderr


def _duration(seconds: float) -> str:
  if seconds == float("inf"):
    return "unknown time"
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
