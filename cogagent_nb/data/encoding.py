"""Conversations → training tensors: ids, labels (the loss mask), positions and the screenshot.

A conversation is the official dict `{"messages": [{"role", "content", "image"?}, ...]}` (or just the
list of messages). It must follow the grammar of `chat_format.conversation_problems` (the validator
reports the same problems), and `chat_format.render_conversation`, the renderer the chat template
uses too, lays it out as *segments*, each with one "supervise this" flag:

    [gMASK]<sop>                       prefix            never a target
    <|user|> "\\n" [boi pad eoi] text   user turn         never a target (image triple included)
    <|assistant|>                      role token        NOT a target: it is the *input* from which the
                                                         first answer token is predicted (at inference
                                                         `add_generation_prompt` supplies it)
    "\\n" answer text                  assistant turn    targets (the model generates "\\n" first)
    <|user|>                           end of turn       a TARGET: the model must learn to emit it to stop

`labels` are aligned with `input_ids` (the model shifts them by one, as Hugging Face causal LMs do):
`labels[t] = input_ids[t]` means "the model is trained to predict token t from tokens < t".

The end-of-turn token. GLM-4 has no explicit end-of-turn: an assistant turn ends where the next role
token starts. Generation stops on `<|endoftext|>`, `<|user|>` or `<|observation|>` (config
`eos_token_id`, CogAgent's finetune and vLLM demo). The default `end_of_turn="<|user|>"` is the token
the official finetune appends (id 151336 on the real model) and the one the model sees after an
assistant turn in every multi-turn chat, so training matches inference. `<|endoftext|>` is allowed
(`end_of_turn="<|endoftext|>"`, what ms-swift does) but it is also the pad id and the image placeholder,
so any collator that masks pad ids in the labels silently erases it. Inside a multi-round conversation
the token after an assistant turn is the next role token (`<|user|>` or `<|observation|>`), which is
supervised as that turn's end; `end_of_turn` only chooses the token appended after the *last* turn.

`mode="official"` reproduces the mask of THUDM/CogAgent `finetune/finetune.py` so that lesson 02 can
show its mistake: every token of an assistant message is a label (role token included) and the
appended end token is **not** a label, so the model never learns to stop.

Lengths. The budgets mean what the official fine-tuning README and `configs/lora.yaml` mean: they count
TEXT ids, and the image comes on top. `max_input_length` counts the prompt (everything up to and
including the last `<|assistant|>`) without the image triple; `max_output_length` counts the answer
(the last assistant turn's "\\n", text and end token). The model then replaces the 3-id image triple by
`num_image_tokens + 2` vectors (boi, patches, eoi: 1602 at full size, 66 for the tiny preset), so a
sample that fits both budgets is at most `max_input_length + max_output_length + num_image_tokens + 2`
positions long, and the official `max_input_length: 512` holds a screenshot plus 512 prompt tokens.
`max_model_length`, a key of this package only, bounds the total the model sees after the splice
(image included), for a fixed memory budget; the prompt is truncated to fit it too. (THUDM/CogAgent
`finetune/finetune.py` cuts the ids at max_input_length + max_output_length, counting the triple as 3
ids, and so can cut it in half.) Truncation (see `_fit_prompt`) drops
history steps oldest first, then cuts user text from the left, keeping the task line as long as
possible; it never splits the triple, never drops the image and never shortens the answer to make
room for the prompt. An answer longer than `max_output_length` is cut from the right and loses its
end-of-turn token (see `_cut_answer`). A sample left with no target raises `EncodingError` naming it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from cogagent_nb.data.chat_format import ROLES, Segment, Supervision, conversation_problems, render_conversation

IGNORE_INDEX = -100  # label value that cross-entropy ignores (torch and Hugging Face convention)
END_OF_TURN_CHOICES = ("<|user|>", "<|endoftext|>")
Mode = Supervision  # "fixed" (this course's mask) or "official" (the official finetune's)
__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "Segment",
    "EncodedSample",
    "EncodingError",
    "TruncationReport",
    "encode_conversation",
    "TrainingCollator",
    "ConversationDataset",
    "split_history",
]


class EncodingError(ValueError):
    """A conversation that cannot become a training sample; the message names the sample."""


@dataclasses.dataclass(frozen=True)
class TruncationReport:
    """What the length budgets removed (all zero/False when nothing was cut)."""

    history_steps_dropped: int = 0  # whole "N. ..." lines removed from "History steps:"
    prompt_tokens_cut: int = 0  # further BPE tokens cut from the left of user text
    task_line_cut: bool = False  # the first line of a user turn had to be shortened too
    answer_tokens_cut: int = 0  # answer text tokens cut from the right
    end_of_turn_dropped: bool = False  # the answer was cut, so it does not end with the stop token

    @property
    def truncated(self) -> bool:
        cuts = (self.history_steps_dropped, self.prompt_tokens_cut, self.answer_tokens_cut, self.end_of_turn_dropped)
        return any(cuts)  # a budget one short drops only the stop token: the sample never learns to stop


@dataclasses.dataclass(frozen=True)
class EncodedSample:
    """One training sample. Token tensors are 1-D int64 of the *unexpanded* length L (image = 3 ids)."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) input id where supervised, IGNORE_INDEX elsewhere
    attention_mask: torch.Tensor  # (L,) ones
    position_ids: torch.Tensor  # (L,) 0 … L-1; the model re-maps positions around the image
    image: torch.Tensor | None  # (3, S, S) CLIP-normalised screenshot
    segments: tuple[Segment, ...]
    num_image_tokens: int  # patches the model splices in (1600 full size, 64 tiny)
    truncation: TruncationReport
    name: str

    @property
    def model_length(self) -> int:
        """Length the language model really sees: the triple becomes num_image_tokens + 2 vectors."""
        return len(self.input_ids) - 3 + self.num_image_tokens + 2

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# --- the grammar -----------------------------------------------------------------------------------
def _checked_messages(conversation: Mapping[str, Any] | Sequence[Mapping[str, Any]], name: str) -> list[Mapping]:
    """The message list, if it follows the training grammar; else EncodingError naming every problem."""
    messages = conversation.get("messages") if isinstance(conversation, Mapping) else conversation
    problems = conversation_problems(messages)
    if problems:
        raise EncodingError(f"{name}: " + "; ".join(str(problem) for problem in problems))
    return list(messages)


