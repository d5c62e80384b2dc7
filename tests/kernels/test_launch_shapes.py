"""Every launch shape benchmarks/matvec_sweep.py may choose (gpu.LAUNCH_GRID, gpu.MOE_GRID: x staged
in shared memory or read from cache, SIMD groups per threadgroup, rows per row group) gives the right
answer: the dequant matvec and both fused MoE kernels against exact float32, on fresh random data
(NVIDIA GPU). And the launch table plan() reads holds only shapes from those grids."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from flashmoe import kernels
from flashmoe.analysis.accuracy import exact_matmul, quantized
from flashmoe.kernels import gpu, moe
from tests.helpers import needs_cuda, rel_err


def name(shape: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in shape.items())


def test_the_package_launch_table_holds_only_tested_shapes():
    table = json.loads(gpu.LAUNCH_TABLE.read_text())
    assert "NVIDIA H200" in table
    for device, entries in table.items():
        for key, shape in entries.items():
            grid = gpu.LAUNCH_GRID if key.startswith("matvec ") else gpu.MOE_GRID
            assert shape == {} or shape in grid, f"{device}: {key} -> {shape} is not a tested launch shape"


@needs_cuda
@pytest.mark.parametrize("shape", gpu.LAUNCH_GRID, ids=name)
@pytest.mark.parametrize(
    "bits, out_dim, in_dim, group_size",
    [(2, 200, 256, 64), (4, 200, 256, 64), (8, 200, 256, 64), (4, 96, 8192 + 512, 32)],
)
def test_dequant_matvec_in_every_launch_shape(shape, bits, out_dim, in_dim, group_size, monkeypatch, seed):
    for key, value in shape.items():
        monkeypatch.setitem(gpu._override, key, value)
    q, scales, biases, dense = quantized((out_dim, in_dim), bits, group_size)
    x = mx.random.normal((3, in_dim))
    y = kernels.dequant_matvec(x, q, scales, biases, bits=bits, group_size=group_size, backend="cuda")
    assert y.shape == (3, out_dim)
    assert rel_err(y, exact_matmul(x, dense.T)) < 1e-4, f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("shape", gpu.LAUNCH_GRID, ids=name)
@pytest.mark.parametrize("in_dim, group_size", [(256, 64), (8192 + 512, 32)])
def test_dequant_matvec_applies_the_rms_norm_in_every_launch_shape(
    shape, in_dim, group_size, monkeypatch, seed
):
    """NORM: x's RMSNorm inside the kernel (one row of x per pair; more than one x tile too)."""
    for key, value in shape.items():
        monkeypatch.setitem(gpu._override, key, value)
    q, scales, biases, dense = quantized((200, in_dim), 4, group_size)
    x = 3.0 * mx.random.normal((3, in_dim)) + 1.0
    norm = (mx.random.uniform(0.5, 1.5, (in_dim,)), 1e-6)
    y = kernels.dequant_matvec(x, q, scales, biases, bits=4, group_size=group_size, backend="cuda", norm=norm)
    ref = exact_matmul(mx.fast.rms_norm(x, *norm, stream=mx.cpu), dense.T)
    assert rel_err(y, ref) < 1e-4, f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("shape", gpu.MOE_GRID, ids=name)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_the_rms_norm_in_the_kernels_rounds_as_mx_fast_rms_norm(shape, dtype, monkeypatch, seed):
    """Normalising inside the matvec and gate/up kernels gives what mx.fast.rms_norm first gives, bf16
    rounding included (the sums of squares add in another order: a rare last-bit difference)."""
    for key, value in shape.items():
        monkeypatch.setitem(gpu._override, key, value)
    d, inter = 2048, 256
    q, scales, biases, _ = quantized((512, d), 4, 64)
    gate, up = (mx.quantize(mx.random.normal((6, inter, d)), group_size=64, bits=4) for _ in range(2))
    x = (4.0 * mx.random.normal((1, d))).astype(dtype)
    norm = (mx.random.uniform(0.5, 1.5, (d,)).astype(dtype), 1e-6)
    normed = mx.fast.rms_norm(x, *norm)
    kw = dict(bits=4, group_size=64, backend="cuda")
    fused = kernels.dequant_matvec(x, q, scales, biases, **kw, norm=norm)
    assert rel_err(fused, kernels.dequant_matvec(normed, q, scales, biases, **kw)) < 1e-3, f"seed {seed}"
    ids = mx.array([[5, 0, 3]], dtype=mx.uint32)
    h = moe.moe_gate_up(x, gate, up, ids, **kw, norm=norm)
    assert rel_err(h, moe.moe_gate_up(normed, gate, up, ids, **kw)) < 1e-3, f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("shape", gpu.MOE_GRID, ids=name)
