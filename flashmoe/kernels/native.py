"""flashmoe's native CPU kernels (the `_flashmoe_native` extension built from native/ by setup.py).

    available() -> bool, why_unavailable() -> str | None
    dequant_matvec(x, w, scales, biases, *, bits, group_size)              x float32 (..., in) -> (..., out)
    gather_dequant_matvec(x, w, scales, biases, indices, *, bits, group_size) -> (..., K, out)
    gated_delta_update(q, k, v, g, beta, state) -> (y, state)      the Gated DeltaNet recurrence, float32
    gated_delta_step(qkv, conv_state, ..., state, *, key_heads, qk_eps, rms_eps) -> (out, state, conv_state)
                                            a decode token's Gated DeltaNet after its projections, float32

The extension links against libmlx, whose C++ ABI changes between releases: it is refused
(available() False, with the reason) unless the runtime mlx is the version it was built against.
"""

from __future__ import annotations

import mlx.core as mx

_ext = None
_reason: str | None = None
try:
    import _flashmoe_native as _ext  # noqa: F811 (top-level module installed next to mlx)
except ImportError as e:  # not built, or built against an mlx whose libmlx no longer matches
    _ext, _reason = (
        None,
        f"the native extension _flashmoe_native is not importable ({e}); reinstall flashmoe with a C++ compiler and cmake",
    )
else:
    if _ext.mlx_version != mx.__version__.split(".dev")[0]:
        _reason = (
            f"_flashmoe_native was built against mlx {_ext.mlx_version} but mlx {mx.__version__} is installed; "
            "reinstall flashmoe (pip install --force-reinstall --no-deps flashmoe) to rebuild it"
        )
        _ext = None
    else:
        try:  # a nanobind mismatch with mlx.core shows only when an mx.array is passed
            _probe = _ext.dequant_matvec(
                mx.ones((1, 32)),
                mx.zeros((1, 4), dtype=mx.uint32),
                mx.ones((1, 1)),
                mx.ones((1, 1)),
                4,
                32,
                stream=mx.cpu,
            )
            if abs(_probe.item() - 32.0) > 1e-4:
                raise RuntimeError(f"probe gave {_probe.item()}, expected 32")
        except Exception as e:
            _reason, _ext = (
                f"_flashmoe_native does not work with this mlx ({type(e).__name__}: {e})",
                None,
            )


def available() -> bool:
    """Whether the native extension imported and matches the installed mlx."""
    return _ext is not None


def has(name: str) -> bool:
    """Whether the extension is available and has the kernel `name` (a module built by an older
    flashmoe lacks the newer ones until reinstalled)."""
    return _ext is not None and hasattr(_ext, name)


def why_unavailable() -> str | None:
    """None when available(), else one line saying why not."""
    return _reason


def info() -> str:
    """'avx512, 2 threads, mlx 0.32.4' or the reason it is unavailable."""
    if _ext is None:
        return f"unavailable: {_reason}"
    return f"{_ext.isa()}, {_ext.threads()} threads, built against mlx {_ext.mlx_version}"


def _require():
    if _ext is None:
        raise ImportError(_reason)
    return _ext


def dequant_matvec(x, w, scales, biases, *, bits: int, group_size: int):
    """x (..., in) float32 @ dequantize(w).T -> (..., out) float32, on the CPU."""
    return _require().dequant_matvec(x, w, scales, biases, bits, group_size, stream=mx.cpu)


def gather_dequant_matvec(x, w, scales, biases, indices, *, bits: int, group_size: int):
    """x (..., in) or (..., K, in) float32 against experts `indices` (..., K) of w (E, out, words) -> (..., K, out)."""
    return _require().gather_dequant_matvec(x, w, scales, biases, indices, bits, group_size, stream=mx.cpu)


def gated_delta_update(q, k, v, g, beta, state):
    """mx.fast.gated_delta_update's recurrence in float32 on the CPU, each state row read and written once:
    q, k (B, T, Hk, dk), v (B, T, Hv, dv), g, beta (B, T, Hv), state (B, Hv, dv, dk) -> (y (B, T, Hv, dv), state)."""
    y, new_state = _require().gated_delta_update(q, k, v, g, beta, state, stream=mx.cpu)
    return y, new_state


def gated_delta_step(
    qkv, conv_state, conv_w, z, b, a, A_log, dt_bias, norm_w, state, *, key_heads, qk_eps, rms_eps
):
    """One decode token of a Gated DeltaNet layer after its in-projections, float32, in one primitive
    (kernels.gated_delta.reference's math): qkv (B, C), conv_state (B, W-1, C), conv_w (W, C), z (B, H_v, d_v),
    b, a (B, H_v), A_log, dt_bias (H_v,), norm_w (d_v,), state (B, H_v, d_v, d_k) -> (out (B, H_v, d_v), state,
    conv_state)."""
    out, new_state, conv = _require().gated_delta_step(
        qkv,
        conv_state,
        conv_w,
        z,
        b,
        a,
        A_log,
        dt_bias,
        norm_w,
        state,
        key_heads,
        qk_eps,
        rms_eps,
        stream=mx.cpu,
    )
    return out, new_state, conv