# --- history-aware truncation ----------------------------------------------------------------------
_HISTORY_HEADER = re.compile(r"^History steps:", re.MULTILINE)
_HISTORY_STEP = re.compile(r"\n\d+\. [^\n]*")


def split_history(content: str) -> tuple[str, list[str], str]:
    """Split an official CogAgent prompt into (head, history steps, tail).

    The official prompt is `Task: …\\nHistory steps: \\n0. …\\n1. …\\n(Platform: …)\\n(Answer in …)\\n`.
    head ends with the "History steps:" line, each step is "\\nN. …" (one line, as the official
    concatenation writes it), the tail is the rest. Content without that header has no history steps
    and comes back as (content, [], "").
    """
    header = _HISTORY_HEADER.search(content)
    if header is None:
        return content, [], ""
    line_end = content.find("\n", header.start())
    if line_end < 0:
        return content, [], ""
    steps, position = [], line_end
    while (step := _HISTORY_STEP.match(content, position)) is not None:
        steps.append(step.group())
        position = step.end()
    return content[:line_end], steps, content[position:]


@dataclasses.dataclass
class _Turn:
    """A message being encoded: its content ids can shrink during truncation."""

    role: str
    content: str
    ids: list[int]
    header_length: int  # BPE(metadata + "\n") after the role token; 1 without metadata


def _turns(messages: Sequence[Mapping[str, Any]], tokenizer) -> list[_Turn]:
    return [
        _Turn(
            m["role"],
            m["content"],
            tokenizer.encode_text(m["content"]),
            len(tokenizer.encode_text(str(m.get("metadata") or "") + "\n")),
        )
        for m in messages
    ]


def _prompt_length(turns: list[_Turn]) -> int:
    """Text ids of the prompt: prefix + every turn before the answer + the final <|assistant|>.

    The image triple is not counted: its num_image_tokens + 2 vectors come on top of the budget.
    """
    length = 2  # [gMASK] <sop>
    for turn in turns[:-1]:
        length += 1 + turn.header_length + len(turn.ids)  # role token, "\n", text
    return length + 1  # the last <|assistant|>


def _prompt_budget(
    max_input_length: int | None, max_model_length: int | None, image_length: int, answer_length: int
) -> tuple[int | None, str]:
    """The prompt's text budget and how to name it in an error: the tighter of the two limits.

    max_model_length counts every position after the splice, so the image (num_image_tokens + 2) and
    the answer already laid out are subtracted from it.
    """
    budgets = []
    if max_input_length is not None:
        budgets.append((max_input_length, f"max_input_length={max_input_length}"))
    if max_model_length is not None:
        budgets.append(
            (
                max_model_length - image_length - answer_length,
                f"max_model_length={max_model_length} less the image ({image_length}) and the answer ({answer_length})",
            )
        )
    return min(budgets) if budgets else (None, "")


