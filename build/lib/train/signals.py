"""SIGINT/SIGTERM as a flag a loop checks between units of work.

  with StopSignals() as stop:
    while working:
      do_one_step()
      if stop.received is not None:   # save, then leave
        break

The training loop checks it after every step (then saves a checkpoint and
returns); the sweep runner checks it between runs. A second Ctrl-C raises
KeyboardInterrupt at once. Outside the main thread (where Python cannot install
handlers) the flag never rises. The previous handlers come back on exit.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
  """Turns SIGINT/SIGTERM into `received` (the signal number) instead of an exception."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  @property
  def name(self) -> str | None:
    """'SIGINT' or 'SIGTERM' once one arrived."""
    return None if self.received is None else signal.Signals(self.received).name

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for sig in STOP_SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signum

  def __exit__(self, *exc) -> bool:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
    return False
