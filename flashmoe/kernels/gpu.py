"""Launching the dequantizing kernels through mx.fast.metal_kernel or mx.fast.cuda_kernel.

Both backends run the same bodies (src/*.inc); only the prelude differs. The dequant
matvec (src/dequant_matvec.inc) and the fused MoE kernels (src/moe_*.inc, launched from
moe.py) share one inner loop, written once in dequant_matvec.inc between its "qdot_tile
begin/end" lines and pasted at CORE_MARKER in the MoE bodies.
Kernel objects are built once per backend; MLX compiles one variant per template
(dtype, bits, group size, launch shape) and caches it by name.

The launch shape comes from the matrix shape (plan()): 128-bit loads when rows are
16-byte aligned, as many lanes per row as the row has 128-bit units (up to a warp), up to
MAX_LOADS loads in flight per lane, two rows per row group for tall matrices.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from . import sources

CORE_MARKER = "// @qdot_tile"  # where a MoE body takes the core
CORE_BEGIN, CORE_END = "// qdot_tile begin", "// qdot_tile end"
# Shared parts pasted into other bodies: marker -> (the file that holds the part, its begin and end lines)
PASTES = {
    CORE_MARKER: ("dequant_matvec.inc", CORE_BEGIN, CORE_END),
    "// @route_core": ("moe_route.inc", "// route core begin", "// route core end"),
}
SIMDS_PER_GROUP = 8  # SIMD groups (warps) per threadgroup
MAX_LOADS = 8  # loads (of VEC words) in flight per lane, over all slots
X_FLOATS = 8192  # float32 x values staged in shared memory at a time (32 KiB), over all slots
INPUT_NAMES = ["x", "w", "scales", "biases", "idx", "res", "nw", "neps"]

_poison: float | None = None
_override: dict = {}  # benchmarks: force launch-shape fields (simds, rps, lpr, vec, u, xd)
# The launch shapes benchmarks/matvec_sweep.py tries (and tests/kernels/test_launch_shapes.py checks):
# x staged in shared memory or read from cache, SIMD groups per threadgroup, rows per row group;
# then, for the sweep by kernel time (--device), more loads in flight per lane (u) and half-warp rows.
LAUNCH_GRID = (
    [dict(xd=xd, simds=s, rps=r) for xd in (0, 1) for s in (4, 8) for r in (1, 2, 4)]
    + [dict(xd=xd, simds=8, rps=r, u=u) for xd in (0, 1) for r in (1, 2) for u in (4, 8)]
    + [dict(xd=xd, simds=8, rps=1, lpr=16) for xd in (0, 1)]
)
MOE_GRID = [dict(xd=xd, simds=s) for xd in (0, 1) for s in (2, 4, 8)]
# Measured best shapes per GPU (benchmarks/matvec_sweep.py --table): the H200's ships; every shape
# in it passed tests/kernels/test_launch_shapes.py on an H200. FLASHMOE_LAUNCH_TABLE names another file.
LAUNCH_TABLE = Path(__file__).with_name("launch_table.json")


def set_output_poison(value: float | None) -> None:
    """Tests: fill kernel outputs with `value` (e.g. NaN) before the kernel runs, so unwritten rows show."""
    global _poison
    _poison = value


def output_init() -> dict:
    return {} if _poison is None else {"init_value": _poison}


@dataclass(frozen=True)
class Plan:
    simds: int  # SIMD groups per threadgroup
    rps: int  # rows per row group
    lpr: int  # lanes per row (a row group)
    vec: int  # words per load: 4 (128-bit) or 1
    u: int  # loads in flight per lane and slot
    tile: int  # x values staged in shared memory at a time, per x slot
    xd: int = 0  # 1: x read from device memory (cache) directly, no shared-memory staging

    @property
    def rows_per_group(self) -> int:
        return self.simds * (32 // self.lpr) * self.rps

    @property
    def unroll_code(self) -> int:
        """dequant_matvec.inc's UNROLL: u | log2(lpr) << 4 | (vec == 4) << 8 | xd << 9."""
        return self.u | (self.lpr.bit_length() - 1) << 4 | (self.vec == 4) << 8 | self.xd << 9

    def template(self) -> list:
        return [
            ("SIMDS", self.simds),
            ("LPR", self.lpr),
            ("VEC", self.vec),
            ("U", self.u),
            ("TILE", self.tile),
            ("XD", self.xd),
        ]


