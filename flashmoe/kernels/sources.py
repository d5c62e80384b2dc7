"""Kernel source files (flashmoe/kernels/src/, shipped in the wheel as package data)."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

PRELUDES = {"metal": "prelude.metal", "cuda": "prelude.cu"}
BODY_MARKER = "// @body"


def source_dir() -> Path:
    """The folder holding the kernel sources."""
    return Path(str(resources.files("flashmoe.kernels") / "src"))


@functools.cache
def read_source(name: str) -> str:
    """The text of one kernel source file, e.g. `dequant_matvec.inc`."""
    path = source_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"kernel source {path} is missing: was flashmoe installed from a full checkout?"
        )
    return path.read_text()


def compose(backend: str, body_file: str) -> tuple[str, str]:
    """(header, body) for a kernel: the backend's prelude wrapped around the common body."""
    header, _, opening = read_source(PRELUDES[backend]).partition(BODY_MARKER)
    return header, opening + "\n" + read_source(body_file)
