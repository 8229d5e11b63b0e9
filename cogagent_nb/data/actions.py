"""CogAgent's action space and answer fields: parse and format.

CogAgent-9B-20241220 answers a GUI task in plain text, one field per line. In the
"Status-Action-Operation-Sensitive" format an answer looks like this::

    Status: The mail app is open, the inbox is in the centre.
    Action: Click the 'Mark all as read' button at the top of the inbox.
    Grounded Operation: CLICK(box=[[219,186,311,207]], element_type='Clickable text', element_info='Mark all as read')
    <<一般操作>>

The `Grounded Operation` line is a Python-looking call, but not Python: the model does not escape
quotes inside strings (``element_info='the 'OK' button'``), puts no space after the colon in the
fine-tuning README (``Grounded Operation:CLICK(...)``), and writes boxes with leading zeros
(``[[000,086,999,932]]``). So this module parses it with a small scanner instead of `ast`:
lenient where real outputs vary, exact where meaning is at stake (action names, numbers, boxes).

Sources: THUDM/CogAgent `README.md` (answer formats, sensitivity tags) and `Action_space_en.md`
(actions and their parameters); the English fine-tuning README writes the tag as
``<<General Operation>>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from cogagent_nb.data.boxes import Box

# --- the vocabulary -------------------------------------------------------------------------------------

ANSWER_FORMATS: tuple[str, ...] = (
    "Action-Operation-Sensitive",
    "Status-Plan-Action-Operation",
    "Status-Action-Operation-Sensitive",
    "Status-Action-Operation",
    "Action-Operation",
)
"""The five official answer formats, in the README's order (the first is the demo default)."""

PLATFORMS: tuple[str, ...] = ("Mac", "WIN", "Mobile")
"""Official platform spellings; the README warns they are case sensitive."""

GENERAL_TAG = "<<一般操作>>"
SENSITIVE_TAG = "<<敏感操作>>"
GENERAL_TAG_EN = "<<General Operation>>"
SENSITIVE_TAG_EN = "<<Sensitive Operation>>"
END_TAG = "<<END>>"
SENSITIVITY: tuple[str, ...] = (GENERAL_TAG, SENSITIVE_TAG, GENERAL_TAG_EN, SENSITIVE_TAG_EN)
"""The sensitivity tags that close a `...-Sensitive` answer (the model itself writes the Chinese ones)."""

ArgValue = Union[str, int, bool, None, Box, tuple["Action", ...]]  # noqa: UP007 (runtime alias, forward ref)

# Parameters of each action: (required, optional). Order = the order `format_operation` prefers.
_MOUSE = (("box",), ("element_type", "element_info"))
_SCROLL = (("box", "step_count"), ("element_type", "element_info"))
ACTION_PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "CLICK": _MOUSE,
    "DOUBLE_CLICK": _MOUSE,
    "RIGHT_CLICK": _MOUSE,
    "HOVER": _MOUSE,
    "TYPE": (("box", "text"), ("element_type", "element_info")),
    "SCROLL_UP": _SCROLL,
    "SCROLL_DOWN": _SCROLL,
    "SCROLL_LEFT": _SCROLL,
    "SCROLL_RIGHT": _SCROLL,
    "KEY_PRESS": (("key",), ()),
    "GESTURE": (("actions",), ()),
    "LAUNCH": ((), ("app", "url")),
    "QUOTE_TEXT": (("box", "output"), ("auto_scroll", "element_type", "element_info", "result")),
    "QUOTE_CLIPBOARD": (("output",), ("result",)),
    "LLM": (("prompt", "output"), ("result",)),
    "END": ((), ()),
}
"""Every official action and its (required, optional) parameters, from `Action_space_en.md`."""

ACTION_NAMES: tuple[str, ...] = tuple(ACTION_PARAMETERS)
GESTURE_KEY_ACTIONS: tuple[str, ...] = ("KEY_DOWN", "KEY_PRESS", "KEY_UP")
"""The only actions allowed inside `GESTURE(actions=[...])`; each takes one `key`."""

_INT_PARAMETERS = {"step_count"}
_BOOL_PARAMETERS = {"auto_scroll"}


class ActionParseError(ValueError):
    """A Grounded Operation or an answer that cannot be read without guessing its meaning."""


