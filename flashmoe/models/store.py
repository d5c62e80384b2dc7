"""The checkpoint's tensors, handed out once each to the modules that use them.

Every tensor is accounted for: a module asking for one that is missing gets an error
naming it and the file it should be in; tensors nobody took are an error at the end.
This is also where each quantized tensor meets its resolved spec, and where
quant="global" replays the 4-bit-only engine's misread (flashmoe.misread).
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import FlashMoeError
from ..misread import misread_as
from ..quant import QuantSpec, Resolved
from .layers import Embedding, ExpertLinear, Linear

QUANT_MODES = ("config", "global")


class TensorStore:
    """name -> array, with per-module quantization specs; `take` each tensor exactly once."""

    def __init__(
        self,
        tensors: dict[str, mx.array],
        *,
        specs: dict[str, Resolved] | None = None,  # module -> resolved spec (quant.check_tensors)
        default_spec: QuantSpec
        | None = None,  # the config's top level (what quant="global" reads everything as)
        quant: str = "config",
        backend: str = "mlx",
        dtype: mx.Dtype = mx.float32,  # compute dtype for float tensors
        source: str = "checkpoint",  # named in errors
    ):
        if quant not in QUANT_MODES:
            raise FlashMoeError(f"quant must be one of {QUANT_MODES}, found {quant!r}")
        self.tensors, self.specs, self.default_spec = dict(tensors), specs or {}, default_spec
        self.quant, self.backend, self.dtype, self.source = quant, backend, dtype, source
        self.misread_modules: list[str] = []  # quant="global": modules read at the wrong bits

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, *, cast: bool = True) -> mx.array:
        """Remove and return tensor `name` (float tensors in the compute dtype)."""
        if name not in self.tensors:
            raise FlashMoeError(f"{self.source}: tensor '{name}' is missing (the model needs it)")
        value = self.tensors.pop(name)
        return value.astype(self.dtype) if cast and mx.issubdtype(value.dtype, mx.floating) else value

    def linear(self, prefix: str, *, bias: bool = False) -> Linear:
        """The linear layer stored under `prefix` (`prefix.weight`, and `.scales`/`.biases` if quantized)."""
        return self._build(Linear, prefix, bias)

    def experts(self, prefix: str) -> ExpertLinear:
        """Stacked experts under `prefix` (mlx-lm's switch_mlp layout: weight (E, out, in))."""
        return self._build(ExpertLinear, prefix, False)

    def embedding(self, prefix: str) -> Embedding:
        return Embedding(self.linear(prefix), dtype=self.dtype)

    def finish(self, ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
        """Check nothing is left over; returns the ignored tensors' names (dropped on purpose)."""
        ignored = [n for n in self.tensors if n.startswith(ignore_prefixes)]
        unused = sorted(set(self.tensors) - set(ignored))
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise FlashMoeError(f"{self.source}: tensors the model does not use: {unused[:5]}{more}")
        self.tensors.clear()
        return ignored

    def _build(self, cls, prefix: str, bias: bool):
        if f"{prefix}.scales" not in self.tensors:
            layer_bias = self.take(f"{prefix}.bias") if bias else None
            return cls(self.take(f"{prefix}.weight"), bias=layer_bias, backend=self.backend)
        spec = self.spec(prefix)
        weight = self.take(f"{prefix}.weight")
        # Scales and biases in the compute dtype once, at load (exact: bf16 -> float32 on CPU), so no
        # kernel converts a whole stack of them per call; fp formats' uint8 scales stay as they are.
        scales = self.take(f"{prefix}.scales")
        biases = self.take(f"{prefix}.biases") if spec.has_biases else None
        layer_bias = self.take(f"{prefix}.bias") if bias else None
        spec, weight = self._as_read(prefix, spec, weight, scales)
        return cls(weight, scales, biases, layer_bias, spec, self.backend)

    def spec(self, module: str) -> QuantSpec:
        """The resolved quantization of quantized module `module`."""
        if module not in self.specs:
            raise FlashMoeError(f"{self.source}: '{module}' is quantized but has no resolved spec")
        return self.specs[module].spec

    def _as_read(self, module: str, spec: QuantSpec, weight, scales):
        """quant="global": every tensor read at the top-level bits, as the 4-bit-only engine did."""
        read = self.default_spec
        if self.quant == "config" or read is None or spec.bits == read.bits or spec.mode != "affine":
            return spec, weight
        in_dim = scales.shape[-1] * spec.group_size
        words = misread_as(weight, stored_bits=spec.bits, read_bits=read.bits, in_dim=in_dim, name=module)
        self.misread_modules.append(module)
        return QuantSpec(read.bits, spec.group_size, spec.mode), words
