"""One conversation grammar for the validator and the encoder: they agree on every case, both ways.

Every role sequence of up to four messages, with the screenshot on no message, on each message, or on
two, plus the malformed shapes (non-object message, missing or unknown role, missing or non-string
content, tool definitions, no list, empty list), is written as one line of a JSONL file. For each line:

- the validator reports an error  <=>  `encode_conversation` raises `EncodingError`;
- the errors the validator reports are exactly the grammar's problems, and each one appears in the
  encoder's message as ``field: message``, so both name the same fields in the same words.

All message texts are clean (a valid prompt, a valid answer), so the grammar is the only thing that
can go wrong.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest
from PIL import Image

from cogagent_nb.data.chat_format import ROLES, conversation_problems
from cogagent_nb.data.encoding import EncodingError, encode_conversation
from cogagent_nb.data.prompts import build_prompt
from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer, write_tokenizer_files
from cogagent_nb.data.validation import validate_file

PROMPT = build_prompt("Open Settings", "WIN", "Action-Operation-Sensitive")
ANSWER = "Action: Click OK.\nGrounded Operation: CLICK(box=[[400,500,480,540]], element_info='OK')\n<<一般操作>>"
TEXT = {"system": "You are a GUI agent.", "user": PROMPT, "assistant": ANSWER, "observation": "ok"}
IMAGE = "images/shot.png"


def _role_cases(max_length: int = 4) -> list[tuple[str, list]]:
    cases = []
    for length in range(1, max_length + 1):
        for roles in itertools.product(ROLES, repeat=length):
            placements = [()] + [(i,) for i in range(length)] + list(itertools.combinations(range(length), 2))
            for images in placements:
                messages = [{"role": r, "content": TEXT[r]} for r in roles]
                for i in images:
                    messages[i]["image"] = IMAGE
                cases.append((f"{'-'.join(roles)} image@{list(images)}", messages))
    return cases


def _shape_cases() -> list[tuple[str, object]]:
    user = {"role": "user", "content": PROMPT, "image": IMAGE}
    return [
        ("message-not-object", [user, "Action: x"]),
        ("missing-role", [user, {"content": ANSWER}]),
        ("unknown-role", [user, {"role": "bot", "content": ANSWER}]),
        ("missing-content", [user, {"role": "assistant"}]),
        ("content-not-string", [user, {"role": "assistant", "content": ["Action: x"]}]),
        ("tools-on-a-message", [{**user, "tools": [{"name": "search"}]}, {"role": "assistant", "content": ANSWER}]),
        ("messages-not-list", "hello"),
        ("messages-empty", []),
    ]


CASES = _role_cases() + _shape_cases()


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> list[tuple[str, object, list, str | None]]:
    """(case, messages, validator errors of its line, encoder error or None) for every case."""
    root = tmp_path_factory.mktemp("grammar")
    (root / "images").mkdir()
    Image.new("RGB", (40, 30), "white").save(root / IMAGE)
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for _, m in CASES), "utf-8")
    errors: dict[int, list] = {}
    for problem in validate_file(path, open_images=False):
        if problem.severity == "error":
            errors.setdefault(problem.line, []).append(problem)
    tokenizer = ChatGLM4Tokenizer.from_pretrained(
        write_tokenizer_files(root / "tok", TINY_TOKENIZER_FILE, image_size=28)
    )
    results = []
    for line, (case, messages) in enumerate(CASES, start=1):
        try:
            encode_conversation({"messages": messages}, tokenizer, num_image_tokens=4, image_root=root, name=case)
            encoder_error = None
        except EncodingError as error:
            encoder_error = str(error)
        results.append((case, messages, errors.get(line, []), encoder_error))
    return results


def test_the_walk_covers_both_outcomes(walked):
    accepted = [case for case, _, _, encoder_error in walked if encoder_error is None]
    assert len(walked) == len(CASES) > 3000
    # the valid shapes of up to four messages: u-a, s-u-a, u-a-u-a, u-a-o-a, with the image on one user turn
    assert sorted(accepted) == sorted(
        [
            "user-assistant image@[0]",
            "system-user-assistant image@[1]",
            "user-assistant-user-assistant image@[0]",
            "user-assistant-user-assistant image@[2]",
            "user-assistant-observation-assistant image@[0]",
        ]
    )


def test_validator_errors_iff_encoder_rejects(walked):
    disagreements = [
        (case, [str(p) for p in errors], encoder_error)
        for case, _, errors, encoder_error in walked
        if bool(errors) != (encoder_error is not None)
    ]
    assert not disagreements, disagreements[:5]


def test_both_report_the_grammar_problems_in_the_same_words(walked):
    for case, messages, errors, encoder_error in walked:
        expected = {str(p) for p in conversation_problems(messages)}
        assert {f"{p.field}: {p.message}" for p in errors} == expected, case
        for problem in expected:
            assert problem in (encoder_error or ""), (case, problem, encoder_error)


@pytest.mark.parametrize(
    "roles, fragment",
    [
        (["user", "user", "assistant"], "messages[1].role: 'user' cannot follow a user turn"),
        (["user", "assistant", "user"], "messages: the conversation ends with a 'user' turn"),
        (["assistant", "user", "assistant"], "messages[0].role: 'assistant' cannot follow the start"),
    ],
)
def test_the_defects_of_issue_7_are_errors_with_file_and_line(walked, roles, fragment):
    """Formerly warnings in the validator (or nothing) while the encoder refused them mid-training."""
    case = f"{'-'.join(roles)} image@[{roles.index('user')}]"
    ((_, _, errors, encoder_error),) = [w for w in walked if w[0] == case]
    line = 1 + [c for c, _ in CASES].index(case)
    pattern = rf"^.*train\.jsonl:{line}: " + re.escape(fragment)  # FILE:LINE: field: message
    assert any(re.match(pattern, str(p)) for p in errors), [str(p) for p in errors]
    assert fragment in encoder_error
