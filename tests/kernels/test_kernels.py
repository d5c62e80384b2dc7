"""Every backend that can run here against mx.dequantize + matmul in float32, on fresh random data."""

from __future__ import annotations

import tempfile

import mlx.core as mx
import pytest

from flashmoe import kernels
from flashmoe.analysis import accuracy
from flashmoe.analysis.accuracy import BITS, GROUP_SIZES, SHAPES, exact_matmul, quantized
from flashmoe.errors import FlashMoeError
from flashmoe.kernels import BackendUnavailableError, gpu
from tests.helpers import rel_err, require_backend

TOLERANCE = 1e-4  # float32


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("out_dim,in_dim", SHAPES)
def test_dequant_matvec_matches_mlx_dequantize(backend, bits, group_size, out_dim, in_dim, seed):
    require_backend(backend)
    if in_dim % group_size:
        pytest.skip(f"in_dim {in_dim} is not a multiple of group_size {group_size}")
    err = accuracy.matvec_error(backend, bits, group_size, out_dim, in_dim)
    assert err < TOLERANCE, f"rel err {err:.3g} (seed {seed})"


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("shared_input", [True, False], ids=["x-shared", "x-per-expert"])
def test_gather_dequant_matvec_matches_mlx_dequantize(backend, bits, group_size, shared_input, seed):
    require_backend(backend)
    err = accuracy.gathered_error(backend, bits, group_size, shared_input)
    assert err < TOLERANCE, f"rel err {err:.3g} (seed {seed})"


@pytest.mark.parametrize("backend", ["metal", "cuda"])
@pytest.mark.parametrize("bits", BITS)
def test_gpu_kernel_keeps_bfloat16_checkpoints(backend, bits, seed):
    """On a GPU the checkpoint's bf16 stays bf16: same answer within bf16 rounding."""
    require_backend(backend)
    q, scales, biases, dense = quantized((64, 2048), bits, 64, dtype=mx.bfloat16)
    x = mx.random.normal((2, 2048)).astype(mx.bfloat16)
    y = kernels.dequant_matvec(x, q, scales, biases, bits=bits, group_size=64, backend=backend)
    assert y.dtype == mx.bfloat16
    err = rel_err(y, exact_matmul(x.astype(mx.float32), dense.T))
    assert err < 1e-2, f"rel err {err:.3g} (seed {seed})"


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("bits", [3, 5, 6])
def test_odd_bits_go_through_mlx_quantized_matmul(backend, bits, seed):
    require_backend(backend)
    q, scales, biases, dense = quantized((40, 512), bits, 64)
    x = mx.random.normal((2, 512))
    y = kernels.dequant_matvec(x, q, scales, biases, bits=bits, group_size=64, backend=backend)
    assert rel_err(y, exact_matmul(x, dense.T)) < TOLERANCE


@pytest.mark.parametrize("mode,bits,group_size", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_fp_modes_run_through_mlx(mode, bits, group_size, seed):
    w = mx.random.normal((24, 256))
    q, scales = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    dense = mx.dequantize(q, scales, group_size=group_size, bits=bits, mode=mode)
    x = mx.random.normal((2, 256))
    y = kernels.dequant_matvec(x, q, scales, None, bits=bits, group_size=group_size, mode=mode)
    assert rel_err(y, exact_matmul(x, dense.T)) < TOLERANCE


def test_wrong_bits_are_refused_with_shapes_named(seed):
    q, scales, biases, _ = quantized((16, 256), 8, 64)
    with pytest.raises(FlashMoeError, match=r"holds 8 bits per value for in_dim 256.*expected 4"):
        kernels.dequant_matvec(mx.zeros((1, 256)), q, scales, biases, bits=4, group_size=64)


def test_unavailable_backend_is_a_clear_error():
    missing = [b for b in ("metal", "cuda") if not kernels.backend_available(b)]
    if not missing:
        pytest.skip("both GPU backends are available here")
    with pytest.raises(BackendUnavailableError, match=missing[0]):
        kernels.resolve_backend(missing[0])


def test_auto_picks_a_gpu_kernel_when_there_is_one():
    gpus = [b for b in ("metal", "cuda") if kernels.backend_available(b)]
    cpu = "native" if kernels.backend_available("native") else "mlx"
    assert kernels.resolve_backend("auto") == (gpus[0] if gpus else cpu)


def test_gpu_kernel_objects_are_built_once(monkeypatch):
    """Many calls, one kernel object per backend (MLX is stood in for, so this runs anywhere)."""
    built = []

    def fake_factory(**spec):
        built.append(spec["name"])
        return lambda **call: [mx.zeros(call["output_shapes"][0], dtype=call["output_dtypes"][0])]

    monkeypatch.setattr(mx.fast, "metal_kernel", fake_factory)
    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_factory)
    gpu._kernel.cache_clear()
    q, scales, biases, _ = quantized((8, 128), 4, 64)
    for backend in ("metal", "cuda", "metal", "cuda", "cuda"):
        gpu.matvec(backend, mx.zeros((2, 128)), q, scales, biases, bits=4, group_size=64)
    gpu._kernel.cache_clear()
    assert len(built) == 2


@pytest.mark.parametrize("mode,bits,group_size", [("mxfp4", 4, 32), ("mxfp8", 8, 32)])
def test_fp_modes_gathered_run_through_gather_qmm(mode, bits, group_size, seed):
    w = mx.random.normal((4, 24, 256))
    q, scales = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    dense = mx.dequantize(q, scales, group_size=group_size, bits=bits, mode=mode)
    indices = mx.array([[0, 3], [2, 2]], dtype=mx.uint32)
    x = mx.random.normal((2, 256))
    y = kernels.gather_dequant_matvec(
        x, q, scales, None, indices, bits=bits, group_size=group_size, mode=mode
    )
    ref = exact_matmul(dense[indices], x[:, None, :, None]).squeeze(-1)
    assert y.shape == (2, 2, 24) and rel_err(y, ref) < TOLERANCE


def test_kernel_names_change_with_their_source():
    """MLX's CUDA backend caches compiled kernels on disk by name: a changed body must get a new name."""
    from flashmoe.kernels import gpu

    header, body = gpu.compose("cuda", "dequant_matvec.inc")
    name = gpu.versioned_name("flashmoe_dequant_matvec", header, body)
    assert name == gpu.versioned_name("flashmoe_dequant_matvec", header, body)
    assert name != gpu.versioned_name("flashmoe_dequant_matvec", header, body + "\n// edited")
    assert name != gpu.versioned_name("flashmoe_dequant_matvec", header + " ", body)


def test_placeholder_inputs_made_inside_a_trace_are_data_not_ops():
    """The unread placeholder inputs (no ids, an unread value) are first made while mx.compile traces the
    decode step: made by an op they would join the step's graph and run every token (a fill launch
    each on a GPU). Made inside a trace here, they must hold data, with no op behind them."""
    gpu._no_ids.cache_clear()
    gpu.unread.cache_clear()
    made = []

    @mx.compile
    def step(x):
        made.extend([gpu._no_ids(), gpu.unread(mx.bfloat16)])
        return x + 1

    mx.eval(step(mx.ones((2,))))
    for array in made:
        with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
            mx.export_to_dot(f.name, array)
            assert "label" not in f.read(), f"an op made the placeholder {array.dtype} {array.shape}"
    gpu._no_ids.cache_clear()
    gpu.unread.cache_clear()