def _fit_prompt(
    turns: list[_Turn],
    tokenizer,
    budget: int,
    budget_name: str,
    name: str,
) -> tuple[int, int, bool]:
    """Shrink user text, oldest first, until the prompt's text ids fit `budget`. Returns what was removed.

    Order, each step only if the previous one was not enough:
      A. drop whole history steps ("N. …" lines under "History steps:"), oldest first, earliest user turn
         first; the header, the task line and the platform/format lines stay;
      B. cut BPE tokens from the left of the text *after* the first (task) line of each user turn;
      C. cut BPE tokens from the left of what remains (the task line itself).
    System, observation and earlier assistant turns, the image and the answer are never touched; if
    they alone exceed the budget the sample is rejected.
    """

    def excess() -> int:
        return _prompt_length(turns) - budget

    users = [t for t in turns[:-1] if t.role == "user"]
    steps_dropped = 0
    for turn in users:  # A
        head, steps, tail = split_history(turn.content)
        while steps and excess() > 0:
            steps.pop(0)
            steps_dropped += 1
            turn.content = head + "".join(steps) + tail
            turn.ids = tokenizer.encode_text(turn.content)
    tokens_cut, task_line_cut = 0, False
    for turn in users:  # B: the task line is encoded on its own so that it stays whole
        if excess() <= 0:
            break
        first_line = turn.content.split("\n", 1)[0]
        head_ids = tokenizer.encode_text(first_line)
        rest_ids = tokenizer.encode_text(turn.content[len(first_line) :])
        turn.ids = head_ids + rest_ids
        cut = max(min(excess(), len(rest_ids)), 0)
        turn.ids = head_ids + rest_ids[cut:]
        tokens_cut += cut
    for turn in users:  # C: the task line too, from its left
        if excess() <= 0:
            break
        cut = min(excess(), len(turn.ids))
        if cut > 0:
            turn.ids = turn.ids[cut:]
            tokens_cut += cut
            task_line_cut = True
    if excess() > 0:
        length = _prompt_length(turns)
        raise EncodingError(
            f"{name}: the prompt needs {length} text tokens even with all user text removed "
            f"(the image comes on top), more than {budget_name}"
        )
    return steps_dropped, tokens_cut, task_line_cut


def _cut_answer(answer: _Turn, budget: int | None) -> tuple[int, bool, bool]:
    """Cut the last answer to `budget` tokens ("\\n" + text + end). Returns (cut, keep "\\n", keep end).

    A cut answer does NOT keep its end-of-turn token: that token means "the answer is complete", and
    attaching it to half an action would teach the model to stop in the middle of one.
    """
    full = answer.header_length + len(answer.ids) + 1
    if budget is None or full <= budget:
        return 0, True, True
    keep_text = max(budget - answer.header_length, 0)
    cut = len(answer.ids) - keep_text
    answer.ids = answer.ids[:keep_text]
    return cut, budget >= answer.header_length, False


# --- assembling ------------------------------------------------------------------------------------
def _end_of_turn_id(tokenizer, end_of_turn: str) -> int:
    if end_of_turn == "<|user|>":
        return tokenizer.user_id
    if end_of_turn == "<|endoftext|>":
        return tokenizer.eos_id
    raise ValueError(f"end_of_turn must be one of {END_OF_TURN_CHOICES}, got {end_of_turn!r}")


def _without_answer_header(segments: list[Segment], last: int) -> list[Segment]:
    """An answer budget too small even for its "\\n": the last turn is its role token alone."""
    return [s for s in segments if not (s.message_index == last and s.kind in ("newline", "content"))]


def _load_image_tensor(source: Any, image_root: str | Path | None, tokenizer, name: str) -> torch.Tensor:
    from cogagent_nb.data.images import image_to_tensor, load_image

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        if not path.is_file():
            raise EncodingError(f"{name}: image file not found: {path}")
        source = path
    return image_to_tensor(load_image(source), tokenizer.image_size)


