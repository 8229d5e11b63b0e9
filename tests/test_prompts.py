"""Tests for cogagent_nb.data.prompts: the official concatenation, the README order, and parsing back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cogagent_nb.data.actions import ANSWER_FORMATS, PLATFORMS, Action
from cogagent_nb.data.prompts import (
    HistoryStep,
    PromptParseError,
    PromptParts,
    build_prompt,
    parse_prompt,
    prompt_problems,
)

# The string printed in THUDM/CogAgent README.md ("The concatenated Python string"), steps 0-1.
README_QUERY = (
    'Task: Search for doors, click doors on sale and filter by brands "Mastercraft".\nHistory steps: '
    "\n0. CLICK(box=[[352,102,786,139]], element_info='Search')\tLeft click on the search box located in "
    "the middle top of the screen next to the Menards logo."
    "\n1. TYPE(box=[[352,102,786,139]], text='doors', element_info='Search')\tIn the search input box at "
    "the top, type 'doors'.\n(Platform: WIN)\n(Answer in Action-Operation format.)\n"
)

# The fine-tuning README's user content (platform and format before the history; ends with a newline).
FINETUNE_QUERY = (
    "Task: Open the system settings\n(Platform: Mac)\n(Answer in Action-Operation-Sensitive format.)\n"
    "History steps: \n0. CLICK(box=[[7,6,27,31]], element_info='Apple logo')\tClick the 'Apple' icon. \n"
    "1. CLICK(box=[[3,77,161,99]], element_info='System settings…')\tClick 'System settings…'.\n"
)


def test_official_order_reproduces_the_readme_string():
    history = [
        (
            "CLICK(box=[[352,102,786,139]], element_info='Search')",
            "Left click on the search box located in the middle top of the screen next to the Menards logo.",
        ),
        (
            Action("TYPE", {"box": (352, 102, 786, 139), "text": "doors", "element_info": "Search"}),
            "In the search input box at the top, type 'doors'.",
        ),
    ]
    task = 'Search for doors, click doors on sale and filter by brands "Mastercraft".'
    assert build_prompt(task, "WIN", "Action-Operation", history) == README_QUERY


def test_empty_history_still_writes_history_steps():
    assert build_prompt("Mark all as read", "Mac", "Action-Operation-Sensitive") == (
        "Task: Mark all as read\nHistory steps: \n(Platform: Mac)\n(Answer in Action-Operation-Sensitive format.)\n"
    )


def test_continue_follows_the_readme_rule():
    # README: query = f'{task}[Continue]\n{history}{platform}{format}', and history starts with "\n".
    assert build_prompt("T", "WIN", "Action-Operation", continue_=True) == (
        "Task: T[Continue]\n\nHistory steps: \n(Platform: WIN)\n(Answer in Action-Operation format.)\n"
    )


def test_readme_order_reproduces_the_finetune_example():
    parts = parse_prompt(FINETUNE_QUERY)
    assert parts.order == "readme" and parts.platform == "Mac" and not parts.continue_
    assert [s.operation.box for s in parts.history] == [(7, 6, 27, 31), (3, 77, 161, 99)]
    assert (
        build_prompt(parts.task, parts.platform, parts.answer_format, parts.history, order="readme") == FINETUNE_QUERY
    )


def test_parse_official():
    parts = parse_prompt(README_QUERY)
    assert parts == PromptParts(
        task='Search for doors, click doors on sale and filter by brands "Mastercraft".',
        platform="WIN",
        answer_format="Action-Operation",
        history=(
            HistoryStep(
                "CLICK(box=[[352,102,786,139]], element_info='Search')",
                "Left click on the search box located in the middle top of the screen next to the Menards logo.",
            ),
            HistoryStep(
                "TYPE(box=[[352,102,786,139]], text='doors', element_info='Search')",
                "In the search input box at the top, type 'doors'.",
            ),
        ),
        order="official",
        continue_=False,
    )


def test_parse_is_lenient_about_cli_demo_quirks():
    # inference/cli_demo.py leaves out the final newline; some writers drop the space after "steps:".
    text = "Task: T\nHistory steps:\n(Platform: Mobile)\n(Answer in Status-Action-Operation format.)"
    parts = parse_prompt(text)
    assert (parts.platform, parts.answer_format, parts.history) == ("Mobile", "Status-Action-Operation", ())


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("Open X\n(Platform: WIN)\n", "does not start with 'Task: '"),
        ("Task: T\n(Platform: WIN)\n(Answer in Action-Operation format.)\n", "lacks 'History steps:'"),
        ("Task: T\nHistory steps: \n(Answer in Action-Operation format.)\n", "lacks '(Platform: '"),
        (
            "Task: T\nHistory steps: \n1. CLICK(box=[[1,2,3,4]])\tx\n(Platform: WIN)\n(Answer in Action-Operation format.)\n",
            "numbered 1, expected 0",
        ),
        (
            "Task: T\nHistory steps: \n0. CLICK(box=[[1,2,3,4]]) x\n(Platform: WIN)\n(Answer in Action-Operation format.)\n",
            "not 'i. operation<TAB>action'",
        ),
    ],
)
def test_parse_errors_name_the_missing_piece(text, fragment):
    with pytest.raises(PromptParseError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        parse_prompt(text)


def test_build_rejects_bad_order_and_multiline_steps():
    with pytest.raises(ValueError, match="order must be one of"):
        build_prompt("T", "WIN", "Action-Operation", order="backwards")
    with pytest.raises(ValueError, match="one line"):
        build_prompt("T", "WIN", "Action-Operation", [("CLICK(box=[[1,2,3,4]])", "two\nlines")])


def test_prompt_problems_flag_unknown_platform_and_format():
    parts = parse_prompt(build_prompt("T", "Linux", "Action-Only"))
    assert prompt_problems(parts) == [
        "unknown platform 'Linux'; CogAgent knows Mac, WIN, Mobile",
        "unknown answer format 'Action-Only'; expected one of " + ", ".join(ANSWER_FORMATS),
    ]
    assert prompt_problems(parse_prompt(README_QUERY)) == []


line_text = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=25)
steps = st.lists(
    st.tuples(
        st.builds(lambda b: f"CLICK(box=[[{b[0]},{b[1]},{b[2]},{b[3]}]])", st.tuples(*[st.integers(0, 999)] * 4)),
        line_text,
    ),
    max_size=4,
)


@given(
    line_text,
    st.sampled_from(PLATFORMS),
    st.sampled_from(ANSWER_FORMATS),
    steps,
    st.sampled_from(["official", "readme"]),
    st.booleans(),
)
@settings(max_examples=200)
def test_build_then_parse_round_trip(task, platform, answer_format, history, order, continue_):
    text = build_prompt(task, platform, answer_format, history, order=order, continue_=continue_)
    parts = parse_prompt(text)
    assert parts == PromptParts(
        task, platform, answer_format, tuple(HistoryStep(*s) for s in history), order, continue_
    )
    assert (
        build_prompt(
            parts.task, parts.platform, parts.answer_format, parts.history, order=parts.order, continue_=parts.continue_
        )
        == text
    )
