"""Configuration of BilingualGlm: GLM-4 block hyper-parameters plus the GLM special-token ids.

This file ships as Hub remote code next to ``modeling_bilingual_glm.py``, so it imports only public
transformers API. Field names are transformers' standard ones (the same as ``GlmConfig``) so that the
conversion to and from native ``glm`` is a plain field copy.

The config is written with an explicit typed ``__init__`` rather than as a bare dataclass: transformers
5.x keeps a custom ``__init__`` on ``PreTrainedConfig`` subclasses, and 4.x only understands that form,
so one file serves every transformers version the exported folder must load in.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import PretrainedConfig

# Special tokens of the bilingual tokenizer, in id order: the presets' token ids are their positions here.
GLM_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[sMASK]",
    "[gMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<pad>",
)
# Config field → special token: the one table the tokenizer, the converters and the collators read.
SPECIAL_TOKEN_FIELDS: dict[str, str] = {
    "eos_token_id": "<|endoftext|>",
    "pad_token_id": "<pad>",
    "mask_token_id": "[MASK]",
    "smask_token_id": "[sMASK]",
    "gmask_token_id": "[gMASK]",
    "sop_token_id": "<sop>",
    "eop_token_id": "<eop>",
}
# The fields GLM adds to transformers' standard ones (native ``glm`` configs have none of these).
GLM_TOKEN_FIELDS: tuple[str, ...] = (
    "mask_token_id",
    "smask_token_id",
    "gmask_token_id",
    "sop_token_id",
    "eop_token_id",
)
_OWN_TOKEN_IDS: dict[str, Any] = {
    **{field: GLM_SPECIAL_TOKENS.index(token) for field, token in SPECIAL_TOKEN_FIELDS.items()},
    "bos_token_id": None,
}

# Named sizes. `tiny` is for CI (< 1M parameters); `mini` (~7M, tied embeddings) is train.py's default:
# on 2 CPU cores it learns more per training minute than `small` (~16M; benchmarks/vs_native.py); `base` is
# GLM-Base scale (~110M) and `glm-4-9b` THUDM's GLM-4-9B geometry and token ids (build it on the meta device).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        **_OWN_TOKEN_IDS,
    ),
    "mini": dict(
        vocab_size=16384,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        **_OWN_TOKEN_IDS,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        **_OWN_TOKEN_IDS,
    ),
    "base": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2304,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        **_OWN_TOKEN_IDS,
    ),
    "glm-4-9b": dict(
        vocab_size=151552,
        hidden_size=4096,
        intermediate_size=13696,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1.5625e-07,
        rope_theta=10000.0 * 500,
        tie_word_embeddings=False,
        eos_token_id=[151329, 151336, 151338],
        pad_token_id=151329,
        bos_token_id=None,
        mask_token_id=151330,
        gmask_token_id=151331,
        smask_token_id=151332,
        sop_token_id=151333,
        eop_token_id=151334,
    ),
    # GLM-4.5-Air's geometry (zai-org/GLM-4.5-Air config.json): meta device only (106B parameters).
    "glm-4.5-air": dict(
        vocab_size=151552,
        hidden_size=4096,
        intermediate_size=10944,
        num_hidden_layers=46,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        attention_bias=True,
        tie_word_embeddings=False,
        n_routed_experts=128,
        moe_intermediate_size=1408,
        num_experts_per_tok=8,
        n_shared_experts=1,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        use_qk_norm=False,
        rotary_interleaved=False,
        eos_token_id=[151329, 151336, 151338],
        pad_token_id=151329,
        bos_token_id=None,
        mask_token_id=151330,
        gmask_token_id=151331,
        smask_token_id=151332,
        sop_token_id=151333,
        eop_token_id=151334,
    ),
}

# The MoE presets: a dense preset with GLM-4.5's layers from the second on (top-2 of the routed experts + 1
# shared, qk-norm, glm4_moe's rotary layout, loss-free balancing). `moe-tiny` is CI's; `moe-mini` is train.py's
# CPU MoE: `mini`'s attention and vocabulary, 8 experts of 1/4 the dense width (active MLP width 3/4 of mini's).
_GLM45_LAYERS: dict[str, Any] = dict(
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    use_qk_norm=True,
    rotary_interleaved=False,
    router_bias_update_rate=1e-3,
)
PRESETS["moe-tiny"] = {**PRESETS["tiny"], **_GLM45_LAYERS, "n_routed_experts": 4, "moe_intermediate_size": 32}
PRESETS["moe-mini"] = {
    **PRESETS["mini"],
    **_GLM45_LAYERS,
    "n_routed_experts": 8,
    "moe_intermediate_size": 172,
}

# Mixture-of-Experts fields, named as transformers' ``Glm4MoeConfig`` names them (the converters copy them
# across); ``n_routed_experts=0``, our default, means no MoE: every layer dense, the model exactly ``glm``/``glm4``.
MOE_FIELDS: tuple[str, ...] = (
    "n_routed_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
    "n_shared_experts",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "norm_topk_prob",
    "use_qk_norm",
)

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
_TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", *GLM_TOKEN_FIELDS)
# The rope types transformers' native ``glm`` takes that this model applies (and tests against native).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


class BilingualGlmConfig(PretrainedConfig):
    r"""GLM-4 block + GLM blank infilling.

    Rotary layout of one head (``head_dim=8``, ``partial_rotary_factor=0.5`` → rotary dim 4)::

        dims   0 1 | 2 3 | 4 5 | 6 7
               pos pairs | block-pos pairs
               (GLM-4 interleaved convention: pairs are adjacent dims)

    The first ``head_dim * partial_rotary_factor`` dims are rotated by the token position, the next as many
    by the GLM block position (0 outside Part B spans, so they pass through unchanged, exactly as in GLM-4).

    ``sandwich_norms=True`` is the GLM-4-0414 block (transformers' ``glm4``): two more RMSNorms per layer,
    each on a sublayer's output before its residual add. Off by default, so ``glm`` checkpoints and every
    folder saved before the field existed load unchanged.
    """

    model_type = "bilingual_glm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Native ``GlmConfig``'s plans, entry for entry (same module names): ``from_pretrained(tp_plan="auto")``
    # shards q/k/v and gate_up by columns, o/down by rows; gate_up is gathered because ``chunk`` splits it.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_up_proj": "colwise_gather_output",
        "layers.*.mlp.down_proj": "rowwise_split_input",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        # sizes
        vocab_size: int = 1024,
        hidden_size: int = 64,
        intermediate_size: int = 172,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = 2,
        head_dim: int | None = None,
        max_position_embeddings: int = 512,
        # block details
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-5,
        attention_bias: bool = True,
        attention_dropout: float = 0.0,
        sandwich_norms: bool = False,
        use_qk_norm: bool = False,
        # mixture of experts (``glm4_moe``'s names; ``n_routed_experts=0``: dense)
        n_routed_experts: int = 0,
        moe_intermediate_size: int = 1408,
        num_experts_per_tok: int = 8,
        n_shared_experts: int = 1,
        routed_scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        first_k_dense_replace: int = 1,
        norm_topk_prob: bool = True,
        router_bias_update_rate: float = 0.0,
        router_aux_loss_coef: float = 0.0,
        # rotary (``rope_parameters`` wins over the two flat fields, which older folders carry)
        rope_theta: float = 10000.0,
        partial_rotary_factor: float = 0.5,
        rotary_interleaved: bool = True,
        rope_parameters: dict[str, Any] | None = None,
        # init / heads / cache
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        # token ids (GLM specials included)
        pad_token_id: int | None = _OWN_TOKEN_IDS["pad_token_id"],
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = _OWN_TOKEN_IDS["eos_token_id"],
        mask_token_id: int | None = _OWN_TOKEN_IDS["mask_token_id"],
        smask_token_id: int | None = _OWN_TOKEN_IDS["smask_token_id"],
        gmask_token_id: int | None = _OWN_TOKEN_IDS["gmask_token_id"],
        sop_token_id: int | None = _OWN_TOKEN_IDS["sop_token_id"],
        eop_token_id: int | None = _OWN_TOKEN_IDS["eop_token_id"],
        **kwargs: Any,
    ) -> None:
        # transformers 5 keeps theta and the scaling in one ``rope_parameters`` dict; 4.x configs and folders
        # saved before it existed carry ``rope_theta`` / ``partial_rotary_factor`` / ``rope_scaling`` instead.
        self.rope_parameters = rope_parameters_from(
            rope_parameters or kwargs.pop("rope_scaling", None),
            rope_theta,
            partial_rotary_factor,
            max_position_embeddings,
        )
        kwargs.pop("rope_scaling", None)
        self._validate_rope_parameters()  # before transformers 5's own check, which raises KeyError
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else _safe_div(hidden_size, num_attention_heads)
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.sandwich_norms = sandwich_norms
        self.use_qk_norm = use_qk_norm
        self.n_routed_experts = n_routed_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.router_bias_update_rate = router_bias_update_rate
        self.router_aux_loss_coef = router_aux_loss_coef
        self.rotary_interleaved = rotary_interleaved
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.smask_token_id = smask_token_id
        self.gmask_token_id = gmask_token_id
        self.sop_token_id = sop_token_id
        self.eop_token_id = eop_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_bilingual_glm()

    @property
    def rope_theta(self) -> float:
        """RoPE base, kept in ``rope_parameters`` (transformers 5); the flat name stays for old code."""
        return self.rope_parameters["rope_theta"]

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters["rope_theta"] = value

    @property
    def partial_rotary_factor(self) -> float:
        """Fraction of each head rotated by the token position (as much again by the block position)."""
        return self.rope_parameters["partial_rotary_factor"]

    @partial_rotary_factor.setter
    def partial_rotary_factor(self, value: float) -> None:
        self.rope_parameters["partial_rotary_factor"] = value

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """transformers 4.x's name for the scaling dict (its rope functions read ``factor`` there)."""
        return None if self.rope_parameters["rope_type"] == "default" else self.rope_parameters

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        self.rope_parameters = rope_parameters_from(
            value, self.rope_theta, self.partial_rotary_factor, self.max_position_embeddings
        )

    @property
    def is_moe(self) -> bool:
        """Mixture-of-Experts layers from ``first_k_dense_replace`` on (``glm4_moe``); else every layer dense."""
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    @property
    def rotary_dim(self) -> int:
        """Dims of each head rotated by the token position (the same number again by block position)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def validate_bilingual_glm(self) -> None:
        """Raise ``ValueError`` naming the first bad field, so a typo fails here and not deep in torch."""
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        rotary = self.head_dim * self.partial_rotary_factor
        if rotary != int(rotary) or int(rotary) % 2:
            raise ValueError(
                f"partial_rotary_factor: head_dim ({self.head_dim}) * partial_rotary_factor "
                f"({self.partial_rotary_factor}) = {rotary} must be an even integer (rotary dims come in pairs)"
            )
        for name, low in (("rms_norm_eps", 0.0), ("rope_theta", 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > low:
                raise ValueError(f"{name} must be a number > {low}, got {value!r}")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ValueError(f"initializer_range must be >= 0, got {self.initializer_range!r}")
        if not isinstance(self.attention_dropout, (int, float)) or not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        for name in ("sandwich_norms", "use_qk_norm", "rotary_interleaved", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._validate_moe()
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (GLM-4's SwiGLU), got {self.hidden_act!r}")
        self._validate_rope_parameters()
        self._drop_token_ids_outside_vocab()

    def _validate_moe(self) -> None:
        """The routed-expert geometry ``glm4_moe``'s router can run: groups of >= 2 experts, k experts reachable."""
        experts = self.n_routed_experts
        if isinstance(experts, bool) or not isinstance(experts, int) or experts < 0:
            raise ValueError(f"n_routed_experts must be an integer >= 0 (0: no MoE), got {experts!r}")
        for name, low in (("router_bias_update_rate", 0.0), ("router_aux_loss_coef", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ValueError(f"{name} must be a number >= {low}, got {value!r}")
        if not experts:
            return
        for name, low, high in (
            ("moe_intermediate_size", 1, None),
            ("n_shared_experts", 0, None),
            ("n_group", 1, experts),
            ("num_experts_per_tok", 1, experts),
            ("topk_group", 1, self.n_group),
            ("first_k_dense_replace", 0, self.num_hidden_layers),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < low
                or (high and value > high)
            ):
                bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
        if experts % self.n_group or experts // self.n_group < 2:
            raise ValueError(
                f"n_group ({self.n_group}) must divide n_routed_experts ({experts}) into groups of >= 2 experts "
                "(a group is scored by its two best experts)"
            )
        if self.num_experts_per_tok > self.topk_group * (experts // self.n_group):
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in topk_group "
                f"({self.topk_group}) groups of {experts // self.n_group}"
            )
        scale = self.routed_scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"routed_scaling_factor must be a number > 0, got {scale!r}")

    def _validate_rope_parameters(self) -> None:
        rope = self.rope_parameters
        if rope["rope_type"] not in ROPE_TYPES:
            raise ValueError(
                f"rope_parameters.rope_type must be one of {ROPE_TYPES}, got {rope['rope_type']!r}"
            )
        if rope["rope_type"] != "default":
            factor = rope.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1.0:
                raise ValueError(
                    f"rope_parameters.factor must be a number >= 1 for {rope['rope_type']!r}, got {factor!r}"
                )
        if rope["rope_type"] == "yarn":
            original = rope.get("original_max_position_embeddings")
            if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
                raise ValueError(
                    f"rope_parameters.original_max_position_embeddings must be a positive integer, got {original!r}"
                )

    def _drop_token_ids_outside_vocab(self) -> None:
        """Ids must be non-negative integers (else ``ValueError``); ids ``>= vocab_size`` are dropped with a warning.

        Dropped, not refused: ``resize_token_embeddings`` to a smaller vocabulary (and every config rebuilt from
        it) must work, and an id the embedding no longer has cannot be used anyway."""
        dropped = []
        for name in _TOKEN_ID_FIELDS:
            value = getattr(self, name, None)
            ids = list(value) if isinstance(value, (list, tuple)) else [value]
            for token_id in ids:
                if token_id is not None and (
                    isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0
                ):
                    raise ValueError(f"{name} must be None or a non-negative integer id, got {value!r}")
            kept = [token_id for token_id in ids if token_id is None or token_id < self.vocab_size]
            if len(kept) == len(ids):
                continue
            dropped.append(f"{name}={value!r}")
            if isinstance(value, (list, tuple)):
                setattr(self, name, kept or None)
            else:
                setattr(self, name, None)
        if dropped:
            warnings.warn(
                f"special token ids outside the vocabulary (vocab_size={self.vocab_size}) dropped from the config: "
                + ", ".join(dropped),
                stacklevel=3,
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BilingualGlmConfig:
        """Build a named size (``tiny``, ``small``, ``base``, ``glm-4-9b``), any field overridable."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})


def rope_parameters_from(
    given: dict[str, Any] | None,
    rope_theta: float,
    partial_rotary_factor: float,
    max_position_embeddings: int,
) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` from any saved form: a 5.x dict, a 4.x ``rope_scaling`` dict
    (``type`` or ``rope_type``, theta and factor beside it), or nothing (folders from before either)."""
    rope = dict(given or {})
    legacy_type = rope.pop("type", "default")
    rope.setdefault("rope_type", legacy_type)
    rope.setdefault("rope_theta", rope_theta)
    rope.setdefault("partial_rotary_factor", partial_rotary_factor)
    if rope["rope_type"] == "yarn":
        rope.setdefault("original_max_position_embeddings", max_position_embeddings)
    return rope


def _safe_div(numerator: Any, denominator: Any) -> Any:
    """hidden_size // num_attention_heads, leaving bad values for validation to name."""
    if isinstance(numerator, int) and isinstance(denominator, int) and denominator > 0:
        if numerator % denominator:
            raise ValueError(
                f"head_dim: hidden_size ({numerator}) is not divisible by num_attention_heads ({denominator}); "
                "set head_dim explicitly"
            )
        return numerator // denominator
    return denominator


__all__ = [
    "BilingualGlmConfig",
    "GLM_SPECIAL_TOKENS",
    "MOE_FIELDS",
    "GLM_TOKEN_FIELDS",
    "PRESETS",
    "ROPE_TYPES",
    "SPECIAL_TOKEN_FIELDS",
]
