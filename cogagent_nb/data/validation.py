"""The CogAgent fine-tuning data format (JSONL) and its validator.

A dataset folder holds ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` and ``images/``. Each line of a
JSONL file is one conversation, the official dict (wrapped here for reading)::

    {"messages": [
      {"role": "user", "image": "images/0001.png",
       "content": "Task: Open Settings\\nHistory steps: \\n(Platform: WIN)\\n(Answer in Action-Operation format.)\\n"},
      {"role": "assistant",
       "content": "Action: Click the Settings icon.\\nGrounded Operation: CLICK(box=[[12,20,40,60]], element_info='Settings')"}]}

Image paths are relative to the JSONL file's folder. Roles are system, user, assistant, observation;
the user turn carries the one screenshot, the assistant turn answers in one of the five formats of
`actions.ANSWER_FORMATS`. The conversation grammar (role order, the one screenshot on a user turn, the
answer at the end) is `chat_format.conversation_problems`, the same function the encoder enforces:
every problem it finds is an error here, so a file that validates without errors also encodes.

Why a validator: the official `finetune.py` fails late and obscurely on bad data (a KeyError deep in
the collator, or silently trains on a conversation without its image), and the fine-tuning README's
own example is not valid JSONL. `validate_file` reads everything, never stops at the first problem,
never writes, and reports each problem as ``FILE:LINE: field: message`` with fields named like
``messages[1].content``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogagent_nb.data.actions import (
    ANSWER_FORMATS,
    Action,
    ActionParseError,
    Answer,
    answer_format_problems,
    parse_answer,
)
from cogagent_nb.data.boxes import box_problems
from cogagent_nb.data.chat_format import conversation_problems
from cogagent_nb.data.prompts import PromptParseError, PromptParts, parse_prompt, prompt_problems

SPLITS: tuple[str, ...] = ("train", "dev", "test")
"""The official file names, ``{split}.jsonl`` (finetune.py reads train/dev/test)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a data file. `severity` is "error" (training would fail or learn something
    wrong) or "warning" (works, but probably not what you meant)."""

    file: str
    line: int
    field: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{self.file}:{self.line}: {self.field}: {prefix}{self.message}"


class DataFormatError(ValueError):
    """Raised by `load_conversations` when a file has errors; `problems` lists all of them."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(str(p) for p in problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s) in the data:\n{shown}{more}")


# --- public entry points --------------------------------------------------------------------------------


def validate_file(path: str | Path, *, open_images: bool = True) -> list[Problem]:
    """All problems in one JSONL file (errors and warnings), in line order.

    `open_images=False` only checks that image files exist, which is much faster on big datasets.
    """
    report = _FileChecker(Path(path), open_images).run()
    return _in_line_order(report.problems + _mixed_order_problems(report.orders), [str(path)])


def validate_paths(paths: Iterable[str | Path], *, open_images: bool = True) -> list[Problem]:
    """Validate several files. Prompt-order mixing is judged per folder, i.e. per dataset, because a
    train split in one order and a test split in the other is exactly the mismatch to catch."""
    paths = [Path(p) for p in paths]
    problems: list[Problem] = []
    orders_by_folder: dict[Path, list[tuple[str, int, str, str]]] = defaultdict(list)
    for path in paths:
        report = _FileChecker(path, open_images).run()
        problems += report.problems
        orders_by_folder[path.resolve().parent] += report.orders
    for orders in orders_by_folder.values():
        problems += _mixed_order_problems(orders)
    return _in_line_order(problems, [str(p) for p in paths])


def _in_line_order(problems: list[Problem], files: list[str]) -> list[Problem]:
    """Files in the order given, lines ascending; problems of one line keep their check order."""
    rank = {file: i for i, file in reversed(list(enumerate(files)))}
    return sorted(problems, key=lambda p: (rank.get(p.file, len(files)), p.line))


def load_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file into the official dicts; raise `DataFormatError` (naming FILE:LINE: field)
    if it has errors. Warnings do not stop loading. Images are checked for existence, not decoded."""
    return [conversation for _, conversation in load_numbered_conversations(path)]


def load_numbered_conversations(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """`load_conversations` with each conversation's line in the file (blank lines are skipped, so the
    n-th conversation is not always line n), for messages that point back into the file."""
    path = Path(path)
    report = _FileChecker(path, open_images=False).run()
    errors = [p for p in report.problems if p.severity == "error"]
    if errors:
        raise DataFormatError(errors)
    return list(zip(report.line_numbers, report.conversations, strict=True))


def load_split(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """``load_conversations(data_dir / f"{split}.jsonl")`` for split in train/dev/test."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return load_conversations(Path(data_dir) / f"{split}.jsonl")


