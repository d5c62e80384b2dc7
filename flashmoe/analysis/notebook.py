"""What the three notebooks share: the checkpoint and held-out tokens they study, an HTML side-by-side, the backends."""

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


def side_by_side_html(texts: dict[str, str]) -> str:
    """An HTML table, one column per text, each left-aligned in a <pre> so code keeps its indentation.

    Jupyter's table style right-aligns cells; `text-align: left` on the cells and the <pre> undoes that.
    """
    import html

    cell = "vertical-align:top; text-align:left; padding:4px 12px"
    pre = "text-align:left; white-space:pre; margin:0; font-family:monospace"
    heads = "".join(f"<th style='{cell}'>{html.escape(name)}</th>" for name in texts)
    cells = "".join(
        f"<td style='{cell}'><pre style='{pre}'>{html.escape(text)}</pre></td>" for text in texts.values()
    )
    return f"<table><tr>{heads}</tr><tr>{cells}</tr></table>"


def backend_status() -> list[tuple[str, bool, str]]:
    """(backend, runs here, why) for every kernel backend flashmoe has, in flashmoe.kernels.BACKENDS order."""
    import mlx.core as mx

    from .. import kernels

    device = mx.default_device()
    on_gpu = device == mx.gpu
    rows = []
    for backend in kernels.BACKENDS:
        if kernels.backend_available(backend):
            why = {
                "metal": "the default device is a Metal GPU",
                "cuda": "the default device is a CUDA GPU",
                "native": f"flashmoe's C++ CPU kernels ({kernels.native.info()})",
                "mlx": "MLX's own quantized_matmul: runs on every device",
                "reference": "pure-MLX shifts and masks (the ground truth): runs on every device",
            }[backend]
        elif backend == "metal":
            why = (
                f"no Metal GPU (default device {device})"
                if not (on_gpu and mx.metal.is_available())
                else "unavailable"
            )
        elif backend == "cuda":
            why = f"no CUDA GPU (default device {device})"
        elif backend == "native":
            why = (
                "the default device is a GPU: the native kernels are CPU-only"
                if on_gpu
                else f"native kernels unavailable: {kernels.native.why_unavailable()}"
            )
        else:
            why = "unavailable"
        rows.append((backend, kernels.backend_available(backend), why))
    return rows
