"""Decoding through every kernel backend that runs here gives the reference backend's logits."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import pytest

from flashmoe import kernels
from flashmoe.analysis.parity import forced_decode_logits
from flashmoe.loader import load_model
from tests.helpers import rel_err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """FLASHMOE_TEST_CHECKPOINT (a directory carried to a GPU host without mlx-lm), else a fresh tiny one."""
    if os.environ.get("FLASHMOE_TEST_CHECKPOINT"):
        return Path(os.environ["FLASHMOE_TEST_CHECKPOINT"])
    from tests.helpers import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("qwen3_next"), "qwen3_next")


@pytest.mark.parametrize("backend", [b for b in kernels.BACKENDS if b != "reference"])
def test_decode_matches_the_reference_backend_in_float32(checkpoint, backend, seed):
    if not kernels.backend_available(backend):
        pytest.skip(f"backend {backend!r} cannot run here")
    prompt = [3, 14, 15, 92, 65]
    tokens = mx.random.randint(0, 200, (16,)).tolist()
    reference = forced_decode_logits(
        load_model(checkpoint, backend="reference", dtype=mx.float32), prompt, tokens
    )
    logits = forced_decode_logits(load_model(checkpoint, backend=backend, dtype=mx.float32), prompt, tokens)
    err = rel_err(logits, reference)
    assert err < 1e-4, f"{backend}: rel err {err:.3g} (seed {seed})"
