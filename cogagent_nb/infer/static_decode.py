"""Greedy decoding with a static KV cache, replayed as one CUDA graph per token.

Why this exists: `GenerationMixin.generate` with a `DynamicCache` is host-bound on a GPU. Each decoded
token costs about 1,600 eager kernel launches (40 layers), a re-splice of the attention mask in
`prepare_inputs_for_generation`, and host synchronisations (`bool(padding_mask.all())` in
`build_attention_mask`, `cache.get_seq_length()`), while the kernels themselves need ~8 ms on an H200.
On the 9B that ran 22 tokens/s at batch 1.

What this module does instead:

1. Prefill through the model's own `forward` (vision tower, image splice, every layer), with a
   `StaticKVCache` that copies the prompt's keys and values into preallocated buffers
   `(B, Hkv, max_length, D)`.
2. One decode step written from the model's modules, with static shapes and all its state in
   preallocated device tensors that the step updates in place: the current token, its RoPE position,
   the cache slot it writes (`write_at`), a boolean key mask, the finished rows, the output buffer.
   Nothing in the step reads a value back to the host, so on CUDA it can be captured once in a
   `torch.cuda.CUDAGraph` and replayed per token: one launch instead of ~1,600.
3. The host looks at `done` only every `check_every` tokens and reads the output once at the end.

The results are those of `model.generate(do_sample=False)` with this package's settings (same
positions, masks, stop set, pad id, and `ImageMarkerSuppressor`), up to the rounding of attention over
a longer, masked key range: `tests/test_static_decode.py` compares the token ids. On CPU, or with
`use_graph=False`, the same step runs eagerly. `generate_answers` uses it for greedy generation
unless `modeling.SPEEDUPS.static_decode` is off; sampling, prefix tuning and wrapped models that are
not the native model keep `model.generate` (`static_decoder_for`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from cogagent_nb.model.modeling import SPEEDUPS, CogAgentForConditionalGeneration, splice_image

SLOT_MULTIPLE = 64  # cache length rounded up: fused attention kernels want the key length aligned
WARMUP_STEPS = 2  # eager steps before capture (cuBLAS handles, attention plans); they get spare slots


# --- which models can use it ---------------------------------------------------------------------------------
def static_decoder_for(model: nn.Module) -> CogAgentForConditionalGeneration | None:
    """The native model whose modules the static decoder can call, or None: use `model.generate`.

    A `PeftModel` with LoRA is unwrapped to its base model, which holds the injected LoRA layers, so the
    adapter is used. None for: the switch `SPEEDUPS.static_decode` off, prompt learning (prefix tuning
    feeds a learned prefix through the cache), anything that is not the native model (a stand-in, a
    DDP wrapper), and weights that are not all materialised (DeepSpeed ZeRO-3 shards, offloaded layers).
    """
    if not SPEEDUPS.static_decode:
        return None
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None:
        if getattr(peft_config, "is_prompt_learning", False):
            return None
        model = model.get_base_model()
    if not isinstance(model, CogAgentForConditionalGeneration):
        return None
    for param in model.parameters():
        if param.device.type == "meta" or hasattr(param, "ds_id"):
            return None
    return model


# --- the cache -------------------------------------------------------------------------------------------------
class StaticKVCache:
    """Per-layer key/value buffers `(B, Hkv, max_length, D)`, allocated once and written in place.

    It serves `SelfAttention.forward`, which calls `cache.update(key, value, layer_idx)` with keys after
    RoPE and KV heads not expanded, and attends over what `update` returns:

    - prefill (before `start_decoding`): the prompt's keys/values are copied into slots `[0, L)` and
      returned unchanged, so the prefill attends exactly as with a `DynamicCache`;
    - decode: the one new key/value is written at slot `write_at` (a 1-element device tensor, so the
      index never leaves the GPU) and the whole buffers are returned; `key_mask` (B, 1, 1, max_length)
      hides the slots not written yet and the padded ones.

    Buffers are allocated at the first prefill update of each layer, in that layer's dtype and device.
    `get_seq_length` returns a host integer set at prefill; the decode step never calls it.
    """

    def __init__(self, num_layers: int, max_length: int) -> None:
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # slots filled by the prefill (host integer, no synchronisation)
        self.decoding = False
        self.write_at: torch.Tensor | None = None  # (1,) long, the slot the next decode step writes
        self.key_mask: torch.Tensor | None = None  # (B, 1, 1, max_length) bool, True = attend

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new key/value (B, Hkv, L, D); return what attention should read (see the class doc)."""
        if self.decoding:
            keys, values = self.keys[layer_idx], self.values[layer_idx]
            keys.index_copy_(2, self.write_at, key)
            values.index_copy_(2, self.write_at, value)
            return keys, values
        length = key.shape[2]
        if length > self.max_length:
            raise ValueError(f"prefill of {length} slots does not fit a cache of {self.max_length}")
        if self.keys[layer_idx] is None:
            shape = (*key.shape[:2], self.max_length, key.shape[3])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros((*value.shape[:2], self.max_length, value.shape[3]))
        self.keys[layer_idx][:, :, :length].copy_(key)
        self.values[layer_idx][:, :, :length].copy_(value)
        self.length = length
        return key, value

    def start_decoding(self, padding_mask: torch.Tensor) -> None:
        """Switch to decode mode; `padding_mask` (B, length) marks the prefilled slots to attend to."""
        batch, length = padding_mask.shape
        if length != self.length:
            raise ValueError(f"mask covers {length} slots but the prefill filled {self.length}")
        self.key_mask = torch.zeros(batch, 1, 1, self.max_length, dtype=torch.bool, device=padding_mask.device)
        self.key_mask[:, 0, 0, :length] = padding_mask.bool()
        self.write_at = torch.full((1,), length, dtype=torch.long, device=padding_mask.device)
        self.decoding = True


