"""Console progress of a loop: ``header [i/n] key=value ... elapsed eta`` lines (main process only)."""
from __future__ import annotations

import sys
import time


class Progress:
    """Prints ``header [i/n] key=value ... eta`` every ``every`` steps and at the end (main process only)."""

    def __init__(self, total: int, header: str, every: int = 20, enabled: bool = True, stream=None):
        self.total, self.header, self.every, self.enabled = total, header, max(1, every), enabled
        self.stream = stream or sys.stdout
        self.start = time.time()

    def update(self, step: int, **values) -> None:
        done = step + 1
        if not self.enabled or (done % self.every and done != self.total):
            return
        elapsed = time.time() - self.start
        eta = elapsed / done * (self.total - done)
        parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"{self.header} [{done}/{self.total}] {parts} elapsed={elapsed:.0f}s eta={eta:.0f}s",
              file=self.stream, flush=True)
