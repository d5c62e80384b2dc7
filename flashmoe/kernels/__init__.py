"""Dequantizing matrix-vector products, on four backends.

    dequant_matvec(x, w, scales, biases, bits=, group_size=)            x (..., in) -> (..., out)
    gather_dequant_matvec(x, w, scales, biases, indices, bits=, ...)    -> (..., K, out)

Backends: "metal" (mx.fast.metal_kernel), "cuda" (mx.fast.cuda_kernel), "native" (flashmoe's own
SIMD CPU kernels, the _flashmoe_native extension built from native/), "mlx" (MLX's own
quantized_matmul / gather_qmm), "reference" (pure-MLX shifts and masks, the ground truth),
"auto" (metal, else cuda, else native on the CPU when built, else mlx; backend_reason() says why). flashmoe's kernels cover affine 2/4/8 bits; bits 3/5/6
and the fp formats (mxfp4, nvfp4, mxfp8) go through MLX's quantized_matmul on every backend.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import BackendUnavailableError, FlashMoeError  # noqa: F401 (re-exported)
from . import gpu, native, reference

BACKENDS = ("metal", "cuda", "native", "mlx", "reference")
KERNEL_BITS = (2, 4, 8)
GPU_BACKENDS = ("metal", "cuda")


def backend_available(backend: str) -> bool:
    """Whether `backend` can run here (the GPU ones need their GPU as the default device)."""
    on_gpu = mx.default_device() == mx.gpu
    if backend == "metal":
        return on_gpu and mx.metal.is_available()
    if backend == "cuda":
        return on_gpu and hasattr(mx, "cuda") and mx.cuda.is_available()
    if backend == "native":
        return not on_gpu and native.available()
    return backend in BACKENDS


def fused_backend(backend: str) -> str:
    """Where the fused decode kernels (moe, gated_delta, attention) run for `backend`: "metal" or
    "cuda" as asked (for "auto", whichever runs here), else "reference", their pure-MLX form."""
    if backend == "auto":
        return next((b for b in GPU_BACKENDS if backend_available(b)), "reference")
    return backend if backend in GPU_BACKENDS else "reference"


def available_backends() -> list[str]:
    """The backends that can run on this machine, fastest first."""
    return [b for b in BACKENDS if backend_available(b)]


def resolve_backend(backend: str = "auto") -> str:
    """`backend`, or for "auto" the best one available; a clear error if it cannot run here."""
    if backend == "auto":
        return available_backends()[0]  # "mlx" always runs
    if backend not in BACKENDS:
        raise FlashMoeError(f"unknown kernel backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if not backend_available(backend):
        raise BackendUnavailableError(
            f"kernel backend {backend!r} cannot run here (default device {mx.default_device()}, "
            f"available: {available_backends()})"
        )
    return backend


def backend_reason() -> str:
    """One line saying which backend "auto" picks here and why."""
    picked = resolve_backend("auto")
    device = mx.default_device()
    if picked in ("metal", "cuda"):
        return f"kernel backend {picked}: the default device is {device} and {picked} is available"
    if picked == "native":
        return f"kernel backend native: default device {device}, flashmoe's CPU kernels ({native.info()})"
    why = (
        f"native kernels unavailable: {native.why_unavailable()}"
        if device == mx.cpu
        else f"no Metal or CUDA on the default device {device}"
    )
    return f"kernel backend mlx (MLX's quantized_matmul): {why}"


def dequant_matvec(
    x,
    w,
    scales,
    biases,
    *,
    bits: int,
    group_size: int,
    mode: str = "affine",
    backend: str = "auto",
    residual=None,
    norm=None,
):
    """x (..., in) @ dequantize(w).T (+ residual (..., out)) -> (..., out), for a quantized w
    (out, in * bits / 32).

    norm = (weight (in,), eps): x is first put through that RMSNorm (mx.fast.rms_norm); the GPU
    kernels apply it as they read x, rounded as mx.fast.rms_norm rounds (one launch fewer).

    A residual is added to the result rounded to x's dtype, as `residual + y` would add it; the
    GPU kernels add it as they write y (one launch fewer).
    The native backend computes in float32: an x of another dtype is cast to float32 and the
    result cast back to x's dtype.
    """
    _check_shapes(x, w, scales, biases, bits, group_size, mode)
    backend = resolve_backend(backend)
    # the GPU backends by name: tests add "reference" to GPU_BACKENDS to run the fused paths' plumbing
    if _own_kernel(bits, mode) and backend in ("metal", "cuda"):
        return gpu.matvec(
            backend, x, w, scales, biases, bits=bits, group_size=group_size, residual=residual, norm=norm
        )
    x = rms_norm(x, norm)
    if not _own_kernel(bits, mode) or backend == "mlx":
        # a 1-D x goes in as one row: MLX's CUDA quantized_matmul fails on it ("SmallVector out of range")
        y = mx.quantized_matmul(
            x[None] if x.ndim == 1 else x,
            w,
            scales,
            biases,
            transpose=True,
            group_size=group_size,
            bits=bits,
            mode=mode,
        )
        y = y[0] if x.ndim == 1 else y
    elif backend == "reference":
        y = reference.dequant_matvec(x, w, scales, biases, bits=bits, group_size=group_size)
    else:  # native
        y = native.dequant_matvec(_f32(x), w, scales, biases, bits=bits, group_size=group_size)
        y = y if x.dtype == mx.float32 else y.astype(x.dtype)
    return y if residual is None else residual + y


def gather_dequant_matvec(
    x,
    w,
    scales,
    biases,
    indices,
    *,
    bits: int,
    group_size: int,
    mode: str = "affine",
    backend: str = "auto",
):
    """x against the experts `indices` (..., K) of a stacked w (E, out, in * bits / 32) -> (..., K, out).

    x is (..., in), one input shared by the K experts (gate/up projections), or
    (..., K, in), one input per selected expert (down projection).
    The native backend computes in float32 (another x dtype is cast to float32 and back).
    """
    _check_shapes(x, w, scales, biases, bits, group_size, mode)
    shared = _check_gather(x, w, indices)
    backend = resolve_backend(backend)
    if not _own_kernel(bits, mode) or backend == "mlx":
        xg = x[..., None, None, :] if shared else x[..., None, :]  # (..., 1 or K, 1, in)
        y = mx.gather_qmm(
            xg,
            w,
            scales,
            biases,
            rhs_indices=indices,
            transpose=True,
            group_size=group_size,
            bits=bits,
            mode=mode,
        )  # (..., K, 1, out)
        return y.squeeze(-2)
    if backend == "reference":
        return reference.gather_dequant_matvec(
            x, w, scales, biases, indices, bits=bits, group_size=group_size
        )
    if backend == "native":
        y = native.gather_dequant_matvec(
            _f32(x), w, scales, biases, indices, bits=bits, group_size=group_size
        )
        return y if x.dtype == mx.float32 else y.astype(x.dtype)
    idx = indices if indices.dtype == mx.uint32 else indices.astype(mx.uint32)
    return gpu.gathered_matvec(
        backend,
        x,
        w,
        scales,
        biases,
        idx,
        x_div=indices.shape[-1] if shared else 1,
        bits=bits,
        group_size=group_size,
        out_shape=(*indices.shape, w.shape[-2]),
    )


def rms_norm(x: mx.array, norm) -> mx.array:
    """x through the RMSNorm norm = (weight, eps) (None: x as it is)."""
    return x if norm is None else mx.fast.rms_norm(x, norm[0], norm[1])


def _f32(x):
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def _own_kernel(bits: int, mode: str) -> bool:
    return mode == "affine" and bits in KERNEL_BITS


def _check_shapes(x, w, scales, biases, bits, group_size, mode) -> None:
    """Refuse inputs whose shapes disagree with bits and group size, naming both."""
    in_dim = scales.shape[-1] * group_size
    problems = []
    if w.dtype != mx.uint32:
        problems.append(f"packed weights must be uint32, found {w.dtype}")
    if w.shape[-1] * 32 != in_dim * bits:
        problems.append(
            f"w {w.shape} holds {w.shape[-1] * 32 / in_dim:g} bits per value for in_dim {in_dim} "
            f"(scales {scales.shape} x group_size {group_size}), expected {bits}"
        )
    if w.shape[:-1] != scales.shape[:-1]:
        problems.append(f"w {w.shape} and scales {scales.shape} differ in their leading dims")
    if x.shape[-1] != in_dim:
        problems.append(f"x has {x.shape[-1]} inputs, the weights expect {in_dim}")
    if (mode == "affine") != (biases is not None):
        problems.append(f"mode {mode!r} {'needs' if mode == 'affine' else 'takes no'} biases")
    elif biases is not None and biases.shape != scales.shape:
        problems.append(f"biases {biases.shape} must match scales {scales.shape}")
    if problems:
        raise FlashMoeError("dequant_matvec: " + "; ".join(problems))


def _check_gather(x, w, indices) -> bool:
    """Validate a gathered call; True when x is shared by the K experts."""
    if w.ndim != 3:
        raise FlashMoeError(
            f"gather_dequant_matvec: w must be stacked experts (E, out, words), found {w.shape}"
        )
    if x.ndim == indices.ndim and x.shape[:-1] == indices.shape[:-1]:
        return True
    if x.ndim == indices.ndim + 1 and x.shape[:-1] == indices.shape:
        return False
    raise FlashMoeError(
        f"gather_dequant_matvec: x {x.shape} must be indices.shape[:-1] + (in,) or "
        f"indices.shape + (in,) for indices {indices.shape}"
    )