# --- the decode state and the step ----------------------------------------------------------------------------
@dataclass
class DecodeState:
    """Everything a decode step reads and advances, as device tensors updated in place."""

    token: torch.Tensor  # (B, 1) long: the token fed to this step (the previous output)
    position: torch.Tensor  # (B, 1) long: its RoPE position
    step: torch.Tensor  # (1,) long: the output column this step writes
    done: torch.Tensor  # (B,) bool: rows that have emitted a stop id
    out: torch.Tensor  # (B, columns) long: generated ids, pad where not (yet) written

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).clone() for f in fields(self)}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, value in saved.items():
            getattr(self, name).copy_(value)


@dataclass(frozen=True)
class TokenRules:
    """How a token is chosen from logits, as `generate` does it with this package's settings."""

    suppress_ids: torch.Tensor  # (S,) ids never chosen (the image markers: `ImageMarkerSuppressor`)
    stop_ids: torch.Tensor  # (K,) ids that finish a row (`eos_token_ids_for_generation`)
    pad_token_id: int  # what a finished row emits


def choose_tokens(logits: torch.Tensor, done: torch.Tensor, rules: TokenRules) -> torch.Tensor:
    """Greedy choice (B,) from logits (B, V); finished rows get the pad id; `done` is updated in place.

    Same order as `generate`: fp32 scores, suppressed ids to -inf, argmax (first index on ties), pad for
    rows finished before this token, then rows whose token is a stop id are finished.
    """
    scores = logits.float()
    scores.index_fill_(1, rules.suppress_ids, -float("inf"))
    chosen = scores.argmax(dim=-1).masked_fill(done, rules.pad_token_id)  # (B,)
    done |= (chosen[:, None] == rules.stop_ids[None, :]).any(dim=-1)  # an == table: no host-side isin
    return chosen


def decode_step(
    model: CogAgentForConditionalGeneration, cache: StaticKVCache, state: DecodeState, rules: TokenRules
) -> None:
    """One token for every row, from the model's modules; static shapes, no host synchronisation.

    It does what a `generate` step does through `forward` (embedding, RoPE at the token's position, the
    decoder stack attending over the cache, the head on the last hidden state), without the per-step
    mask splice and without the checks that read tensors back to the host.
    """
    transformer = model.transformer
    cache.key_mask.index_fill_(3, cache.write_at, True)  # the slot this step writes becomes visible
    embeds = transformer.embedding(state.token)  # (B, 1, H)
    rotary = transformer.rotary_pos_emb(state.position, embeds.dtype)
    hidden = transformer.encoder(embeds, rotary, cache.key_mask, False, cache=cache)  # (B, 1, H)
    logits = transformer.output_layer(hidden[:, -1:])[:, -1]  # (B, V)
    chosen = choose_tokens(logits, state.done, rules)
    state.out.index_copy_(1, state.step, chosen[:, None])
    state.token.copy_(chosen[:, None])
    state.position.add_(1)
    state.step.add_(1)
    cache.write_at.add_(1)


