"""The CUDA kernel bodies *run* on this CPU (tests/kernels/emulator.py: every GPU thread an OS thread,
barriers and warp shuffles emulated), float32, tiny shapes, against the same references the GPU tests
use. Metal shares these bodies; the GPU tests (needs_cuda) run them for real on an H200."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flashmoe import kernels
from flashmoe.analysis.accuracy import exact_matmul, quantized
from flashmoe.kernels import attention, embedding, gated_delta, gpu, moe
from flashmoe.kernels.greedy import greedy_pick
from flashmoe.models.layers import Embedding, Linear
from flashmoe.quant import QuantSpec
from tests.helpers import rel_err
from tests.kernels import emulator, test_embed_rows

pytestmark = pytest.mark.skipif(emulator.available() is not None, reason=emulator.available() or "")


@pytest.fixture(autouse=True)
def cuda_on_the_cpu():
    with emulator.emulated_cuda():
        yield


def name(shape: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in shape.items())


@pytest.mark.parametrize("shape", gpu.LAUNCH_GRID, ids=name)
def test_dequant_matvec_in_every_launch_shape(shape, monkeypatch, seed):
    for key, value in shape.items():
        monkeypatch.setitem(gpu._override, key, value)
    q, scales, biases, dense = quantized((72, 256), 4, 64)  # 72 rows: the last row group overhangs
    x = mx.random.normal((2, 256))
    y = kernels.dequant_matvec(x, q, scales, biases, bits=4, group_size=64, backend="cuda")
    assert rel_err(y, exact_matmul(x, dense.T)) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("group_size", [32, 128])
def test_dequant_matvec_bits_group_sizes_and_residual(bits, group_size, seed):
    q, scales, biases, dense = quantized((40, 512), bits, group_size)
    x, res = mx.random.normal((512,)), mx.random.normal((40,))
    y = kernels.dequant_matvec(
        x, q, scales, biases, bits=bits, group_size=group_size, backend="cuda", residual=res
    )
    assert rel_err(y, res + exact_matmul(x[None], dense.T)[0]) < 1e-5, f"seed {seed}"


def test_dequant_matvec_tiles_a_long_row(monkeypatch, seed):
    """in = 8192 + 512 values: more than one tile of x in shared memory, a partial last tile."""
    q, scales, biases, dense = quantized((8, 8192 + 512), 4, 32)
    x = mx.random.normal((1, 8192 + 512))
    y = kernels.dequant_matvec(x, q, scales, biases, bits=4, group_size=32, backend="cuda")
    assert rel_err(y, exact_matmul(x, dense.T)) < 1e-5, f"seed {seed}"


NORM_SHAPES = [{}, dict(xd=1), dict(simds=4, rps=2), dict(simds=8, rps=1, lpr=16)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: name(s) or "planned")
def test_dequant_matvec_applies_the_rms_norm_as_it_reads_x(shape, monkeypatch, seed):
    """NORM: each row of x through mx.fast.rms_norm's math, inside the kernel (one launch)."""
    for key, value in shape.items():
        monkeypatch.setitem(gpu._override, key, value)
    q, scales, biases, dense = quantized((72, 256), 4, 64)
    x = 3.0 * mx.random.normal((2, 256)) + 1.0
    norm = (mx.random.uniform(0.5, 1.5, (256,)), 1e-6)
    y = kernels.dequant_matvec(x, q, scales, biases, bits=4, group_size=64, backend="cuda", norm=norm)
    ref = exact_matmul(mx.fast.rms_norm(x, *norm), dense.T)
    assert rel_err(y, ref) < 1e-5, f"seed {seed}"


def test_dequant_matvec_rms_norm_over_two_tiles_and_residual(seed):
    """The norm's factor spans the whole row when x is staged in more than one tile."""
    q, scales, biases, dense = quantized((8, 8192 + 512), 4, 32)
    x, res = mx.random.normal((1, 8192 + 512)), mx.random.normal((1, 8))
    norm = (mx.random.uniform(0.5, 1.5, (8192 + 512,)), 1e-5)
    y = kernels.dequant_matvec(
        x, q, scales, biases, bits=4, group_size=32, backend="cuda", residual=res, norm=norm
    )
    assert rel_err(y, res + exact_matmul(mx.fast.rms_norm(x, *norm), dense.T)) < 1e-5, f"seed {seed}"


