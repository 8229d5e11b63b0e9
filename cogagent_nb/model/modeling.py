"""The CogAgent / GLM-4V-9B model, read top to bottom like the architecture diagram.

Upstream: the remote code of `THUDM/glm-4v-9b` (`modeling_chatglm.py`, `visual.py`), which
`THUDM/cogagent-9b-20241220` shares, and the GLM-4 / CogAgent papers (arXiv 2406.12793, 2312.08914).
This is a re-implementation written from the facts in `docs/MODEL_SPEC.md`, checked
against logits of the official code (`tests/test_modeling.py`). Module names equal the keys of the
official safetensors, so loading is a key-by-key copy; the only checkpoint key without a module,
`transformer.rotary_pos_emb.inv_freq`, is accepted and ignored (the table is recomputed, as the hub does).

Notable features, in the order of this file:
- RMSNorm computed in fp32 and multiplied by its weight in fp32, rounded once to the input dtype.
- Rotary position embedding on the first half of each head only (64 of 128 dims), in two styles:
  `original_rope` true (glm-4v-9b, interleaved pairs, table cast to bf16/fp16) and false (CogAgent,
  rotate-half pairs inside the rotated half, table in fp32).
- Grouped-query attention: 32 query heads share 2 KV heads; fused QKV with bias, no other biases;
  attention through `torch.nn.functional.scaled_dot_product_attention` (flash kernels on GPU).
- SwiGLU MLP with a fused gate/up projection (`dense_h_to_4h`).
- The EVA2-CLIP-E vision tower with *sublayer-output* LayerNorms (x + LN(Attn(x)), misleadingly named
  `input_layernorm` / `post_attention_layernorm`), no final norm.
- A 2x2 stride-2 conv that turns the 80x80 patch grid into 40x40 = 1600 image tokens, a GLU adapter
  into the language width, learned boi/eoi vectors, everything divided by `scaling_factor` 8.
- The splice: the three ids boi, placeholder, eoi are replaced by boi + 1600 image vectors + eoi, and
  all 1600 image vectors share one RoPE position, so an image costs 3 positions but 1602 cache slots.
- A transformers `Cache` for generation; the vision tower and the splice run once, at prefill, and the
  image marker ids are never generated (`ImageMarkerSuppressor`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from cogagent_nb.data.encoding import IGNORE_INDEX
from cogagent_nb.model import tiny_init
from cogagent_nb.model.configuration import CogAgentConfig, VisionConfig

# transformers 5.24 renamed the cache field of model outputs from `past_key_values` to `cache`; 5.17 to
# 5.23 (what GPU images ship today) still use the old name. This is the one place that knows.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class Speedups:
    """Switches for the memory and speed measures of docs/BENCHMARKS.md; on by default where they paid.

    They change no result beyond rounding (tests/test_modeling.py and the GPU parity check of
    benchmarks/bench_gpu.py); they exist as switches only so that a benchmark can measure each
    one's before and after in the same run. Users leave them alone.

    - supervised_loss: with `labels`, the language-model head runs only at supervised positions,
      chunk by chunk, each chunk recomputed in backward (`supervised_lm_loss`), instead of
      materialising (B, L, 151,552) logits and their fp32 copy.
    - frozen_vision_no_grad: a vision tower with no trainable parameter runs under `no_grad`.
    - expand_kv_with_mask (off): with an explicit attention mask, repeat K/V to the query heads instead
      of passing `enable_gqa`. Older PyTorch served `enable_gqa` + a mask only with the math kernel;
      on PyTorch 2.11 / H200 the grouped call with a padding mask ran on a fused kernel (3.5 ms and
      0.67 GiB for 4 x 2048 tokens, forward + backward, against 3.7 ms and 0.78 GiB expanded;
      docs/BENCHMARKS.md), so expanding does not pay there. Turn it on for an older PyTorch.
    - static_decode: greedy `generate_answers` decodes with a static KV cache, one CUDA graph replay per
      token (`infer/static_decode.py`), instead of `GenerationMixin.generate` (host-bound: ~1,600
      eager launches and several host synchronisations per token).
    - compile_decode_step (off): that decode step also goes through `torch.compile`, which fuses its
      small elementwise kernels: on one H200 (9B, bf16) 164 tokens/s at batch 1 and 1,144 at batch 8
      against 99 and 718 without (docs/BENCHMARKS.md, run 6). Off by default because each new
      (batch size, cache length) compiles anew, tens of seconds each on the 9B: it pays for serving
      and long evaluations on a GPU, not for a few answers. Used on CUDA only.
    """

    supervised_loss: bool = True
    frozen_vision_no_grad: bool = True
    expand_kv_with_mask: bool = False
    static_decode: bool = True
    compile_decode_step: bool = False

    @contextlib.contextmanager
    def switched(self, **switches: bool) -> Iterator[None]:
        """Set the named switches for a `with` block, then put the previous values back (benchmarks, tests)."""
        unknown = set(switches) - {f.name for f in fields(self)}
        if unknown:
            raise AttributeError(f"no speed switch named {sorted(unknown)}")
        saved = {name: getattr(self, name) for name in switches}
        for name, value in switches.items():
            setattr(self, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)


SPEEDUPS = Speedups()


# ================================================================================================
# Language model parts
# ================================================================================================
class RMSNorm(nn.Module):
    """Root-mean-square norm as the hub computes it.

    The variance is taken in fp32, `x * rsqrt(var + eps)` stays fp32, the weight multiplies in fp32
    and the result is rounded once to the input dtype (LLaMA-style "round, then scale" differs in the
    last bit in bf16).
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)  # (B, L, 1) fp32
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)  # (B, L, H) fp32
        return (self.weight * hidden_states).to(input_dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions; no state (the checkpoint's `inv_freq` is ignored).

    Frequencies: inv_freq[i] = base^(-2i / rotary_dim), i < rotary_dim / 2 (`CogAgentConfig.rotary_inv_freq`),
    computed in fp32 on every forward exactly as the hub recomputes them. Positions come from
    `position_ids`, not from the index in the sequence (the image splice gives 1600 tokens the same
    position).
    """

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        self.config = config  # the frequencies are computed by the config, the one place they are defined
        self.original_rope = config.original_rope
        self.table_dtype = config.rope_table_dtype

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin), each (B, 1, L, rotary_dim / 2), in the dtype the rotation will use."""
        inv_freq = self.config.rotary_inv_freq(device=position_ids.device)  # (R/2,) fp32
        angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, L, R/2)
        cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]  # (B, 1, L, R/2)
        if self._table_in_model_dtype() and dtype in (torch.float16, torch.bfloat16):
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def _table_in_model_dtype(self) -> bool:
        if self.table_dtype == "auto":
            return self.original_rope  # hub: cast for the original style, fp32 for CogAgent's
        return self.table_dtype == "model"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, original_rope: bool) -> torch.Tensor:
    """Rotate the first `2 * cos.shape[-1]` dims of each head of x (B, heads, L, D); the rest pass through.

    original_rope true (GPT-J pairs): (x[2i], x[2i+1]) rotate by angle i.
    original_rope false (NeoX pairs inside the rotated part): (x[j], x[j + R/2]) rotate by angle j.
    The arithmetic runs in the dtype of the table (x's dtype, or fp32 for an fp32 table) and the
    result is rounded once to x's dtype.
    """
    half = cos.shape[-1]
    x_rot, x_pass = x[..., : 2 * half], x[..., 2 * half :]  # (B, h, L, R), (B, h, L, D-R)
    if original_rope:
        pairs = x_rot.reshape(*x_rot.shape[:-1], half, 2)  # (B, h, L, R/2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    else:
        first, second = x_rot[..., :half], x_rot[..., half:]  # (B, h, L, R/2) each
        cos2, sin2 = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # (B, 1, L, R)
        rotated = x_rot * cos2 + torch.cat([-second, first], dim=-1) * sin2
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