_COMPILED_STEP: Callable[..., None] | None = None


def compiled_decode_step() -> Callable[..., None]:
    """`decode_step` through `torch.compile` (made once per process), for `greedy_generate(compile_step=True)`.

    What it buys: Inductor fuses the ~25 small elementwise kernels a layer (RoPE, RMSNorm's fp32 pieces,
    residual adds) that the graph otherwise still runs one by one (docs/BENCHMARKS.md, decode profile).
    What it costs: a compilation per new shape (batch size, cache length), tens of seconds on the 9B, so
    it pays for long serving or evaluation runs, not for one answer; hence opt-in.
    """
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(decode_step, dynamic=False)
    return _COMPILED_STEP


# --- running the steps ------------------------------------------------------------------------------------------
def run_eager(step: Callable[[], None], state: DecodeState, steps: int, check_every: int) -> None:
    """Call `step` up to `steps` times; stop early once every row is done (looked at every `check_every`)."""
    for i in range(steps):
        step()
        if (i + 1) % check_every == 0 and bool(state.done.all()):
            return


def warm_up(step: Callable[[], None], state: DecodeState, cache: StaticKVCache) -> None:
    """Run `step` `WARMUP_STEPS` times on a side stream, then put the state back.

    The PyTorch CUDA-graph notes prescribe it: cuBLAS handles, attention plans and lazy allocations
    must exist before capture. The steps really run, so the state they advance (output columns
    included) is restored; the cache slots they wrote are masked again and get overwritten by the
    real steps (the cache has `WARMUP_STEPS` spare slots).
    """
    saved = state.snapshot()
    saved_mask, saved_write_at = cache.key_mask.clone(), cache.write_at.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    state.restore(saved)
    cache.key_mask.copy_(saved_mask)
    cache.write_at.copy_(saved_write_at)


