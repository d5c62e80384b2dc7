"""Quantization resolution: which bits, group size and mode each module of a checkpoint uses.

This is the one place that reads `"bits"` from a config. mlx-lm writes a section like

    "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                     "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}, ...}

(the same under "quantization_config"). Top-level keys are the defaults; a module entry
is a dict (its own settings), `true` (the defaults) or `false` (not quantized).

The config alone is not trusted: `check_tensors` compares every quantized tensor's
shapes with what the config claims. An 8-bit gate read as 4-bit is the bug this
project is about, and the shapes always tell the truth:

    in_dim = scales.shape[-1] * group_size
    bits   = weight.shape[-1] * 32 / in_dim
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import QuantConfigError, QuantMismatchError

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
# Floating-point formats fix their bits and group size; scales are uint8, no biases.
FP_FORMATS = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
MODE_DEFAULTS = {
    "affine": (4, 64),
    **FP_FORMATS,
}  # mode -> (bits, group_size), as MLX's nn.quantize
SECTION_KEYS = ("quantization", "quantization_config")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is stored: `bits` per value, one scale (and bias) per `group_size`."""

    bits: int
    group_size: int
    mode: str = "affine"

    @property
    def has_biases(self) -> bool:
        """Affine quantization stores a bias per group; the fp formats do not."""
        return self.mode == "affine"

    def __str__(self) -> str:
        return f"{self.bits}-bit {self.mode} g{self.group_size}"


@dataclass(frozen=True)
class Resolved:
    """A module's spec and where it came from (for tables and error messages)."""

    module: str
    spec: QuantSpec | None
    source: str  # e.g. "config entry", "config top level", "shapes"


@dataclass
class QuantPlan:
    """The resolved quantization section: defaults plus per-module entries."""

    default: QuantSpec | None  # None: the checkpoint is not quantized
    entries: dict[str, QuantSpec | None] = field(default_factory=dict)
    section: str | None = None  # where in config.json the settings were found

    def spec_for(self, module: str) -> QuantSpec | None:
        """The spec the config claims for `module` (a path such as `model.layers.0.mlp.gate`)."""
        return self.explain(module).spec

    def explain(self, module: str) -> Resolved:
        """The spec the config claims for `module`, with the config key it came from."""
        if module in self.entries:
            return Resolved(module, self.entries[module], f"{self.section}[{module!r}]")
        return Resolved(module, self.default, f"{self.section} top level")

    def table(self) -> list[Resolved]:
        """The defaults and every per-module entry, in config order."""
        rows = [Resolved("(default)", self.default, f"{self.section} top level")]
        return rows + [self.explain(module) for module in self.entries]


def resolve(config: Mapping) -> QuantPlan:
    """Read the quantization section of a config.json dict into a QuantPlan."""
    found = _find_section(config)
    if found is None:
        return QuantPlan(default=None)
    where, section = found
    default = _spec_from_dict(section, where, "top level")
    entries = {}
    for key, value in section.items():
        if isinstance(value, bool):
            entries[key] = default if value else None
        elif isinstance(value, Mapping):
            entries[key] = _spec_from_dict(value, where, repr(key))
    return QuantPlan(default=default, entries=entries, section=where)


def _find_section(config: Mapping) -> tuple[str, Mapping] | None:
    """The first quantization section, top level before text_config, `quantization` first."""
    for prefix, cfg in (("", config), ("text_config.", config.get("text_config") or {})):
        present = [key for key in SECTION_KEYS if cfg.get(key) is not None]
        if not present:
            continue
        if len(present) == 2 and _settings(cfg[present[0]]) != _settings(cfg[present[1]]):
            raise QuantConfigError(
                f"config.json: '{prefix}quantization' and '{prefix}quantization_config' disagree; "
                "mlx-lm writes them identical, so one of them was edited: fix the checkpoint"
            )
        return prefix + present[0], cfg[present[0]]
    return None


def _settings(section: Mapping) -> dict:
    """The parts of a section that change numerics (to compare the two copies)."""
    keys = ("bits", "group_size", "mode")
    return {k: v for k, v in section.items() if k in keys or isinstance(v, (bool, Mapping))}