class SelfAttention(nn.Module):
    """GQA self-attention with a fused QKV projection (bias on QKV only), RoPE on Q and K, SDPA."""

    def __init__(self, config: CogAgentConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.kv_channels
        self.original_rope = config.original_rope
        self.dropout = config.attention_dropout
        self.query_key_value = nn.Linear(
            config.hidden_size, config.qkv_width, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(config.q_width, config.hidden_size, bias=config.add_bias_linear)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)  # (B, L, q + 2kv)
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query, key, value = qkv.split([q_width, kv_width, kv_width], dim=-1)
        query = query.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, L, D)
        key = key.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        value = value.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        cos, sin = rotary
        query = apply_rotary(query, cos, sin, self.original_rope)
        key = apply_rotary(key, cos, sin, self.original_rope)
        if cache is not None:  # the cache holds K (after RoPE) and V with the KV heads, before expansion
            key, value = cache.update(key, value, self.layer_idx)  # (B, Hkv, T, D)
        # Query head h reads KV head h // (Hq / Hkv): the hub's expand along a new axis after the group axis.
        grouped = self.num_heads != self.num_kv_heads
        if grouped and attention_mask is not None and SPEEDUPS.expand_kv_with_mask:
            # SDPA serves enable_gqa + an explicit mask only with its math kernel on CUDA (PyTorch docs,
            # torch.nn.functional.scaled_dot_product_attention); repeated K/V reach the fused kernels.
            groups = self.num_heads // self.num_kv_heads
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            grouped = False
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=grouped,
        )  # (B, Hq, L, D)
        context = context.transpose(1, 2).reshape(batch, length, q_width)  # (B, L, Hq*D)
        return self.dense(context)  # (B, L, H)