def present_splits(data_dir: str | Path) -> list[str]:
    """The splits whose file a dataset folder holds, in `SPLITS` order; a missing folder is an error.

    A learner's own folder may hold train.jsonl alone, so lessons ask rather than assume all three.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data_dir {folder.resolve()}: no such folder (a dataset folder holds train.jsonl and images/)"
        )
    return [split for split in SPLITS if (folder / f"{split}.jsonl").is_file()]


def held_out_split(data_dir: str | Path) -> str:
    """The split to show a model's answers on: "test", else "dev", else "train" (the first file present).

    A learner's own folder may hold train.jsonl alone; lessons then show a training sample and say so.
    """
    present = present_splits(data_dir)
    for split in ("test", "dev", "train"):
        if split in present:
            return split
    raise FileNotFoundError(f"{data_dir}: no train.jsonl, dev.jsonl or test.jsonl (see lesson 01 for the layout)")


def conversation_image(conversation: dict[str, Any], data_dir: str | Path) -> Path | None:
    """The screenshot of a conversation as a path (image paths are relative to the data folder)."""
    for message in conversation["messages"]:
        if message.get("image"):
            return Path(data_dir) / message["image"]
    return None


def episode_around(conversations: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """The consecutive samples that form the episode holding sample `index`.

    Datasets written step by step (the demo set, and most agent traces) store an episode on
    consecutive lines where step k carries k history lines. The episode therefore starts `k` lines
    before a step with k history lines, and runs on while the history keeps growing by one.
    """

    def history_length(conversation: dict[str, Any]) -> int:
        user = next(m for m in conversation["messages"] if m["role"] == "user")
        return len(parse_prompt(user["content"]).history)

    start = index - history_length(conversations[index])
    if start < 0 or history_length(conversations[start]) != 0:
        raise ValueError(f"sample {index} has history, but its earlier steps are not the lines before it")
    episode = [conversations[start]]
    for conversation in conversations[start + 1 :]:
        if history_length(conversation) != len(episode):
            break
        episode.append(conversation)
    return episode


# --- the checker ----------------------------------------------------------------------------------------

UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class _Report:
    problems: list[Problem] = field(default_factory=list)
    conversations: list[dict[str, Any]] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)  # the file line of each conversation
    orders: list[tuple[str, int, str, str]] = field(default_factory=list)  # (file, line, field, order)


class _FileChecker:
    """Checks one file line by line; every check appends to `report.problems` and carries on."""

    def __init__(self, path: Path, open_images: bool):
        self.path = path
        self.name = str(path)
        self.open_images = open_images
        self.report = _Report()
        self._image_cache: dict[Path, str | None] = {}

    # reporting
    def error(self, line: int, field: str, message: str) -> None:
        self.report.problems.append(Problem(self.name, line, field, message, "error"))

    def warn(self, line: int, field: str, message: str) -> None:
        self.report.problems.append(Problem(self.name, line, field, message, "warning"))

    # file level
    def run(self) -> _Report:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            self.error(1, "file", f"cannot read: {exc.strerror or exc}")
            return self.report
        if raw.startswith(UTF8_BOM):
            self.error(
                1,
                "encoding",
                "file starts with a UTF-8 byte-order mark (BOM), which json.loads "
                "rejects; save it as plain UTF-8 (e.g. open(..., encoding='utf-8'), not 'utf-8-sig')",
            )
            raw = raw[len(UTF8_BOM) :]
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the newline that ends the last line
        if not lines:
            self.error(1, "file", "empty file: no conversations")
            return self.report
        if _looks_pretty_printed(lines):
            self._report_pretty_printed(raw)
            return self.report
        for number, data in enumerate(_progress(lines, self.path.name), start=1):
            self.check_line(number, data)
        return self.report

    def _report_pretty_printed(self, raw: bytes) -> None:
        """One error for the layout, then the first JSON syntax error of the document, decoded as a
        sequence of values (the README's example is several objects separated by commas)."""
        self.error(
            1,
            "json",
            "the file is pretty-printed JSON, not JSONL: each conversation must be one "
            "whole line (the fine-tuning README's example is laid out on many lines; write each "
            "conversation with json.dumps(conversation, ensure_ascii=False) and a newline)",
        )
        text = raw.decode("utf-8", errors="replace")
        decoder, pos = json.JSONDecoder(), 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,[]":
                pos += 1
            if pos >= len(text):
                return
            try:
                _, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                self.error(exc.lineno, "json", f"invalid JSON at column {exc.colno}: {exc.msg}" + _json_hint(exc))
                return

    # line level
    def check_line(self, number: int, data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.error(
                number,
                "encoding",
                f"not valid UTF-8 (byte {exc.start + 1} of the line, "
                f"{data[exc.start : exc.start + 1]!r}); re-save the file as UTF-8",
            )
            return
        if not text.strip():
            self.warn(number, "line", "blank line (skipped; JSONL has one conversation per line)")
            return
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            self.error(number, "json", f"invalid JSON at column {exc.colno}: {exc.msg}" + _json_hint(exc))
            return
        if self.check_record(number, record):
            self.report.conversations.append(record)
            self.report.line_numbers.append(number)

    def check_record(self, number: int, record: Any) -> bool:
        """Structure first; only a well-formed conversation gets its content checked."""
        if not isinstance(record, dict):
            self.error(number, "record", f"a line must hold a JSON object, got {type(record).__name__}")
            return False
        messages = record.get("messages")
        if messages is None:
            self.error(number, "messages", 'missing (each line is {"messages": [...]})')
            return False
        if not isinstance(messages, list) or not messages:
            for problem in conversation_problems(messages):  # "must be a list" / "empty conversation"
                self.error(number, problem.field, problem.message)
            return False
        before = len(self.report.problems)
        ConversationChecker(self, number, messages).run()
        new = self.report.problems[before:]
        return not any(p.severity == "error" for p in new)

    def image_problem(self, image: str) -> str | None:
        """None if the image is usable, else why not (cached: episodes may share screenshots)."""
        path = self.path.parent / image
        if path not in self._image_cache:
            self._image_cache[path] = _image_problem(path, image, self.open_images)
        return self._image_cache[path]


class ConversationChecker:
    """The checks of one conversation (one line)."""

    def __init__(self, file: _FileChecker, line: int, messages: list[Any]):
        self.file, self.line, self.messages = file, line, messages
        self.prompt: PromptParts | None = None  # the latest parsed user prompt

    def error(self, field: str, message: str) -> None:
        self.file.error(self.line, field, message)

    def warn(self, field: str, message: str) -> None:
        self.file.warn(self.line, field, message)

    def run(self) -> None:
        for problem in conversation_problems(self.messages):  # the grammar the encoder enforces
            self.error(problem.field, problem.message)
        for i, message in enumerate(self.messages):
            if not isinstance(message, dict):
                continue  # reported by the grammar
            where = f"messages[{i}]"
            role = message.get("role")
            content = self.check_content(where, message)
            self.check_image(where, message)
            if content is not None and role == "user":
                self.check_prompt(where, content)
            elif content is not None and role == "assistant":
                self.check_answer(where, content)

    def check_content(self, where: str, message: dict) -> str | None:
        """The text, if there is some to check (a missing or non-string content is a grammar error)."""
        content = message.get("content")
        if not isinstance(content, str):
            return None
        if not content.strip():
            self.error(f"{where}.content", "empty")
            return None
        return content

    def check_image(self, where: str, message: dict) -> None:
        """The image must be a path to a file PIL can open (where it may be is the grammar's part)."""
        image = message.get("image")
        if image is None:
            return
        if not isinstance(image, str) or not image.strip():
            self.error(f"{where}.image", f"must be a non-empty path string, got {image!r}")
            return
        problem = self.file.image_problem(image)
        if problem:
            self.error(f"{where}.image", problem)

    def check_prompt(self, where: str, content: str) -> None:
        try:
            self.prompt = parse_prompt(content)
        except PromptParseError as exc:
            self.prompt = None
            self.warn(f"{where}.content", f"user prompt does not follow CogAgent's concatenation rule: {exc}")
            return
        self.file.report.orders.append((self.file.name, self.line, f"{where}.content", self.prompt.order))
        for message in prompt_problems(self.prompt):
            self.warn(f"{where}.content", message)
        for k, step in enumerate(self.prompt.history):
            try:
                operation = step.operation
            except ActionParseError as exc:
                self.warn(f"{where}.content", f"history step {k}: Grounded Operation does not parse: {exc}")
                continue
            for problem in _operation_box_problems(operation):
                self.warn(f"{where}.content", f"history step {k}: {problem}")

    def check_answer(self, where: str, content: str) -> None:
        try:
            answer = parse_answer(content)
        except ActionParseError as exc:
            self.error(f"{where}.content", f"Grounded Operation does not parse: {exc}")
            return
        if answer.operation is None:
            self.error(f"{where}.content", "assistant answer has no 'Grounded Operation:' line")
            return
        for problem in _operation_box_problems(answer.operation):
            self.error(f"{where}.content", problem)
        self.check_answer_format(where, answer)

    def check_answer_format(self, where: str, answer: Answer) -> None:
        """The answer must carry the fields the prompt asked for (missing ones are errors: the model
        would learn to drop them); extra fields are warnings."""
        if self.prompt is None or self.prompt.answer_format not in ANSWER_FORMATS:
            return
        for problem in answer_format_problems(answer, self.prompt.answer_format):
            report = self.warn if "should not carry" in problem else self.error
            report(f"{where}.content", problem + " (format asked for in the user prompt)")


# --- helpers --------------------------------------------------------------------------------------------


def _operation_box_problems(operation: Action) -> list[str]:
    box = operation.box
    if box is None:
        return []
    return [f"box [[{','.join(map(str, box))}]]: {p}" for p in box_problems(box)]


def _image_problem(path: Path, image: str, open_images: bool) -> str | None:
    if path.is_dir():
        return f"{image} is a folder, not an image file (looked at {path})"
    if not path.is_file():
        return f"image file not found: {image} (looked for {path}; paths are relative to the JSONL file's folder)"
    if not open_images:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"PIL cannot open {image}: {exc}"
    return None


def _looks_pretty_printed(lines: list[bytes]) -> bool:
    """A first non-blank line that is only '{' or '[' means a JSON document laid out on many lines."""
    for data in lines:
        if data.strip():
            return data.strip() in (b"{", b"[")
    return False


def _json_hint(exc: json.JSONDecodeError) -> str:
    """A how-to-fix hint for the usual mistakes, found by looking around the error position."""
    before = exc.doc[: exc.pos].rstrip()
    after = exc.doc[exc.pos :].split("\n", 1)[0]
    if exc.msg.startswith("Expecting") and before.endswith(",") and after.lstrip()[:1] in ("}", "]"):
        return (
            " -- a trailing comma before '" + after.lstrip()[0] + "': JSON allows none, remove it "
            "(the fine-tuning README's example has one after its last message)"
        )
    if exc.msg.startswith(("Expecting ',' delimiter", "Expecting ':' delimiter")) and before.endswith('"'):
        return (
            ' -- probably an unescaped double quote inside a string: write it as \\" (or use “ ” or '
            "single quotes in the text); json.dumps escapes it for you"
        )
    if exc.msg.startswith("Expecting property name") and after[:1] == "'":
        return " -- JSON needs double quotes; write lines with json.dumps, not str() of a Python dict"
    if exc.msg.startswith("Invalid control character"):
        return " -- a raw tab or newline inside a string; write it as \\t or \\n"
    if exc.msg.startswith("Extra data") and after.strip() == ",":
        return " -- a comma after the conversation: JSONL lines are not separated by commas, remove it"
    if exc.msg.startswith("Extra data"):
        return " -- more than one JSON value on this line; JSONL holds exactly one conversation per line"
    return ""


def _mixed_order_problems(orders: list[tuple[str, int, str, str]]) -> list[Problem]:
    """One warning when prompts of one dataset follow both concatenation orders, placed at the first
    prompt of the rarer order and naming the lines of both."""
    by_order: dict[str, list[tuple[str, int]]] = defaultdict(list)
    fields: dict[tuple[str, int], str] = {}
    for file, line, where, order in orders:
        by_order[order].append((file, line))
        fields.setdefault((file, line), where)
    if len(by_order) < 2:
        return []
    minority, majority = sorted(by_order, key=lambda o: len(by_order[o]))
    first_file, first_line = by_order[minority][0]
    several_files = len({file for file, *_ in orders}) > 1
    message = (
        f"the dataset mixes prompt orders: {len(by_order[minority])} prompt(s) in {minority!r} "
        f"order ({_lines(by_order[minority], several_files)}) vs {len(by_order[majority])} in "
        f"{majority!r} order ({_lines(by_order[majority], several_files)}); build all prompts with one "
        f"build_prompt(order=...)"
    )
    return [Problem(first_file, first_line, fields[(first_file, first_line)], message, "warning")]


def _lines(places: list[tuple[str, int]], several_files: bool, limit: int = 5) -> str:
    shown = [f"{Path(f).name}:{n}" if several_files else f"line {n}" for f, n in places[:limit]]
    return ", ".join(shown) + (f", ... {len(places) - limit} more" if len(places) > limit else "")


def _progress(lines: list[bytes], name: str):
    """A progress bar for big files only (small ones validate in a blink)."""
    if len(lines) < 5000:
        return lines
    from tqdm.auto import tqdm

    return tqdm(lines, desc=f"validating {name}", unit="line")
