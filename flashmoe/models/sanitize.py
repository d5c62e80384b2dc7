"""All checkpoint key renaming, in one step: Hugging Face layouts -> mlx-lm's layout.

mlx-lm checkpoints pass through unchanged. Raw Hugging Face ones need:
  - experts.{e}.{proj}.*          -> switch_mlp.{proj}.* stacked as (E, out, in)
  - experts.gate_up_proj (fused)  -> switch_mlp.gate_proj / up_proj
  - model.language_model.*        -> language_model.model.* (arch.weight_prefix; vision tower dropped)
  - conv1d.weight (C, 1, k)       -> (C, k, 1)
  - zero-centred RMSNorm weights  -> +1 (arch.zero_centred_norms; mlx-lm checkpoints already carry it)
Multi-token-prediction heads (mtp.*) are dropped, and the loader says so.
"""

from __future__ import annotations

import re

import mlx.core as mx

from ..errors import FlashMoeError
from ..quant import Resolved
from .args import ModelArgs

DROPPED_PREFIXES = ("mtp.", "vision_tower", "model.visual")
ZERO_CENTRED_NORMS = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)
EXPERT_KEY = re.compile(
    r"^(?P<mlp>.*\.mlp)\.experts\.(?P<e>\d+)\.(?P<proj>\w+_proj)\.(?P<kind>weight|scales|biases)$"
)


def sanitize(tensors: dict, specs: dict[str, Resolved], args: ModelArgs) -> tuple[dict, dict, list[str]]:
    """(tensors, specs, dropped names) in mlx-lm's layout."""
    dropped = [k for k in tensors if k.startswith(DROPPED_PREFIXES)]
    tensors = {k: v for k, v in tensors.items() if k not in set(dropped)}
    if args.arch.weight_prefix:
        tensors = {canonical_name(k, args): v for k, v in tensors.items()}
        specs = {canonical_name(k, args): v for k, v in specs.items()}
    _split_fused_gate_up(tensors)
    raw_hf = any(EXPERT_KEY.match(k) for k in tensors) or any(
        k.endswith("conv1d.weight") and v.shape[-1] != 1 for k, v in tensors.items()
    )
    tensors, specs = _stack_experts(tensors, specs, args)
    for key, value in list(tensors.items()):
        if key.endswith("conv1d.weight") and value.shape[-1] != 1:
            tensors[key] = value.moveaxis(2, 1)
        if raw_hf and args.arch.zero_centred_norms and key.endswith(ZERO_CENTRED_NORMS):
            tensors[key] = value + 1.0
    return tensors, specs, dropped


def canonical_name(key: str, args: ModelArgs) -> str:
    """A stored name as sanitize renames it (streamed experts are renamed without being loaded)."""
    root = args.arch.weight_prefix  # "language_model.": Hugging Face nests it as model.language_model.*
    if not root:
        return key
    hf_nested = "model." + root.rstrip(".")
    if key.startswith(hf_nested):
        return key.replace(hf_nested, root + "model", 1)
    return key if key.startswith(root) else root + key


def _split_fused_gate_up(tensors: dict) -> None:
    for key in [k for k in tensors if k.endswith(".mlp.experts.gate_up_proj")]:
        prefix = key[: -len(".experts.gate_up_proj")]
        gate_up = tensors.pop(key)  # (E, 2 * I, D)
        middle = gate_up.shape[-2] // 2
        tensors[f"{prefix}.switch_mlp.gate_proj.weight"] = gate_up[..., :middle, :]
        tensors[f"{prefix}.switch_mlp.up_proj.weight"] = gate_up[..., middle:, :]
        tensors[f"{prefix}.switch_mlp.down_proj.weight"] = tensors.pop(f"{prefix}.experts.down_proj")


def _stack_experts(tensors: dict, specs: dict, args: ModelArgs) -> tuple[dict, dict]:
    """experts.{e}.{proj}.{kind} -> switch_mlp.{proj}.{kind} (E, ...), with one spec per stack."""
    groups: dict[tuple[str, str, str], dict[int, str]] = {}
    for key in tensors:
        match = EXPERT_KEY.match(key)
        if match:
            groups.setdefault((match["mlp"], match["proj"], match["kind"]), {})[int(match["e"])] = key
    for (mlp, proj, kind), members in groups.items():
        if sorted(members) != list(range(args.num_experts)):
            raise FlashMoeError(
                f"{mlp}.experts.*.{proj}.{kind}: expected experts 0..{args.num_experts - 1}, "
                f"found {len(members)} of them"
            )
        tensors[f"{mlp}.switch_mlp.{proj}.{kind}"] = mx.stack(
            [tensors.pop(members[e]) for e in sorted(members)]
        )
        if kind == "scales":
            specs = _stacked_spec(
                specs, f"{mlp}.switch_mlp.{proj}", [f"{mlp}.experts.{e}.{proj}" for e in members]
            )
    return tensors, specs


def _stacked_spec(specs: dict, stacked: str, modules: list[str]) -> dict:
    found = {specs[m].spec for m in modules}
    if len(found) != 1:
        raise FlashMoeError(f"{stacked}: its experts are quantized differently ({sorted(map(str, found))})")
    return {**specs, stacked: Resolved(stacked, found.pop(), specs[modules[0]].source)}
