"""Graceful stops: the first SIGINT/SIGTERM asks training to stop at the next step boundary
(after saving a resumable state); a second one ends the process at once."""

from __future__ import annotations

import logging
import os
import signal


logger = logging.getLogger(__name__)


class StopRequest:
    """Installs the handlers on enter and restores the previous ones on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict = {}

    def _handle(self, signal_number, frame) -> None:
        if self.signal_number is not None:
            logger.warning("Second signal: exiting now without saving.")
            signal.signal(signal_number, signal.SIG_DFL)
            os.kill(os.getpid(), signal_number)
            return
        self.signal_number = signal_number
        logger.warning("%s received: finishing this step, saving a resumable state, then stopping "
                       "(send it again to exit at once).", signal.Signals(signal_number).name)

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