class MLP(nn.Module):
    """SwiGLU: `dense_h_to_4h` gives [gate | up]; silu(gate) * up -> `dense_4h_to_h`."""

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)  # (B, L, F) each
        return self.dense_4h_to_h(F.silu(gate) * up)  # (B, L, H)


class GLMBlock(GradientCheckpointingLayer):
    """Pre-norm decoder layer: h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h))."""

    def __init__(self, config: CogAgentConfig, layer_idx: int) -> None:
        super().__init__()
        self.residual_after_norm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)  # (B, L, H)
        attention = self.self_attention(normed, rotary, attention_mask, is_causal, cache=cache)
        residual = normed if self.residual_after_norm else hidden_states
        hidden_states = residual + F.dropout(attention, self.hidden_dropout, self.training)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.residual_after_norm else hidden_states
        return residual + F.dropout(self.mlp(normed), self.hidden_dropout, self.training)


class GLMTransformer(nn.Module):
    """The decoder stack (`transformer.encoder` in the checkpoint) and its final RMSNorm."""

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        if config.post_layer_norm:
            self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        else:
            self.final_layernorm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary, attention_mask, is_causal, cache=cache)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states


class Embedding(nn.Module):
    """Token embedding (`transformer.embedding.word_embeddings`), no scaling."""

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)  # (B, L, H)
        return embeddings.float() if self.fp32_residual_connection else embeddings


