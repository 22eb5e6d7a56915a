"""Console progress of a loop: training epoch, evaluation, image check, prediction (callers show it on the
main process only, ``enabled=rank == 0``).

On a terminal (``stream.isatty()``) a tqdm bar, with the loop's values (loss, lr, images/s) after it.
Anywhere else (a pipe, a log file, CI, the distributed launcher's ``workerlog.N``) plain lines, by time
rather than by step::

    Epoch 3 [1/40] loss=1.097 lr=1.2e-05 images/s=14.2 elapsed=1s eta=55s run_eta=1h32m

Progress only reads a clock: it never touches random state, data order or the numbers it shows.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h03m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed or odd streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty(), or closed
        return False


def _bar_width(stream) -> int | None:
    """``None`` (follow the terminal's size), or 100 columns on a terminal that reports a size of 0 (a
    pseudo-terminal without a size, where tqdm would draw nothing)."""
    try:
        return None if os.get_terminal_size(stream.fileno()).columns else 100
    except (AttributeError, OSError, ValueError):  # not a real file descriptor: tqdm decides
        return None


def _format(key: str, value) -> str:
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


class Progress:
    """Progress of a loop of ``total`` steps, shown under ``header``; call ``update`` after each step.

    On a terminal: a tqdm bar (its own rate, elapsed time and ETA; the values, ``img/s`` and ``run_eta``
    after it). Otherwise a line ``header [i/n] key=value ... images/s=.. elapsed=.. eta=..`` at the first
    step, then whenever ``interval`` seconds have passed since the last line, and at the last step. With
    ``every`` (the ``--print_freq`` flag) also at steps every, 2*every, ... whatever the time: an upper bound
    on the steps between two lines (the flag's old meaning, "a line every N steps", plus the time-based
    lines). ``every=None`` or 0: by time only.

    Args:
        total: steps in the loop (``len(loader)``).
        header: ``Epoch 3``, ``Val``, ``Test``, ...
        every: at most this many steps between two lines (plain lines only).
        enabled: False prints nothing (the other ranks of a distributed run).
        stream: where to write (default ``sys.stdout``); its ``isatty()`` picks bar or lines.
        interval: seconds between two plain lines (default 30; 0: a line every step).
        epoch, epochs: the index of this epoch and the run's number of epochs: adds ``run_eta``, the time
            left for this epoch plus the remaining epochs at this epoch's pace (training steps only).
        unit: what a step is, for the bar's rate (``it/s``, ``img/s``).
        leave: keep the finished bar on the terminal (else it is cleared).
        clock: the time function (seconds); tests inject a fake one.
    """

    def __init__(self, total: int, header: str, every: int | None = None, enabled: bool = True,
                 stream: TextIO | None = None, *, interval: float = 30.0, epoch: int | None = None,
                 epochs: int | None = None, unit: str = "it", leave: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.header, self.enabled = total, header, enabled
        self.every = every if every and every > 0 else None
        self.interval = interval
        self.epochs_after = None if epoch is None or epochs is None else max(0, epochs - epoch - 1)
        self.stream = sys.stdout if stream is None else stream
        self.clock = clock
        self.start = self.last = clock()
        self.images = 0
        self.bar = None
        if enabled and is_terminal(self.stream):
            width = _bar_width(self.stream)
            self.bar = tqdm(total=total, desc=header, unit=unit, file=self.stream, leave=leave, ncols=width,
                            nrows=None if width is None else 20, dynamic_ncols=width is None)

    def update(self, step: int, images: int = 0, **values) -> None:
        """Step ``step`` (0-based) is done, with ``images`` more images; ``values`` are shown as key=value."""
        if not self.enabled:
            return
        done = step + 1
        self.images += images
        now = self.clock()
        due = (done == 1 or done >= self.total or now - self.last >= self.interval
               or (self.every is not None and done % self.every == 0))
        if self.bar is None and not due:
            return
        elapsed = now - self.start
        eta = elapsed / done * max(0, self.total - done)
        rate = f"{self.images / elapsed:.1f}" if self.images and elapsed > 0 else None
        run_eta = None if self.epochs_after is None else format_duration(
            eta + self.epochs_after * elapsed / done * self.total)
        parts = [_format(k, v) for k, v in values.items()]
        if self.bar is not None:  # tqdm shows the elapsed time and the ETA itself
            parts += ([f"img/s={rate}"] if rate else []) + ([f"run_eta={run_eta}"] if run_eta else [])
            self.bar.set_postfix_str(" ".join(parts), refresh=False)
            self.bar.update(done - self.bar.n)
            return
        self.last = now
        parts += ([f"images/s={rate}"] if rate else []) + [f"elapsed={format_duration(elapsed)}",
                                                            f"eta={format_duration(eta)}"]
        parts += [f"run_eta={run_eta}"] if run_eta else []
        print(f"{self.header} [{done}/{self.total}] {' '.join(parts)}", file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar (a no-op for plain lines); ``with Progress(...)`` does it even on an error."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
