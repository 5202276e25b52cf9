"""Stopping a training run cleanly: SIGINT/SIGTERM finish the current update, then a checkpoint is saved;
before training starts they are held back while the heavy libraries load."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class GracefulStop:
    """While active, SIGINT/SIGTERM ask the training run to stop after the current update.

    A second SIGINT interrupts at once (KeyboardInterrupt), for when saving takes too long.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name
        log.warning("%s received: finishing this update, then saving a checkpoint", self.signal_name)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block ends, then deliver them.

    For importing torch and numpy: a KeyboardInterrupt inside their import can be swallowed by a
    library's `except` and leave a half-initialised module that fails much later.
    """
    numbers = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, numbers)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held signal is delivered here
