"""Progress lines on stderr while rounds train: round, strategy, seed, iteration, accuracy, ETA."""
from __future__ import annotations

import sys
import time


def hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Progress lines on stderr: round, strategy, seed, iteration, accuracy, elapsed and ETA.

    The ETA counts the training iterations still to run in this process (rounds already on disk are
    not counted) at the rate measured so far."""

    def __init__(self, net: str, total_iterations: int, quiet: bool = False, every: float = 5.0,
                 stream=None):
        self.net, self.total, self.quiet, self.every = net, max(1, total_iterations), quiet, every
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.done_before = 0   # iterations of finished trainings
        self.current = 0
        self.last = 0.0

    def _eta(self) -> str:
        done = self.done_before + self.current
        el = time.perf_counter() - self.t0
        if done == 0:
            return "?"
        return hms(el / done * max(0, self.total - done))

    def __call__(self, event: str, **k) -> None:
        if event == "start":
            self.current = 0
            layers = ", ".join(f"{n.split('.')[0]} {p:.1f}%" for n, p in k.get("layers", {}).items())
            self._print(f"[{self.net} seed {k['seed']} {k['strategy']} round {k['round']}] "
                        f"{k['density']:.2f}% of weights left ({layers})")
        elif event == "eval":
            self.current = k["iteration"]
            now = time.perf_counter()
            if now - self.last >= self.every or k["iteration"] == k["total"]:
                self.last = now
                self._print(f"[{self.net} seed {k['seed']} {k['strategy']} round {k['round']}] "
                            f"it {k['iteration']}/{k['total']} val {100 * k['val_acc']:.2f}% "
                            f"test {100 * k['test_acc']:.2f}% elapsed "
                            f"{hms(time.perf_counter() - self.t0)} eta {self._eta()}")
        elif event == "done":
            self.done_before += self.current
            self.current = 0
            m = k["metrics"]
            self._print(f"[{self.net} seed {k['seed']} {k['strategy']} round {k['round']}] done in "
                        f"{k['seconds']:.1f}s: early stop at {m['early_stop_iter']}, test "
                        f"{100 * m['early_stop_test_acc']:.2f}% ({m['percent_left']:.2f}% left)")
        elif event == "diverged":
            self._print(f"[{self.net} seed {k['seed']} {k['strategy']} round {k['round']}] "
                        f"DIVERGED: {k['error']}; later rounds of this strategy are skipped")

    def _print(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream, flush=True)
