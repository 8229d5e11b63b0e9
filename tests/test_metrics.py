"""GUI metrics: each verdict on hand-made answers, the rates' denominators, grouping and confusion."""

import pytest

from cogagent_nb.infer.metrics import (
    UNPARSED,
    action_confusion,
    centre_in_box,
    gui_metrics,
    score_answer,
    summarize_by,
)


def answer(operation: str) -> str:
    return f"Action: do it.\nGrounded Operation:{operation}"


CLICK_REF = answer("CLICK(box=[[100,100,200,200]], element_info='OK')")
TYPE_REF = answer("TYPE(box=[[300,300,600,350]], text='hello world', element_info='Search')")
KEY_REF = answer("KEY_PRESS(key='Enter')")


def test_centre_in_box_edges_count_as_inside():
    assert centre_in_box((100, 100, 200, 200), (150, 150, 250, 250))  # centre (150, 150) on the edge
    assert not centre_in_box((0, 0, 100, 100), (150, 150, 250, 250))


def test_click_hit_and_miss():
    hit = score_answer(answer("CLICK(box=[[120,120,180,190]], element_info='OK')"), CLICK_REF)
    assert hit.parsed and hit.type_correct and hit.click_in_box and hit.step_success
    assert hit.text_exact is None  # CLICK carries no text
    miss = score_answer(answer("CLICK(box=[[500,500,600,600]])"), CLICK_REF)
    assert miss.type_correct and miss.click_in_box is False and not miss.step_success


def test_right_box_wrong_type_is_not_a_success():
    score = score_answer(answer("DOUBLE_CLICK(box=[[120,120,180,190]])"), CLICK_REF)
    assert score.click_in_box and not score.type_correct and not score.step_success


def test_type_needs_box_and_exact_text():
    good = score_answer(answer("TYPE(box=[[310,310,590,340]], text=' hello world ')"), TYPE_REF)
    assert good.text_exact and good.step_success
    wrong_text = score_answer(answer("TYPE(box=[[310,310,590,340]], text='hello')"), TYPE_REF)
    assert wrong_text.click_in_box and wrong_text.text_exact is False and not wrong_text.step_success


def test_key_press_scored_by_key():
    assert score_answer(answer("KEY_PRESS(key='Enter')"), KEY_REF).step_success
    score = score_answer(answer("KEY_PRESS(key='Tab')"), KEY_REF)
    assert score.click_in_box is None and score.text_exact is False and not score.step_success


def test_unparsable_prediction_counts_as_a_miss_everywhere():
    score = score_answer("Action: click it\nGrounded Operation:CLICK(box=[[1,2,3", CLICK_REF)
    assert not score.parsed and score.predicted_type == UNPARSED
    assert score.click_in_box is False and not score.step_success


def test_broken_reference_is_a_data_error():
    with pytest.raises(ValueError, match="reference answer"):
        score_answer(CLICK_REF, "no operation here")


def test_rates_use_only_the_pairs_each_metric_applies_to():
    predictions = [
        answer("CLICK(box=[[120,120,180,190]])"),  # hit
        answer("CLICK(box=[[900,900,950,950]])"),  # miss
        answer("KEY_PRESS(key='Enter')"),  # right key
        "garbage",
    ]
    references = [CLICK_REF, CLICK_REF, KEY_REF, KEY_REF]
    m = gui_metrics(predictions, references)
    assert m["n"] == 4 and m["n_with_box"] == 2 and m["n_with_text"] == 2
    assert m["parse_rate"] == 0.75
    assert m["type_accuracy"] == 0.75
    assert m["click_in_box"] == 0.5
    assert m["text_exact"] == 0.5
    assert m["step_success"] == 0.5


def test_grouping_and_confusion():
    predictions = [answer("CLICK(box=[[120,120,180,190]])"), answer("CLICK(box=[[120,120,180,190]])"), "x"]
    references = [CLICK_REF, KEY_REF, KEY_REF]
    scores = [score_answer(p, r) for p, r in zip(predictions, references)]
    by = summarize_by(scores, ["WIN", "Mac", "Mac"])
    assert list(by) == ["Mac", "WIN"] and by["WIN"]["step_success"] == 1.0 and by["Mac"]["step_success"] == 0.0
    assert by["Mac"]["click_in_box"] is None  # no Mac reference has a box
    assert action_confusion(scores) == {"CLICK": {"CLICK": 1}, "KEY_PRESS": {"CLICK": 1, UNPARSED: 1}}


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        gui_metrics(["a", "b"], [CLICK_REF])
