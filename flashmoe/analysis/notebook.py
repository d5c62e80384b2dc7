"""What the three notebooks share: the checkpoint they study and the held-out tokens they measure on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..loader import default_model_dir


def setup(checkpoint: str | Path | None, heldout_path: str | Path) -> tuple[Path, np.ndarray]:
    """(checkpoint directory, held-out token ids as int32); the bundled model when `checkpoint` is None.

    Run outside Jupyter (nbmake, a script), matplotlib draws headless: call this before pyplot is imported.
    """
    if "ipykernel" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")
    directory = Path(checkpoint) if checkpoint else default_model_dir()
    heldout = np.fromfile(heldout_path, dtype=np.uint16).astype(np.int32)
    print("checkpoint:", directory)
    return directory, heldout
