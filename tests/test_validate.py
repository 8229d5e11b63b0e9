"""Tests for cogagent_nb.data.validation: each broken input is reported at its exact line and field.

Every case writes a small dataset in tmp_path: two clean conversations, then the broken line as line 3,
then one more clean conversation, so a correct report must say ``FILE:3: field: ...`` and nothing about
the clean lines.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cogagent_nb.data.prompts import build_prompt
from cogagent_nb.data.validation import (
    DataFormatError,
    Problem,
    conversation_image,
    held_out_split,
    load_conversations,
    load_split,
    present_splits,
    validate_file,
    validate_paths,
)

STEP0 = ("CLICK(box=[[10,20,110,60]], element_info='Settings')", "Click the Settings icon.")
ANSWER = "Action: Click OK.\nGrounded Operation: CLICK(box=[[400,500,480,540]], element_info='OK')\n<<一般操作>>"


def user(content: str | None = None, image: str | None = "images/ok.png", **extra) -> dict:
    message = {
        "role": "user",
        "content": content
        if content is not None
        else build_prompt("Set DNS to 8.8.4.4", "WIN", "Action-Operation-Sensitive", [STEP0]),
    }
    if image is not None:
        message["image"] = image
    return {**message, **extra}


def assistant(content: str = ANSWER, **extra) -> dict:
    return {"role": "assistant", "content": content, **extra}


def line(*messages: dict) -> str:
    return json.dumps({"messages": list(messages)}, ensure_ascii=False)


CLEAN = line(user(), assistant())


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), "white").save(tmp_path / "images" / "ok.png")
    Image.new("RGB", (64, 48), "gray").save(tmp_path / "images" / "other.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


def write(data_dir: Path, broken: str | bytes, name: str = "train.jsonl") -> Path:
    path = data_dir / name
    body = broken if isinstance(broken, bytes) else broken.encode("utf-8")
    path.write_bytes(b"\n".join([CLEAN.encode(), CLEAN.encode(), body, CLEAN.encode()]) + b"\n")
    return path


# (id, the broken line 3, expected field, a fragment of the message, severity)
BROKEN = [
    ("trailing-comma", CLEAN[:-2] + ",]}", "json", "trailing comma before ']'", "error"),
    (
        "unescaped-quotes",
        '{"messages": [{"role": "user", "content": "click "OK" now"}]}',
        "json",
        "unescaped double quote",
        "error",
    ),
    ("python-repr", str({"messages": []}), "json", "JSON needs double quotes", "error"),
    ("comma-after-line", CLEAN + ",", "json", "JSONL lines are not separated by commas", "error"),
    ("not-an-object", "[1, 2, 3]", "record", "must hold a JSON object, got list", "error"),
    ("no-messages", json.dumps({"conversation": []}), "messages", "missing", "error"),
    ("messages-not-list", json.dumps({"messages": "hello"}), "messages", "must be a list, got str", "error"),
    ("empty-messages", json.dumps({"messages": []}), "messages", "empty conversation", "error"),
    (
        "unknown-role",
        line(user(), {"role": "bot", "content": ANSWER}),
        "messages[1].role",
        "unknown role 'bot'",
        "error",
    ),
    ("missing-role", line(user(), {"content": ANSWER}), "messages[1].role", "missing", "error"),
    ("missing-content", line(user(), {"role": "assistant"}), "messages[1].content", "missing", "error"),
    ("empty-content", line(user(content="   "), assistant()), "messages[0].content", "empty", "error"),
    (
        "content-not-string",
        line(user(), assistant(content=["Action: x"])),
        "messages[1].content",
        "must be a string, got list",
        "error",
    ),
    (
        "missing-image",
        line(user(image="images/nope.png"), assistant()),
        "messages[0].image",
        "image file not found: images/nope.png",
        "error",
    ),
    (
        "image-is-a-folder",
        line(user(image="images"), assistant()),
        "messages[0].image",
        "images is a folder, not an image file",
        "error",
    ),
    (
        "unreadable-image",
        line(user(image="images/broken.png"), assistant()),
        "messages[0].image",
        "PIL cannot open images/broken.png",
        "error",
    ),
    (
        "two-images",
        line(user(), assistant(), user(image="images/other.png"), assistant()),
        "messages[2].image",
        "more than one image",
        "error",
    ),
    (
        "image-on-assistant",
        line(user(image=None), assistant(image="images/ok.png")),
        "messages[1].image",
        "image on the assistant turn",
        "error",
    ),
    ("no-image", line(user(image=None), assistant()), "messages", "no user turn with an image", "error"),
    ("no-assistant", line(user()), "messages", "no assistant turn", "error"),
    (
        "unknown-action",
        line(user(), assistant("Action: x\nGrounded Operation: TAP(box=[[1,2,3,4]])\n<<一般操作>>")),
        "messages[1].content",
        "unknown action 'TAP'",
        "error",
    ),
    (
        "malformed-box",
        line(user(), assistant("Action: x\nGrounded Operation: CLICK(box=[[1,2,3]])\n<<一般操作>>")),
        "messages[1].content",
        "box must hold four integers",
        "error",
    ),
    (
        "box-out-of-range",
        line(user(), assistant("Action: x\nGrounded Operation: CLICK(box=[[1,2,3,1000]])\n<<一般操作>>")),
        "messages[1].content",
        "box [[1,2,3,1000]]: coordinate 1000 outside 0-999",
        "error",
    ),
    (
        "box-x1-gt-x2",
        line(user(), assistant("Action: x\nGrounded Operation: CLICK(box=[[500,2,100,4]])\n<<一般操作>>")),
        "messages[1].content",
        "x1=500 > x2=100",
        "error",
    ),
    (
        "no-operation",
        line(user(), assistant("Action: Click OK.\n<<一般操作>>")),
        "messages[1].content",
        "no 'Grounded Operation:' line",
        "error",
    ),
    (
        "answer-lacks-tag",
        line(user(), assistant("Action: x\nGrounded Operation: END()")),
        "messages[1].content",
        "Action-Operation-Sensitive answer lacks 'sensitivity tag'",
        "error",
    ),
    (
        "unknown-tag",
        line(user(), assistant("Action: x\nGrounded Operation: END()\n<<危险>>")),
        "messages[1].content",
        "unknown tag '<<危险>>'",
        "error",
    ),
    ("bad-utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "encoding", "not valid UTF-8", "error"),
    (
        "unknown-platform",
        line(user(build_prompt("T", "Linux", "Action-Operation-Sensitive")), assistant()),
        "messages[0].content",
        "unknown platform 'Linux'",
        "warning",
    ),
    (
        "unknown-format",
        line(user(build_prompt("T", "WIN", "Action-Only")), assistant()),
        "messages[0].content",
        "unknown answer format 'Action-Only'",
        "warning",
    ),
    (
        "free-form-prompt",
        line(user("What should I click?"), assistant()),
        "messages[0].content",
        "does not start with 'Task: '",
        "warning",
    ),
    (
        "bad-history-box",
        line(
            user(build_prompt("T", "WIN", "Action-Operation-Sensitive", [("CLICK(box=[[5,5,1200,9]])", "Click.")])),
            assistant(),
        ),
        "messages[0].content",
        "history step 0: box [[5,5,1200,9]]: coordinate 1200 outside",
        "warning",
    ),
    (
        "extra-field",
        line(user(), assistant("Status: s\n" + ANSWER)),
        "messages[1].content",
        "should not carry 'Status:'",
        "warning",
    ),
    ("blank-line", "   ", "line", "blank line", "warning"),
]


@pytest.mark.parametrize("broken, field, fragment, severity", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_each_problem_names_its_line_and_field(data_dir, broken, field, fragment, severity):
    path = write(data_dir, broken)
    problems = validate_file(path)
    assert problems, "nothing reported"
    assert all(p.line == 3 for p in problems), [str(p) for p in problems]
    matching = [p for p in problems if p.field == field and fragment in p.message]
    assert matching, [str(p) for p in problems]
    assert matching[0].severity == severity
    assert str(matching[0]).startswith(f"{path}:3: {field}: ")


def test_clean_file_has_no_problems(data_dir):
    path = data_dir / "train.jsonl"
    path.write_text("\n".join([CLEAN] * 3) + "\n", encoding="utf-8")
    assert validate_file(path) == []
    conversations = load_conversations(path)
    assert len(conversations) == 3 and conversations[0]["messages"][1]["content"] == ANSWER
    assert conversation_image(conversations[0], data_dir) == data_dir / "images" / "ok.png"


def test_never_stops_at_the_first_error_and_never_modifies_input(data_dir):
    path = data_dir / "train.jsonl"
    broken = [c[1] for c in BROKEN if c[4] == "error" and isinstance(c[1], str)]
    path.write_text("\n".join(broken) + "\n", encoding="utf-8")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    problems = validate_file(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted({p.line for p in problems if p.severity == "error"}) == list(range(1, len(broken) + 1))


def test_bom_is_reported_at_line_1(data_dir):
    path = data_dir / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + CLEAN.encode() + b"\n" + CLEAN.encode() + b"\n")
    assert [str(p) for p in validate_file(path)] == [
        f"{path}:1: encoding: file starts with a UTF-8 byte-order mark (BOM), which json.loads rejects; "
        "save it as plain UTF-8 (e.g. open(..., encoding='utf-8'), not 'utf-8-sig')"
    ]


# The English fine-tuning README's example, shortened: pretty-printed, objects separated by a comma,
# and a trailing comma after the last message of the second object.
README_EXAMPLE = """{
  "messages": [
    {
      "role": "user",
      "content": "Task: Open the system settings\\n(Platform: Mac)\\n(Answer in Action-Operation-Sensitive format.)\\nHistory steps: \\n",
      "image": "images/ok.png"
    },
    {
      "role": "assistant",
      "content": "Action: Click.\\nGrounded Operation:CLICK(box=[[7,6,27,31]], element_info='Apple logo')\\n<<General Operation>>"
    }
  ]
},
{
  "messages": [
    {
      "role": "user",
      "content": "Task: Open the system settings\\n(Platform: Mac)\\n(Answer in Action-Operation-Sensitive format.)\\nHistory steps: \\n",
      "image": "images/ok.png"
    },
    {
      "role": "assistant",
      "content": "Action: Left click\\nGrounded Operation:CLICK(box=[[150,911,180,975]], element_info='lower')\\n<<END>>"
    },
  ]
}
"""


def test_the_readme_example_gets_messages_that_say_how_to_fix_it(data_dir):
    path = data_dir / "train.jsonl"
    path.write_text(README_EXAMPLE, encoding="utf-8")
    problems = validate_file(path)
    assert [(p.line, p.field) for p in problems] == [(1, "json"), (25, "json")]
    assert "pretty-printed JSON, not JSONL" in problems[0].message and "json.dumps" in problems[0].message
    assert "trailing comma before ']'" in problems[1].message and "remove it" in problems[1].message
    # The same conversations written properly are clean (README order, English tags, no space after ':').
    fixed = [
        json.dumps(c, ensure_ascii=False) for c in json.loads("[" + README_EXAMPLE.replace("},\n  ]", "}\n  ]") + "]")
    ]
    path.write_text("\n".join(fixed) + "\n", encoding="utf-8")
    assert validate_file(path) == []


def test_mixed_prompt_orders_warn_once_naming_the_lines(data_dir):
    readme = line(user(build_prompt("T", "WIN", "Action-Operation-Sensitive", [STEP0], order="readme")), assistant())
    path = write(data_dir, readme)
    assert [str(p) for p in validate_file(path)] == [
        f"{path}:3: messages[0].content: warning: the dataset mixes prompt orders: 1 prompt(s) in 'readme' "
        "order (line 3) vs 3 in 'official' order (line 1, line 2, line 4); build all prompts with one "
        "build_prompt(order=...)"
    ]


def test_mixed_orders_across_the_files_of_one_dataset(data_dir):
    readme = line(user(build_prompt("T", "WIN", "Action-Operation-Sensitive", order="readme")), assistant())
    (data_dir / "train.jsonl").write_text(CLEAN + "\n" + CLEAN + "\n", encoding="utf-8")
    (data_dir / "test.jsonl").write_text(readme + "\n", encoding="utf-8")
    problems = validate_paths([data_dir / "train.jsonl", data_dir / "test.jsonl"])
    assert len(problems) == 1 and problems[0].file.endswith("test.jsonl") and problems[0].line == 1
    assert "test.jsonl:1" in problems[0].message and "train.jsonl:1, train.jsonl:2" in problems[0].message
    assert validate_file(data_dir / "test.jsonl") == []  # each file alone is consistent


def test_load_conversations_raises_naming_file_line_field(data_dir):
    path = write(data_dir, line(user(), {"role": "bot", "content": ANSWER}))
    with pytest.raises(DataFormatError, match=r"train\.jsonl:3: messages\[1\]\.role: unknown role 'bot'") as info:
        load_conversations(path)
    assert info.value.problems == [
        Problem(
            str(path), 3, "messages[1].role", "unknown role 'bot'; expected one of system, user, assistant, observation"
        )
    ]
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(data_dir, "validation")


def test_problem_str_is_file_line_field_message():
    assert str(Problem("a.jsonl", 7, "messages[1].content", "empty")) == "a.jsonl:7: messages[1].content: empty"
    assert str(Problem("a.jsonl", 2, "line", "blank", "warning")) == "a.jsonl:2: line: warning: blank"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cogagent_nb", "validate", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_exit_codes_and_output(data_dir):
    bad = write(data_dir, line(user(image="images/nope.png"), assistant()), "bad.jsonl")
    result = _cli(str(bad))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{bad}:3: messages[0].image: image file not found: images/nope.png (looked for "
        f"{data_dir / 'images' / 'nope.png'}; paths are relative to the JSONL file's folder)"
    ]
    assert "1 error(s)" in result.stderr
    clean = data_dir / "clean.jsonl"
    clean.write_text(CLEAN + "\n", encoding="utf-8")
    result = _cli(str(clean))
    assert (result.returncode, result.stdout) == (0, "")


def test_committed_demo_dataset_is_clean(demo_data_dir):
    files = sorted(demo_data_dir.glob("*.jsonl"))
    assert [f.name for f in files] == ["dev.jsonl", "test.jsonl", "train.jsonl"]
    problems = validate_paths(files)
    assert [str(p) for p in problems] == []
    assert len(load_split(demo_data_dir, "train")) > 0


def test_missing_and_empty_files(data_dir):
    missing = data_dir / "nope.jsonl"
    assert [str(p) for p in validate_paths([missing])] == [f"{missing}:1: file: cannot read: No such file or directory"]
    empty = data_dir / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert [str(p) for p in validate_file(empty)] == [f"{empty}:1: file: empty file: no conversations"]


def test_windows_line_endings_are_fine(data_dir):
    path = data_dir / "train.jsonl"
    path.write_bytes((CLEAN + "\r\n" + CLEAN + "\r\n").encode())
    assert validate_file(path) == []


def test_episode_around_finds_the_consecutive_steps_of_an_episode(demo_data_dir) -> None:
    from cogagent_nb.data.prompts import parse_prompt
    from cogagent_nb.data.validation import episode_around

    samples = load_split(demo_data_dir, "train")
    history = [len(parse_prompt(s["messages"][0]["content"]).history) for s in samples]
    last_step = next(i for i in range(1, len(samples)) if history[i] == 0) - 1  # end of the first episode
    episode = episode_around(samples, last_step)
    assert episode == samples[: last_step + 1]
    assert episode_around(samples, 0) == episode  # any step gives the whole episode
    second = episode_around(samples, last_step + 1)
    assert second[0] is samples[last_step + 1] and len(second) >= 2


def test_present_splits_and_the_held_out_one(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    assert present_splits(tmp_path) == ["train"] and held_out_split(tmp_path) == "train"
    (tmp_path / "test.jsonl").write_text("")
    assert present_splits(tmp_path) == ["train", "test"] and held_out_split(tmp_path) == "test"
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        present_splits(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no train.jsonl, dev.jsonl or test.jsonl"):
        held_out_split(empty)


def test_the_example_in_our_readme_is_clean(repo_root: Path, tmp_path: Path) -> None:
    """What a user copies from "Using your own data" validates with no error and no warning."""
    import re

    block = re.search(r"## Using your own data.*?```json\n(.*?)\n```", (repo_root / "README.md").read_text(), re.S)
    assert block, "README.md lost its 'Using your own data' example"
    (tmp_path / "train.jsonl").write_text(block.group(1) + "\n", encoding="utf-8")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (320, 200), "white").save(tmp_path / "images" / "0001.png")
    assert [str(p) for p in validate_paths([tmp_path / "train.jsonl"])] == []
