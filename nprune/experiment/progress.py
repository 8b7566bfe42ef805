"""Progress lines on stderr while rounds train: round, strategy, seed, iteration, accuracy, ETA."""
from __future__ import annotations

import sys
import time


def hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Clock:
    """Training iterations done and to do across a whole command (every net, seed, strategy and
    round it still has to run; rounds already on disk are not counted), and the ETA they give at
    the rate measured so far. One clock is shared by the progress lines of all the command's runs."""

    def __init__(self, total_iterations: int, done: int = 0, start: float | None = None):
        self.total = max(0, total_iterations)
        self.done = done   # iterations of finished trainings
        self.start = time.time() if start is None else start   # wall clock: the same in every process

    def state(self) -> tuple:
        """``(total, done, start)``: a copy made by ``Clock(*state)`` in a --jobs worker carries on
        from here (it misses only the rounds other workers finish meanwhile)."""
        return self.total, self.done, self.start

    def elapsed(self) -> float:
        return time.time() - self.start

    def eta(self, current: int = 0) -> str:
        """The time left once ``current`` more iterations (of a training under way) are done."""
        done = self.done + current
        if done == 0:
            return "?"
        return hms(self.elapsed() / done * max(0, self.total - done))


class Progress:
    """Progress lines on stderr: round, strategy, seed, iteration, accuracy, elapsed and ETA.

    Elapsed time and ETA are the ``clock``'s (the whole command's); without one, a clock of
    ``total_iterations``; with neither, no ETA."""

    def __init__(self, net: str, total_iterations: int | None = None, quiet: bool = False,
                 every: float = 5.0, stream=None, clock: Clock | None = None):
        self.net, self.quiet, self.every = net, quiet, every
        self.clock = clock or (Clock(total_iterations) if total_iterations is not None else None)
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.current = 0
        self.last = 0.0

    @property
    def done_before(self) -> int:
        """Iterations of the trainings finished so far (by the whole command, with a shared clock)."""
        return self.clock.done if self.clock else 0

    def _times(self) -> str:
        if self.clock is None:
            return f"elapsed {hms(time.perf_counter() - self.t0)}"
        return f"elapsed {hms(self.clock.elapsed())} eta {self.clock.eta(self.current)}"

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
                test = k.get("test_acc")   # None where the test set was not evaluated
                test = f"test {100 * test:.2f}% " if test is not None and test == test else ""
                self._print(f"[{self.net} seed {k['seed']} {k['strategy']} round {k['round']}] "
                            f"it {k['iteration']}/{k['total']} val {100 * k['val_acc']:.2f}% "
                            f"{test}{self._times()}")
        elif event == "done":
            if self.clock:
                self.clock.done += self.current
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
