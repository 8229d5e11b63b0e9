"""`ChatGLM4Tokenizer`: the GLM-4 / CogAgent tokenizer and chat template, without remote code.

What it reproduces (spec: ``docs/MODEL_SPEC.md`` §5; upstream: ``tokenization_chatglm.py`` and
``tokenizer_config.json`` of THUDM/glm-4v-9b and THUDM/cogagent-9b-20241220 on the Hugging Face hub):

- ``tokenizer.model``: byte-level BPE ranks (base64 bytes + rank per line), encoded with tiktoken and
  the GLM-4 pre-tokenization regex. 151 329 ranks in the real file.
- 14 special tokens appended after the ranks, in a fixed order, so their ids are ``N + offset``:
  151329 ``<|endoftext|>`` … 151342 on the real model, TINY_N_RANKS… on the course's tiny tokenizer, 557… on
  the parity case. Nothing in this package hard-codes an id; ask the tokenizer (``tok.user_id``).
- The chat template: ``[gMASK]<sop>`` once, then per message ``<|role|>`` + BPE(metadata + "\\n") +
  [``<|begin_of_image|> <|endoftext|> <|end_of_image|>`` if the message has an image] + BPE(content).
  Content is plain text: a literal ``<|user|>`` typed by a user is BPE-encoded, never a control token.
  ``add_generation_prompt`` appends ``<|assistant|>`` alone (the model writes the "\\n"). The layout is
  rendered by `cogagent_nb.data.chat_format.render_conversation`, the same function the training
  encoder uses, so inference and training see the same ids.
- ``tokenizer(text)`` is the Hugging Face path: registered special strings in raw text *are* control
  tokens there, and ``[gMASK]<sop>`` is prepended. Padding is on the left with ``<|endoftext|>``.

It subclasses transformers' ``PreTrainedTokenizer`` so that ``save_pretrained``, ``Trainer``
(``processing_class=``) and ``decode(..., skip_special_tokens=True)`` work as usual. Tokens are bytes
(as upstream): a BPE token need not be valid UTF-8 on its own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken
import torch
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken, BatchEncoding, PaddingStrategy

from cogagent_nb.data.bpe import GLM4_PAT_STR, SPECIAL_TOKENS, TINY_N_RANKS, read_tokenizer_model, write_tokenizer_model
from cogagent_nb.data.chat_format import render_conversation
from cogagent_nb.data.images import image_to_tensor, load_image

DEFAULT_IMAGE_SIZE = 1120  # CogAgent-9B / GLM-4V-9B
# The course's tiny tokenizer (TINY_N_RANKS ranks learned from the demo dataset, specials after them).
TINY_TOKENIZER_FILE: Path = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer.model"
__all__ = ["ChatGLM4Tokenizer", "SPECIAL_TOKENS", "TINY_N_RANKS", "TINY_TOKENIZER_FILE", "write_tokenizer_files"]


class ChatGLM4Tokenizer(PreTrainedTokenizer):
    """GLM-4 byte-level BPE with the GLM-4V chat template (see the module docstring)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        image_size: int = DEFAULT_IMAGE_SIZE,
        **kwargs: Any,
    ) -> None:
        for key in ("is_local", "local_files_only"):  # loader bookkeeping, not tokenizer settings
            kwargs.pop(key, None)
        self.vocab_file = str(vocab_file)
        self._ranks: dict[bytes, int] = read_tokenizer_model(vocab_file)
        self._id_to_bytes: dict[int, bytes] = {rank: token for token, rank in self._ranks.items()}
        self._bpe = tiktoken.Encoding(
            name=f"glm4-{len(self._ranks)}", pat_str=GLM4_PAT_STR, mergeable_ranks=self._ranks, special_tokens={}
        )
        self.image_size = int(image_size)
        kwargs["added_tokens_decoder"] = _special_added_tokens(
            len(self._ranks), kwargs.get("added_tokens_decoder"), self.vocab_file
        )
        kwargs.setdefault("eos_token", "<|endoftext|>")
        kwargs.setdefault("pad_token", "<|endoftext|>")
        if not kwargs.get("extra_special_tokens") and not kwargs.get("additional_special_tokens"):
            kwargs["extra_special_tokens"] = list(SPECIAL_TOKENS)
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            image_size=self.image_size,
            **kwargs,
        )
        ids = {token: len(self._ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.special_ids: dict[str, int] = ids
        self.gmask_id, self.sop_id = ids["[gMASK]"], ids["<sop>"]
        self.system_id, self.user_id = ids["<|system|>"], ids["<|user|>"]
        self.assistant_id, self.observation_id = ids["<|assistant|>"], ids["<|observation|>"]
        self.boi_id, self.eoi_id = ids["<|begin_of_image|>"], ids["<|end_of_image|>"]
        self.eos_id = ids["<|endoftext|>"]

    # --- the BPE vocabulary (what PreTrainedTokenizer asks a subclass for) ---------------------------
    @property
    def vocab_size(self) -> int:
        """Number of BPE ranks; the special tokens come after (``len(tokenizer)`` counts both)."""
        return len(self._ranks)

    def get_vocab(self) -> dict[bytes | str, int]:
        vocab: dict[bytes | str, int] = dict(self._ranks)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[bytes]:
        return [self._id_to_bytes[i] for i in self._bpe.encode_ordinary(text)]

    def _convert_token_to_id(self, token: bytes | str) -> int:
        key = token.encode("utf-8") if isinstance(token, str) else token
        if key not in self._ranks:
            raise KeyError(f"{token!r} is not a token of {self.vocab_file}")
        return self._ranks[key]

    def _convert_id_to_token(self, index: int) -> bytes:
        # Unknown ids decode to nothing, as upstream: the model's embedding matrix is padded past the
        # vocabulary (to a multiple of 64 on the tiny model) and an untrained model can sample those rows.
        return self._id_to_bytes.get(index, b"")

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        data = b"".join(t.encode("utf-8") if isinstance(t, str) else t for t in tokens)
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = write_tokenizer_model(Path(save_directory) / name, self._ranks)
        return (str(path),)

    # --- special tokens around raw text (the `tokenizer(text)` path) ------------------------------------
    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """``[gMASK] <sop> text`` (and ``… text_b <|endoftext|>`` for a pair), as upstream."""
        ids = [self.gmask_id, self.sop_id] + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def _pad(
        self,
        encoded_inputs: dict[str, Any] | BatchEncoding,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """The base padding, plus `position_ids` (0…L−1, padded with 0) as the GLM-4 model expects."""
        length = len(encoded_inputs[self.model_input_names[0]])
        if "position_ids" in self.model_input_names and "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(length))
        padded = super()._pad(
            encoded_inputs, max_length, padding_strategy, pad_to_multiple_of, padding_side, return_attention_mask
        )
        difference = len(padded[self.model_input_names[0]]) - len(padded["position_ids"])
        if difference > 0:
            side = padding_side if padding_side is not None else self.padding_side
            positions = list(padded["position_ids"])
            padded["position_ids"] = [0] * difference + positions if side == "left" else positions + [0] * difference
        return padded

    # --- plain text --------------------------------------------------------------------------------------
    @property
    def eos_token_ids_for_generation(self) -> list[int]:
        """The stop set of the official generation config: <|endoftext|>, <|user|>, <|observation|>."""
        return [self.eos_id, self.user_id, self.observation_id]

    def encode_text(self, text: str) -> list[int]:
        """Plain BPE of `text`: special-token strings inside it are ordinary text, not control tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode_text expects a str, got {type(text).__name__}")
        return self._bpe.encode_ordinary(text)

    # --- the chat template ---------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]] | Mapping[str, Any],
        tools: list | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        padding: bool | str | PaddingStrategy = True,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = False,
        image_root: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | torch.Tensor | BatchEncoding:
        """Render one conversation or a batch in the GLM-4V chat format (module docstring).

        Messages are ``{"role", "content", "image"?, "metadata"?}``; ``image`` is a path (relative paths
        resolve against `image_root`, else the working directory) or a PIL image; at most one image per
        conversation. ``tokenize=False`` returns the rendered string(s). With ``return_dict=True`` the
        result holds input_ids, attention_mask, position_ids (left-padded with <|endoftext|>, mask 0,
        position 0) and, when a message carries an image, ``images`` [B, 3, S, S].
        Truncation is refused: cutting a templated conversation can split the image marker; use
        `cogagent_nb.data.encoding.encode_conversation` with length budgets instead.
        """
        unused = {
            k: v for k, v in kwargs.items() if k not in ("chat_template", "tokenizer_kwargs", "add_special_tokens")
        }
        if unused:
            raise TypeError(f"apply_chat_template got unexpected arguments: {sorted(unused)}")
        if truncation:
            raise ValueError(
                "apply_chat_template does not truncate (it could split the image tokens); "
                "use cogagent_nb.data.encoding.encode_conversation with max_input_length/max_output_length"
            )
        if tools:
            raise NotImplementedError("tool messages (`tools=`) are not supported by this tokenizer's chat template")
        if return_dict and not tokenize:
            raise ValueError("return_dict=True needs tokenize=True")
        conversations, is_batch = _as_batch(conversation)
        if not tokenize:
            texts = [self._render_text(c, add_generation_prompt) for c in conversations]
            return texts if is_batch else texts[0]
        rendered = [self._render_ids(c, add_generation_prompt, image_root) for c in conversations]
        return self._collate_rendered(rendered, is_batch, padding, max_length, return_tensors, return_dict)

    def _render_ids(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, image_root: str | os.PathLike | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """The template's ids (`render_conversation`) and the screenshot as a tensor, if a message has one."""
        segments = render_conversation(messages, self, add_generation_prompt=add_generation_prompt)
        ids = [token for segment in segments for token in segment.ids]
        image_index = next((s.message_index for s in segments if s.kind == "image"), None)
        if image_index is None:
            return ids, None
        image = _open_image(messages[image_index]["image"], image_root, image_index)
        return ids, image_to_tensor(image, self.image_size)

    def _render_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        """The rendered string: the same segments as `_render_ids`, special tokens written by name."""
        segments = render_conversation(messages, self, add_generation_prompt=add_generation_prompt)
        return "".join(segment.text for segment in segments)

    def _collate_rendered(
        self,
        rendered: list[tuple[list[int], torch.Tensor | None]],
        is_batch: bool,
        padding: bool | str | PaddingStrategy,
        max_length: int | None,
        return_tensors: str | None,
        return_dict: bool,
    ) -> list[int] | list[list[int]] | torch.Tensor | BatchEncoding:
        images = [image for _, image in rendered]
        if any(image is not None for image in images) and any(image is None for image in images):
            missing = [i for i, image in enumerate(images) if image is None]
            raise ValueError(
                f"conversation(s) {missing} of the batch have no image while others do; the model splices "
                "one image into every sample of an image batch"
            )
        batch = self.pad(
            {"input_ids": [ids for ids, _ in rendered]},
            padding=padding,
            max_length=max_length,
            return_attention_mask=True,
        )
        if not is_batch and return_tensors is None:
            batch = BatchEncoding({key: value[0] for key, value in batch.items()})
        else:
            batch = BatchEncoding(dict(batch), tensor_type=return_tensors)
        if not return_dict:
            return batch["input_ids"]
        if images[0] is not None:
            stacked = torch.stack(images)  # (B, 3, S, S)
            batch["images"] = stacked if is_batch or return_tensors is not None else stacked[0]
        return batch


# --- helpers -------------------------------------------------------------------------------------------------
def _special_added_tokens(n_ranks: int, from_config: Mapping[int, Any] | None, source: str) -> dict[int, AddedToken]:
    """The special tokens at ids n_ranks…n_ranks+13; a tokenizer_config.json that disagrees is an error."""
    tokens = {
        n_ranks + i: AddedToken(content, lstrip=False, rstrip=False, normalized=False, single_word=False, special=True)
        for i, content in enumerate(SPECIAL_TOKENS)
    }
    for index, token in (from_config or {}).items():
        content = (
            token.content
            if isinstance(token, AddedToken)
            else str(token.get("content") if isinstance(token, Mapping) else token)
        )
        expected = tokens.get(int(index))
        if expected is None or expected.content != content:
            raise ValueError(
                f"tokenizer_config.json: added_tokens_decoder: id {index} is {content!r}, but {source} has "
                f"{n_ranks} ranks, so the special tokens must be {n_ranks}…{n_ranks + len(SPECIAL_TOKENS) - 1} "
                f"in the order {SPECIAL_TOKENS}"
            )
    return tokens


def _as_batch(conversation: Any) -> tuple[list[Sequence[Mapping[str, Any]]], bool]:
    """Normalise the input to a list of message lists; also accept the dataset's {"messages": [...]}."""
    if isinstance(conversation, Mapping):
        if "messages" not in conversation:
            raise TypeError("a conversation dict must hold a 'messages' list")
        return [conversation["messages"]], False
    if not isinstance(conversation, Sequence) or isinstance(conversation, str) or not conversation:
        raise TypeError("expected a non-empty list of messages or a list of conversations")
    first = conversation[0]
    if isinstance(first, Mapping) and "role" in first:
        return [conversation], False
    return [c["messages"] if isinstance(c, Mapping) else c for c in conversation], True


def _open_image(image: Any, image_root: str | os.PathLike | None, index: int):
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        if not path.is_file():
            raise FileNotFoundError(f"message {index}: image not found: {path.resolve()}")
        return load_image(path)
    return load_image(image)


def write_tokenizer_files(
    out_dir: str | os.PathLike, tokenizer_model: str | os.PathLike | ChatGLM4Tokenizer, *, image_size: int
) -> Path:
    """Write `tokenizer.model` + `tokenizer_config.json` into `out_dir` in the official GLM-4V layout.

    tokenizer_model: a `tokenizer.model` file (copied byte for byte) or a loaded `ChatGLM4Tokenizer`
      (its ranks are written from memory, in rank order).
    The config lists the special tokens at their ids (number of ranks + offset), left padding, and the
    model's `image_size`, with ``tokenizer_class`` "ChatGLM4Tokenizer" and no ``auto_map`` (this package
    registers the class; nothing runs remote code). Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "tokenizer.model"
    if isinstance(tokenizer_model, ChatGLM4Tokenizer):
        n_ranks = tokenizer_model.vocab_size
        write_tokenizer_model(target, tokenizer_model._ranks)
    else:
        n_ranks = len(read_tokenizer_model(tokenizer_model))  # validates the file before copying it
        if not target.exists() or not target.samefile(tokenizer_model):
            shutil.copyfile(tokenizer_model, target)
    added = {
        str(n_ranks + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, content in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 8192,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
        "image_size": int(image_size),
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out_dir