def _spec_from_dict(entry: Mapping, where: str, key: str) -> QuantSpec:
    """Validate one dict of settings; missing values take MLX's defaults for the mode."""
    method = entry.get("quant_method")
    if method is not None and method != "mlx":
        raise QuantConfigError(
            f"config.json: {where} has quant_method={method!r}; flashmoe reads only MLX's "
            "own quantization (affine, mxfp4, nvfp4, mxfp8)"
        )
    mode = entry.get("mode", "affine")
    if mode not in MODE_DEFAULTS:
        raise QuantConfigError(
            f"config.json: {where} {key}: unknown quantization mode {mode!r}; expected one of {sorted(MODE_DEFAULTS)}"
        )
    default_bits, default_group = MODE_DEFAULTS[mode]
    spec = QuantSpec(
        bits=int(entry.get("bits") or default_bits),
        group_size=int(entry.get("group_size") or default_group),
        mode=mode,
    )
    problem = _unsupported(spec)
    if entry.get("global_scale"):
        problem = "a global nvfp4 scale per tensor is not supported"
    if problem:
        raise QuantConfigError(f"config.json: {where} {key}: {problem} (found {spec})")
    return spec


def _unsupported(spec: QuantSpec) -> str | None:
    """Why `spec` is not a format MLX defines, or None when it is."""
    if spec.mode == "affine":
        if spec.bits not in AFFINE_BITS:
            return f"affine bits must be one of {AFFINE_BITS}"
        if spec.group_size not in AFFINE_GROUP_SIZES:
            return f"affine group_size must be one of {AFFINE_GROUP_SIZES}"
        return None
    if (spec.bits, spec.group_size) != FP_FORMATS[spec.mode]:
        bits, group = FP_FORMATS[spec.mode]
        return f"{spec.mode} is always {bits} bits with group_size {group}"
    return None


# --------------------------------------------------------------------------- shapes


SECTION_KEYS = ("quantization", "quantization_config")  # mlx-lm writes both, with the same content


def quantization_section(specs: Mapping[str, QuantSpec], default: QuantSpec) -> dict:
    """mlx-lm's section: top-level defaults plus an entry for each module stored otherwise."""
    section = {"group_size": default.group_size, "bits": default.bits, "mode": default.mode}
    for module, spec in sorted(specs.items()):
        if spec != default:
            section[module] = {"group_size": spec.group_size, "bits": spec.bits}
    return section


def with_section(config: Mapping, section: Mapping) -> dict:
    """`config` carrying `section` under both keys mlx-lm writes."""
    return {**config, **{key: dict(section) for key in SECTION_KEYS}}


def claim_bits(config: Mapping, module: str, bits: int) -> dict:
    """`config` whose sections claim `bits` for `module` (its group size kept): a lie, for demonstrations."""
    config = dict(config)
    for key in SECTION_KEYS:
        if key in config:
            section = dict(config[key])
            entry = section.get(module) if isinstance(section.get(module), dict) else {}
            section[module] = {
                **entry,
                "bits": bits,
                "group_size": entry.get("group_size", section.get("group_size", 64)),
            }
            config[key] = section
    return config


def implied_bits(weight_shape: Sequence[int], scales_shape: Sequence[int], group_size: int) -> float:
    """Bits per value that a packed weight's shape implies, given the group size."""
    in_dim = scales_shape[-1] * group_size
    return weight_shape[-1] * 32 / in_dim


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor without loading it."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "U32", "BF16", "F32", "U8", ...
    file: str = "?"


def check_tensors(plan: QuantPlan, tensors: Mapping[str, TensorInfo]) -> dict[str, Resolved]:
    """Check every quantized module (a `<module>.scales` tensor) against the plan.

    Returns module -> Resolved. Raises QuantMismatchError when an explicit config entry
    disagrees with the shapes; a module the config does not mention gets its spec from
    its shapes (source "shapes ...") when the top-level default does not fit them.
    """
    resolved = {}
    for name in sorted(tensors):
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            resolved[module] = check_module(plan, module, tensors)
    return resolved


def check_module(plan: QuantPlan, module: str, tensors: Mapping[str, TensorInfo]) -> Resolved:
    """Resolve one quantized module and check it against its tensors' shapes."""
    weight = _require(tensors, f"{module}.weight", f"{module}.scales")
    scales = tensors[f"{module}.scales"]
    _check_dtypes(module, weight, scales, tensors.get(f"{module}.biases"))
    claim = plan.explain(module)
    explicit = module in plan.entries
    if claim.spec is None and explicit:
        raise QuantMismatchError(
            f"{weight.file}: config key {claim.source} says '{module}' is not quantized, "
            f"but the checkpoint has '{module}.scales' {scales.shape}"
        )
    if claim.spec is not None and _fits(claim.spec, weight, scales):
        _check_companions(module, claim.spec, tensors)
        return claim
    if explicit:
        raise QuantMismatchError(_mismatch_message(module, claim, weight, scales))
    spec = infer_spec(module, weight, scales, claim.spec)
    _check_companions(module, spec, tensors)
    said = f"; {claim.source} says {claim.spec}" if claim.spec else ""
    return Resolved(module, spec, f"shapes{said}")