def plan(
    out_dim: int,
    in_dim: int,
    bits: int,
    *,
    slots: int = 1,
    x_slots: int = 1,
    rps: int | None = None,
    kind: str = "matvec",
) -> Plan:
    """The launch shape for rows of in_dim values: `slots` rows of weights per row group
    (gate + up: 2, K experts: K) reading `x_slots` distinct inputs. Fields measured best for this
    GPU and shape (launch_table.json, written by benchmarks/matvec_sweep.py) come first, then
    the rules below; _override beats both."""
    force = {**tuned(kind, out_dim, in_dim, bits), **_override}
    words = in_dim * bits // 32
    vec = force.get("vec", 4 if words % 4 == 0 else 1)
    units = words // vec
    lpr = 32
    while lpr > 1 and lpr > units:
        lpr //= 2
    lpr = force.get("lpr", lpr)
    if rps is None:  # tall matrices: two rows share each x read (halves shared-memory traffic)
        rps = force.get("rps", 2 if out_dim >= 8192 and slots == 1 else 1)
    per_slot = max(1, MAX_LOADS // (slots * rps))
    u = force.get("u", max(1, min(math.ceil(units / lpr), per_slot)))
    unit_vals = vec * 32 // bits
    step = max(unit_vals, 32)
    cap = max(step, (X_FLOATS // x_slots) // step * step)
    tile = min(math.ceil(in_dim / step) * step, cap)
    simds = force.get("simds", SIMDS_PER_GROUP)
    xd = force.get("xd", 0)
    return Plan(simds=simds, rps=rps, lpr=lpr, vec=vec, u=u, tile=tile, xd=xd)


def table_key(kind: str, out_dim: int, in_dim: int, bits: int) -> str:
    """A launch_table.json entry: "matvec 5120x2048 4-bit" (kind: matvec, gate_up, down)."""
    return f"{kind} {out_dim}x{in_dim} {bits}-bit"


def tuned(kind: str, out_dim: int, in_dim: int, bits: int) -> dict:
    """The measured best launch-shape fields for this GPU and shape, or {} when none were measured."""
    return launch_table().get(table_key(kind, out_dim, in_dim, bits), {})


@functools.cache
def launch_table() -> dict:
    """This GPU's entries of the launch table ($FLASHMOE_LAUNCH_TABLE, else launch_table.json
    beside this file), keyed by mx.device_info()'s device name; {} for a GPU never measured."""
    path = Path(os.environ.get("FLASHMOE_LAUNCH_TABLE", LAUNCH_TABLE))
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get(device_name(), {})


def device_name() -> str:
    return str(mx.device_info().get("device_name", "unknown"))


def compose(backend: str, body_file: str, defines: tuple[str, ...] = ()) -> tuple[str, str]:
    """(header, body): the backend's prelude around a body, the shared parts (PASTES) pasted in;
    `defines` (e.g. ("FM_ROUTED",)) set to 1 ahead of the body, for a body's `#if` forms."""
    header, body = sources.compose(backend, body_file)
    for marker, (source, begin, end) in PASTES.items():
        if marker in body:
            body = body.replace(marker, part(source, begin, end))
    return header, "".join(f"#define {name} 1\n" for name in defines) + body


def part(source: str, begin: str, end: str) -> str:
    """The lines of `source` from its `begin` line to its `end` line."""
    text = sources.read_source(source)
    return text[text.index(begin) : text.index(end) + len(end)]


def build(
    backend: str, body_file: str, name: str, inputs: tuple, outputs: tuple = ("y",), defines: tuple = ()
):
    """A new kernel object for `body_file` on `backend`."""
    header, body = compose(backend, body_file, defines)
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return make(
        name=versioned_name(name, header, body),
        input_names=list(inputs),
        output_names=list(outputs),
        source=body,
        header=header,
    )


def versioned_name(name: str, header: str, body: str) -> str:
    """`name` with a hash of the kernel's source. MLX's CUDA backend keeps compiled kernels on disk
    (/tmp/mlx/<mlx version>/ptx) under their name alone: without the hash, a changed body (a new
    flashmoe) would silently run the old compiled code."""
    digest = hashlib.sha256((header + "\0" + body).encode()).hexdigest()[:12]
    return f"{name}_{digest}"


@functools.cache
def kernel(
    backend: str, body_file: str, name: str, inputs: tuple, outputs: tuple = ("y",), defines: tuple = ()
):
    """The kernel object for `body_file` on `backend` (with `defines`, see compose), built once."""
    return build(backend, body_file, name, inputs, outputs, defines)


@functools.cache
def _kernel(backend: str):
    """The dequant-matvec kernel object for `backend`, built once."""
    return build(backend, "dequant_matvec.inc", "flashmoe_dequant_matvec", tuple(INPUT_NAMES))


# Parameter arrays hold at least this many values (32 bytes). MLX's CUDA backend puts arrays of 8 bytes
# or fewer in a shared pool of managed memory, where the host also writes (each step's position) and
# reads (each step's token): a kernel reading a parameter from that pool stalls on page faults (the
# kernels that read one, measured on the H200, took 14-21 us longer each). Padded, the array gets a
# buffer of its own, written once by the host and then only read by the GPU.
PARAM_VALUES = 8


@functools.lru_cache(maxsize=256)
def int_array(*values: int) -> mx.array:
    """A kernel's int32 parameters as an input array (padded with zeros), made once per distinct tuple."""
    return mx.array([*values, *[0] * (PARAM_VALUES - len(values))], dtype=mx.int32)


@functools.lru_cache(maxsize=64)
def float_array(*values: float) -> mx.array:
    """A kernel's float32 parameters as an input array (padded with zeros), made once per distinct tuple."""
    return mx.array([*values, *[0.0] * (PARAM_VALUES - len(values))], dtype=mx.float32)


# The placeholders below are arrays made from data (mx.array), not ops (mx.zeros): these helpers are
# first called while mx.compile traces the decode step, and an op would be traced into the step and
# run every token (a Broadcast and a Full node each, one fill launch each, seen on the H200).


@functools.cache
def _no_ids() -> mx.array:
    """What the matvec's `idx` input gets for one matrix (GATHER = 0): one unread id."""
    return mx.array([0], dtype=mx.uint32)


def norm_inputs(norm) -> list[mx.array]:
    """A kernel's `nw`, `neps` inputs: the RMSNorm (weight, eps) it applies to x as it reads it, or
    for norm None one unread value each (NORM = 0)."""
    if norm is None:
        return [float_array(0.0), float_array(0.0)]
    weight, eps = norm
    return [weight, float_array(eps)]


@functools.lru_cache(maxsize=8)
def unread(dtype: mx.Dtype) -> mx.array:
    """One unread value of `dtype`: what an input gets that its kernel's template leaves unread (a
    matvec's `res` with RES = 0, the attention's `gate` with GATED = 0)."""
    return mx.array([0], dtype=dtype)


def gathered_matvec(
    backend, x, w, scales, biases, idx, *, x_div, bits, group_size, out_shape, residual=None, norm=None
) -> mx.array:
    """Pairs p = 0..P-1: y[p] = dequant(w[idx[p]]) @ x[p // x_div] (+ residual[p]) -> y of out_shape;
    idx None: one matrix w (out, words) for every pair (P = x's rows).

    x (P / x_div rows of in), w (E, out, words) or (out, words), row-contiguous: the kernel indexes
    flat memory, so no reshape (an extra op per call) is needed.
    residual: None or an array of out_shape in x's dtype, added as a separate add would round it.
    norm: None or (weight (in,), eps): x goes through that RMSNorm as the kernel reads it, rounded as
    mx.fast.rms_norm rounds its output (one launch fewer than normalising first).
    """
    pairs = x.size // x.shape[-1] if idx is None else idx.size
    launch = matvec_launch(
        x.dtype,
        pairs,
        w.shape[-2],
        x.shape[-1],
        x_div,
        bits,
        group_size,
        residual is not None,
        idx is not None,
        norm is not None,
        tuple(_override.items()),
    )
    res = unread(x.dtype) if residual is None else residual
    (y,) = _kernel(backend)(
        inputs=[x, w, scales, biases, _no_ids() if idx is None else idx, res, *norm_inputs(norm)],
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=[out_shape],
        output_dtypes=[x.dtype],
        **output_init(),
    )
    return y


@dataclass(frozen=True)
class Launch:
    """Everything of a dequant-matvec launch but its arrays, worked out once per shape."""

    template: list
    grid: tuple
    threadgroup: tuple


@functools.lru_cache(maxsize=512)
def matvec_launch(
    dtype, pairs, out_dim, in_dim, x_div, bits, group_size, residual, gather, norm, override
) -> Launch:
    """The launch of `pairs` rows of x against (out_dim, in_dim) matrices (`override`: gpu._override's
    items, so that a benchmark forcing a shape gets its own entry)."""
    p = plan(out_dim, in_dim, bits)
    return Launch(
        template=[
            ("T", dtype),
            ("BITS", bits),
            ("GROUP_SIZE", group_size),
            ("SIMDS", p.simds),
            ("RPS", p.rps),
            ("UNROLL", p.unroll_code),
            ("TILE", p.tile),
            ("RES", int(residual)),
            ("NORM", int(norm)),
            ("OUT_DIM", out_dim),
            ("IN_DIM", in_dim),
            ("X_DIV", x_div),
            ("GATHER", int(gather)),
        ],
        grid=(pairs * p.simds * 32, math.ceil(out_dim / p.rows_per_group), 1),
        threadgroup=(p.simds * 32, 1, 1),
    )


def matvec(backend, x, w, scales, biases, *, bits, group_size, residual=None, norm=None) -> mx.array:
    """x (..., in) (RMSNorm'd by norm = (weight, eps) when given) against one matrix w (out, words)
    (+ residual (..., out)) -> (..., out)."""
    return gathered_matvec(
        backend,
        x,
        w,
        scales,
        biases,
        None,
        x_div=1,
        bits=bits,
        group_size=group_size,
        out_shape=(*x.shape[:-1], w.shape[-2]),
        residual=residual,
        norm=norm,
    )