@pytest.mark.parametrize("bits", [4, 8])
def test_moe_kernels_in_every_launch_shape(shape, bits, monkeypatch, seed):
    for key, value in shape.items():
        monkeypatch.setitem(gpu._override, key, value)
    experts, d, inter, k = 8, 512, 256, 5
    gate, up, down = (
        mx.quantize(mx.random.normal((experts, o, i)), group_size=64, bits=bits)
        for o, i in ((inter, d), (inter, d), (d - 24, inter))
    )
    x = mx.random.normal((2, d))
    ids = mx.random.randint(0, experts, (2, k)).astype(mx.uint32)
    weights = mx.softmax(mx.random.normal((2, k)), axis=-1)
    h = moe.moe_gate_up(x, gate, up, ids, bits=bits, group_size=64, backend="cuda")
    h_ref = moe.moe_gate_up_reference(x, gate, up, ids, bits=bits, group_size=64)
    assert rel_err(h, h_ref) < 1e-4, f"gate_up (seed {seed})"
    y = moe.moe_down(h_ref, down, ids, weights, bits=bits, group_size=64, backend="cuda")
    y_ref = moe.moe_down_reference(h_ref, down, ids, weights, bits=bits, group_size=64)
    assert rel_err(y, y_ref) < 1e-4, f"down (seed {seed})"


@needs_cuda
@pytest.mark.parametrize("xd", [0, 1])
@pytest.mark.parametrize(
    "bits, out_dim, in_dim, group_size",
    [
        (2, 70, 4096 + 128, 64),
        (4, 70, 4096 + 128, 64),
        (8, 70, 4096 + 128, 32),
        (4, 33, 8192 + 1024 + 64, 64),
    ],
)
def test_dequant_matvec_over_many_load_iterations(xd, bits, out_dim, in_dim, group_size, monkeypatch):
    """One load in flight per lane (u = 1), so a row takes many iterations of the core's loop, the
    last one partial, and (the last shape) two x tiles: the core's loop over iterations and tiles is
    exercised, not only the single-iteration launches of the shapes above."""
    for key, value in dict(u=1, xd=xd, rps=2).items():
        monkeypatch.setitem(gpu._override, key, value)
    q, scales, biases, dense = quantized((out_dim, in_dim), bits, group_size)
    x = mx.random.normal((2, in_dim))
    y = kernels.dequant_matvec(x, q, scales, biases, bits=bits, group_size=group_size, backend="cuda")
    assert rel_err(y, exact_matmul(x, dense.T)) < 1e-4


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_moe_kernels_over_many_load_iterations(bits, monkeypatch):
    """The fused MoE kernels with u = 1 at widths where each row takes several core iterations."""
    monkeypatch.setitem(gpu._override, "u", 1)
    experts, d, inter, k = 6, 2048 + 256, 1024 + 192, 3
    gate, up, down = (
        mx.quantize(mx.random.normal((experts, o, i)), group_size=64, bits=bits)
        for o, i in ((inter, d), (inter, d), (d, inter))
    )
    x = mx.random.normal((1, d))
    ids = mx.random.randint(0, experts, (1, k)).astype(mx.uint32)
    weights = mx.softmax(mx.random.normal((1, k)), axis=-1)
    h = moe.moe_gate_up(x, gate, up, ids, bits=bits, group_size=64, backend="cuda")
    h_ref = moe.moe_gate_up_reference(x, gate, up, ids, bits=bits, group_size=64)
    assert rel_err(h, h_ref) < 1e-4, "gate_up"
    y = moe.moe_down(h_ref, down, ids, weights, bits=bits, group_size=64, backend="cuda")
    y_ref = moe.moe_down_reference(h_ref, down, ids, weights, bits=bits, group_size=64)
    assert rel_err(y, y_ref) < 1e-4, "down"