def encode_conversation(
    messages: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    num_image_tokens: int,
    max_input_length: int | None = None,
    max_output_length: int | None = None,
    max_model_length: int | None = None,
    end_of_turn: str = "<|user|>",
    mode: Mode = "fixed",
    image_root: str | Path | None = None,
    name: str = "sample",
) -> EncodedSample:
    """Turn one conversation into an `EncodedSample` (see the module docstring for the layout).

    messages: the official conversation dict or its message list; exactly one user turn has an
      `image` (a path, relative to `image_root`, or a PIL image).
    num_image_tokens: patches the model splices in for the image (1600 full size, 64 tiny preset).
    max_input_length / max_output_length: text-id budgets of the prompt and of the last answer, as in
      the official config (None = no limit); the image's num_image_tokens + 2 vectors come on top.
    max_model_length: optional budget of everything the model sees after the splice, image included;
      the prompt is truncated to fit it as well.
    end_of_turn: the token appended (and supervised) after the last answer.
    mode: "fixed" (this course's mask) or "official" (the official finetune's mask, for comparison).
    name: how errors refer to this sample, e.g. "train.jsonl:12".
    """
    if mode not in ("fixed", "official"):
        raise ValueError(f"mode must be 'fixed' or 'official', got {mode!r}")
    budgets = (
        ("max_input_length", max_input_length),
        ("max_output_length", max_output_length),
        ("max_model_length", max_model_length),
    )
    for key, value in budgets:
        if value is not None and value < 0:
            raise ValueError(f"{key} must be None or >= 0, got {value}")
    end_of_turn_id = _end_of_turn_id(tokenizer, end_of_turn)
    messages = _checked_messages(messages, name)
    image_index = next(i for i, m in enumerate(messages) if m.get("image") is not None)
    turns, truncation, keep_newline = _fitted_turns(
        messages, tokenizer, num_image_tokens, max_input_length, max_output_length, max_model_length, name
    )
    keep_end = not truncation.end_of_turn_dropped
    segments = render_conversation(
        messages,
        tokenizer,
        supervise=mode,
        content_ids=[turn.ids for turn in turns],
        end_of_turn_id=end_of_turn_id if keep_end else None,
    )
    if not keep_newline:
        segments = _without_answer_header(segments, len(turns) - 1)

    input_ids = [t for s in segments for t in s.ids]
    labels = [t if s.supervised else IGNORE_INDEX for s in segments for t in s.ids]
    if all(label == IGNORE_INDEX for label in labels):
        raise EncodingError(
            f"{name}: no supervised token is left (max_output_length={max_output_length}); "
            "training on it would divide the loss by zero"
        )
    length = len(input_ids)
    return EncodedSample(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        attention_mask=torch.ones(length, dtype=torch.long),
        position_ids=torch.arange(length, dtype=torch.long),
        image=_load_image_tensor(messages[image_index]["image"], image_root, tokenizer, name),
        segments=tuple(segments),
        num_image_tokens=num_image_tokens,
        truncation=truncation,
        name=name,
    )


def _fitted_turns(
    messages: list[Mapping],
    tokenizer,
    num_image_tokens: int,
    max_input_length: int | None,
    max_output_length: int | None,
    max_model_length: int | None,
    name: str,
) -> tuple[list[_Turn], TruncationReport, bool]:
    """The turns' text ids after the budgets cut them (answer from the right, then the prompt's history,
    then its text from the left), what was cut, and whether the answer keeps its "\n" header. Images are
    not read, so `truncation_of` can count over a whole file."""
    turns = _turns(messages, tokenizer)
    answer = turns[-1]
    answer_cut, keep_newline, keep_end = _cut_answer(answer, max_output_length)
    answer_length = int(keep_newline) * answer.header_length + len(answer.ids) + int(keep_end)
    budget, budget_name = _prompt_budget(max_input_length, max_model_length, num_image_tokens + 2, answer_length)
    steps_dropped, tokens_cut, task_line_cut = (0, 0, False)
    if budget is not None:
        steps_dropped, tokens_cut, task_line_cut = _fit_prompt(turns, tokenizer, budget, budget_name, name)
    return turns, TruncationReport(steps_dropped, tokens_cut, task_line_cut, answer_cut, not keep_end), keep_newline


def truncation_of(
    messages: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    num_image_tokens: int,
    max_input_length: int | None = None,
    max_output_length: int | None = None,
    max_model_length: int | None = None,
    name: str = "sample",
) -> TruncationReport:
    """What `encode_conversation` with these budgets would cut from a conversation, without reading its
    screenshot: cheap enough to count over a whole training file before training starts."""
    checked = _checked_messages(messages, name)
    return _fitted_turns(
        checked, tokenizer, num_image_tokens, max_input_length, max_output_length, max_model_length, name
    )[1]