# --- data classes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One grounded operation: its name and typed arguments.

    `args` keeps the order the parameters were written in. Values are typed: `box` is a tuple of four
    ints (thousandths of the screen, see `boxes.py`), `step_count` an int, `auto_scroll` a bool,
    GESTURE's `actions` a tuple of `Action`, everything else the string between the quotes, verbatim
    (escapes such as ``\\n`` in a QUOTE_CLIPBOARD result stay as written, because the model writes them).
    """

    name: str
    args: Mapping[str, ArgValue] = field(default_factory=dict)

    @property
    def box(self) -> Box | None:
        """The target box in thousandths, or None for actions without one (KEY_PRESS, END, ...)."""
        return self.args.get("box")  # type: ignore[return-value]

    def __str__(self) -> str:
        return format_operation(self)


@dataclass(frozen=True)
class Answer:
    """A parsed assistant answer; fields the answer format does not carry are None.

    `sensitivity` is one of `SENSITIVITY` (normalised spelling) or None; `end` is True when the answer
    closes with `<<END>>` (the task is finished), which the official data writes where the sensitivity
    tag would otherwise be.
    """

    status: str | None = None
    plan: str | None = None
    action: str | None = None
    operation: Action | None = None
    sensitivity: str | None = None
    end: bool = False


# --- Grounded Operation: parse --------------------------------------------------------------------------

_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*", re.DOTALL)
_KEY = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*")
_BOX = re.compile(r"\[\s*\[?\s*([^\[\]]*?)\s*\]?\s*\]")
_INT = re.compile(r"[+-]?\d+")


def parse_operation(text: str) -> Action:
    """Read one Grounded Operation such as ``CLICK(box=[[1,2,3,4]], element_info='OK')``.

    Raises `ActionParseError` for an unknown action name (names are case sensitive: the executor
    dispatches on them), an unknown or missing parameter, or a malformed box or number.
    """
    match = _CALL.fullmatch(text)
    if not match:
        raise ActionParseError(f"not an operation of the form NAME(key=value, ...): {text!r}")
    name, body = match.group(1), match.group(2)
    if name not in ACTION_PARAMETERS:
        raise ActionParseError(f"unknown action {name!r}; expected one of {', '.join(ACTION_NAMES)}")
    required, optional = ACTION_PARAMETERS[name]
    args = _parse_arguments(name, body, required + optional)
    missing = [key for key in required if key not in args]
    if missing:
        raise ActionParseError(f"{name} needs {', '.join(missing)}: {text.strip()!r}")
    return Action(name, args)


def _parse_arguments(name: str, body: str, allowed: tuple[str, ...]) -> dict[str, ArgValue]:
    """Scan ``key=value, key=value`` left to right; each value parser returns where it stopped."""
    args: dict[str, ArgValue] = {}
    pos = 0
    while body[pos:].strip():
        key_match = _KEY.match(body, pos)
        if not key_match:
            raise ActionParseError(f"{name}: expected key=value at {body[pos:].strip()!r}")
        key = key_match.group(1)
        if key not in allowed:
            expected = ", ".join(allowed) or "no parameters"
            raise ActionParseError(f"{name}: unknown parameter {key!r} (expected {expected})")
        if key in args:
            raise ActionParseError(f"{name}: parameter {key!r} given twice")
        value, pos = _parse_value(name, key, body, key_match.end(), allowed)
        args[key] = value
        pos = _skip_comma(name, body, pos)
    return args


def _skip_comma(name: str, body: str, pos: int) -> int:
    rest = body[pos:]
    stripped = rest.lstrip()
    if not stripped:
        return len(body)
    if not stripped.startswith(","):
        raise ActionParseError(f"{name}: expected ',' or ')' before {stripped!r}")
    return pos + (len(rest) - len(stripped)) + 1


def _parse_value(name: str, key: str, body: str, pos: int, allowed: tuple[str, ...]) -> tuple[ArgValue, int]:
    if key == "box":
        return _parse_box(name, body, pos)
    if key == "actions":
        return _parse_gesture_list(body, pos)
    if body[pos : pos + 1] in ("'", '"'):
        text, end = _parse_string(body, pos, allowed)
        return _typed(name, key, text), end
    bare = re.match(r"[^,]*", body[pos:]).group(0)
    return _typed(name, key, bare.strip(), bare=True), pos + len(bare)


def _parse_string(body: str, pos: int, allowed: tuple[str, ...]) -> tuple[str, int]:
    """A quoted value ends at the first matching quote that is followed by the end of the call or by
    ``, <known parameter>=``. That rule reads ``'the 'OK' button'`` the way the model meant it."""
    quote = body[pos]
    keys = "|".join(map(re.escape, allowed))
    closing = re.compile(rf"{quote}(?=\s*$|\s*,\s*(?:{keys})\s*=)", re.DOTALL)
    match = closing.search(body, pos + 1)
    if not match:
        raise ActionParseError(f"unterminated string starting at {body[pos : pos + 40]!r}")
    return body[pos + 1 : match.start()], match.end()


def _typed(name: str, key: str, text: str, bare: bool = False) -> ArgValue:
    """Convert a scalar to its parameter's type. Bare words other than numbers/True/False/None are
    tolerated as strings (``key=Return``), since their meaning is not in doubt."""
    if key in _INT_PARAMETERS:
        if not _INT.fullmatch(text.strip()):
            raise ActionParseError(f"{name}: {key} must be an integer, got {text!r}")
        return int(text)
    if key in _BOOL_PARAMETERS:
        if text.strip() not in ("True", "False", "true", "false"):
            raise ActionParseError(f"{name}: {key} must be True or False, got {text!r}")
        return text.strip() in ("True", "true")
    if bare and text == "None":
        return None
    if bare and not text:
        raise ActionParseError(f"{name}: {key} has no value")
    return text


def _parse_box(name: str, body: str, pos: int) -> tuple[Box, int]:
    """``[[x1,y1,x2,y2]]`` (single brackets tolerated) with exactly four integers; range checks are
    `boxes.box_problems`' job, so that a validator can say *which* rule a box breaks."""
    match = _BOX.match(body, pos)
    if not match:
        raise ActionParseError(f"{name}: box must look like [[x1,y1,x2,y2]], got {body[pos : pos + 30]!r}")
    parts = [p.strip() for p in match.group(1).split(",")]
    if len(parts) != 4 or not all(_INT.fullmatch(p) for p in parts):
        raise ActionParseError(f"{name}: box must hold four integers (thousandths 0-999), got [[{match.group(1)}]]")
    return tuple(int(p) for p in parts), match.end()  # type: ignore[return-value]