def test_bf16_rms_norm_in_the_kernel_rounds_as_mx_fast_rms_norm(seed):
    """bf16: the kernel rounds the normalised x as mx.fast.rms_norm stores it, so normalising inside
    gives what normalising first gives (up to the order of the sum of squares)."""
    q, scales, biases, _ = quantized((64, 512), 4, 64)
    x = (4.0 * mx.random.normal((1, 512))).astype(mx.bfloat16)
    norm = (mx.random.uniform(0.5, 1.5, (512,)).astype(mx.bfloat16), 1e-6)
    kw = dict(bits=4, group_size=64, backend="cuda")
    fused = kernels.dequant_matvec(x, q, scales, biases, **kw, norm=norm)
    first = kernels.dequant_matvec(mx.fast.rms_norm(x, *norm), q, scales, biases, **kw)
    assert fused.dtype == mx.bfloat16
    assert rel_err(fused, first) < 1e-3, f"seed {seed}"


def test_moe_gate_up_applies_the_rms_norm(seed):
    experts, d, inter = 5, 256, 64
    gate, up = (mx.quantize(mx.random.normal((experts, inter, d)), group_size=64, bits=4) for _ in range(2))
    x = 2.0 * mx.random.normal((d,))
    norm = (mx.random.uniform(0.5, 1.5, (d,)), 1e-6)
    ids = mx.array([3, 0, 4], dtype=mx.uint32)
    h = moe.moe_gate_up(x, gate, up, ids, bits=4, group_size=64, backend="cuda", norm=norm)
    ref = moe.moe_gate_up_reference(mx.fast.rms_norm(x, *norm), gate, up, ids, bits=4, group_size=64)
    assert rel_err(h, ref) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("norm", [False, True], ids=["", "rms_norm"])
def test_routed_gate_up_routes_as_the_route_kernel(renorm, norm, seed):
    """The routed form of moe_gate_up: each threadgroup routes its token itself; the ids, weights and
    SwiGLU outputs are the route kernel's and the plain gate/up kernel's (same arithmetic), for two
    tokens, 100 experts (not a multiple of 32)."""
    experts, d, inter, k = 100, 128, 64, 4
    gate, up = (mx.quantize(mx.random.normal((experts, inter, d)), group_size=64, bits=4) for _ in range(2))
    x, logits = mx.random.normal((2, d)), 2.0 * mx.random.normal((2, experts))
    rms = (mx.random.uniform(0.5, 1.5, (d,)), 1e-6) if norm else None
    kw = dict(bits=4, group_size=64, backend="cuda")
    h, ids, weights = moe.routed_gate_up(x, gate, up, logits, k, renorm, **kw, norm=rms)
    want_ids, want_weights = moe.route(logits, k, renorm, backend="cuda", out_dtype=x.dtype)
    assert ids.tolist() == want_ids.tolist(), f"seed {seed}"
    assert mx.array_equal(weights, want_weights), f"seed {seed}"
    assert rel_err(h, moe.moe_gate_up(x, gate, up, want_ids, **kw, norm=rms)) < 1e-6, f"seed {seed}"
    ref_ids, _ = moe.route_reference(logits, k, renorm)
    assert sorted(ids[0].tolist()) == sorted(ref_ids[0].tolist()), f"seed {seed}"


def shared_expert_case(tokens: int, experts: int, d: int, inter: int, dtype=mx.float32):
    """Fresh experts and a shared expert (gate and up stacked as Projections stacks them), quantized by
    MLX, with their dequantized float32 weights for an independent expectation."""
    stacks = [quantized((experts, o, i), 4, 64, dtype) for o, i in ((inter, d), (inter, d), (d, inter))]
    shared_gate_up, shared_down = quantized((2 * inter, d), 4, 64, dtype), quantized((d, inter), 4, 64, dtype)
    x = mx.random.normal((tokens, d)).astype(dtype)
    return stacks, shared_gate_up, shared_down, x