def capture(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Record `step` in a CUDA graph; nothing runs during capture, `graph.replay()` runs it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def run_graph(graph: torch.cuda.CUDAGraph, state: DecodeState, steps: int, check_every: int) -> None:
    """Replay the captured step up to `steps` times; the host reads `done` every `check_every` replays."""
    run_eager(graph.replay, state, steps, check_every)
    graph.reset()  # give the graph's private memory pool back


# --- the entry point ---------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    images: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_token_id: int,
    suppress_ids: Sequence[int] | None = None,
    use_graph: bool | None = None,
    check_every: int = 8,
    compile_step: bool = False,
) -> torch.Tensor:
    """New token ids (B, T), T <= max_new_tokens: what `model.generate(do_sample=False)` appends.

    Inputs are a left-padded batch as the tokenizer returns it (one image per row, or none).
    position_ids: the prompt's RoPE positions (B, L); None: as the tokenizer writes them (0..n-1 over
      each row's real tokens, from `attention_mask`), which is also what `generate` derives. Decode
      positions continue each row from its last prompt position + 1.
    stop_ids: a row is finished after emitting one; it then emits `pad_token_id`. The output ends at the
      step where every row has finished (as `generate`), or after `max_new_tokens`.
    suppress_ids: ids never chosen; default the image markers (`ImageMarkerSuppressor`).
    use_graph: replay a CUDA graph (default: on a CUDA device with the model in eval mode and on one
      device); False runs the same step eagerly.
    compile_step: run the step through `torch.compile` first (`compiled_decode_step`); opt-in.
    """
    native = static_decoder_for(model) if not isinstance(model, CogAgentForConditionalGeneration) else model
    if native is None:
        raise ValueError("this model cannot use the static decoder (see static_decoder_for); use model.generate")
    config = native.config
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    if suppress_ids is None:
        suppress_ids = (config.boi_token_id, config.eoi_token_id)
    rules = TokenRules(
        suppress_ids=torch.tensor(list(suppress_ids), dtype=torch.long, device=device),
        stop_ids=torch.tensor(list(stop_ids), dtype=torch.long, device=device),
        pad_token_id=int(pad_token_id),
    )
    batch, length = input_ids.shape
    spliced_length = length + (config.num_image_tokens - 1 if images is not None else 0)
    slots = spliced_length + max_new_tokens + WARMUP_STEPS
    cache = StaticKVCache(config.num_layers, -(-slots // SLOT_MULTIPLE) * SLOT_MULTIPLE)

    logits = native(
        input_ids=input_ids,
        images=images,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits  # (B, 1, V)
    cache.start_decoding(_spliced_padding_mask(native, input_ids, attention_mask, images is not None))
    state = DecodeState(
        token=torch.zeros(batch, 1, dtype=torch.long, device=device),
        position=position_ids[:, -1:].to(device=device, dtype=torch.long) + 1,
        step=torch.ones(1, dtype=torch.long, device=device),
        done=torch.zeros(batch, dtype=torch.bool, device=device),
        out=torch.full((batch, max_new_tokens + WARMUP_STEPS), rules.pad_token_id, dtype=torch.long, device=device),
    )
    first = choose_tokens(logits[:, -1], state.done, rules)
    state.out[:, 0] = first
    state.token.copy_(first[:, None])

    steps = max_new_tokens - 1
    if steps > 0 and not bool(state.done.all()):
        step_fn = compiled_decode_step() if compile_step else decode_step
        step = lambda: step_fn(native, cache, state, rules)  # noqa: E731
        graph = _captured(step, state, cache, use_graph) if _graph_wanted(native, device, use_graph) else None
        if graph is not None:
            run_graph(graph, state, steps, check_every)
        else:
            run_eager(step, state, steps, check_every)
    return trim_to_generate(state.out[:, :max_new_tokens], rules.stop_ids)


def _spliced_padding_mask(
    model: CogAgentForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor, has_image: bool
) -> torch.Tensor:
    """The key mask of the prefilled slots: the padding mask with the image's n slots spliced in."""
    if not has_image:
        return attention_mask
    config = model.config
    return splice_image(
        input_ids,
        num_image_tokens=config.num_image_tokens,
        boi_token_id=config.boi_token_id,
        eoi_token_id=config.eoi_token_id,
        attention_mask=attention_mask,
    ).attention_mask


def _captured(
    step: Callable[[], None], state: DecodeState, cache: StaticKVCache, use_graph: bool | None
) -> torch.cuda.CUDAGraph | None:
    """The captured step, or None with a warning when capture fails and the graph was not asked for.

    Capture runs nothing, so after a failed capture the state is as the warm-up left it and the eager
    step can run; an error of the step itself shows in the warm-up and is raised.
    """
    warm_up(step, state, cache)
    try:
        return capture(step)
    except RuntimeError as err:
        if use_graph:
            raise
        warnings.warn(f"CUDA graph capture of the decode step failed, decoding eagerly: {err}", stacklevel=3)
        return None


def _graph_wanted(model: nn.Module, device: torch.device, use_graph: bool | None) -> bool:
    """Graphs need CUDA, one device for every weight, and no dropout randomness (eval mode)."""
    possible = device.type == "cuda" and not model.training and len({p.device for p in model.parameters()}) == 1
    if use_graph and not possible:
        raise ValueError("use_graph=True needs the model in eval mode on one CUDA device")
    return possible if use_graph is None else use_graph


def trim_to_generate(out: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Cut the output where `generate` stops: after the step at which the last row emitted its stop id.

    The decoder looks at `done` only every few steps, so it may run a few steps past that point; those
    columns hold only pad ids and are dropped here. If some row never stopped, all columns are kept.
    """
    is_stop = (out[:, :, None] == stop_ids[None, None, :]).any(dim=-1)  # (B, T)
    stopped = is_stop.any(dim=1)
    if out.shape[1] == 0 or not bool(stopped.all()):
        return out
    last = int(is_stop.int().argmax(dim=1).max())  # each row's first stop; the latest of them
    return out[:, : last + 1]
