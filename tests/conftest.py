"""Shared fixtures: fresh random data each run (seed printed on failure), backend skips."""

from __future__ import annotations

import secrets

import mlx.core as mx
import pytest

from flashmoe import kernels


@pytest.fixture
def seed() -> int:
    """A fresh seed per test; failures print it so a run can be replayed."""
    value = secrets.randbits(31)
    mx.random.seed(value)
    return value


def require_backend(backend: str) -> None:
    """Skip, with the reason, when `backend` cannot run on this machine."""
    if not kernels.backend_available(backend):
        why = {
            "metal": "Metal is not available (mx.metal.is_available() is False); the Apple Silicon CI runs these",
            "cuda": "CUDA is not available (needs an NVIDIA GPU and mlx[cuda13])",
            "native": f"native CPU kernels unavailable: {kernels.native.why_unavailable() or 'the default device is a GPU'}",
        }[backend]
        pytest.skip(why)


def rel_err(y: mx.array, ref: mx.array) -> float:
    """max |y - ref| / max |ref| in float32 (NaN when y has NaN, e.g. a poisoned row left unwritten)."""
    y, ref = y.astype(mx.float32), ref.astype(mx.float32)
    err = mx.max(mx.abs(y - ref)) / mx.maximum(mx.max(mx.abs(ref)), 1e-30)
    return float(mx.where(mx.any(mx.isnan(y)), mx.array(float("nan")), err).item())
