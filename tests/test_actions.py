"""Tests for cogagent_nb.data.actions: the official examples, leniency, strictness, and round trips."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cogagent_nb.data.actions import (
    ACTION_PARAMETERS,
    ANSWER_FORMATS,
    END_TAG,
    GENERAL_TAG,
    GENERAL_TAG_EN,
    PLATFORMS,
    SENSITIVE_TAG,
    SENSITIVITY,
    Action,
    ActionParseError,
    Answer,
    answer_fields,
    answer_format_problems,
    format_answer,
    format_operation,
    parse_answer,
    parse_operation,
)

# Every example operation of THUDM/CogAgent's README.md and Action_space_en.md.
OFFICIAL_OPERATIONS = [
    "CLICK(box=[[387,248,727,317]], element_type='Clickable text', element_info='Click to add Title')",
    "TYPE(box=[[387,249,727,317]], text='CogAgent', element_type='Text input box', element_info='CogAgent')",
    "SCROLL_DOWN(box=[[000,086,999,932]], element_type='Scroll', element_info='Scroll', step_count=5)",
    "KEY_PRESS(key='F11')",
    "GESTURE(actions=[KEY_DOWN(key='Lcontrol'), KEY_PRESS(key='A'), KEY_UP(key='Lcontrol')])",
    "LAUNCH(app='Settings', url='None')",
    "LAUNCH(app='None', url='baidu.com')",
    "QUOTE_TEXT(box=[[387,249,727,317]], element_type='Text', element_info='Price after coupon: 17.00', "
    "output='__CogName_ProductPrice__', result='17.00')",
    "QUOTE_TEXT(box=[[000,086,999,932]], auto_scroll=True, element_type='Window', "
    "element_info='CogAgent Technical Report Blog', output='__CogName_TechnicalReport__')",
    "LLM(prompt='Summarize the following content: __CogName_TechnicalReport__', "
    "output='__CogName_TechnicalReportSummary__')",
    "QUOTE_CLIPBOARD(output='__CogName_QuickSortCode__', result='def quick_sort(arr):\\n\\tif len(arr) <= 1:')",
    "END()",
    "SCROLL_DOWN(box=[[0,209,998,952]], step_count=5, element_info='[None]')",
    "RIGHT_CLICK(box=[[154,275,343,341]], element_info='[AXCell]')",
    "CLICK(box=[[655,842,671,857]], element_info='“显示器具有单独空间”的开关按钮')",
]


@pytest.mark.parametrize("text", OFFICIAL_OPERATIONS)
def test_official_operations_parse_and_round_trip(text):
    action = parse_operation(text)
    assert parse_operation(format_operation(action)) == action


def test_parsed_values_are_typed():
    scroll = parse_operation(OFFICIAL_OPERATIONS[2])
    assert scroll.name == "SCROLL_DOWN"
    assert scroll.box == (0, 86, 999, 932)  # leading zeros read as decimal, not octal
    assert scroll.args["step_count"] == 5
    quote = parse_operation(OFFICIAL_OPERATIONS[8])
    assert quote.args["auto_scroll"] is True
    gesture = parse_operation(OFFICIAL_OPERATIONS[4])
    assert [(a.name, a.args["key"]) for a in gesture.args["actions"]] == [
        ("KEY_DOWN", "Lcontrol"),
        ("KEY_PRESS", "A"),
        ("KEY_UP", "Lcontrol"),
    ]
    assert gesture.box is None
    assert format_operation(scroll) == (
        "SCROLL_DOWN(box=[[0,86,999,932]], element_type='Scroll', element_info='Scroll', step_count=5)"
    )


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("CLICK(box=[[1,2,3,4]], element_info='the 'OK' button')", "element_info", "the 'OK' button"),
        ('CLICK(box=[[1,2,3,4]], element_info="Say "hi"", element_type=\'Button\')', "element_info", 'Say "hi"'),
        ("TYPE(box=[[1,2,3,4]], text='a, b=c', element_info='x')", "text", "a, b=c"),
        ("CLICK( box = [ [ 1 , 2 , 3 , 4 ] ] , element_info = 'x' )", "box", (1, 2, 3, 4)),
        ("CLICK(box=[1,2,3,4])", "box", (1, 2, 3, 4)),
        ("KEY_PRESS(key=Return)", "key", "Return"),
        ("LAUNCH(app=None, url='baidu.com')", "app", None),
    ],
)
def test_lenient_where_outputs_vary(text, key, value):
    assert parse_operation(text).args[key] == value


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("click(box=[[1,2,3,4]])", "unknown action 'click'"),
        ("TAP(box=[[1,2,3,4]])", "unknown action 'TAP'"),
        ("CLICK(box=[[1,2,3]])", "four integers"),
        ("CLICK(box=[[1,2,3,4,5]])", "four integers"),
        ("CLICK(box=[[1.5,2,3,4]])", "four integers"),
        ("CLICK(box=[[a,b,c,d]])", "four integers"),
        ("CLICK(box=(1,2,3,4))", "box must look like"),
        ("CLICK(element_info='OK')", "CLICK needs box"),
        ("TYPE(box=[[1,2,3,4]])", "TYPE needs text"),
        ("CLICK(box=[[1,2,3,4]], colour='red')", "unknown parameter 'colour'"),
        ("CLICK(box=[[1,2,3,4]], box=[[1,2,3,4]])", "given twice"),
        ("SCROLL_UP(box=[[1,2,3,4]], step_count=2.5)", "step_count must be an integer"),
        ("QUOTE_TEXT(box=[[1,2,3,4]], output='x', auto_scroll=maybe)", "auto_scroll must be True or False"),
        ("GESTURE(actions=[KEY_DOWN(key='a'), CLICK(key='b')])", "unknown step 'CLICK'"),
        ("CLICK(box=[[1,2,3,4]], element_info='unterminated)", "unterminated string"),
        ("CLICK box=[[1,2,3,4]]", "not an operation"),
        ("", "not an operation"),
    ],
)
def test_exact_where_meaning_is_at_stake(text, fragment):
    with pytest.raises(ActionParseError, match=re.escape(fragment)):
        parse_operation(text)


def test_vocabulary_matches_the_readme():
    assert ANSWER_FORMATS[0] == "Action-Operation-Sensitive" and len(ANSWER_FORMATS) == 5
    assert PLATFORMS == ("Mac", "WIN", "Mobile")
    assert set(ACTION_PARAMETERS) >= {
        "CLICK",
        "DOUBLE_CLICK",
        "RIGHT_CLICK",
        "HOVER",
        "TYPE",
        "SCROLL_UP",
        "SCROLL_DOWN",
        "SCROLL_LEFT",
        "SCROLL_RIGHT",
        "KEY_PRESS",
        "GESTURE",
        "LAUNCH",
        "QUOTE_TEXT",
        "QUOTE_CLIPBOARD",
        "LLM",
        "END",
    }
    assert answer_fields("Status-Plan-Action-Operation") == ("status", "plan", "action", "operation")
    with pytest.raises(ValueError, match="unknown answer format"):
        answer_fields("Action-Only")


# --- answers --------------------------------------------------------------------------------------------

README_ANSWER = (
    "Status: Currently in the email interface [[0, 2, 998, 905]], with the inbox in the center.\n"
    'Action: Click the "Mark all as read" button at the top center of the inbox page.\n'
    "Grounded Operation: CLICK(box=[[219,186,311,207]], element_type='Clickable text', "
    "element_info='Mark all emails as read')\n"
    "<<一般操作>>"
)


def test_parse_readme_answer():
    answer = parse_answer(README_ANSWER)
    assert answer.status.startswith("Currently in the email interface [[0, 2, 998, 905]]")
    assert answer.plan is None
    assert answer.operation.box == (219, 186, 311, 207)
    assert answer.sensitivity == GENERAL_TAG and not answer.end
    assert format_answer(answer, "Status-Action-Operation-Sensitive") == README_ANSWER


def test_answer_leniency_no_space_english_tag_end_and_continuation():
    text = (
        "Action: Click the 'Displays have separate spaces' option \n"
        "Grounded Operation:CLICK(box=[[655,842,671,857]], element_info='switch')\n<<general operation>>"
    )
    answer = parse_answer(text)
    assert answer.operation.name == "CLICK" and answer.sensitivity == GENERAL_TAG_EN
    done = parse_answer("Action: Done.\nGrounded Operation:END()\n<<END>>")
    assert done.end and done.operation == Action("END", {}) and done.sensitivity is None
    same_line = parse_answer("Action: x\nGrounded Operation: KEY_PRESS(key='F5') <<敏感操作>>")
    assert same_line.sensitivity == SENSITIVE_TAG and same_line.operation.args == {"key": "F5"}
    multi = parse_answer("Status: line one\nline two\nAction: a\nGrounded Operation: END()")
    assert multi.status == "line one\nline two"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("Action: a\nGrounded Operation: CLICK(box=[[1,2,3,4]])\n<<maybe>>", "unknown tag"),
        ("Action: a\nGrounded Operation: DRAG(box=[[1,2,3,4]])", "unknown action 'DRAG'"),
        ("Action: a\nAction: b\nGrounded Operation: END()", "two 'Action:' lines"),
        ("Action: a\nGrounded Operation: END()\n<<一般操作>>\n<<敏感操作>>", "two sensitivity tags"),
    ],
)
def test_answer_errors(text, fragment):
    with pytest.raises(ActionParseError, match=re.escape(fragment)):
        parse_answer(text)


def test_format_answer_requires_the_formats_fields():
    answer = Answer(action="a", operation=Action("END", {}))
    with pytest.raises(ValueError, match="Status"):
        format_answer(answer, "Status-Action-Operation")
    with pytest.raises(ValueError, match="sensitivity tag"):
        format_answer(answer, "Action-Operation-Sensitive")
    assert format_answer(answer, "Action-Operation") == "Action: a\nGrounded Operation: END()"
    assert answer_format_problems(answer, "Status-Action-Operation") == [
        "Status-Action-Operation answer lacks 'Status:'"
    ]
    extra = Answer(status="s", action="a", operation=Action("END", {}))
    assert answer_format_problems(extra, "Action-Operation") == ["Action-Operation answer should not carry 'Status:'"]


# --- property tests -------------------------------------------------------------------------------------

# Free text as the model writes it on one line: no line breaks (str.splitlines' set), no tag brackets.
_TEXT_ALPHABET = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="<>")
texts = st.text(_TEXT_ALPHABET, min_size=1, max_size=30).map(str.strip).filter(bool)
# A string argument may hold quotes, but not a quote followed by ", key=" (that would be ambiguous
# for any reader of this quote-unescaped syntax; see actions._parse_string).
values = st.text(_TEXT_ALPHABET, max_size=30).filter(lambda s: not re.search(r"['\"]\s*,\s*\w+\s*=", s))
boxes = st.tuples(*[st.integers(0, 999)] * 4)
keys = st.text(string.ascii_letters + string.digits + " '", min_size=1, max_size=8)


@st.composite
def actions(draw, name=None):
    name = name or draw(st.sampled_from(sorted(ACTION_PARAMETERS)))
    required, optional = ACTION_PARAMETERS[name]
    chosen = list(required) + [k for k in optional if draw(st.booleans())]
    args = {}
    for key in draw(st.permutations(chosen)):
        if key == "box":
            args[key] = draw(boxes)
        elif key == "step_count":
            args[key] = draw(st.integers(-50, 500))
        elif key == "auto_scroll":
            args[key] = draw(st.booleans())
        elif key == "actions":
            args[key] = tuple(
                Action(n, {"key": draw(keys)})
                for n in draw(st.lists(st.sampled_from(["KEY_DOWN", "KEY_PRESS", "KEY_UP"]), max_size=4))
            )
        elif key in ("app", "url"):
            args[key] = draw(st.one_of(st.none(), values))
        else:
            args[key] = draw(values)
    return Action(name, args)


@given(actions())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_format_then_parse_gives_the_action_back(action):
    assert parse_operation(format_operation(action)) == action


def _messy(action: Action, draw) -> str:
    """The same action written the way real outputs vary: spacing, leading zeros, quote style."""

    def value(v):
        if isinstance(v, tuple) and len(v) == 4 and all(isinstance(n, int) for n in v):
            sep = draw(st.sampled_from([",", ", ", " , "]))
            return "[[" + sep.join(draw(st.sampled_from(["{}", "{:03d}"])).format(n) for n in v) + "]]"
        if isinstance(v, str) and '"' not in v and draw(st.booleans()):
            return f'"{v}"'
        return format_operation(Action("X", {"k": v}))[4:-1]

    eq = draw(st.sampled_from(["=", " = "]))
    comma = draw(st.sampled_from([", ", ",", " ,  "]))
    return f"{action.name}(" + comma.join(f"{k}{eq}{value(v)}" for k, v in action.args.items()) + ")"


@given(st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_parse_format_parse_is_stable(data):
    action = data.draw(actions())
    text = _messy(action, data.draw)
    parsed = parse_operation(text)
    assert parsed == action
    assert parse_operation(format_operation(parsed)) == parsed


@st.composite
def answers(draw):
    answer_format = draw(st.sampled_from(ANSWER_FORMATS))
    wanted = answer_fields(answer_format)
    end = draw(st.booleans())
    sensitivity = draw(st.sampled_from(SENSITIVITY)) if "sensitivity" in wanted and not end else None
    answer = Answer(
        status=draw(texts) if "status" in wanted else None,
        plan=draw(texts) if "plan" in wanted else None,
        action=draw(texts) if "action" in wanted else None,
        operation=draw(actions()),
        sensitivity=sensitivity,
        end=end,
    )
    return answer, answer_format


@given(answers())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_answer_round_trip(case):
    answer, answer_format = case
    text = format_answer(answer, answer_format)
    assert parse_answer(text) == answer
    assert answer_format_problems(answer, answer_format) == []
    assert text.endswith(END_TAG) == answer.end
