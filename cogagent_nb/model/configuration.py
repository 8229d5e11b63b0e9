"""`CogAgentConfig`: the official `config.json` of CogAgent / GLM-4V-9B, as a transformers config.

The official checkpoint (`THUDM/cogagent-9b-20241220`, architecture of `THUDM/glm-4v-9b`) describes
its language model with top-level fields (`num_layers`, `hidden_size`, `kv_channels`, ...) and its
EVA2-CLIP vision tower with a nested `vision_config` dictionary. This class reads and writes exactly
those names (model_type `chatglm`), so a checkpoint directory round-trips unchanged; fields it does
not know are kept as attributes and written back.

Everything the model derives from the config (head widths, patch grid, number of image tokens) is
computed here, in one place, as read-only properties. A config that cannot describe a working model
(for example `num_positions` that does not match the patch grid) fails loudly when it is built.

Reference: `shared/reference/cogagent-9b-architecture.md` §1. Where the reference says UNCONFIRMED,
the choice is an explicit field with a documented default (`rotary_percent`, `rope_table_dtype`).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from transformers import PretrainedConfig

from cogagent_nb.data.bpe import SPECIAL_TOKENS, TINY_N_RANKS

# The EVA2-CLIP-E tower of GLM-4V-9B (hub config of THUDM/glm-4v-9b; CogAgent's block was not visible
# and is assumed identical, reference §1.2).
EVA2_CLIP_E: dict[str, Any] = {
    "dropout_prob": 0.0,
    "hidden_act": "gelu",
    "in_channels": 3,
    "num_hidden_layers": 63,
    "hidden_size": 1792,
    "patch_size": 14,
    "num_heads": 16,
    "intermediate_size": 15360,
    "layer_norm_eps": 1e-06,
    "num_positions": 6401,
    "image_size": 1120,
    "scaling_factor": 8,
}

VISION_KEYS: tuple[str, ...] = tuple(EVA2_CLIP_E)

ROPE_TABLE_DTYPES: tuple[str, ...] = ("auto", "float32", "model")


class CogAgentConfig(PretrainedConfig):
    """The GLM-4V-9B / CogAgent configuration, field names as in the official `config.json`.

    Defaults are the values of `THUDM/cogagent-9b-20241220` (reference §1.1). Use
    `CogAgentConfig.from_preset(name)` for the named presets in `PRESETS`.

    Two fields are this project's, for choices the reference marks UNCONFIRMED:

    - `rotary_percent` (default 0.5): the fraction of each head's dimensions that RoPE rotates. The hub
      code hard-codes one half (`RotaryEmbedding(kv_channels // 2)`); CogAgent's config carries the
      field with an invisible value, most probably 0.5.
    - `rope_table_dtype` (default "auto"): the dtype of the cos/sin table. "auto" follows the hub:
      with `original_rope` true the fp32 table is cast to the model's half dtype (bf16/fp16) and the
      rotation runs in that dtype; with `original_rope` false the table stays fp32, the rotation is
      computed in fp32 and rounded once to the model dtype. "float32" and "model" force one behaviour
      for both styles. In fp32 all three are identical.
    """

    model_type = "chatglm"
    # Standard transformers names (used by generate, PEFT, caches) mapped onto the official ones.
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers",
        "vocab_size": "padded_vocab_size",
        "head_dim": "kv_channels",
        "intermediate_size": "ffn_hidden_size",
        "rms_norm_eps": "layernorm_epsilon",
    }

    # Language model (top level of config.json), defaults = cogagent-9b-20241220.
    num_layers: int = 40
    padded_vocab_size: int = 151552
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 8192
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None
    layernorm_epsilon: float = 1e-05
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    bias_dropout_fusion: bool = True
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    original_rope: bool = False
    rope_ratio: float = 1
    rotary_percent: float = 0.5
    rope_table_dtype: str = "auto"
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    # Special tokens (reference §1.1, §5.2).
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = 151329
    boi_token_id: int = 151339
    eoi_token_id: int = 151340
    # The vision tower, a plain dict exactly as in config.json.
    vision_config: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.eos_token_id is None:
            self.eos_token_id = [151329, 151336, 151338]
        vision = dict(EVA2_CLIP_E)
        vision.update(self.vision_config or {})
        self.vision_config = vision
        if not self.architectures:
            self.architectures = ["ChatGLMForConditionalGeneration"]
        super().__post_init__(**kwargs)
        self.check_consistency()

    # ---- derived fields: the only place where widths and counts are computed ------------------------
    @property
    def num_key_value_heads(self) -> int:
        """KV heads: `multi_query_group_num` under GQA, else one per query head."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.kv_channels

    @property
    def qkv_width(self) -> int:
        """Output width of the fused `query_key_value` projection: Q, then K, then V."""
        return self.q_width + 2 * self.kv_width

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (64 of 128 on the real model)."""
        return int(self.kv_channels * self.rotary_percent)

    @property
    def rope_base(self) -> float:
        return 10000 * self.rope_ratio

    @property
    def vision_head_dim(self) -> int:
        return self.vision_config["hidden_size"] // self.vision_config["num_heads"]

    @property
    def patches_per_side(self) -> int:
        return self.vision_config["image_size"] // self.vision_config["patch_size"]

    @property
    def num_patches(self) -> int:
        """Patch tokens entering the ViT (without the cls token)."""
        return self.patches_per_side**2

    @property
    def num_image_tokens(self) -> int:
        """Image tokens after the 2x2 conv: (image_size // patch_size // 2) ** 2 (1600 on the real model)."""
        return (self.patches_per_side // 2) ** 2

    @property
    def image_size(self) -> int:
        return self.vision_config["image_size"]

    # ---- validation ---------------------------------------------------------------------------------
    def check_consistency(self) -> None:
        """Raise ValueError naming the field when the config cannot describe a working model."""
        v = self.vision_config
        missing = [key for key in VISION_KEYS if key not in v]
        if missing:
            raise ValueError(f"vision_config: missing field(s) {missing}")
        problems: list[str] = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"multi_query_group_num ({self.num_key_value_heads})"
            )
        rotated = self.kv_channels * self.rotary_percent
        if not 0 < self.rotary_percent <= 1 or rotated != int(rotated) or int(rotated) % 2:
            problems.append(
                f"rotary_percent ({self.rotary_percent}) x kv_channels ({self.kv_channels}) must give an even "
                "whole number of rotated dimensions"
            )
        if self.rope_table_dtype not in ROPE_TABLE_DTYPES:
            problems.append(f"rope_table_dtype ({self.rope_table_dtype!r}) must be one of {ROPE_TABLE_DTYPES}")
        if v["image_size"] % v["patch_size"]:
            problems.append(
                f"vision_config.image_size ({v['image_size']}) must be a multiple of patch_size ({v['patch_size']})"
            )
        if self.patches_per_side % 2:
            problems.append(
                f"vision_config: the patch grid ({self.patches_per_side}x{self.patches_per_side}) must have an "
                "even side for the 2x2 conv"
            )
        if v["num_positions"] != self.num_patches + 1:
            problems.append(
                f"vision_config.num_positions ({v['num_positions']}) must equal patches + 1 "
                f"(({v['image_size']} // {v['patch_size']})**2 + 1 = {self.num_patches + 1})"
            )
        if v["hidden_size"] % v["num_heads"]:
            problems.append(
                f"vision_config.hidden_size ({v['hidden_size']}) must be a multiple of num_heads ({v['num_heads']})"
            )
        if self.boi_token_id == self.eoi_token_id:
            problems.append(f"boi_token_id and eoi_token_id are equal ({self.boi_token_id})")
        for name in ("boi_token_id", "eoi_token_id"):
            if not 0 <= getattr(self, name) < self.padded_vocab_size:
                problems.append(f"{name} ({getattr(self, name)}) outside the vocabulary ({self.padded_vocab_size})")
        if problems:
            raise ValueError("inconsistent CogAgentConfig: " + "; ".join(problems))

    # ---- presets --------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CogAgentConfig:
        """Build a named preset (see `PRESETS`); keyword overrides replace top-level fields."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        fields = copy.deepcopy(PRESETS[name]["fields"])
        fields.update(overrides)
        return cls(**fields)


def _tiny_vision() -> dict[str, Any]:
    """The tiny vision tower. Two values differ from the 9B on purpose (issue 10, docs/BENCHMARKS.md):

    - `scaling_factor` 0.125 instead of 8: the official division by 8 suits trained 9B weights; on a
      random tiny model it made the image vectors entering the language model ~50x smaller than the
      text embeddings (norm 0.005 against 0.23), and the model learnt to ignore the screenshot.
      With 0.125 they start at norm ~0.3, the text's scale.
    - `position_embedding_std` 0.3 (a project key, read only by `_init_weights`): patch positions start
      as large as patch contents, so a vector says *where* as clearly as *what*.
    """
    return {
        **EVA2_CLIP_E,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "intermediate_size": 128,
        "image_size": 224,
        "num_positions": (224 // 14) ** 2 + 1,
        "scaling_factor": 0.125,
        "position_embedding_std": 0.3,
    }


def vocabulary_fields(n_ranks: int, *, multiple: int = 64) -> dict[str, Any]:
    """Config fields that tie a model to a tokenizer with `n_ranks` BPE ranks.

    GLM-4 numbers its 14 special tokens after the BPE ranks (reference §5.2), so every special id
    follows from the rank count; the embedding rows are padded up to a multiple of `multiple`
    (151552 = 2368 x 64 on the real model).
    """
    special = {token: n_ranks + i for i, token in enumerate(SPECIAL_TOKENS)}
    return {
        "padded_vocab_size": -(-(n_ranks + len(SPECIAL_TOKENS)) // multiple) * multiple,
        "eos_token_id": [special["<|endoftext|>"], special["<|user|>"], special["<|observation|>"]],
        "pad_token_id": special["<|endoftext|>"],
        "boi_token_id": special["<|begin_of_image|>"],
        "eoi_token_id": special["<|end_of_image|>"],
    }


# Named presets: the fields (as in config.json) and where the values come from.
PRESETS: dict[str, dict[str, Any]] = {
    "cogagent-9b-20241220": {
        "source": "huggingface.co/THUDM/cogagent-9b-20241220 config.json (reference §1.1; vision block "
        "assumed equal to glm-4v-9b, rotary_percent assumed 0.5)",
        "fields": {"architectures": ["ChatGLMForConditionalGeneration"]},
    },
    "glm-4v-9b": {
        "source": "huggingface.co/THUDM/glm-4v-9b config.json (reference §1.1-1.2)",
        "fields": {
            "architectures": ["ChatGLMModel"],
            "original_rope": True,
            "layernorm_epsilon": 1.5625e-07,
        },
    },
    "tiny": {
        "source": "this project: the 9B architecture at CPU size (GQA 4:2, half-rotary RoPE, post-norm "
        "EVA2-CLIP, 2x2 conv, GLU adapter, boi/eoi); vocabulary of the tiny tokenizer (768 ranks, "
        "digits as single tokens, + 14 specials at 768-781, padded to 832)",
        "fields": {
            "architectures": ["ChatGLMForConditionalGeneration"],
            "num_layers": 2,
            "hidden_size": 128,
            "ffn_hidden_size": 256,
            "kv_channels": 32,
            "num_attention_heads": 4,
            "multi_query_group_num": 2,
            "seq_length": 2048,
            "original_rope": False,
            "layernorm_epsilon": 1e-05,
            **vocabulary_fields(TINY_N_RANKS),
            "torch_dtype": "float32",
            "vision_config": _tiny_vision(),
        },
    },
}