def infer_spec(module: str, weight: TensorInfo, scales: TensorInfo, hint: QuantSpec | None) -> QuantSpec:
    """The spec a tensor's shapes imply, trying the hinted group size first."""
    mode = "affine" if scales.dtype != "U8" else (hint.mode if hint and hint.mode != "affine" else None)
    if mode is None:
        raise QuantMismatchError(
            f"{weight.file}: '{module}.scales' is uint8 (an fp format), but the config names "
            "no mxfp4/nvfp4/mxfp8 mode for it, so its format cannot be told from shapes"
        )
    groups = [hint.group_size] if hint else []
    groups += [g for g in (64, 32, 128) if g not in groups] if mode == "affine" else []
    for group_size in groups:
        bits = implied_bits(weight.shape, scales.shape, group_size)
        spec = QuantSpec(int(bits), group_size, mode)
        if bits == int(bits) and _unsupported(spec) is None:
            return spec
    raise QuantMismatchError(
        f"{weight.file}: '{module}.weight' {weight.shape} with scales {scales.shape} fits no "
        f"supported quantization (tried group sizes {groups})"
    )


def _fits(spec: QuantSpec, weight: TensorInfo, scales: TensorInfo) -> bool:
    fp_scales = scales.dtype == "U8"
    return implied_bits(weight.shape, scales.shape, spec.group_size) == spec.bits and fp_scales == (
        spec.mode != "affine"
    )


def _mismatch_message(module: str, claim: Resolved, weight: TensorInfo, scales: TensorInfo) -> str:
    spec = claim.spec
    in_dim = scales.shape[-1] * spec.group_size
    bits = implied_bits(weight.shape, scales.shape, spec.group_size)
    return (
        f"{weight.file}: tensor '{module}.weight' does not match its config entry {claim.source}: "
        f"configured {spec.bits} bits, but its shapes imply {bits:g} bits "
        f"(weight {weight.shape} {weight.dtype}, scales {scales.shape} {scales.dtype}, "
        f"group_size {spec.group_size} -> in_dim {in_dim}, bits = {weight.shape[-1]} * 32 / {in_dim})"
    )


FLOAT_DTYPES = ("BF16", "F16", "F32")


def _check_dtypes(module: str, weight: TensorInfo, scales: TensorInfo, biases: TensorInfo | None) -> None:
    """Packed words are uint32; scales are floats (affine) or uint8 (fp formats); biases floats."""
    problems = []
    if weight.dtype != "U32":
        problems.append(f"'{module}.weight' is {weight.dtype}, expected U32 (packed words)")
    if scales.dtype not in (*FLOAT_DTYPES, "U8"):
        problems.append(f"'{module}.scales' is {scales.dtype}, expected a float dtype or U8")
    if biases is not None and biases.dtype not in FLOAT_DTYPES:
        problems.append(f"'{module}.biases' is {biases.dtype}, expected a float dtype")
    if problems:
        raise QuantMismatchError(f"{weight.file}: " + "; ".join(problems))


def _check_companions(module: str, spec: QuantSpec, tensors: Mapping[str, TensorInfo]) -> None:
    """Affine tensors carry biases shaped like their scales; fp formats carry none."""
    scales = tensors[f"{module}.scales"]
    biases = tensors.get(f"{module}.biases")
    if spec.has_biases and biases is None:
        raise QuantMismatchError(f"{scales.file}: '{module}' is {spec} but has no '{module}.biases'")
    if not spec.has_biases and biases is not None:
        raise QuantMismatchError(
            f"{scales.file}: '{module}' is {spec}, which has no biases, but '{module}.biases' exists"
        )
    if biases is not None and biases.shape != scales.shape:
        raise QuantMismatchError(
            f"{biases.file}: '{module}.biases' has shape {biases.shape}, expected the scales' {scales.shape}"
        )


def _require(tensors: Mapping[str, TensorInfo], name: str, because: str) -> TensorInfo:
    if name not in tensors:
        file = tensors[because].file
        raise QuantMismatchError(f"{file}: '{because}' exists but '{name}' is missing")
    return tensors[name]
