"""The residual a kernel adds as it writes its output (dequant_matvec, moe_down) against the separate
add it replaces: bit-identical, on every backend that runs here, in bfloat16 and float32."""

from __future__ import annotations

import mlx.core as mx
import pytest

from flashmoe import kernels
from flashmoe.analysis.accuracy import quantized
from flashmoe.kernels import gpu, moe
from tests.helpers import needs_cuda, require_backend

DTYPES = [mx.float32, mx.bfloat16]


@pytest.fixture
def poisoned():
    gpu.set_output_poison(float("nan"))  # a row the kernel leaves unwritten shows as NaN
    yield
    gpu.set_output_poison(None)


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_matvec_residual_is_the_separate_add(backend, dtype, bits, poisoned, seed):
    require_backend(backend)
    q, scales, biases, _ = quantized((200, 512), bits, 64, dtype=dtype)  # 200 rows: blocks overhang
    x = mx.random.normal((1, 1, 512)).astype(dtype)
    residual = (10 * mx.random.normal((1, 1, 200))).astype(dtype)
    kw = dict(bits=bits, group_size=64, backend=backend)
    fused = kernels.dequant_matvec(x, q, scales, biases, residual=residual, **kw)
    apart = residual + kernels.dequant_matvec(x, q, scales, biases, **kw)
    assert fused.dtype == dtype and fused.shape == (1, 1, 200)
    assert mx.array_equal(fused, apart).item(), f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_moe_down_residual_is_the_separate_add(dtype, poisoned, seed):
    w = mx.random.normal((8, 200, 128)).astype(dtype)
    down = mx.quantize(w, group_size=64, bits=4)
    h = mx.random.normal((1, 3, 128)).astype(dtype)
    ids = mx.array([[5, 0, 7]], dtype=mx.uint32)
    weights = mx.softmax(mx.random.normal((1, 3)), axis=-1).astype(dtype)
    residual = (10 * mx.random.normal((1, 200))).astype(dtype)
    kw = dict(bits=4, group_size=64, backend="cuda")
    fused = moe.moe_down(h, down, ids, weights, residual=residual, **kw)
    apart = residual + moe.moe_down(h, down, ids, weights, **kw)
    assert fused.dtype == dtype and mx.array_equal(fused, apart).item(), f"seed {seed}"


def test_moe_down_reference_adds_the_residual(seed):
    down = mx.quantize(mx.random.normal((8, 200, 128)), group_size=64, bits=4)
    h, ids = mx.random.normal((3, 128)), mx.array([5, 0, 7], dtype=mx.uint32)
    weights, residual = mx.softmax(mx.random.normal((3,))), mx.random.normal((200,))
    kw = dict(bits=4, group_size=64, backend="reference")
    fused = moe.moe_down(h, down, ids, weights, residual=residual, **kw)
    assert mx.array_equal(fused, residual + moe.moe_down(h, down, ids, weights, **kw)).item()
