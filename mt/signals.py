"""Stopping a training run cleanly: SIGINT/SIGTERM finish the current update, then a checkpoint is saved."""

from __future__ import annotations

import logging
import signal
import threading

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
