"""GLM-4V's chat format, written once: the roles, the grammar of a training conversation, the renderer.

Three parts of the package speak this format, and all three read it from here:

- `ChatGLM4Tokenizer.apply_chat_template` (inference: ids or the rendered string),
- `encode_conversation` (training: ids and the loss mask),
- `validate_file` / `cogagent-nb validate` (the data check before training).

**The layout** (upstream: ``tokenization_chatglm.py`` of THUDM/glm-4v-9b, its ``apply_chat_template``)::

    [gMASK]<sop>                                        once
    <|role|> BPE(metadata + "\\n") [boi pad eoi] BPE(content)    per message; the image triple only on
                                                        the message that carries the screenshot
    <|assistant|>                                       add_generation_prompt only

There is no end-of-turn token between messages: a turn ends where the next role token starts. Content
is plain text (a literal "<|user|>" typed by a user is BPE text, never a control token).

**The renderer** `render_conversation` lays a conversation out as `Segment`s, each a run of ids with
one "supervise this" flag, in the manner of nanochat's ``render_conversation`` (nanochat
``tokenizer.py``). The tokenizer concatenates the ids (or the text); the encoder also reads the flags.
With ``supervise="fixed"`` (this course's mask) the "\\n" and text of every assistant turn are
targets, and so is the token right after each assistant turn (the next role token, or the appended
end-of-turn token): that token is how the model learns to stop. ``supervise="official"`` reproduces
THUDM/CogAgent ``finetune/finetune.py``: every token of an assistant message is a target, the role
token included, and the appended end token is not.

**The grammar** `conversation_problems` is what a *training* conversation must be; the encoder
refuses a conversation that breaks it and the validator reports the same problems as errors, so a
file that validates also encodes::

    system? user assistant ((user | observation) assistant)*

with exactly one screenshot, on a user turn. An observation (a tool result) answers an assistant
turn; a sample ends on the assistant turn it teaches. The chat template itself renders any role
order, as the official one does (inference may end on a user turn, or carry no image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

ROLES: tuple[str, ...] = ("system", "user", "assistant", "observation")
"""The four roles of GLM-4's chat template; each has its own special token ``<|role|>``."""

IMAGE_TOKENS: tuple[str, str, str] = ("<|begin_of_image|>", "<|endoftext|>", "<|end_of_image|>")
"""The image triple in the ids: boi, a placeholder (the pad id), eoi; the model splices the image there."""

Supervision = Literal["fixed", "official"]

# Which role may follow which in a training conversation; "start" is the state before the first message.
ALLOWED_NEXT: dict[str, tuple[str, ...]] = {
    "start": ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "observation"),
    "observation": ("assistant",),
}


# --- the grammar --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GrammarProblem:
    """One way a conversation breaks the grammar: `field` is named like ``messages[1].role``."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def conversation_problems(messages: Any) -> list[GrammarProblem]:
    """Every way `messages` breaks the grammar of a training conversation (module docstring); [] if none.

    Checked: a non-empty list of objects; each with a known `role` and a string `content`; the role
    order of `ALLOWED_NEXT`; an assistant turn at the end; exactly one `image`, on a user turn.
    Data-quality checks (empty text, answers that do not parse, image files) are the validator's.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return [
            GrammarProblem(
                "messages", f'must be a list, got {type(messages).__name__} (a conversation is {{"messages": [...]}})'
            )
        ]
    if not messages:
        return [GrammarProblem("messages", "empty conversation")]
    problems: list[GrammarProblem] = []
    roles: list[str | None] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            problems.append(
                GrammarProblem(f"messages[{i}]", f"a message must be an object, got {type(message).__name__}")
            )
            roles.append(None)
            continue
        problems += _message_problems(i, message)
        roles.append(message.get("role") if message.get("role") in ROLES else None)
    if all(role is not None for role in roles):
        problems += _order_problems(roles)
    problems += _image_problems(messages)
    return problems


