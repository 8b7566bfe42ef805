"""The stop signals of a command: SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`, so a run
stops its workers and exits with one line and 128 + the signal's number."""
from __future__ import annotations


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) turned into a KeyboardInterrupt; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def catch_stop_signals() -> dict:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread, and return
    the handlers they had. The first one also ignores all three from then on: a second Ctrl-C while
    the workers are stopped and the message printed must not cut the shutdown short. A signal that
    was ignored (``nohup``, a background job) stays ignored."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}
    sigs = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]

    def stop(signum, frame):
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)
    old = {}
    for s in sigs:
        if signal.getsignal(s) is not signal.SIG_IGN:
            old[s] = signal.signal(s, stop)
    return old
