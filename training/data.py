"""Token streams and the batches cut from them, as pure functions of (seed, epoch, position).

An epoch cuts train.bin into non-overlapping windows of seq + 1 tokens (inputs and shifted
targets), starting at an offset drawn per epoch so window edges move, and visits them in a
permutation drawn per epoch. Batch i of epoch e is therefore fixed by (seed, e, i): resuming
needs only the step's (epoch, position), no generator state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def load_tokens(data_dir: Path, split: str) -> np.ndarray:
    """The uint16 ids of `split` ("train" or "heldout"), memory-mapped."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; build it with `python -m training.corpus`")
    return np.memmap(path, dtype=np.uint16, mode="r")


def manifest(data_dir: Path) -> dict:
    """data_dir/manifest.json (written by training.corpus), or {} when absent."""
    path = Path(data_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Batches:
    """Training batches (B, seq + 1) over `tokens`, epoch by epoch, in a seeded order."""

    tokens: np.ndarray
    batch: int  # B
    seq: int  # tokens a window predicts
    seed: int = 0

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        """This epoch's window offset and the order its windows are visited in."""
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(0, self.seq))
        count = (len(self.tokens) - 1 - offset) // self.seq
        return offset, rng.permutation(count)

    def per_epoch(self, epoch: int = 0) -> int:
        """Whole batches in `epoch` (a trailing partial batch is skipped)."""
        return len(self._epoch(epoch)[1]) // self.batch

    def get(self, epoch: int, position: int) -> np.ndarray:
        """Batch `position` of `epoch`: (B, seq + 1) int32."""
        offset, order = self._epoch(epoch)
        starts = offset + order[position * self.batch : (position + 1) * self.batch] * self.seq
        if len(starts) < self.batch:
            raise IndexError(f"epoch {epoch} has {len(order) // self.batch} batches; asked for {position}")
        return np.stack([self.tokens[s : s + self.seq + 1] for s in starts]).astype(np.int32)

    def advance(self, epoch: int, position: int) -> tuple[int, int]:
        """The (epoch, position) after this one."""
        position += 1
        return (epoch + 1, 0) if position >= self.per_epoch(epoch) else (epoch, position)


def eval_windows(tokens: np.ndarray, seq: int, max_tokens: int) -> np.ndarray:
    """The first held-out windows, non-overlapping (each token predicted once): (N, seq + 1) int32."""
    count = min((len(tokens) - 1) // seq, max(max_tokens // seq, 1))
    if count < 1:
        raise ValueError(f"held-out data has {len(tokens)} tokens; a window needs {seq + 1}")
    return np.stack([tokens[i * seq : i * seq + seq + 1] for i in range(count)]).astype(np.int32)