def expected_layer(x, stacks, shared_gate_up, shared_down, ids, weights, logit):
    """sum_k w_k down_k(silu(gate_k x) * up_k x) + sigmoid(logit) * shared(x), float32, from MLX's
    own dequantized weights: (tokens, d)."""
    (*_, g), (*_, u), (*_, dn) = stacks
    silu = lambda v: v * mx.sigmoid(v)  # noqa: E731
    x = x.astype(mx.float32)
    rows = []
    for t in range(x.shape[0]):
        e = ids[t].tolist()
        h = silu(exact_matmul(g[e], x[t][:, None])[..., 0]) * exact_matmul(u[e], x[t][:, None])[..., 0]
        y = (exact_matmul(dn[e], h[..., None])[..., 0] * weights[t].astype(mx.float32)[:, None]).sum(0)
        sg, su = mx.split(exact_matmul(shared_gate_up[3], x[t][:, None])[:, 0], 2)
        shared = exact_matmul(shared_down[3], (silu(sg) * su)[:, None])[:, 0]
        rows.append(y + mx.sigmoid(logit[t].astype(mx.float32)) * shared)
    return mx.stack(rows)


def test_shared_expert_rides_as_slot_k(seed):
    """moe_gate_up and moe_down's shared forms: slot K is the shared expert, added with its sigmoid
    gate (read at a column of a wider logits row), two tokens, against MLX's dequantized weights."""
    experts, d, inter, k = 6, 128, 64, 3
    stacks, shared_gate_up, shared_down, x = shared_expert_case(2, experts, d, inter)
    ids = mx.array([[3, 0, 5], [1, 4, 2]], dtype=mx.uint32)
    weights = mx.softmax(mx.random.normal((2, k)), axis=-1)
    logits = mx.random.normal((2, experts + 1))  # the router's rows, then the shared gate's
    kw = dict(bits=4, group_size=64, backend="cuda")
    h = moe.moe_gate_up(x, stacks[0][:3], stacks[1][:3], ids, **kw, shared=shared_gate_up[:3])
    assert h.shape == (2, k + 1, inter)
    gate = moe.SharedGate(logits, experts)
    y = moe.moe_down(
        h, stacks[2][:3], ids, weights, **kw, residual=x, shared=shared_down[:3], shared_gate=gate
    )
    want = x + expected_layer(x, stacks, shared_gate_up, shared_down, ids, weights, logits[:, experts])
    assert rel_err(y, want) < 1e-5, f"seed {seed}"


def test_routed_gate_up_takes_the_shared_expert(seed):
    """The routed form with the shared expert: the router's logits carry the shared gate as a last
    column the routing must not see; ids, weights and h as the plain shared form gives them."""
    experts, d, inter, k = 40, 128, 64, 4
    stacks, shared_gate_up, _, x = shared_expert_case(2, experts, d, inter)
    logits = 2.0 * mx.random.normal((2, experts + 1))
    logits[:, experts] = 50.0  # were it routed, the shared gate's column would win every top-K
    kw = dict(bits=4, group_size=64, backend="cuda")
    gate_up = (stacks[0][:3], stacks[1][:3])
    h, ids, weights = moe.routed_gate_up(
        x, *gate_up, logits, k, **kw, shared=shared_gate_up[:3], experts=experts
    )
    want_ids, want_weights = moe.route(logits[:, :experts], k, backend="cuda", out_dtype=x.dtype)
    assert ids.tolist() == want_ids.tolist(), f"seed {seed}"
    assert mx.array_equal(weights, want_weights), f"seed {seed}"
    plain = moe.moe_gate_up(x, *gate_up, want_ids, **kw, shared=shared_gate_up[:3])
    assert rel_err(h, plain) < 1e-6, f"seed {seed}"


