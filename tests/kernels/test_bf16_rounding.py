"""In bf16 each GPU kernel returns the float32 answer on its bf16 inputs, rounded once.

The kernels read bf16, compute in float32 and round only what they write. So a kernel's bf16 output is
as near the float32 answer (the reference in float32 on the same bf16 values) as bf16 can hold: its
mean error is the mean error of rounding that answer to bf16. An intermediate kept in bf16 (a
dequantized weight, the recurrent state, a partial sum) adds roundings and shows here as a larger
ratio (1.27-3.5 for the ones below). This is the per-kernel form of "flashmoe's bf16 logits are no
farther from float32 than they must be": it needs no model, so no rounding grows through layers and
steps (tests/models/test_gpu_path.py's end-to-end comparison carries that noise; benchmarks/
bf16_positions.py measures it). MLX's own ops in bf16 (mlx-lm's composition) round after each op:
2.0-4.7 on these inputs on this CPU.

Runs twice: the CUDA kernel bodies emulated on this CPU (tests/kernels/emulator.py, bf16 rounded as
cuda_bf16.h rounds) and, on an NVIDIA GPU, for real.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np
import pytest

from flashmoe import kernels
from flashmoe.analysis.accuracy import exact_matmul
from flashmoe.kernels import attention, gated_delta, moe
from tests.helpers import rel_err
from tests.kernels import emulator
from tests.kernels.test_attention_decode import case
from tests.kernels.test_fused_moe import stack
from tests.kernels.test_gated_delta_kernel import inputs

# mean error over the mean error of one rounding: 1.000 emulated; the GPU's float32 sums, in another
# order, may round a few elements the other way
ONE_ROUNDING = 1.1


def rounding_excess(y: mx.array, truth: mx.array) -> float:
    """mean |y - truth| / mean |bf16(truth) - truth|: 1 when y is truth rounded to bf16."""
    y, exact = (np.array(a.astype(mx.float32)) for a in (y, truth))
    rounded = np.array(truth.astype(mx.bfloat16).astype(mx.float32))
    return float(np.abs(y - exact).mean() / np.abs(rounded - exact).mean())


@pytest.fixture(params=["emulated", "cuda"])
def gpu_kernels(request):
    """backend="cuda" runs the CUDA kernels: emulated on the CPU, or on an NVIDIA GPU (skipped without)."""
    if request.param == "emulated":
        if emulator.available() is not None:
            pytest.skip(emulator.available())
        context = emulator.emulated_cuda()
    else:
        if not kernels.backend_available("cuda"):
            pytest.skip("CUDA is not available here")
        context = contextlib.nullcontext()
    with context:
        yield


def quantized_bf16(out_dim: int, in_dim: int, bits: int):
    """bf16 weights quantized by MLX (bf16 scales and biases) and their float32 dequantization."""
    q, scales, biases = mx.quantize(
        mx.random.normal((out_dim, in_dim)).astype(mx.bfloat16), group_size=64, bits=bits
    )
    exact = mx.dequantize(q, scales.astype(mx.float32), biases.astype(mx.float32), group_size=64, bits=bits)
    return q, scales, biases, exact


@pytest.mark.parametrize("bits", [4, 8])
def test_dequant_matvec(bits, gpu_kernels, seed):
    q, scales, biases, exact = quantized_bf16(96, 512, bits)
    x = mx.random.normal((1, 512)).astype(mx.bfloat16)
    y = kernels.dequant_matvec(x, q, scales, biases, bits=bits, group_size=64, backend="cuda")
    assert y.dtype == mx.bfloat16
    excess = rounding_excess(y, exact_matmul(x.astype(mx.float32), exact.T))
    assert excess <= ONE_ROUNDING, f"{excess:.3f} (seed {seed})"


def test_the_measure_sees_one_rounding_more(seed):
    """A matvec over weights dequantized to bf16 first (one rounding per weight) is caught (2.7-3.5)."""
    q, scales, biases, exact = quantized_bf16(96, 512, 4)
    in_bf16 = mx.dequantize(q, scales, biases, group_size=64, bits=4).astype(mx.float32)
    x = mx.random.normal((1, 512)).astype(mx.float32)
    truth = exact_matmul(x, exact.T)
    assert rounding_excess(exact_matmul(x, in_bf16.T).astype(mx.bfloat16), truth) > 2 * ONE_ROUNDING, (
        f"seed {seed}"
    )


def test_moe_launches(gpu_kernels, seed):
    """moe_gate_up (SwiGLU of the K experts' gate and up) and moe_down (the weighted sum), each alone."""
    kw = dict(bits=4, group_size=64)
    gate, up = stack(8, 64, 256, 4, 64, mx.bfloat16), stack(8, 64, 256, 4, 64, mx.bfloat16)
    down = stack(8, 256, 64, 4, 64, mx.bfloat16)
    x = mx.random.normal((256,)).astype(mx.bfloat16)
    ids = mx.array([5, 1, 6], dtype=mx.uint32)
    weights = mx.softmax(mx.random.normal((3,))).astype(mx.bfloat16)
    h = moe.moe_gate_up(x, gate, up, ids, **kw, backend="cuda")
    f32 = [tuple(t.astype(mx.float32) if t.dtype == mx.bfloat16 else t for t in m) for m in (gate, up, down)]
    truth = moe.moe_gate_up_reference(x.astype(mx.float32), f32[0], f32[1], ids, **kw)
    assert h.dtype == mx.bfloat16 and rounding_excess(h, truth) <= ONE_ROUNDING, f"gate_up (seed {seed})"
    y = moe.moe_down(h, down, ids, weights, **kw, backend="cuda")
    truth = moe.moe_down_reference(h.astype(mx.float32), f32[2], ids, weights.astype(mx.float32), **kw)
    assert y.dtype == mx.bfloat16 and rounding_excess(y, truth) <= ONE_ROUNDING, f"down (seed {seed})"


def test_decode_attention(gpu_kernels, seed):
    args = case(1, 8, 2, 64, 48, mx.bfloat16)
    at = mx.array([30], dtype=mx.int32)
    y = attention.decode_attention(*args, at, scale=64**-0.5, backend="cuda")
    truth = attention.reference(*(a.astype(mx.float32) for a in args), at, scale=64**-0.5)
    assert y.dtype == mx.bfloat16
    assert rounding_excess(y, truth) <= ONE_ROUNDING, f"seed {seed}"


def test_gated_delta_steps_keep_the_state_exact(gpu_kernels, seed):
    """Eight decode steps, each from the last one's state and conv window: the output of every step is
    rounded once, and the float32 recurrent state stays the float32 answer (a state kept in bf16 between
    steps: state rel err 2.7e-3 to 7.0e-3, output 1.27-1.79)."""
    n_k, n_v, d_k, d_v = 2, 4, 64, 32
    dims = dict(n_k=n_k, n_v=n_v, d_k=d_k, d_v=d_v, rms_eps=1e-6)
    args = inputs(1, n_k, n_v, d_k, d_v, 4, mx.bfloat16)
    tokens = [mx.random.normal(args["qkv"].shape).astype(mx.bfloat16) for _ in range(8)]

    def steps(step, args, tokens):
        outs, conv, state = [], args["conv_state"], args["state"]
        for qkv in tokens:
            out, state, conv = step(**dict(args, qkv=qkv, conv_state=conv, state=state), **dims)
            outs.append(out)
        return mx.stack(outs), state

    out, state = steps(lambda **a: gated_delta.gated_delta_step(**a, backend="cuda"), args, tokens)
    f32 = {k: v.astype(mx.float32) for k, v in args.items()}
    truth, truth_state = steps(gated_delta.reference, f32, [t.astype(mx.float32) for t in tokens])
    assert out.dtype == mx.bfloat16 and state.dtype == mx.float32
    assert rounding_excess(out, truth) <= ONE_ROUNDING, f"output (seed {seed})"
    assert rel_err(state, truth_state) < 1e-4, f"state {rel_err(state, truth_state):.2e} (seed {seed})"