# ================================================================================================
# Vision tower (EVA2-CLIP-E) and adapter: `transformer.vision`
# ================================================================================================
class PatchEmbedding(nn.Module):
    """14x14 patch conv, a learned cls token in front, learned absolute positions (no interpolation)."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        patch, hidden = vision.patch_size, vision.hidden_size
        self.proj = nn.Conv2d(vision.in_channels, hidden, kernel_size=patch, stride=patch)
        self.cls_embedding = nn.Parameter(torch.zeros(1, hidden))
        self.position_embedding = nn.Embedding(vision.num_positions, hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.proj(images)  # (B, Hv, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, P, Hv), row-major grid
        cls = self.cls_embedding.expand(patches.shape[0], -1, -1)  # (B, 1, Hv)
        tokens = torch.cat([cls, patches], dim=1)  # (B, P+1, Hv)
        return tokens + self.position_embedding.weight.unsqueeze(0)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention, fused QKV with bias, heads contiguous, output `dense` with bias."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.num_heads = vision.num_heads
        self.query_key_value = nn.Linear(vision.hidden_size, 3 * vision.hidden_size)
        self.dense = nn.Linear(vision.hidden_size, vision.hidden_size)
        self.dropout = vision.dropout_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)  # (B, N, 3Hv)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, N, d)
        context = context.transpose(1, 2).reshape(batch, length, -1)  # (B, N, Hv)
        return F.dropout(self.dense(context), self.dropout, self.training)


class VisionMLP(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[vision.hidden_act]  # "gelu": exact erf GELU
        self.fc1 = nn.Linear(vision.hidden_size, vision.intermediate_size)
        self.fc2 = nn.Linear(vision.intermediate_size, vision.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class VisionLayer(GradientCheckpointingLayer):
    """EVA2-CLIP layer with sublayer-output norms: x = x + LN1(Attn(x)); x = x + LN2(MLP(x)).

    The names `input_layernorm` / `post_attention_layernorm` come from the checkpoint; neither norm
    touches the layer's input.
    """

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        eps = vision.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(vision.hidden_size, eps=eps)
        self.attention = VisionAttention(vision)
        self.mlp = VisionMLP(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision.hidden_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.input_layernorm(self.attention(hidden_states))
        return hidden_states + self.post_attention_layernorm(self.mlp(hidden_states))


class VisionTransformer(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(vision) for _ in range(vision.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class GLU(nn.Module):
    """The adapter into the language width: linear -> LayerNorm (eps 1e-5) -> GELU -> SwiGLU. No residual.

    It uses the *language* config's hidden and FFN sizes (4096 / 13696 on the real model).
    """

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.ffn_hidden_size
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        self.dense_h_to_4h = nn.Linear(hidden, ffn, bias=False)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.gelu(self.norm1(self.linear_proj(hidden_states)))  # (B, n, H)
        return self.dense_4h_to_h(F.silu(self.gate_proj(hidden_states)) * self.dense_h_to_4h(hidden_states))


class EVA2CLIPModel(nn.Module):
    """Image (B, 3, S, S) -> boi + image tokens + eoi (B, n + 2, H), divided by `scaling_factor`."""

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        vision = config.vision_config
        self.patch_embedding = PatchEmbedding(vision)
        self.transformer = VisionTransformer(vision)
        self.linear_proj = GLU(config)
        self.conv = nn.Conv2d(vision.hidden_size, config.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.scaling_factor = vision.scaling_factor
        self.grid = config.patches_per_side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.transformer(self.patch_embedding(images))  # (B, P+1, Hv)
        patches = tokens[:, 1:]  # (B, P, Hv), cls dropped
        batch, _, width = patches.shape
        grid = patches.view(batch, self.grid, self.grid, width).permute(0, 3, 1, 2)  # (B, Hv, g, g)
        merged = self.conv(grid).flatten(2).transpose(1, 2)  # (B, n, H), n = (g/2)^2
        image = self.linear_proj(merged)  # (B, n, H)
        boi = self.boi.to(image.device).expand(batch, -1, -1)  # .to: the tower may span devices (device_map)
        eoi = self.eoi.to(image.device).expand(batch, -1, -1)
        return torch.cat([boi, image, eoi], dim=1) / self.scaling_factor  # (B, n+2, H)


# ================================================================================================
# The splice: three ids (boi, placeholder, eoi) become boi + n image vectors + eoi
# ================================================================================================
@dataclass
class SplicedInputs:
    """What `splice_image` returns; fields are None where the matching input was None."""

    inputs_embeds: torch.Tensor | None  # (B, L + n - 1, H)
    position_ids: torch.Tensor | None  # (B, L + n - 1)
    attention_mask: torch.Tensor | None  # (B, L + n - 1)
    labels: torch.Tensor | None  # (B, L + n - 1)
    boi_positions: torch.Tensor  # (B,) index of boi in input_ids


def find_image_positions(input_ids: torch.Tensor, boi_token_id: int, eoi_token_id: int) -> torch.Tensor:
    """Index of boi in each row; raise if a row has no image, several, or a broken boi/placeholder/eoi triple."""
    boi_counts = (input_ids == boi_token_id).sum(dim=1)
    eoi_counts = (input_ids == eoi_token_id).sum(dim=1)
    boi = (input_ids == boi_token_id).int().argmax(dim=1)  # (B,)
    eoi = (input_ids == eoi_token_id).int().argmax(dim=1)  # (B,)
    # One host synchronisation for the whole batch; the per-row messages are built only on failure.
    if not bool(((boi_counts != 1) | (eoi_counts != 1) | (eoi - boi != 2)).any()):
        return boi
    for row in range(input_ids.shape[0]):
        if boi_counts[row] != 1 or eoi_counts[row] != 1:
            raise ValueError(
                f"row {row} of input_ids holds {int(boi_counts[row])} <|begin_of_image|> (id {boi_token_id}) and "
                f"{int(eoi_counts[row])} <|end_of_image|> (id {eoi_token_id}) tokens, but each sample must carry "
                "exactly 1 image (one boi, placeholder, eoi triple) when images are passed"
            )
    bad = (eoi - boi != 2).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"row {bad[0]} of input_ids: <|end_of_image|> at index {int(eoi[bad[0]])} must come 2 after "
            f"<|begin_of_image|> at index {int(boi[bad[0]])} (boi, placeholder, eoi)"
        )
    return boi


def splice_image(
    input_ids: torch.Tensor,
    *,
    num_image_tokens: int,
    boi_token_id: int,
    eoi_token_id: int,
    inputs_embeds: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    boi_positions: torch.Tensor | None = None,
) -> SplicedInputs:
    """Replace each row's (boi, placeholder, eoi) ids by boi + n image vectors + eoi, and align the rest.

    Every row carries exactly one image, so every row grows by the same n - 1 and the batch stays
    rectangular even when boi sits at a different index per row (left or right padding). Nothing is
    discarded: each row gets its own image features, in training and in inference.

    Worked example, n = 2 image tokens (features = [B*, I1, I2, E*], B*/E* the learned boi/eoi):

        index         0    1    2    3    4    5                     (L = 6, boi at p = 1)
        input_ids     g    boi  ph   eoi  t1   t2
        position_ids  0    1    2    3    4    5
        attention     1    1    1    1    1    1
        labels        -100 -100 -100 -100 t2   -100

    becomes (length L + n - 1 = 7):

        index         0    1    2    3    4    5    6
        embeddings    e(g) B*   I1   I2   E*   e(t1) e(t2)  text[0:p] + features + text[p+3:]
        position_ids  0    1    2    2    3    4    5      boi keeps p, images p+1, eoi p+2, ...
        attention     1    1    1    1    1    1    1      mask[0:p+1] + n ones + mask[p+2:]
        labels        -100 -100 -100 -100 -100 t2   -100   labels[0:p+1] + n x -100 + labels[p+2:]

    In general, output index o of a row with boi at p reads text index
    o (o <= p), p + 1 (an image token, p < o < p + n + 1), or o - n + 1 (eoi and after);
    the text embeddings of boi, placeholder and eoi are replaced by the features.

    Args:
        input_ids: (B, L) ids holding one boi/placeholder/eoi triple per row.
        num_image_tokens: n, the image tokens between boi and eoi (1600 on the real model).
        inputs_embeds: (B, L, H) text embeddings, spliced with `image_features` (B, n + 2, H).
        position_ids, attention_mask, labels: (B, L), each optional.
        boi_positions: (B,) boi index per row when it is already known (decode steps, where the ids
            also hold generated tokens, which may include marker ids); None: find and check it.
    """
    batch, length = input_ids.shape
    if boi_positions is None:
        boi_positions = find_image_positions(input_ids, boi_token_id, eoi_token_id)  # (B,)
    boi = boi_positions
    new_length = length + num_image_tokens - 1
    out = torch.arange(new_length, device=input_ids.device).expand(batch, -1)  # (B, L')
    p = boi[:, None]  # (B, 1)
    is_image = (out > p) & (out <= p + num_image_tokens)  # (B, L') the n patch slots
    source = torch.where(out <= p, out, torch.where(is_image, p + 1, out - num_image_tokens + 1))  # (B, L')

    spliced_embeds = None
    if inputs_embeds is not None:
        if image_features is None or image_features.shape[:2] != (batch, num_image_tokens + 2):
            got = None if image_features is None else tuple(image_features.shape)
            raise ValueError(f"image_features must be ({batch}, {num_image_tokens + 2}, H), got {got}")
        hidden = inputs_embeds.shape[-1]
        # text before boi keeps its index; after eoi, index o reads text o - (n + 2) + 3 (clamped where unused)
        text_index = torch.where(out < p, out, out - num_image_tokens + 1).clamp(0, length - 1)  # (B, L')
        text = inputs_embeds.gather(1, text_index[..., None].expand(-1, -1, hidden))  # (B, L', H)
        feature_index = (out - p).clamp(0, num_image_tokens + 1)  # (B, L')
        features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        image = features.gather(1, feature_index[..., None].expand(-1, -1, hidden))  # (B, L', H)
        from_image = (out >= p) & (out <= p + num_image_tokens + 1)  # boi, patches, eoi
        spliced_embeds = torch.where(from_image[..., None], image, text)  # (B, L', H)

    def take(values: torch.Tensor | None, image_value: int | None) -> torch.Tensor | None:
        if values is None:
            return None
        taken = values.gather(1, source)  # (B, L')
        return taken if image_value is None else taken.masked_fill(is_image, image_value)

    return SplicedInputs(
        inputs_embeds=spliced_embeds,
        position_ids=take(position_ids, None),
        attention_mask=take(attention_mask, 1),
        labels=take(labels, IGNORE_INDEX),
        boi_positions=boi,
    )


# ================================================================================================
# Masks
# ================================================================================================
def build_attention_mask(
    padding_mask: torch.Tensor | None, query_length: int, past_length: int
) -> tuple[torch.Tensor | None, bool]:
    """Return (boolean mask (B, 1, Q, K) with True = attend, or None; is_causal) for SDPA.

    Without padding the mask is implicit: `is_causal` on a fresh sequence, nothing for a single
    decoded token, an explicit offset-causal mask when several tokens extend a cache. With padding:
    causal x key padding; a query row that may attend to nothing (a padded position in front of
    left padding) attends to every key instead of producing NaN (its output is never used).
    """
    key_length = past_length + query_length
    if padding_mask is not None and padding_mask.shape[-1] != key_length:
        raise ValueError(
            f"attention_mask has length {padding_mask.shape[-1]} but the keys number {key_length} "
            f"({past_length} cached + {query_length} new, after the image splice)"
        )
    if padding_mask is None or bool(padding_mask.all()):
        if query_length == 1:
            return None, False
        if past_length == 0:
            return None, True
        padding_mask = None
    device = padding_mask.device if padding_mask is not None else None
    keys = torch.arange(key_length, device=device)
    queries = torch.arange(query_length, device=device) + past_length
    mask = (keys[None, :] <= queries[:, None])[None, None]  # (1, 1, Q, K)
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]  # (B, 1, Q, K)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask, False


# ================================================================================================
# The whole model
# ================================================================================================
class CogAgentPreTrainedModel(PreTrainedModel):
    config_class = CogAgentConfig
    config: CogAgentConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock", "VisionLayer"]
    _keys_to_ignore_on_load_unexpected = [r"transformer\.rotary_pos_emb\.inv_freq"]
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        """Random init for training from scratch: normal(0, initializer_range) for matrices, ones/zeros for norms."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, PatchEmbedding):
            init.normal_(module.cls_embedding, mean=0.0, std=std)
        elif isinstance(module, EVA2CLIPModel):
            init.normal_(module.boi, mean=0.0, std=std)
            init.normal_(module.eoi, mean=0.0, std=std)
            # Tiny preset only (the 9B has no such key): start the tower so that where a patch lies
            # reaches the language model. Children are initialised first, so this redraws what they
            # drew; weights read from a checkpoint are left alone. Why: `tiny_init`.
            if self.config.vision_config.extra.get("readable_init"):
                tiny_init.init_tower(module)


