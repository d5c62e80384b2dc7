"""Per-phase timing of a forward pass (`--timing`), flash-moe style.

MLX evaluates lazily, so a phase only has a duration if the work is forced at its end.
`mark` does that, and only while timing is on: with timing off it returns at once and
the forward pass keeps its single evaluation per token.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import mlx.core as mx

PHASES = (
    "embedding",
    "attention",
    "linear attention",
    "routing",
    "expert i/o",
    "experts",
    "shared expert",
    "dense mlp",
    "output",
    "sampling",
)


class PhaseTimer:
    """Seconds per phase, summed over the marks made while enabled."""

    def __init__(self):
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._last = 0.0

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self._last = time.perf_counter()

    def mark(self, phase: str, *arrays: mx.array) -> None:
        """End `phase` here: force `arrays` (a sync, for the measurement) and book the time since the last mark."""
        if not self.enabled:
            return
        mx.eval(*arrays)
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self.calls[phase] += 1
        self._last = now

    def restart(self) -> None:
        """Start counting from now (e.g. after work that belongs to no phase)."""
        self._last = time.perf_counter()


timer = PhaseTimer()


@contextmanager
def timing():
    """Collect a per-phase breakdown inside the block: `with timing() as t: ...; t.seconds`."""
    timer.enabled = True
    timer.reset()
    try:
        yield timer
    finally:
        timer.enabled = False


def format_timing(timer: PhaseTimer, bytes_per_token: float | None = None) -> str:
    """Per-phase table: ms per decoded token and share of the total; with `bytes_per_token` (weight
    bytes one decode step reads), the GB/s that makes at the timed ms per token."""
    steps = max(timer.calls.get("sampling", 0), 1)  # one sampling mark per decode step
    phases = [p for p in PHASES if p in timer.seconds] + sorted(set(timer.seconds) - set(PHASES))
    total = sum(timer.seconds.values())
    lines = [f"{'phase':<18}{'ms/token':>10}{'share':>8}"]
    for phase in phases:
        share = timer.seconds[phase] / total if total else 0.0
        lines.append(f"{phase:<18}{1e3 * timer.seconds[phase] / steps:>10.3f}{share:>8.1%}")
    lines.append(f"{'total':<18}{1e3 * total / steps:>10.3f}{1.0 if total else 0.0:>8.1%}")
    text = "\n".join(lines) + f"\n({steps} decode steps timed)"
    if bytes_per_token and total:
        text += (
            f"\nweights read per token: {bytes_per_token / 1e6:.3f} MB; at {1e3 * total / steps:.3f} ms/token "
            f"that is {bytes_per_token * steps / total / 1e9:.3f} GB/s"
        )
    return text