_KEY_CALL = re.compile(r"\s*([A-Za-z_]+)\s*\(\s*key\s*=\s*(['\"])(.*?)\2\s*\)\s*", re.DOTALL)


def _parse_gesture_list(body: str, pos: int) -> tuple[tuple[Action, ...], int]:
    """``[KEY_DOWN(key='Lcontrol'), KEY_PRESS(key='A'), KEY_UP(key='Lcontrol')]``."""
    if body[pos : pos + 1] != "[":
        raise ActionParseError(f"GESTURE: actions must be a list [...], got {body[pos : pos + 30]!r}")
    steps: list[Action] = []
    pos += 1
    while True:
        rest = body[pos:].lstrip()
        if rest.startswith("]"):
            return tuple(steps), len(body) - len(rest) + 1
        match = _KEY_CALL.match(body, pos)
        if not match:
            raise ActionParseError(f"GESTURE: expected KEY_DOWN/KEY_PRESS/KEY_UP(key='...') at {rest[:40]!r}")
        if match.group(1) not in GESTURE_KEY_ACTIONS:
            raise ActionParseError(
                f"GESTURE: unknown step {match.group(1)!r}; expected one of {', '.join(GESTURE_KEY_ACTIONS)}"
            )
        steps.append(Action(match.group(1), {"key": match.group(3)}))
        pos = match.end()
        if body[pos : pos + 1] == ",":
            pos += 1


# --- Grounded Operation: format -------------------------------------------------------------------------


