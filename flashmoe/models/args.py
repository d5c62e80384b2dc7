"""Model dimensions from config.json (one dataclass, unknown keys ignored), the feature row of each
architecture, and the name and shape of every tensor a model of those dimensions holds.

What differs between architectures is stated here once, as data (`Arch`): model code asks the
row ("has an output gate?"), never the model name. A fifth architecture is one more row.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import FlashMoeError


@dataclass(frozen=True)
class Arch:
    """What sets one architecture (a config.json `model_type`) apart from the others."""

    model_type: str
    text_config: bool = False  # its fields sit under config["text_config"] (multimodal wrapper)
    weight_prefix: str = ""  # tensor names start with this ("language_model." for the wrapper)
    hybrid: bool = False  # Gated DeltaNet layers, full attention every `full_attention_interval` (default 4)
    split_in_proj: bool = False  # Gated DeltaNet's in_proj_qkv/_z/_b/_a (else fused in_proj_qkvz/_ba)
    output_gate: bool = False  # q_proj gives a query and a sigmoid output gate per head
    partial_rotary: bool = False  # rotary on head_dim * partial_rotary_factor dims only
    qk_norm: bool = False  # RMSNorm on each query and key head
    qkv_bias: bool = False  # q/k/v always carry a bias and o_proj never does (else: config's attention_bias)
    head_dim_from_hidden: bool = False  # head_dim = hidden_size / heads, whatever the config says
    config_rope_traditional: bool = False  # honours the config's rope_traditional (else always False)
    zero_centred_norms: bool = False  # raw Hugging Face checkpoints store RMSNorm weights minus 1
    every_layer_moe: bool = False  # every layer routes (decoder_sparse_step / mlp_only_layers ignored)
    norm_topk_prob: bool = False  # the default of norm_topk_prob when the config omits it


_HYBRID = dict(hybrid=True, output_gate=True, partial_rotary=True, qk_norm=True, zero_centred_norms=True)
ARCHS = {
    arch.model_type: arch
    for arch in (
        Arch("qwen3_next", **_HYBRID),
        Arch(
            "qwen3_5_moe",
            text_config=True,
            split_in_proj=True,
            weight_prefix="language_model.",
            every_layer_moe=True,
            norm_topk_prob=True,
            **_HYBRID,
        ),
        Arch("qwen3_moe", qk_norm=True),
        Arch(
            "qwen2_moe",
            qkv_bias=True,
            head_dim_from_hidden=True,
            config_rope_traditional=True,
            every_layer_moe=True,
        ),
    )
}


@dataclass
class ModelArgs:
    """Everything the forward pass needs to know about a model's shape."""

    model_type: str  # a key of ARCHS
    hidden_size: int  # D
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int = 0  # 0: same as num_attention_heads
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # share of head_dim that rotary embedding turns
    rope_traditional: bool = False
    rope_scaling: dict | None = None  # only "default" / "linear" are supported
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o projections carry a bias (arch.qkv_bias overrides)
    intermediate_size: int = 0  # width of dense MLP layers
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # K
    moe_intermediate_size: int = 0  # I, each expert's width
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool | None = None  # renormalise the K routing weights to sum to 1 (None: arch default)
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    full_attention_interval: int = 0  # hybrid models: layer i is full attention when (i+1) % n == 0
    linear_num_key_heads: int = 0  # Gated DeltaNet key heads
    linear_num_value_heads: int = 0  # Gated DeltaNet value heads
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4  # depthwise causal conv width

    @property
    def arch(self) -> Arch:
        return ARCHS[self.model_type]

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        """Read a config.json dict; the architecture's row says where fields live and their defaults."""
        model_type = config.get("model_type")
        if model_type not in ARCHS:
            raise FlashMoeError(
                f"config.json: model_type {model_type!r} is not supported; flashmoe runs {', '.join(ARCHS)}"
            )
        arch = ARCHS[model_type]
        fields = dict(config.get("text_config") or config) if arch.text_config else dict(config)
        fields["model_type"] = model_type
        rope = fields.get("rope_parameters")
        if rope:  # newer configs keep rope settings here
            fields.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            fields.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
            fields.setdefault("rope_scaling", rope)  # its "type" decides the scaling, as rope_scaling's does
        if arch.hybrid:
            fields.setdefault("full_attention_interval", 4)
        known = {f.name for f in dataclasses.fields(cls)}
        required = [
            f
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [f.name for f in required if f.name not in fields]
        if missing:
            raise FlashMoeError(f"config.json: {model_type} needs {missing}, which are missing")
        _validate({k: v for k, v in fields.items() if k in known and v is not None}, model_type)
        args = cls(**{k: v for k, v in fields.items() if k in known and v is not None})
        args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
        if arch.head_dim_from_hidden or not args.head_dim:
            args.head_dim = args.hidden_size // args.num_attention_heads
        if args.norm_topk_prob is None:
            args.norm_topk_prob = arch.norm_topk_prob
        _check_derived(args)
        return args

    def is_linear_attention(self, layer: int) -> bool:
        """Gated DeltaNet layer (hybrid models) rather than full attention."""
        interval = self.full_attention_interval
        return self.arch.hybrid and interval > 0 and (layer + 1) % interval != 0

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer` routes to experts (else a dense MLP)."""
        if self.num_experts == 0:
            return False
        if self.arch.every_layer_moe:
            return True
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


MAX_DIM = 1 << 20  # widths, heads, experts: far above any real model, small enough that shapes never overflow
MAX_LAYERS = 4096
_POSITIVE = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")
_NON_NEGATIVE = (
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "full_attention_interval",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
)
_BOOLS = ("rope_traditional", "tie_word_embeddings", "attention_bias", "norm_topk_prob")


def _validate(fields: dict, model_type: str) -> None:
    """Types and ranges of every config.json field the engine uses; each error names the key."""

    def bad(key: str, want: str):
        raise FlashMoeError(f"config.json: {key} = {fields[key]!r:.80}; expected {want} ({model_type})")

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for key in _POSITIVE + _NON_NEGATIVE:
        if key in fields:
            low = 1 if key in _POSITIVE else 0
            high = MAX_LAYERS if key == "num_hidden_layers" else (1 << 24 if key == "vocab_size" else MAX_DIM)
            if not is_int(fields[key]) or not low <= fields[key] <= high:
                bad(key, f"an integer in [{low}, {high}]")
    for key in ("decoder_sparse_step", "linear_conv_kernel_dim"):
        if key in fields and (not is_int(fields[key]) or not 1 <= fields[key] <= MAX_DIM):
            bad(key, f"an integer in [1, {MAX_DIM}]")
    for key in _BOOLS:
        if key in fields and not isinstance(fields[key], bool):
            bad(key, "true or false")
    if "rms_norm_eps" in fields and (
        not is_number(fields["rms_norm_eps"]) or not 0 < fields["rms_norm_eps"] < 1
    ):
        bad("rms_norm_eps", "a finite number in (0, 1)")
    if "rope_theta" in fields and (not is_number(fields["rope_theta"]) or fields["rope_theta"] <= 0):
        bad("rope_theta", "a finite number > 0")
    if "partial_rotary_factor" in fields and (
        not is_number(fields["partial_rotary_factor"]) or not 0 < fields["partial_rotary_factor"] <= 1
    ):
        bad("partial_rotary_factor", "a number in (0, 1]")
    if "mlp_only_layers" in fields and (
        not isinstance(fields["mlp_only_layers"], list)
        or not all(is_int(i) and i >= 0 for i in fields["mlp_only_layers"])
    ):
        bad("mlp_only_layers", "a list of layer numbers")
    if "rope_scaling" in fields and not isinstance(fields["rope_scaling"], dict):
        bad("rope_scaling", "an object or null")
    experts = fields.get("num_experts", 0)
    if experts and "num_experts_per_tok" in fields and not 1 <= fields["num_experts_per_tok"] <= experts:
        bad("num_experts_per_tok", f"an integer in [1, num_experts={experts}]")


def _check_derived(args: ModelArgs) -> None:
    """Relations between fields, once defaults are filled in (head_dim, num_key_value_heads)."""
    where = f"({args.model_type})"
    if args.num_attention_heads % args.num_key_value_heads:
        raise FlashMoeError(
            f"config.json: num_attention_heads = {args.num_attention_heads} is not a multiple of "
            f"num_key_value_heads = {args.num_key_value_heads} {where}"
        )
    if args.head_dim < 1:
        raise FlashMoeError(
            f"config.json: head_dim = {args.head_dim} (hidden_size {args.hidden_size} / "
            f"num_attention_heads {args.num_attention_heads}); expected >= 1 {where}"
        )
    if args.arch.head_dim_from_hidden and args.hidden_size % args.num_attention_heads:
        raise FlashMoeError(
            f"config.json: hidden_size = {args.hidden_size} is not divisible by "
            f"num_attention_heads = {args.num_attention_heads} {where}"
        )
    if args.arch.partial_rotary and int(args.head_dim * args.partial_rotary_factor) % 2:
        raise FlashMoeError(
            f"config.json: partial_rotary_factor = {args.partial_rotary_factor} turns an odd number "
            f"of head_dim = {args.head_dim} dims; rotary needs an even number {where}"
        )
    if (
        args.arch.hybrid
        and args.linear_num_key_heads
        and args.linear_num_value_heads % args.linear_num_key_heads
    ):
        raise FlashMoeError(
            f"config.json: linear_num_value_heads = {args.linear_num_value_heads} is not a "
            f"multiple of linear_num_key_heads = {args.linear_num_key_heads} {where}"
        )


def param_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """name -> float (unquantized) shape of every tensor the Model takes, in mlx-lm's layout."""
    D, root = args.hidden_size, args.arch.weight_prefix
    shapes = {
        f"{root}model.embed_tokens.weight": (args.vocab_size, D),
        f"{root}model.norm.weight": (D,),
    }
    for i in range(args.num_hidden_layers):
        p = f"{root}model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (D,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (D,)
        shapes.update(
            _linear_attention(args, f"{p}.linear_attn")
            if args.is_linear_attention(i)
            else _attention(args, f"{p}.self_attn")
        )
        shapes.update(
            _moe(args, f"{p}.mlp") if args.is_moe(i) else _mlp(f"{p}.mlp", D, args.intermediate_size)
        )
    if not args.tie_word_embeddings:
        shapes[f"{root}lm_head.weight"] = (args.vocab_size, D)
    return shapes


def _attention(a: ModelArgs, p: str) -> dict:
    D, hd, H, H_kv = a.hidden_size, a.head_dim, a.num_attention_heads, a.num_key_value_heads
    gate = 2 if a.arch.output_gate else 1  # query and output gate per head
    shapes = {
        f"{p}.q_proj.weight": (gate * H * hd, D),
        f"{p}.k_proj.weight": (H_kv * hd, D),
        f"{p}.v_proj.weight": (H_kv * hd, D),
        f"{p}.o_proj.weight": (D, H * hd),
    }
    if a.arch.qk_norm:
        shapes.update({f"{p}.q_norm.weight": (hd,), f"{p}.k_norm.weight": (hd,)})
    if a.arch.qkv_bias or a.attention_bias:
        shapes.update(
            {f"{p}.{n}_proj.bias": (w,) for n, w in (("q", H * hd), ("k", H_kv * hd), ("v", H_kv * hd))}
        )
    if a.attention_bias and not a.arch.qkv_bias:
        shapes[f"{p}.o_proj.bias"] = (D,)
    return shapes


def _linear_attention(a: ModelArgs, p: str) -> dict:
    """Gated DeltaNet: input projections, depthwise conv, decay parameters, gated norm, output."""
    D, H_v = a.hidden_size, a.linear_num_value_heads
    key_dim = a.linear_num_key_heads * a.linear_key_head_dim  # H_k * d_k
    value_dim = H_v * a.linear_value_head_dim  # H_v * d_v
    if a.arch.split_in_proj:
        projections = {
            f"{p}.in_proj_qkv.weight": (2 * key_dim + value_dim, D),
            f"{p}.in_proj_z.weight": (value_dim, D),
            f"{p}.in_proj_b.weight": (H_v, D),
            f"{p}.in_proj_a.weight": (H_v, D),
        }
    else:
        projections = {
            f"{p}.in_proj_qkvz.weight": (2 * key_dim + 2 * value_dim, D),
            f"{p}.in_proj_ba.weight": (2 * H_v, D),
        }
    return {
        **projections,
        f"{p}.conv1d.weight": (2 * key_dim + value_dim, a.linear_conv_kernel_dim, 1),  # (C, W, 1)
        f"{p}.A_log": (H_v,),
        f"{p}.dt_bias": (H_v,),
        f"{p}.norm.weight": (a.linear_value_head_dim,),
        f"{p}.out_proj.weight": (D, value_dim),
    }


def _moe(a: ModelArgs, p: str) -> dict:
    D, E, I, S = (
        a.hidden_size,
        a.num_experts,
        a.moe_intermediate_size,
        a.shared_expert_intermediate_size,
    )
    shapes = {
        f"{p}.gate.weight": (E, D),
        f"{p}.switch_mlp.gate_proj.weight": (E, I, D),
        f"{p}.switch_mlp.up_proj.weight": (E, I, D),
        f"{p}.switch_mlp.down_proj.weight": (E, D, I),
    }
    if S:
        shapes.update(_mlp(f"{p}.shared_expert", D, S))
        shapes[f"{p}.shared_expert_gate.weight"] = (1, D)
    return shapes


def _mlp(p: str, D: int, width: int) -> dict:
    return {
        f"{p}.gate_proj.weight": (width, D),
        f"{p}.up_proj.weight": (width, D),
        f"{p}.down_proj.weight": (D, width),
    }
