"""`CogAgentConfig`: the official `config.json` of CogAgent / GLM-4V-9B, as a transformers config.

The official checkpoint (`THUDM/cogagent-9b-20241220`, architecture of `THUDM/glm-4v-9b`) describes
its language model with top-level fields (`num_layers`, `hidden_size`, `kv_channels`, ...) and its
EVA2-CLIP vision tower with a nested `vision_config` dictionary. This class reads and writes exactly
those names (model_type `chatglm`), so a checkpoint directory round-trips unchanged; fields it does
not know are kept as attributes and written back. In Python the vision block is a typed, frozen
`VisionConfig` (`config.vision_config.image_size`); in config.json it stays the official nested dict.

Everything the model derives from the config (KV heads, head widths, rotary frequencies, patch grid,
number of image tokens) is computed here, in one place, as read-only properties or methods. A config
that cannot describe a working model (for example `num_positions` that does not match the patch grid)
fails loudly when it is built.

Sources: the `config.json` files of THUDM/cogagent-9b-20241220 and THUDM/glm-4v-9b on the Hugging Face
hub, and the GLM-4V hub code (`modeling_chatglm.py`, `visual.py`). Summary with section numbers: `docs/MODEL_SPEC.md` §1. Where a value could not be confirmed,
the choice is an explicit field with a documented default (`rotary_percent`, `rope_table_dtype`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from transformers import PretrainedConfig

from cogagent_nb.data.bpe import SPECIAL_TOKENS, TINY_N_RANKS

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The `vision_config` block of config.json: the EVA2-CLIP-E tower, field names as in the file.

    Defaults are the tower of GLM-4V-9B (hub config of THUDM/glm-4v-9b; CogAgent's block was not
    published and is assumed identical). Frozen, so that the derived sizes below cannot drift from
    the fields after the config was checked; change a field with `merged({...})`.
    Keys of the JSON block that this package does not read are kept in `extra` and written back.
    """

    dropout_prob: float = 0.0
    hidden_act: str = "gelu"
    in_channels: int = 3
    num_hidden_layers: int = 63
    hidden_size: int = 1792
    patch_size: int = 14
    num_heads: int = 16
    intermediate_size: int = 15360
    layer_norm_eps: float = 1e-06
    num_positions: int = 6401
    image_size: int = 1120
    scaling_factor: float = 8
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, block: Mapping[str, Any]) -> VisionConfig:
        """Read the JSON block; absent fields take the defaults (the 9B tower), unknown ones go to `extra`."""
        if not isinstance(block, Mapping):
            raise TypeError(f"vision_config: expected a dict (the config.json block), got {type(block).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {key: value for key, value in block.items() if key not in known}
        return cls(**{key: value for key, value in block.items() if key in known}, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The block as config.json holds it (the official keys, then the unknown ones as read)."""
        block = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**block, **copy.deepcopy(dict(self.extra))}

    def merged(self, overrides: Mapping[str, Any]) -> VisionConfig:
        """A copy with `overrides` applied on top of these values (a partial dict is fine).

        `num_positions` (patches + 1 cls token) follows a changed `image_size` or `patch_size` unless the
        overrides set it too, since no other value would describe a working tower.
        """
        values = {**self.to_dict(), **overrides}
        grid_changed = "image_size" in overrides or "patch_size" in overrides
        if grid_changed and "num_positions" not in overrides:
            values["num_positions"] = (values["image_size"] // values["patch_size"]) ** 2 + 1
        return VisionConfig.from_dict(values)

    # ---- derived sizes ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads  # 112 on the 9B

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size  # 80 on the 9B

    @property
    def num_patches(self) -> int:
        """Patch tokens entering the ViT (without the cls token)."""
        return self.patches_per_side**2

    @property
    def num_image_tokens(self) -> int:
        """Image tokens after the 2x2 conv: (image_size // patch_size // 2) ** 2 (1600 on the 9B)."""
        return (self.patches_per_side // 2) ** 2

    def problems(self) -> list[str]:
        """Why these values cannot describe a working tower ([] when they can)."""
        problems = []
        if self.image_size % self.patch_size:
            problems.append(
                f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.patches_per_side % 2:
            side = self.patches_per_side
            problems.append(f"vision_config: the patch grid ({side}x{side}) must have an even side for the 2x2 conv")
        if self.num_positions != self.num_patches + 1:
            problems.append(
                f"vision_config.num_positions ({self.num_positions}) must equal patches + 1 "
                f"(({self.image_size} // {self.patch_size})**2 + 1 = {self.num_patches + 1})"
            )
        if self.hidden_size % self.num_heads:
            problems.append(
                f"vision_config.hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return problems

    def __getitem__(self, key: str) -> Any:
        raise TypeError(
            f"vision_config is a VisionConfig, not a dict: read config.vision_config.{key} "
            "(config.vision_config.to_dict() gives the config.json block)"
        )


EVA2_CLIP_E = VisionConfig()
"""The EVA2-CLIP-E tower of GLM-4V-9B (and, assumed, of CogAgent-9B)."""

ROPE_TABLE_DTYPES: tuple[str, ...] = ("auto", "float32", "model")


class CogAgentConfig(PretrainedConfig):
    """The GLM-4V-9B / CogAgent configuration, field names as in the official `config.json`.

    Defaults are the values of `THUDM/cogagent-9b-20241220` (its hub `config.json`). Use
    `CogAgentConfig.from_preset(name)` for the named presets in `PRESETS`.

    Two fields are this project's, for values the public sources do not confirm:

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
    # Special tokens (config.json; ids = BPE ranks + position in SPECIAL_TOKENS, tokenization_chatglm.py).
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = 151329
    boi_token_id: int = 151339
    eoi_token_id: int = 151340
    # The vision tower: a VisionConfig in Python, the official nested dict in config.json.
    vision_config: VisionConfig | dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.eos_token_id is None:
            self.eos_token_id = [151329, 151336, 151338]
        if not isinstance(self.vision_config, VisionConfig):
            self.vision_config = VisionConfig.from_dict(self.vision_config or {})  # absent fields: the 9B tower
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

    def rotary_inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """RoPE inverse frequencies base^(-2i / rotary_dim), i < rotary_dim / 2, in fp32 ([32] on the 9B).

        The one place they are computed: the model recomputes them on every forward, as the hub code
        does (GLM-4 `RotaryEmbedding`), and GLM-4 checkpoints also store them as
        `transformer.rotary_pos_emb.inv_freq`, which `save_pretrained` writes and loading ignores.
        """
        import torch

        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.rope_base ** (exponent / self.rotary_dim))

    @property
    def vision_head_dim(self) -> int:
        return self.vision_config.head_dim

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.patches_per_side

    @property
    def num_patches(self) -> int:
        """Patch tokens entering the ViT (without the cls token)."""
        return self.vision_config.num_patches

    @property
    def num_image_tokens(self) -> int:
        """Image tokens after the 2x2 conv: (image_size // patch_size // 2) ** 2 (1600 on the real model)."""
        return self.vision_config.num_image_tokens

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    def to_dict(self) -> dict[str, Any]:
        """The transformers serialisation, with `vision_config` written as the official nested dict."""
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        return output

    # ---- validation ---------------------------------------------------------------------------------
    def check_consistency(self) -> None:
        """Raise ValueError naming the field when the config cannot describe a working model."""
        problems: list[str] = list(self.vision_config.problems())
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
        """Build a named preset (see `PRESETS`); keyword overrides replace top-level fields.

        A `vision_config` override may be partial: a dict is merged onto the *preset's* own vision
        values (`VisionConfig.merged`), so `from_preset("tiny", vision_config={"hidden_size": 128})`
        is the tiny tower with a wider hidden size, not the 9B tower. A `VisionConfig` replaces it whole.
        """
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        fields = copy.deepcopy(PRESETS[name]["fields"])
        vision = overrides.pop("vision_config", None)
        fields.update(overrides)
        if isinstance(vision, VisionConfig):
            fields["vision_config"] = vision
        elif vision is not None:
            fields["vision_config"] = fields.get("vision_config", EVA2_CLIP_E).merged(vision)
        return cls(**fields)


TINY_VISION = EVA2_CLIP_E.merged(
    {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "intermediate_size": 128,
        "image_size": 224,
        "readable_init": True,
    }
)
"""The tiny vision tower: the 9B's at CPU size, with the official `scaling_factor` 8.

`readable_init` (a project key, kept in `extra`, read only by `_init_weights`) starts the tower so that
*where* a patch lies reaches the language model: smooth 2-D patch positions, identity-start layers, a
fan-in adapter (`cogagent_nb.model.tiny_init`; figures in docs/BENCHMARKS.md, issue 10). With it the image
vectors enter the language model at norm ~0.35, the text embeddings' scale (0.23), under the official
division by 8; the 9B, whose weights come from its checkpoint, has no such key.
"""


def vocabulary_fields(n_ranks: int, *, multiple: int = 64) -> dict[str, Any]:
    """Config fields that tie a model to a tokenizer with `n_ranks` BPE ranks.

    GLM-4 numbers its 14 special tokens after the BPE ranks (`tokenization_chatglm.py`), so every special id
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
        "source": "huggingface.co/THUDM/cogagent-9b-20241220 config.json (vision block "
        "assumed equal to glm-4v-9b, rotary_percent assumed 0.5)",
        "fields": {"architectures": ["ChatGLMForConditionalGeneration"]},
    },
    "glm-4v-9b": {
        "source": "huggingface.co/THUDM/glm-4v-9b config.json",
        "fields": {
            "architectures": ["ChatGLMModel"],
            "original_rope": True,
            "layernorm_epsilon": 1.5625e-07,
        },
    },
    "tiny": {
        "source": "this project: the 9B architecture at CPU size (GQA 4:2, half-rotary RoPE, post-norm "
        "EVA2-CLIP, 2x2 conv, GLU adapter, boi/eoi); vocabulary of the tiny tokenizer (768 ranks, digits as "
        "single tokens, + 14 specials at 768-781, padded to 832); image scale and position init for "
        "training from scratch (TINY_VISION)",
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
            "vision_config": TINY_VISION,
        },
    },
}