def _message_problems(i: int, message: Mapping[str, Any]) -> list[GrammarProblem]:
    problems = []
    role = message.get("role")
    if role is None:
        problems.append(GrammarProblem(f"messages[{i}].role", "missing"))
    elif role not in ROLES:
        problems.append(
            GrammarProblem(f"messages[{i}].role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        )
    content = message.get("content")
    if content is None:
        problems.append(GrammarProblem(f"messages[{i}].content", "missing"))
    elif not isinstance(content, str):
        problems.append(GrammarProblem(f"messages[{i}].content", f"must be a string, got {type(content).__name__}"))
    if message.get("tools"):  # GLM-4's template renders tool definitions; this package's has no such branch
        problems.append(
            GrammarProblem(f"messages[{i}].tools", "tool definitions are not supported by this chat template")
        )
    return problems


def _order_problems(roles: list[str]) -> list[GrammarProblem]:
    """Role order against `ALLOWED_NEXT`, then the end: a training sample ends on an assistant turn."""
    problems = []
    state = "start"
    for i, role in enumerate(roles):
        if role not in ALLOWED_NEXT[state]:
            after = "the start of the conversation" if state == "start" else f"a {state} turn"
            allowed = " or ".join(ALLOWED_NEXT[state])
            problems.append(
                GrammarProblem(f"messages[{i}].role", f"{role!r} cannot follow {after} (allowed: {allowed})")
            )
        state = role
    if "assistant" not in roles:
        problems.append(GrammarProblem("messages", "no assistant turn: nothing to learn from this conversation"))
    elif roles[-1] != "assistant":
        problems.append(
            GrammarProblem(
                "messages",
                f"the conversation ends with a {roles[-1]!r} turn; a training sample must end with the assistant "
                "answer it teaches (drop the trailing turns, or answer them)",
            )
        )
    return problems


def _image_problems(messages: Sequence[Any]) -> list[GrammarProblem]:
    """Exactly one screenshot, on a user turn (the model splices one image per sample)."""
    carriers = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("image") is not None]
    problems = []
    for i in carriers[1:]:
        problems.append(
            GrammarProblem(
                f"messages[{i}].image",
                f"more than one image in the conversation (first in messages[{carriers[0]}]); CogAgent takes "
                "exactly one screenshot per sample (split the conversation, one screenshot each)",
            )
        )
    for i in carriers:
        role = messages[i].get("role")
        if role != "user" and role in ROLES:
            problems.append(
                GrammarProblem(
                    f"messages[{i}].image", f"image on the {role} turn; the screenshot belongs to the user turn"
                )
            )
    if not carriers:
        problems.append(
            GrammarProblem(
                "messages",
                "no user turn with an image; CogAgent needs one screenshot per conversation "
                '(add "image": "images/<file>.png" to the user turn)',
            )
        )
    return problems


# --- the renderer ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of token ids with one supervision flag.

    role: the message role it belongs to ("prefix" for [gMASK]<sop>).
    kind: "prefix" | "role" | "newline" (BPE of metadata + "\\n") | "image" | "content" | "end_of_turn".
    text: what the ids spell in the rendered string (special tokens by name); None for content ids
      given from outside (a truncated turn).
    message_index: index of the message in the conversation (None for the prefix and the appended end).
    """

    role: str
    kind: str
    ids: tuple[int, ...]
    supervised: bool
    message_index: int | None = None
    text: str | None = None


def render_conversation(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    supervise: Supervision | None = None,
    content_ids: Sequence[Sequence[int]] | None = None,
    end_of_turn_id: int | None = None,
    add_generation_prompt: bool = False,
) -> list[Segment]:
    """Lay `messages` out in GLM-4V's chat format, one supervision flag per segment (module docstring).

    tokenizer: anything with `encode_text(str) -> list[int]` and the special ids as attributes
      (`gmask_id`, `sop_id`, `<role>_id`, `boi_id`, `eoi_id`, `eos_id`), e.g. `ChatGLM4Tokenizer`.
    supervise: None (inference: nothing is a target), "fixed" or "official" (see the module docstring).
    content_ids: the content ids of every message, when the caller has already encoded (and
      truncated) them; default BPE(content).
    end_of_turn_id: a token appended after the last message (training), a target under "fixed".
    add_generation_prompt: append `<|assistant|>` alone, from which the model generates its answer.

    Raises ValueError for an unknown role or a second image, TypeError for non-text content, and
    NotImplementedError for tool definitions, which this template does not render.
    """
    official = supervise == "official"
    role_ids = {
        "system": tokenizer.system_id,
        "user": tokenizer.user_id,
        "assistant": tokenizer.assistant_id,
        "observation": tokenizer.observation_id,
    }
    segments = [Segment("prefix", "prefix", (tokenizer.gmask_id, tokenizer.sop_id), False, None, "[gMASK]<sop>")]
    image_at = None
    previous = None
    for i, message in enumerate(messages):
        role, content, metadata = _message_parts(message, i)
        answer = supervise is not None and role == "assistant"
        # the token right after an assistant turn ends that turn: a target under the fixed mask;
        # the official mask supervises the assistant's own role token instead
        role_target = supervise is not None and (answer if official else previous == "assistant")
        segments.append(Segment(role, "role", (role_ids[role],), role_target, i, f"<|{role}|>"))
        header = metadata + "\n"
        segments.append(Segment(role, "newline", tuple(tokenizer.encode_text(header)), answer, i, header))
        if message.get("image") is not None:
            if image_at is not None:
                raise ValueError(
                    f"message {i} carries a second image (the first is on message {image_at}); CogAgent supports "
                    "one image per conversation"
                )
            image_at = i
            image_ids = (tokenizer.boi_id, tokenizer.eos_id, tokenizer.eoi_id)
            segments.append(Segment(role, "image", image_ids, False, i, "".join(IMAGE_TOKENS)))
        if content_ids is None:
            ids, text = tuple(tokenizer.encode_text(content)), content
        else:
            ids, text = tuple(content_ids[i]), None
        if ids:
            segments.append(Segment(role, "content", ids, answer, i, text))
        previous = role
    if end_of_turn_id is not None:
        segments.append(Segment("assistant", "end_of_turn", (end_of_turn_id,), supervise == "fixed", None, None))
    if add_generation_prompt:
        segments.append(Segment("assistant", "role", (tokenizer.assistant_id,), False, None, "<|assistant|>"))
    return segments


def _message_parts(message: Any, index: int) -> tuple[str, str, str]:
    """(role, content, metadata) of one message, or the error that says why it cannot be rendered."""
    if not isinstance(message, Mapping):
        raise TypeError(f"message {index}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    if message.get("tools"):
        raise NotImplementedError(f"message {index}: messages with `tools` are not supported by this chat template")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"message {index}: role {role!r} is not one of {ROLES}")
    content = message.get("content")
    content = "" if content is None else content
    if not isinstance(content, str):
        raise TypeError(f"message {index}: content must be a string, got {type(content).__name__}")
    return role, content, str(message.get("metadata") or "")