class ChatGLMModel(nn.Module):
    """`transformer.*`: embedding, the decoder stack, the output layer and the vision tower."""

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.vision = EVA2CLIPModel(config)


class CogAgentForConditionalGeneration(CogAgentPreTrainedModel, GenerationMixin):
    """CogAgent / GLM-4V-9B with the language-model head; accepts the official forward arguments."""

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.transformer.output_layer = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits over the spliced sequence (length L + n - 1 when images are given) and the loss.

        `past_key_values` (official name) and `cache` (transformers >= 5.24 name) are the same argument;
        if both are given, a non-empty `cache` wins (during `generate` with PEFT prefix tuning, PEFT
        passes a fresh prefix as `past_key_values` on every step while `cache` holds the real one).

        The image is spliced in when `images` is given and the prompt is being read: on an empty
        cache, or on a cache that holds only a prefix (PEFT prefix tuning) when input_ids still carry
        the boi token; in that case `attention_mask` is (B, prefix + L) and only its last L columns
        are expanded. A decode step extends a cache that already holds the image: its
        `attention_mask` covers cache + new tokens and `position_ids` are required (the RoPE position
        differs from the cache index after an image); `prepare_inputs_for_generation` provides both.

        With `labels`, the loss is computed from the supervised positions only (`supervised_lm_loss`)
        and `logits` is None while gradients are enabled (a training step), the full logits otherwise;
        `return_logits=True` / `False` forces either.
        """
        config = self.config
        cache = _pick_cache(cache, past_key_values)
        return_dict = return_dict if return_dict is not None else config.return_dict
        if use_cache is None:
            use_cache = config.use_cache and not self.training
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        past_length = cache.get_seq_length() if cache is not None else 0

        if inputs_embeds is None:
            inputs_embeds = self.transformer.embedding(input_ids)  # (B, L, H)
        batch, length = inputs_embeds.shape[:2]
        reading_prompt = past_length == 0 or (
            images is not None and input_ids is not None and bool((input_ids == config.boi_token_id).any())
        )
        if position_ids is None:
            if not reading_prompt:
                raise ValueError("position_ids are required when extending a non-empty cache")
            position_ids = torch.arange(length, device=inputs_embeds.device).expand(batch, -1)  # (B, L)

        if reading_prompt:
            prefix_mask = None
            if past_length and attention_mask is not None:  # a prefix in the cache: splice only the prompt part
                prefix_mask, attention_mask = attention_mask[:, :-length], attention_mask[:, -length:]
            inputs_embeds, position_ids, attention_mask, labels = self._splice_images(
                input_ids, images, inputs_embeds, position_ids, attention_mask, labels
            )
            if prefix_mask is not None:
                attention_mask = torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)

        hidden_states = self._run_decoder_stack(inputs_embeds, position_ids, attention_mask, past_length, cache)
        loss, logits = None, None
        if labels is not None and SPEEDUPS.supervised_loss:
            loss = supervised_lm_loss(hidden_states, labels, self.transformer.output_layer)
            if return_logits is None:  # evaluation keeps its logits; a training step does not pay for them
                return_logits = not torch.is_grad_enabled()
        if labels is None or not SPEEDUPS.supervised_loss or return_logits is not False:
            if logits_to_keep:
                hidden_states = hidden_states[:, -logits_to_keep:]
            logits = self.transformer.output_layer(hidden_states)  # (B, L', V)
        if labels is not None and loss is None:
            loss = causal_lm_loss(logits, labels)
        if not return_dict:
            return tuple(item for item in (loss, logits, cache if use_cache else None) if item is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})

    def _splice_images(
        self,
        input_ids: torch.Tensor | None,
        images: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Run the vision tower and splice its output in (prefill only); text-only input passes through."""
        config = self.config
        if images is None:
            if input_ids is not None and bool((input_ids == config.boi_token_id).any()):
                rows = (input_ids == config.boi_token_id).any(dim=1).nonzero().flatten().tolist()
                raise ValueError(
                    f"input_ids rows {rows} contain <|begin_of_image|> (id {config.boi_token_id}) but images is None; "
                    "pass images (one per sample)"
                )
            return inputs_embeds, position_ids, attention_mask, labels
        if input_ids is None:
            raise ValueError("images need input_ids to locate the <|begin_of_image|> token")
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"images holds {images.shape[0]} image(s) but input_ids has {input_ids.shape[0]} row(s); "
                "each sample must carry exactly one image"
            )
        with torch.set_grad_enabled(self._vision_needs_grad(images)):
            features = self.transformer.vision(images.to(inputs_embeds.dtype))  # (B, n+2, H)
        spliced = splice_image(
            input_ids,
            num_image_tokens=config.num_image_tokens,
            boi_token_id=config.boi_token_id,
            eoi_token_id=config.eoi_token_id,
            inputs_embeds=inputs_embeds,
            image_features=features,
            position_ids=position_ids,
            attention_mask=attention_mask,
            labels=labels,
        )
        return spliced.inputs_embeds, spliced.position_ids, spliced.attention_mask, spliced.labels

    def _vision_needs_grad(self, images: torch.Tensor) -> bool:
        """Record the vision tower for backward only when something in it (or the image) can get a gradient.

        A frozen tower (the official sft.yaml's freezeV, or LoRA on the language model only) then keeps
        no activations and skips autograd bookkeeping for its 63 layers.
        """
        if not torch.is_grad_enabled():
            return False
        if not SPEEDUPS.frozen_vision_no_grad or images.requires_grad:
            return True
        return any(p.requires_grad for p in self.transformer.vision.parameters())

    def _run_decoder_stack(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_length: int,
        cache: Cache | None,
    ) -> torch.Tensor:
        """The decoder stack over (spliced) embeddings; returns final hidden states (B, L', H)."""
        mask, is_causal = build_attention_mask(attention_mask, inputs_embeds.shape[1], past_length)
        rotary = self.transformer.rotary_pos_emb(position_ids, inputs_embeds.dtype)
        return self.transformer.encoder(inputs_embeds, rotary, mask, is_causal, cache=cache)

    # ---- generation ----------------------------------------------------------------------------------
    def generate(self, *args: Any, suppress_image_markers: bool = True, **kwargs: Any) -> Any:
        """`GenerationMixin.generate`, with the image marker ids never generated (unless told otherwise).

        <|begin_of_image|> and <|end_of_image|> belong to the chat template, not to answers. An untrained
        or half-trained model can still rank them first; `ImageMarkerSuppressor` sets their scores to -inf
        before greedy or sampled selection. `suppress_image_markers=False` lets them through (a generated
        marker is then plain output: decode steps never splice, see `prepare_inputs_for_generation`).
        """
        if suppress_image_markers:
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(ImageMarkerSuppressor((self.config.boi_token_id, self.config.eoi_token_id)))
            kwargs["logits_processor"] = processors
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        past_key_values: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Turn `generate`'s *unexpanded* state into this step's forward arguments.

        `generate` keeps input_ids, attention_mask and position_ids without the image expansion and
        appends one entry per new token (position last + 1, mask 1). Prefill (empty cache, or no cache
        at all) passes everything and lets `forward` splice. A decode step feeds the new token(s)
        with their RoPE positions (L + t) and the mask re-expanded to the cache length (L + n - 1 + t),
        because the cache holds the n - 1 extra image slots.
        """
        cache = _pick_cache(cache, past_key_values)
        if inputs_embeds is not None:
            raise ValueError("generate with inputs_embeds is not supported: pass input_ids (and images)")
        if position_ids is None:  # the hub's default: 0 ... L-1 over the unexpanded ids
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        past_length = cache.get_seq_length() if cache is not None else 0
        model_inputs: dict[str, Any] = {"cache": cache, "use_cache": kwargs.get("use_cache")}
        if past_length == 0:
            model_inputs.update(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
            model_inputs["images"] = images
        else:
            new = next_sequence_length or 1
            model_inputs.update(input_ids=input_ids[:, -new:], position_ids=position_ids[:, -new:])
            if attention_mask is not None and images is not None:
                # The prompt's image is each row's *first* boi (checked at prefill); generated ids come
                # after it and are never spliced, even if the model emitted a marker id.
                prompt_boi = (input_ids == self.config.boi_token_id).int().argmax(dim=1)  # (B,)
                attention_mask = splice_image(
                    input_ids,
                    num_image_tokens=self.config.num_image_tokens,
                    boi_token_id=self.config.boi_token_id,
                    eoi_token_id=self.config.eoi_token_id,
                    attention_mask=attention_mask,
                    boi_positions=prompt_boi,
                ).attention_mask  # (B, L + n - 1 + t)
            model_inputs["attention_mask"] = attention_mask
        if "logits_to_keep" in kwargs:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs


class ImageMarkerSuppressor(LogitsProcessor):
    """Scores of the given ids (the image markers) become -inf, so no decoding strategy picks them."""

    def __init__(self, token_ids: tuple[int, ...]) -> None:
        self.token_ids = tuple(int(i) for i in token_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, list(self.token_ids)] = -float("inf")  # (B, V)
        return scores


def _pick_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """`cache` (transformers >= 5.24) or `past_key_values` (official name): a non-empty `cache` wins, then any given one."""
    if cache is not None and (cache.get_seq_length() > 0 or past_key_values is None):
        return cache
    return past_key_values if past_key_values is not None else cache


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: fp32 logits, shift by one, mean over labels != -100.

    The loss stays fp32 (the hub rounds it to the model dtype afterwards; that only changes what is
    printed, not the gradient direction).
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match the logits' (batch, length) {tuple(logits.shape[:2])}"
        )
    shift_logits = logits[:, :-1].float()  # (B, L'-1, V)
    shift_labels = labels[:, 1:].to(logits.device)  # (B, L'-1)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


LOSS_CHUNK_ROWS = 1024  # supervised positions per head chunk: 1024 x 151,552 fp32 logits = 0.6 GB at most


def supervised_lm_loss(
    hidden_states: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """`causal_lm_loss(head(hidden_states), labels)` without the full logits.

    Only positions whose next label is supervised (labels != -100; about 5% of a CogAgent sample, the
    answer) go through the head, `chunk_rows` at a time; with gradients on, each chunk is checkpointed,
    so backward recomputes its logits instead of keeping them. Per row the arithmetic is the same as
    `causal_lm_loss` (head output in the model dtype, cross-entropy in fp32), so the two agree up to
    the order of the final sum. The boolean selection costs one host synchronisation (its size).
    """
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match the hidden states' (batch, length) "
            f"{tuple(hidden_states.shape[:2])}"
        )
    targets = labels[:, 1:].to(hidden_states.device)  # (B, L'-1): label j+1 is predicted at j
    keep = targets != IGNORE_INDEX
    rows = hidden_states[:, :-1][keep]  # (N, H), N supervised positions
    targets = targets[keep]  # (N,)
    total = hidden_states.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_rows):
        piece, piece_targets = rows[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled() and piece.requires_grad:
            total = total + checkpoint(_summed_cross_entropy, piece, piece_targets, head, use_reentrant=False)
        else:
            total = total + _summed_cross_entropy(piece, piece_targets, head)
    return total / keep.sum()  # 0 / 0 = NaN with nothing supervised, as F.cross_entropy gives


def _summed_cross_entropy(rows: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def enable_activation_checkpointing(model: nn.Module, *, every_n_layers: int = 1) -> None:
    """Checkpoint every (n-th) layer of both towers, non-reentrant; works on a bare or PEFT-wrapped model.

    The one place that knows the transformers rename: 5.24 calls it `activation_checkpointing_enable`
    (and adds `every_n_layers`); 5.17-5.23, which GPU images ship, only have `gradient_checkpointing_enable`.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(
            f"every_n_layers={every_n_layers} needs transformers >= 5.24 (activation_checkpointing_enable)"
        )