def test_shared_expert_rounds_as_mlx_lm_blocks_do(seed):
    """bf16: the down kernel's shared form rounds the routed sum, the gate, the shared output and
    each op after them to bf16, as `y + sigmoid(g) * shared` in MLX's ops rounds them. The gate is
    taken correctly rounded (float64): MLX's CPU sigmoid is an approximation that lands on the other
    side of a bf16 boundary for some logits, which would move every row at once. With it, 30 seeds
    gave 0 differing rows of 128; leaving the gate or the shared output unrounded gave up to 48."""
    experts, d, inter, k = 6, 128, 64, 3
    stacks, _, shared_down, _ = shared_expert_case(1, experts, d, inter, mx.bfloat16)
    ids = mx.array([[2, 5, 0]], dtype=mx.uint32)
    weights = mx.softmax(mx.random.normal((1, k)), axis=-1).astype(mx.bfloat16)
    gate = moe.SharedGate(mx.random.normal((1, 1)).astype(mx.bfloat16), 0)
    h = (0.5 * mx.random.normal((1, k + 1, inter))).astype(mx.bfloat16)
    kw = dict(bits=4, group_size=64, shared=shared_down[:3], shared_gate=gate)
    y = moe.moe_down(h, stacks[2][:3], ids, weights, **kw, backend="cuda")
    routed = moe.moe_down_reference(h, stacks[2][:3], ids, weights, bits=4, group_size=64)
    shared = kernels.dequant_matvec(h[:, k], *shared_down[:3], bits=4, group_size=64, backend="reference")
    sigmoid = 1.0 / (1.0 + np.exp(-np.array(gate.logits.astype(mx.float32), dtype=np.float64)))
    want = routed + mx.array(sigmoid.astype(np.float32)).astype(mx.bfloat16) * shared  # bf16 ops
    assert y.dtype == mx.bfloat16
    assert (y.astype(mx.float32) != want.astype(mx.float32)).sum().item() <= 2, f"seed {seed}"


def test_gathered_experts(seed):
    w = mx.random.normal((6, 24, 128))
    q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    ids = mx.array([[4, 0, 5]], dtype=mx.uint32)
    x = mx.random.normal((1, 128))
    y = kernels.gather_dequant_matvec(x, q, scales, biases, ids, bits=4, group_size=64, backend="cuda")
    ref = kernels.gather_dequant_matvec(x, q, scales, biases, ids, bits=4, group_size=64, backend="reference")
    assert y.shape == (1, 3, 24) and rel_err(y, ref) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("shape", gpu.MOE_GRID, ids=name)
def test_fused_moe_in_every_launch_shape(shape, monkeypatch, seed):
    for key, value in shape.items():
        monkeypatch.setitem(gpu._override, key, value)
    experts, d, inter, k = 5, 128, 64, 3
    gate, up, down = (
        mx.quantize(mx.random.normal((experts, o, i)), group_size=64, bits=4)
        for o, i in ((inter, d), (inter, d), (d - 24, inter))
    )
    x = mx.random.normal((d,))
    ids = mx.array([3, 0, 4], dtype=mx.uint32)
    weights = mx.softmax(mx.random.normal((k,)))
    h = moe.moe_gate_up(x, gate, up, ids, bits=4, group_size=64, backend="cuda")
    assert rel_err(h, moe.moe_gate_up_reference(x, gate, up, ids, bits=4, group_size=64)) < 1e-5, (
        f"seed {seed}"
    )
    y = moe.moe_down(h, down, ids, weights, bits=4, group_size=64, backend="cuda", residual=x[: d - 24])
    ref = x[: d - 24] + moe.moe_down_reference(h, down, ids, weights, bits=4, group_size=64)
    assert rel_err(y, ref) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("norm", [True, False])
