"""The native CPU kernels (_flashmoe_native) against mx.dequantize + matmul in float64, on fresh random data."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from flashmoe import kernels
from flashmoe.kernels import native

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native CPU kernels not built here: {native.why_unavailable()}"
)

TOLERANCE = 1e-5  # max |y - ref| / max |ref|, ref in float64
BITS = (2, 4, 8)
GROUP_SIZES = (32, 64, 128)
# odd out dims (tiles of 4 rows with 1-3 left over), in dims from one group to 4096, block tails (96),
# and one past the threading threshold
SHAPES = [(17, 128), (1, 32), (33, 96), (5, 256), (6, 256), (7, 512), (64, 4096), (300, 4096)]
SCALE_DTYPES = (mx.bfloat16, mx.float32)


def quantized(shape, bits, group_size, scale_dtype):
    q, scales, biases = mx.quantize(mx.random.normal(shape), group_size=group_size, bits=bits)
    return q, scales.astype(scale_dtype), biases.astype(scale_dtype)


def dense64(q, scales, biases, bits, group_size):
    """mx.dequantize with the exact float32 values of the scales, as float64."""
    w = mx.dequantize(
        q, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits
    )
    return np.array(w, dtype=np.float64)


def max_rel_err(y, ref) -> float:
    y = np.array(y, dtype=np.float64)
    assert y.shape == ref.shape
    assert np.isfinite(y).all(), "non-finite output: an element was left unwritten or went wrong"
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=["bf16", "f32"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("out_dim,in_dim", SHAPES)
def test_dequant_matvec(bits, group_size, out_dim, in_dim, scale_dtype, seed):
    if in_dim % group_size:
        pytest.skip(f"in_dim {in_dim} is not a multiple of group_size {group_size}")
    q, s, b = quantized((out_dim, in_dim), bits, group_size, scale_dtype)
    x = mx.random.normal((3, in_dim))
    y = native.dequant_matvec(x, q, s, b, bits=bits, group_size=group_size)
    assert y.dtype == mx.float32
    ref = np.array(x, dtype=np.float64) @ dense64(q, s, b, bits, group_size).T
    err = max_rel_err(y, ref)
    assert err <= TOLERANCE, f"rel err {err:.3g} (seed {seed})"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("shared", [True, False], ids=["x-shared", "x-per-expert"])
@pytest.mark.parametrize(
    "experts,out_dim,in_dim,lead", [(8, 17, 256, (2,)), (6, 33, 128, (2, 3)), (64, 512, 2048, (1,))]
)
def test_gather_dequant_matvec(bits, group_size, shared, experts, out_dim, in_dim, lead, seed):
    K = 3
    q, s, b = quantized((experts, out_dim, in_dim), bits, group_size, mx.bfloat16)
    idx = mx.random.randint(0, experts, (*lead, K)).astype(mx.uint32)
    x = mx.random.normal((*lead, in_dim) if shared else (*lead, K, in_dim))
    y = native.gather_dequant_matvec(x, q, s, b, idx, bits=bits, group_size=group_size)
    w = dense64(q, s, b, bits, group_size)[np.array(idx)]  # (*lead, K, out, in)
    xk = np.array(x, dtype=np.float64)
    xk = xk[..., None, :] if shared else xk
    ref = np.einsum("...ki,...koi->...ko", np.broadcast_to(xk, (*lead, K, in_dim)), w)
    assert y.shape == (*lead, K, out_dim)
    err = max_rel_err(y, ref)
    assert err <= TOLERANCE, f"rel err {err:.3g} (seed {seed})"


def test_int32_indices_and_out_of_range_expert_is_nan(seed):
    q, s, b = quantized((4, 9, 64), 4, 64, mx.float32)
    x = mx.random.normal((1, 64))
    y = np.array(
        native.gather_dequant_matvec(x, q, s, b, mx.array([[1, 7]], dtype=mx.int32), bits=4, group_size=64)
    )
    assert np.isfinite(y[0, 0]).all() and np.isnan(y[0, 1]).all()


def test_strided_inputs_give_what_their_contiguous_copies_give(seed):
    """The ops take inputs in any layout (no copy nodes in the graph; a strided input is copied at
    evaluation): sliced, transposed-back, broadcast and offset views, and reversed int32 ids."""
    q, s, b = quantized((8, 40, 256), 4, 64, mx.bfloat16)
    # the same values in other layouts: a transpose of a transpose, a slice of a wider stack
    qt, st, bt = (mx.swapaxes(mx.swapaxes(a, 1, 2) + 0, 1, 2) for a in (q, s, b))
    wide = [mx.concatenate([a, a], axis=-1)[..., : a.shape[-1]] for a in (q, s, b)]
    x = mx.random.normal((2, 3, 256))
    x_view = mx.concatenate([x, x], axis=-1)[..., 256:]  # an offset, strided view
    ids = mx.array([[5, 0, 7], [2, 2, 6]], dtype=mx.int32)
    ids_view = mx.array([[6, 2, 2], [7, 0, 5]], dtype=mx.int32)[::-1, ::-1]  # negative strides
    expected = np.array(native.gather_dequant_matvec(x, q, s, b, ids, bits=4, group_size=64))
    for weights in ((qt, st, bt), wide):
        got = native.gather_dequant_matvec(x_view, *weights, ids_view, bits=4, group_size=64)
        assert np.array_equal(np.array(got), expected)
    x1 = mx.random.normal((1, 256))
    dense = np.array(
        native.dequant_matvec(mx.broadcast_to(x1, (4, 256)), q[3], s[3], b[3], bits=4, group_size=64)
    )
    assert np.array_equal(
        dense,
        np.broadcast_to(
            np.array(native.dequant_matvec(x1, q[3], s[3], b[3], bits=4, group_size=64)), (4, 40)
        ),
    )


def test_dispatch_routes_native_and_casts_other_dtypes(seed):
    q, s, b = quantized((40, 256), 4, 64, mx.bfloat16)
    x = mx.random.normal((2, 256)).astype(mx.bfloat16)
    y = kernels.dequant_matvec(x, q, s, b, bits=4, group_size=64, backend="native")
    assert y.dtype == mx.bfloat16
    ref = np.array(x.astype(mx.float32), dtype=np.float64) @ dense64(q, s, b, 4, 64).T
    assert max_rel_err(y.astype(mx.float32), ref) < 1e-2  # bfloat16 output rounding


def test_auto_picks_native_on_cpu():
    if mx.default_device() != mx.cpu:
        pytest.skip("auto prefers the GPU backends when the default device is a GPU")
    assert kernels.resolve_backend("auto") == "native"
    assert "native" in kernels.available_backends()
    assert kernels.backend_reason().startswith("kernel backend native")


def test_bad_shapes_raise_clear_errors():
    q, s, b = quantized((8, 128), 4, 64, mx.float32)
    with pytest.raises(ValueError, match="inputs"):
        native.dequant_matvec(mx.ones((1, 64)), q, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="bits"):
        native.dequant_matvec(mx.ones((1, 128)), q, s, b, bits=3, group_size=64)
    with pytest.raises(ValueError, match="float32"):
        native.dequant_matvec(mx.ones((1, 128), dtype=mx.float16), q, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="indices"):
        native.gather_dequant_matvec(
            mx.ones((2, 5, 128)),
            q[None],
            s[None],
            b[None],
            mx.zeros((2, 3), dtype=mx.uint32),
            bits=4,
            group_size=64,
        )


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_instruction_sets_agree(isa):
    """The portable and AVX2 paths (the ISA is chosen once per process, so each runs in a child)."""
    if isa == "avx2" and native._ext.isa() not in ("avx2", "avx512"):
        pytest.skip(f"this CPU has no AVX2 ({native._ext.isa()})")
    code = (
        "import mlx.core as mx, numpy as np; from tests.kernels.test_native import *\n"
        "for bits in BITS:\n"
        "  for gs in GROUP_SIZES:\n"
        "    q, s, b = quantized((37, 1024), bits, gs, mx.bfloat16); x = mx.random.normal((2, 1024))\n"
        "    ref = np.array(x, dtype=np.float64) @ dense64(q, s, b, bits, gs).T\n"
        "    assert max_rel_err(native.dequant_matvec(x, q, s, b, bits=bits, group_size=gs), ref) <= TOLERANCE\n"
        "print(native._ext.isa())\n"
    )
    env = dict(os.environ, FLASHMOE_NATIVE_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == isa
