"""SIGTERM (``docker stop``, compose, systemd) ends a command the way Ctrl-C does: cleanup runs, exit code 143.

Python's default for SIGTERM is to die on the spot, which leaves temporary ``.partial`` files behind;
as PID 1 in a container without an init, it is not even delivered. ``raise_on_sigterm()`` turns it into
a ``Terminated`` exception in the main thread, so ``atomic_output`` removes what was half-written and
``main`` exits 143. ``infer`` and ``demo`` stop after the frame being written and keep what was written.
"""

from __future__ import annotations

import signal
import threading

EXIT_TERMINATED = 143  # 128 + SIGTERM: what a shell reports for a process the signal ended


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that ``except Exception`` lets it through."""


def raise_on_sigterm() -> None:
    """From now on the first SIGTERM raises ``Terminated`` in the main thread; later ones are ignored, so
    that the cleanup the first one started can finish."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