def test_routing(norm, seed):
    logits = mx.random.normal((1, 40))
    ids, weights = moe.route(logits, 4, norm, backend="cuda")
    ref_ids, ref_weights = moe.route(logits, 4, norm, backend="reference")
    assert sorted(ids.tolist()[0]) == sorted(ref_ids.tolist()[0]), f"seed {seed}"
    order = lambda i, w: sorted(zip(i.tolist()[0], w.tolist()[0]))  # noqa: E731
    got, want = order(ids, weights), order(ref_ids, ref_weights)
    assert max(abs(a[1] - b[1]) for a, b in zip(got, want)) < 1e-6, f"seed {seed}"


@pytest.mark.parametrize("key_heads", [False, True])
def test_gated_delta_step(key_heads, seed):
    from tests.kernels.test_gated_delta_kernel import inputs, key_head_inputs

    n_k, n_v, d_k, d_v = 1, 2, 32, 32
    args = inputs(1, n_k, n_v, d_k, d_v, 4, mx.float32)
    dims = dict(n_k=n_k, n_v=n_v, d_k=d_k, d_v=d_v, rms_eps=1e-6)
    if key_heads:
        fused, args = key_head_inputs(args, n_k, n_v, d_k, d_v)
        got = gated_delta.gated_delta_step(**fused, **dims, key_heads=True, backend="cuda")
    else:
        got = gated_delta.gated_delta_step(**args, **dims, backend="cuda")
    want = gated_delta.reference(**args, **dims)
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) < 1e-5, f"out/state/conv {errs} (seed {seed})"


@pytest.mark.parametrize("key_heads", [False, True])
def test_gated_delta_step_reads_the_stacked_projections(key_heads, seed):
    """The projections' stacked output given as all four inputs at their offsets (as the model passes
    it) gives what the four arrays give, out flat (B, 1, HV * DV)."""
    from tests.kernels.test_gated_delta_kernel import inputs, key_head_inputs

    n_k, n_v, d_k, d_v = 1, 2, 32, 32
    args = inputs(2, n_k, n_v, d_k, d_v, 4, mx.float32)
    dims = dict(n_k=n_k, n_v=n_v, d_k=d_k, d_v=d_v, rms_eps=1e-6, key_heads=key_heads)
    if key_heads:
        args = key_head_inputs(args, n_k, n_v, d_k, d_v)[0]
        parts, starts = [args["qkv"], args["b"]], [0, 0, args["qkv"].shape[-1], args["qkv"].shape[-1]]
    else:
        parts = [args["qkv"], args["z"].reshape(2, -1), args["b"], args["a"]]
        starts = [0, *mx.cumsum(mx.array([t.shape[-1] for t in parts[:-1]])).tolist()]
    stacked = mx.concatenate(parts, axis=-1)[:, None]  # (B, 1, sum of widths)
    layout = tuple((stacked.shape[-1], at) for at in starts)
    given = dict(args, qkv=stacked, z=stacked, b=stacked, a=stacked)
    got = gated_delta.gated_delta_step(**given, **dims, layout=layout, flat=True, backend="cuda")
    want = gated_delta.gated_delta_step(**args, **dims, backend="cuda")
    assert got[0].shape == (2, 1, n_v * d_v)
    for g, w in zip((got[0].reshape(want[0].shape), *got[1:]), want):
        assert mx.array_equal(g, w), f"seed {seed}"
    ref = gated_delta.gated_delta_step(**given, **dims, layout=layout, flat=True, backend="reference")
    assert max(rel_err(g, w) for g, w in zip(got, ref)) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("pos", [0, 5, 9])
def test_decode_attention(pos, seed):
    from tests.kernels.test_attention_decode import case

    q, kv, kv_new = case(2, 4, 2, 32, 10)  # two sequences: the values start past both's keys
    at = mx.array([pos], dtype=mx.int32)
    y = attention.decode_attention(q, kv, kv_new, at, scale=32**-0.5, backend="cuda")
    ref = attention.reference(q, kv, kv_new, at, scale=32**-0.5)
    assert rel_err(y, ref) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("flat", [False, True])