def format_operation(action: Action) -> str:
    """Write an `Action` the way CogAgent does: ``NAME(key=value, ...)``, boxes as ``[[x1,y1,x2,y2]]``."""
    parts = [f"{key}={_format_value(value)}" for key, value in action.args.items()]
    return f"{action.name}({', '.join(parts)})"


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple) and all(isinstance(v, Action) for v in value):
        return "[" + ", ".join(format_operation(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "[[" + ",".join(str(int(v)) for v in value) + "]]"
    text = str(value)
    # Single quotes like the model, unless the text holds a single quote and no double quote.
    quote = '"' if "'" in text and '"' not in text else "'"
    return f"{quote}{text}{quote}"


# --- answers --------------------------------------------------------------------------------------------

_LABELS = {"status": "Status:", "plan": "Plan:", "action": "Action:", "operation": "Grounded Operation:"}
_LABEL_LINE = re.compile(r"^(Status|Plan|Action|Grounded Operation)\s*:\s?(.*)$")
_TAG = re.compile(r"<<[^<>]*>>\s*$")
_TAG_BY_LOWER = {tag.lower(): tag for tag in SENSITIVITY}

_FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    fmt: tuple(
        {"Status": "status", "Plan": "plan", "Action": "action", "Operation": "operation", "Sensitive": "sensitivity"}[
            part
        ]
        for part in fmt.split("-")
    )
    for fmt in ANSWER_FORMATS
}
"""Which `Answer` fields each format carries, e.g. Action-Operation -> ("action", "operation")."""


def answer_fields(answer_format: str) -> tuple[str, ...]:
    """The `Answer` fields an answer format carries; raises ValueError for an unknown format."""
    if answer_format not in _FORMAT_FIELDS:
        raise ValueError(f"unknown answer format {answer_format!r}; expected one of {', '.join(ANSWER_FORMATS)}")
    return _FORMAT_FIELDS[answer_format]


def parse_answer(text: str) -> Answer:
    """Read an assistant answer into an `Answer`.

    Fields are recognised by their labels at the start of a line (``Grounded Operation:`` with or
    without a space); a line without a label continues the previous field, and text before the first
    label (the README's optional "general answer") is ignored. A closing ``<<...>>`` tag
    (alone on its line or after the operation) is the sensitivity tag or ``<<END>>``. An unknown tag or
    an operation that does not parse raises `ActionParseError`.
    """
    fields: dict[str, str] = {}
    current: str | None = None
    sensitivity, end = None, False
    for raw_line in text.strip().splitlines():
        line, tag = _split_tag(raw_line)
        if tag is not None:
            sensitivity, end = _read_tag(tag, sensitivity, end)
        if not line.strip():
            continue
        match = _LABEL_LINE.match(line.strip())
        if match:
            current = {"Status": "status", "Plan": "plan", "Action": "action", "Grounded Operation": "operation"}[
                match.group(1)
            ]
            if current in fields:
                raise ActionParseError(f"answer has two {_LABELS[current]!r} lines")
            fields[current] = match.group(2).strip()
        elif current is not None:
            fields[current] = (fields[current] + "\n" + line.strip()).strip()
    operation = parse_operation(fields["operation"]) if "operation" in fields else None
    return Answer(fields.get("status"), fields.get("plan"), fields.get("action"), operation, sensitivity, end)


def _split_tag(line: str) -> tuple[str, str | None]:
    match = _TAG.search(line)
    if not match:
        return line, None
    return line[: match.start()], match.group(0).strip()


def _read_tag(tag: str, sensitivity: str | None, end: bool) -> tuple[str | None, bool]:
    if tag.upper() == END_TAG:
        return sensitivity, True
    canonical = _TAG_BY_LOWER.get(tag.lower())
    if canonical is None:
        raise ActionParseError(f"unknown tag {tag!r}; expected one of {', '.join(SENSITIVITY + (END_TAG,))}")
    if sensitivity is not None:
        raise ActionParseError(f"answer has two sensitivity tags ({sensitivity} and {tag})")
    return canonical, end


def format_answer(answer: Answer, answer_format: str) -> str:
    """Write `answer` in `answer_format`, one field per line, as the model does.

    The sensitivity line of a `...-Sensitive` format is `<<END>>` when `answer.end`, else the answer's
    tag (required). In the other formats `<<END>>` is appended when `answer.end`. Fields the format
    does not carry are left out; a field it needs but the answer lacks raises ValueError.
    """
    lines = []
    for name in answer_fields(answer_format):
        if name == "sensitivity":
            continue
        value = answer.operation if name == "operation" else getattr(answer, name)
        if value is None:
            raise ValueError(f"{answer_format} needs {_LABELS[name]!r} but the answer has none")
        text = format_operation(value) if name == "operation" else value
        lines.append(f"{_LABELS[name]} {text}")
    if answer.end:
        lines.append(END_TAG)
    elif "sensitivity" in answer_fields(answer_format):
        if answer.sensitivity is None:
            raise ValueError(f"{answer_format} needs a sensitivity tag (one of {', '.join(SENSITIVITY)})")
        lines.append(answer.sensitivity)
    return "\n".join(lines)


def answer_format_problems(answer: Answer, answer_format: str) -> list[str]:
    """What in `answer` disagrees with the requested format (missing fields first), for validators."""
    wanted = answer_fields(answer_format)
    problems = []
    for name in ("status", "plan", "action", "operation", "sensitivity"):
        present = getattr(answer, name) is not None or (name == "sensitivity" and answer.end)
        label = _LABELS.get(name, "sensitivity tag")
        if name in wanted and not present:
            problems.append(f"{answer_format} answer lacks {label!r}")
        elif name not in wanted and getattr(answer, name) is not None:
            problems.append(f"{answer_format} answer should not carry {label!r}")
    return problems