# --- batching --------------------------------------------------------------------------------------
class TrainingCollator:
    """Pad a list of `EncodedSample`s into one batch of tensors.

    Pads input_ids with the tokenizer's pad id, labels with IGNORE_INDEX, attention_mask and
    position_ids with 0 (what the official tokenizer does for left padding), and stacks the images
    into (B, 3, S, S). `padding_side="left"` lines prompts up at the right edge, as generation needs;
    either side works for training because padded positions carry no label and no attention.
    """

    def __init__(
        self, tokenizer, padding_side: Literal["right", "left"] = "right", pad_to_multiple_of: int | None = None
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        self.pad_id = tokenizer.pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _padded_length(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        return longest if multiple is None else -(-longest // multiple) * multiple

    def _pad(self, rows: list[torch.Tensor], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)  # (B, L)
        for b, row in enumerate(rows):
            if self.padding_side == "right":
                out[b, : len(row)] = row
            else:
                out[b, length - len(row) :] = row
        return out

    def __call__(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("TrainingCollator got an empty batch")
        length = self._padded_length(max(len(s.input_ids) for s in samples))
        batch = {
            "input_ids": self._pad([s.input_ids for s in samples], self.pad_id, length),
            "labels": self._pad([s.labels for s in samples], IGNORE_INDEX, length),
            "attention_mask": self._pad([s.attention_mask for s in samples], 0, length),
            "position_ids": self._pad([s.position_ids for s in samples], 0, length),
        }
        missing = [s.name for s in samples if s.image is None]
        if missing:
            raise ValueError(f"samples without an image cannot be batched for CogAgent: {missing}")
        batch["images"] = torch.stack([s.image for s in samples])  # (B, 3, S, S)
        return batch


TRUNCATION_BUDGETS = ("max_input_length", "max_output_length", "max_model_length")


class ConversationDataset(torch.utils.data.Dataset):
    """A JSONL file of conversations, encoded lazily one item at a time (images are read on access).

    `ConversationDataset("data/CogAgentData/train.jsonl", tok, 64)` or
    `ConversationDataset("data/CogAgentData", tok, 64, split="train")`. Image paths resolve relative to
    the JSONL file's folder; errors name the sample as "FILE sample INDEX".
    """

    def __init__(
        self, path: str | Path, tokenizer, num_image_tokens: int, *, split: str | None = None, **encode_kwargs: Any
    ):
        from cogagent_nb.data.validation import load_conversations

        path = Path(path)
        self.path = path / f"{split}.jsonl" if split is not None else path
        self.conversations = load_conversations(self.path)
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.encode_kwargs = encode_kwargs

    def __len__(self) -> int:
        return len(self.conversations)

    def text_lengths(self) -> list[int]:
        """Token count of each conversation's text (images not opened): what length grouping sorts by."""
        if not hasattr(self, "_text_lengths"):
            self._text_lengths = [
                len(
                    self.tokenizer.encode(
                        "".join(str(m.get("content", "")) for m in messages), add_special_tokens=False
                    )
                )
                for messages in (c["messages"] if isinstance(c, Mapping) else c for c in self.conversations)
            ]
        return self._text_lengths

    def truncation_summary(self) -> str | None:
        """One line saying how many samples the length budgets cut and where, or None if none: printed
        before training, since a cut prompt or answer otherwise changes the loss without a word."""
        budgets = {k: v for k, v in self.encode_kwargs.items() if k in TRUNCATION_BUDGETS}
        reports = [
            truncation_of(
                c, self.tokenizer, num_image_tokens=self.num_image_tokens, name=f"{self.path} sample {i}", **budgets
            )
            for i, c in enumerate(self.conversations)
        ]
        cut = [r for r in reports if r.truncated]
        if not cut:
            return None
        where = {
            "history steps dropped": sum(r.history_steps_dropped > 0 for r in cut),
            "prompt text cut": sum(r.prompt_tokens_cut > 0 for r in cut),
            "answer cut": sum(r.answer_tokens_cut > 0 for r in cut),
            "stop token dropped": sum(r.end_of_turn_dropped for r in cut),
        }
        settings = ", ".join(f"{k}={v}" for k, v in budgets.items() if v is not None)
        parts = ", ".join(f"{what} in {n}" for what, n in where.items() if n)
        return f"{self.path}: {len(cut)} of {len(reports)} samples are cut to fit {settings}: {parts}"

    def __getitem__(self, index: int) -> EncodedSample:
        return encode_conversation(
            self.conversations[index],
            self.tokenizer,
            num_image_tokens=self.num_image_tokens,
            image_root=self.path.parent,
            name=f"{self.path} sample {index}",
            **self.encode_kwargs,
        )