def test_decode_attention_applies_the_output_gate(flat, seed):
    """Qwen3-Next's gated attention: the result times sigmoid of each head's gate, which sits after that
    head's queries in q_proj's output, here inside a wider array (a stacked q/k/v row) from column 17."""
    from tests.kernels.test_attention_decode import case

    B, H, hd, offset = 2, 4, 32, 17
    q, kv, kv_new = case(B, H, 2, hd, 10)
    at = mx.array([6], dtype=mx.int32)
    row = mx.random.normal((B, 1, offset + H * 2 * hd + 40))
    y = attention.decode_attention(
        q, kv, kv_new, at, scale=0.2, flat=flat, backend="cuda", gate=(row, offset)
    )
    g = np.array(row)[:, 0, offset : offset + H * 2 * hd].reshape(B, H, 2, hd)[:, :, 1]  # (B, H, hd)
    want = np.array(attention.reference(q, kv, kv_new, at, scale=0.2))[:, :, 0] / (1 + np.exp(-g))
    want = want.reshape(B, 1, H * hd) if flat else want[:, :, None]
    assert y.shape == want.shape and rel_err(y, mx.array(want)) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("gated, stacked", [(False, True), (True, True), (True, False)])
def test_qk_norm_rope(traditional, gated, stacked, seed):
    from tests.kernels.test_attention_decode import err64, norm_rope, norm_rope_case, norm_rope_float64

    q, k, q_w, k_w = norm_rope_case(2, 4, 2, 64, gated)
    kw = dict(eps=1e-6, rope_dims=32, traditional=traditional, base=1e6, scale=0.5)
    got = norm_rope(q, k, q_w, k_w, mx.array([7], dtype=mx.int32), stacked=stacked, **kw)
    for g, x, w in zip(got, (q, k), (q_w, k_w)):
        assert err64(g, norm_rope_float64(x[..., :64], w, 7, **kw)) < 1e-5, f"seed {seed}"


def test_decode_attention_flat_is_the_heads_side_by_side(seed):
    from tests.kernels.test_attention_decode import case

    q, kv, kv_new = case(1, 4, 2, 32, 10)
    at = mx.array([6], dtype=mx.int32)
    flat = attention.decode_attention(q, kv, kv_new, at, scale=0.2, flat=True, backend="cuda")
    ref = attention.reference(q, kv, kv_new, at, scale=0.2)
    assert flat.shape == (1, 1, 128) and rel_err(flat, ref.transpose(0, 2, 1, 3).reshape(1, 1, 128)) < 1e-5