def selective_checkpointing(model: nn.Module, *, vision_attention: bool = True) -> None:
    """Activation checkpointing in both towers that keeps the vision tower's attention outputs.

    Measured on an H200 (docs/BENCHMARKS.md) it does not pay for LoRA at 2048 tokens: 0.91 s and
    30.4 GiB against 0.88 s and 29.1 GiB with plain checkpointing, because the vision attention
    forward is only ~0.4 ms a layer there. Kept for longer images or sequences, where it grows
    quadratically; the recipes use `activation_checkpointing_enable` (every layer, or
    `every_n_layers=2` where memory allows).

    Recomputing a checkpointed layer repeats its forward; in the vision tower the 6,401-token flash
    attention is the dearest part to repeat per byte kept (its output is one (6401, 1792) bf16 tensor,
    23 MB a layer, 1.4 GB for 63 layers). PyTorch's selective activation checkpointing
    (`torch.utils.checkpoint.create_selective_checkpoint_contexts`, PyTorch >= 2.4) saves the outputs of
    the listed ops and recomputes the rest. The language layers are checkpointed whole.
    Works on a bare model or a PEFT wrapper (call after `get_peft_model`).
    """
    enable_activation_checkpointing(model)
    if not vision_attention:
        return
    saved = [
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    ]
    context = partial(create_selective_checkpoint_contexts, saved)
    function: Callable = partial(checkpoint, use_reentrant=False, context_fn=context)
    for module in model.modules():
        if isinstance(module, VisionLayer):
            module._gradient_checkpointing_func = function


# The official class name (config.json "architectures").
ChatGLMForConditionalGeneration = CogAgentForConditionalGeneration

__all__ = [
    "CogAgentForConditionalGeneration",
    "ChatGLMForConditionalGeneration",
    "CogAgentPreTrainedModel",
    "splice_image",
    "build_attention_mask",
    "causal_lm_loss",
    "supervised_lm_loss",
    "selective_checkpointing",
    "enable_activation_checkpointing",
    "Speedups",
    "SPEEDUPS",
    "ImageMarkerSuppressor",
]