def test_greedy_pick_first_largest_and_non_finite(seed):
    logits = mx.random.normal((1, 3000))
    top = int(mx.argmax(logits).item())
    assert greedy_pick(logits, backend="cuda").tolist() == [top, 1], f"seed {seed}"
    bad = mx.where(mx.arange(3000) == 17, mx.array(float("nan")), logits)
    assert greedy_pick(bad, backend="cuda").tolist() == [0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_moe"])
def test_a_model_decodes_through_the_emulated_kernels(model_type, tmp_path, monkeypatch):
    """The decode step a GPU runs (tests/models/test_gpu_path.py's first test), every kernel emulated:
    the step function called as it is (mx.compile cannot trace an emulated kernel), float32 logits
    within 1e-4 of the reference backend's."""
    from flashmoe.analysis.parity import forced_decode_logits
    from flashmoe.loader import load_model
    from tests.helpers import write_checkpoint

    directory = write_checkpoint(tmp_path / model_type, model_type)
    ours = load_model(directory, backend="cuda", dtype=mx.float32)
    assert all(layer.compiled for layer in ours.layers)
    monkeypatch.setattr(ours, "_step", ours._pure_step)
    reference = load_model(directory, backend="reference", dtype=mx.float32)
    prompt, tokens = [3, 17, 42, 9, 77], [5, 61, 12]
    got, want = forced_decode_logits(ours, prompt, tokens), forced_decode_logits(reference, prompt, tokens)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("dtypes", ["f32", "bf16"])
@pytest.mark.parametrize("bits,group_size", test_embed_rows.BITS_GROUPS)
def test_embed_rows_round_once_as_mlx_does_on_a_gpu(bits, group_size, dtypes, seed):
    """Against the exact value rounded once (test_embed_rows.rows_rounded, which the GPU test checks against
    MLX's own kernel), bit for bit; row 1 is built so that a float FMA rounded again to bf16 would break a
    tie the wrong way: 7 * (37 / 256) - 2^-30 lies just below the midpoint 259 / 256 of two bf16 values,
    which the float FMA lands on."""
    stored, dtype = test_embed_rows.DTYPES[dtypes]
    w, scales, biases = test_embed_rows.table(37, 384, bits, group_size, stored)
    if bits == 4:
        w[1] = 0x77777777  # every code 7
    scales[1], biases[1] = 37 / 256, -(2.0**-30)
    tokens = mx.array([[0, 1, 36, 5, 5, 20]], dtype=mx.uint32)
    kw = dict(bits=bits, group_size=group_size, dtype=dtype)
    got = embedding.embed_rows(tokens, w, scales, biases, **kw, backend="cuda")
    want = test_embed_rows.rows_rounded(tokens, w, scales, biases, **kw, once=True)
    assert got.shape == (1, 6, 384) and got.dtype == dtype
    assert np.array_equal(test_embed_rows.as_f64(got), want), f"seed {seed}"
    if dtype == mx.bfloat16 and bits == 4:
        assert got[0, 1, 0].item() == 129 / 128  # not 130 / 128, the even one


def test_the_embedding_layer_takes_the_kernel_for_a_few_tokens(monkeypatch, seed):
    """Embedding on "cuda": the kernel for a decode token, MLX's path for a prefill; both as the "mlx"
    backend's Embedding computes them (here on the CPU too: in float32 the product of a bf16 scale and
    an 8-bit code is exact, so rounding once or twice agree)."""
    launches = []
    kernel = gpu.kernel
    monkeypatch.setattr(gpu, "kernel", lambda *a: launches.append(a[1]) or kernel(*a))
    w, scales, biases = test_embed_rows.table(100, 256, 4, 64, mx.bfloat16)
    layers = {
        b: Embedding(Linear(w, scales, biases, spec=QuantSpec(4, 64), backend=b), dtype=mx.float32)
        for b in ("cuda", "mlx")
    }
    for tokens in (mx.array([[7]]), mx.random.randint(0, 100, (1, embedding.MAX_TOKENS + 1))):
        got, want = layers["cuda"](tokens), layers["mlx"](tokens)
        assert mx.array_equal(got, want).item(), f"seed {seed}"
    assert launches == ["embed_rows.inc"]  # the decode token's


def test_a_streamed_model_runs_the_shared_expert_in_the_expert_kernels(tmp_path, monkeypatch):
    """Qwen3-Next with streamed experts on "cuda" (uncompiled, so the emulator runs every kernel): a
    decode token's experts, read in routing order, and its shared expert in the experts' two launches
    (MoE.shared runs for the prompt only), against the reference backend's float32 logits."""
    from flashmoe.analysis.parity import forced_decode_logits
    from flashmoe.loader import load_model
    from flashmoe.models.moe import MoE
    from tests.helpers import write_checkpoint

    directory = write_checkpoint(tmp_path / "qwen3_next", "qwen3_next")
    prompt, tokens = [3, 17, 42, 9, 77], [5, 61, 12]
    want = forced_decode_logits(load_model(directory, backend="reference", dtype=mx.float32), prompt, tokens)
    model = load_model(directory, backend="cuda", dtype=mx.float32, stream_experts=True)
    assert all(model.layers[i].mlp.shared_slot is not None for i in model.moe_layers)
    shared_tokens = []
    plain = MoE.shared
    monkeypatch.setattr(
        MoE, "shared", lambda self, x, *a, **k: shared_tokens.append(x.shape[1]) or plain(self, x, *a, **k)
    )
    got = forced_decode_logits(model, prompt, tokens)
    assert rel_err(got, want) < 1e-5
    assert set(shared_tokens) == {len(prompt)}
