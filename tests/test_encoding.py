"""Tests of cogagent_nb.data.encoding against hand-written expected sequences.

Two tokenizers:
- `CharTokenizer`, defined here: one id per ASCII character (id = ord), specials at 200+. Expected
  sequences are spelled out with `ids("...")` = the character codes, so they can be read and checked by
  eye without any BPE.
- the parity tokenizer (official `tokenizer.model` format, 557 ranks, specials 557…570): a few
  sequences with the ids written out, and a check that the ids equal what the *official*
  `apply_chat_template` produced for the parity conversations (template_cases.json).
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cogagent_nb.data.encoding import (
    IGNORE_INDEX,
    ConversationDataset,
    EncodingError,
    TrainingCollator,
    encode_conversation,
    split_history,
)

X = IGNORE_INDEX


class CharTokenizer:
    """A test tokenizer: ASCII characters are their own ids, the GLM-4 specials sit at 200…213."""

    eos_id = pad_token_id = 200
    gmask_id, sop_id = 202, 204
    system_id, user_id, assistant_id, observation_id = 206, 207, 208, 209
    boi_id, eoi_id = 210, 211
    image_size = 28

    def encode_text(self, text: str) -> list[int]:
        assert text.isascii(), text
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()
PRE = [202, 204]  # [gMASK] <sop>
U, A, S, O, EOT = 207, 208, 206, 209, 200
NL = 10  # "\n"
IMG = [210, 200, 211]  # boi, placeholder, eoi


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def screenshot(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "shot.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return str(path)


def encode(messages, **kwargs):
    kwargs.setdefault("num_image_tokens", 4)
    return encode_conversation(messages, TOK, **kwargs)


# --- layout and supervision ----------------------------------------------------------------------------
def test_single_round_ids_labels_positions(screenshot):
    s = encode([{"role": "user", "content": "hi", "image": screenshot}, {"role": "assistant", "content": "ok"}])
    assert s.input_ids.tolist() == [202, 204, 207, 10, 210, 200, 211, 104, 105, 208, 10, 111, 107, 207]
    # targets: "\n" after <|assistant|>, the answer, and the end-of-turn <|user|>; not <|assistant|> itself
    assert s.labels.tolist() == [X, X, X, X, X, X, X, X, X, X, 10, 111, 107, 207]
    assert s.attention_mask.tolist() == [1] * 14
    assert s.position_ids.tolist() == list(range(14))
    assert s.image.shape == (3, 28, 28) and s.image.dtype == torch.float32
    assert s.model_length == 14 - 3 + 4 + 2
    assert [seg.kind for seg in s.segments] == [
        "prefix",
        "role",
        "newline",
        "image",
        "content",
        "role",
        "newline",
        "content",
        "end_of_turn",
    ]


def test_multi_round_supervises_every_assistant_turn(screenshot):
    s = encode(
        [
            {"role": "user", "content": "a", "image": screenshot},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    )
    expected = PRE + [U, NL, *IMG, *ids("a"), A, NL, *ids("b"), U, NL, *ids("c"), A, NL, *ids("d"), EOT + 7]
    assert s.input_ids.tolist() == expected
    # the <|user|> that follows the first answer is that answer's end-of-turn target
    assert s.labels.tolist() == [X] * 8 + [X, NL, ord("b"), U, X, X, X, NL, ord("d"), U]


def test_system_turn_is_never_supervised(screenshot):
    s = encode(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "q", "image": screenshot},
            {"role": "assistant", "content": "r"},
        ]
    )
    assert s.input_ids.tolist() == PRE + [S, NL, *ids("be brief"), U, NL, *IMG, *ids("q"), A, NL, ord("r"), U]
    assert s.labels.tolist() == [X] * (2 + 2 + 8 + 2 + 3 + 1 + 1) + [NL, ord("r"), U]


def test_observation_turn(screenshot):
    s = encode(
        [
            {"role": "user", "content": "q", "image": screenshot},
            {"role": "assistant", "content": "t"},
            {"role": "observation", "content": "42"},
            {"role": "assistant", "content": "a"},
        ]
    )
    assert s.input_ids.tolist() == PRE + [U, NL, *IMG, ord("q"), A, NL, ord("t"), O, NL, *ids("42"), A, NL, ord("a"), U]
    # the tool call ends with <|observation|> (a stop token the model must emit); the result is input
    assert s.labels.tolist() == [X] * 8 + [X, NL, ord("t"), O, X, X, X, X, NL, ord("a"), U]


def test_end_of_turn_choice(screenshot):
    conversation = [{"role": "user", "content": "q", "image": screenshot}, {"role": "assistant", "content": "a"}]
    s = encode(conversation, end_of_turn="<|endoftext|>")
    assert s.input_ids.tolist()[-1] == TOK.eos_id and s.labels.tolist()[-1] == TOK.eos_id
    with pytest.raises(ValueError, match="end_of_turn"):
        encode(conversation, end_of_turn="</s>")


def test_official_mode_reproduces_the_official_mask(screenshot):
    s = encode(
        [
            {"role": "user", "content": "q", "image": screenshot},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
        mode="official",
    )
    assert s.input_ids.tolist() == PRE + [U, NL, *IMG, ord("q"), A, NL, ord("b"), U, NL, ord("c"), A, NL, ord("d"), U]
    # every token of an assistant message is a label (role token too); the appended end token is not
    assert s.labels.tolist() == [X] * 8 + [A, NL, ord("b"), X, X, X, A, NL, ord("d"), X]


def test_accepts_the_official_conversation_dict(screenshot):
    messages = [{"role": "user", "content": "q", "image": screenshot}, {"role": "assistant", "content": "a"}]
    assert encode({"messages": messages}).input_ids.tolist() == encode(messages).input_ids.tolist()


# --- errors ---------------------------------------------------------------------------------------------
def test_no_image_raises_naming_the_sample():
    with pytest.raises(EncodingError, match=r"train\.jsonl:3: messages: no user turn with an image"):
        encode([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], name="train.jsonl:3")


def test_two_images_raise(screenshot):
    with pytest.raises(EncodingError, match=r"messages\[2\]\.image: more than one image .*first in messages\[0\]"):
        encode(
            [
                {"role": "user", "content": "q", "image": screenshot},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q", "image": screenshot},
                {"role": "assistant", "content": "a"},
            ]
        )


def test_image_on_assistant_raises(screenshot):
    with pytest.raises(EncodingError, match=r"messages\[1\]\.image: image on the assistant turn"):
        encode([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "image": screenshot}])


def test_missing_image_file_raises(tmp_path):
    with pytest.raises(EncodingError, match="image file not found"):
        encode(
            [{"role": "user", "content": "q", "image": "nope.png"}, {"role": "assistant", "content": "a"}],
            image_root=tmp_path,
        )


@pytest.mark.parametrize(
    "roles, message",
    [
        (["assistant", "user", "assistant"], r"messages\[0\]\.role: 'assistant' cannot follow the start"),
        (["user", "user", "assistant"], r"messages\[1\]\.role: 'user' cannot follow a user turn"),
        (["user", "assistant", "assistant"], r"messages\[2\]\.role: 'assistant' cannot follow an? assistant turn"),
        (["user", "observation"], r"'observation' cannot follow a user turn"),
        (["system", "system", "user", "assistant"], r"messages\[1\]\.role: 'system'"),
        (
            ["user", "assistant", "user"],
            "messages: the conversation ends with a 'user' turn; a training sample must end with",
        ),
        (["user", "bot"], r"messages\[1\]\.role: unknown role 'bot'"),
    ],
)
def test_role_order_errors(screenshot, roles, message):
    messages = [{"role": r, "content": "x"} for r in roles]
    messages[next(i for i, r in enumerate(roles) if r == "user")]["image"] = screenshot
    with pytest.raises(EncodingError, match=message):
        encode(messages)


# --- truncation -------------------------------------------------------------------------------------------
TASK = "Task: go"
HISTORY = "\nHistory steps: \n0. s0\n1. s1\n2. s2"
TAIL = "\n(Platform: WIN)\n"


def _history_conversation(screenshot, answer="ANSWER"):
    return [
        {"role": "user", "content": TASK + HISTORY + TAIL, "image": screenshot},
        {"role": "assistant", "content": answer},
    ]


def _prompt_len(content: str) -> int:
    """Text ids of a one-turn prompt: prefix, role + "\\n", text, <|assistant|>; the image is not counted."""
    return 2 + 2 + len(content) + 1


def test_split_history_of_the_official_prompt():
    head, steps, tail = split_history(TASK + HISTORY + TAIL)
    assert head == "Task: go\nHistory steps: "
    assert steps == ["\n0. s0", "\n1. s1", "\n2. s2"]
    assert tail == TAIL
    assert split_history("Where is it?") == ("Where is it?", [], "")


def test_no_truncation_when_the_budget_fits(screenshot):
    content = TASK + HISTORY + TAIL
    s = encode(_history_conversation(screenshot), max_input_length=_prompt_len(content), max_output_length=8)
    assert not s.truncation.truncated
    assert s.input_ids.tolist() == PRE + [U, NL, *IMG, *ids(content), A, NL, *ids("ANSWER"), U]


def test_history_is_dropped_oldest_first_and_the_image_is_kept(screenshot):
    kept = TASK + "\nHistory steps: \n1. s1\n2. s2" + TAIL
    budget = _prompt_len(kept)  # one step too short for the full prompt
    s = encode(_history_conversation(screenshot), max_input_length=budget)
    assert s.input_ids.tolist() == PRE + [U, NL, *IMG, *ids(kept), A, NL, *ids("ANSWER"), U]
    assert s.truncation.history_steps_dropped == 1 and s.truncation.prompt_tokens_cut == 0
    assert s.model_length - (4 + 2) - len(ids("\nANSWER")) - 1 == budget  # image on top of the text budget


def test_max_input_length_counts_text_only_the_image_comes_on_top(screenshot):
    content = TASK + HISTORY + TAIL
    budget = _prompt_len(content)
    for n_img in (4, 1600):  # the tiny and the real image size: the text budget means the same
        s = encode(_history_conversation(screenshot), num_image_tokens=n_img, max_input_length=budget)
        assert not s.truncation.truncated
        assert s.model_length == budget + n_img + 2 + len(ids("\nANSWER")) + 1


def test_official_budget_512_keeps_a_full_size_screenshot(screenshot):
    # configs/lora.yaml: max_input_length 512, max_output_length 512, at CogAgent's 1600 image tokens
    s = encode(_history_conversation(screenshot), num_image_tokens=1600, max_input_length=512, max_output_length=512)
    assert not s.truncation.truncated and s.model_length > 1602


def test_max_model_length_counts_the_expanded_image(screenshot):
    content = TASK + HISTORY + TAIL
    answer = len(ids("\nANSWER")) + 1
    total = _prompt_len(content) + (4 + 2) + answer
    fits = encode(_history_conversation(screenshot), max_model_length=total)
    assert not fits.truncation.truncated and fits.model_length == total
    # 6 more image vectors = one "\nN. sN" step (6 chars) must go
    bigger_image = encode(_history_conversation(screenshot), num_image_tokens=10, max_model_length=total)
    assert bigger_image.truncation.history_steps_dropped == 1 and bigger_image.model_length <= total
    # both limits given: the tighter one wins
    both = encode(_history_conversation(screenshot), max_input_length=_prompt_len(content) - 6, max_model_length=total)
    assert both.truncation.history_steps_dropped == 1


def test_max_model_length_too_small_for_image_and_answer_raises(screenshot):
    with pytest.raises(
        EncodingError, match=r"s1: the prompt needs 5 text tokens .* max_model_length=14 less the image"
    ):
        encode(_history_conversation(screenshot), max_model_length=14, name="s1")


def test_left_cut_keeps_the_task_line_then_cuts_it(screenshot):
    no_history = TASK + "\nHistory steps: " + TAIL  # all steps dropped: 24 + 17 chars
    budget = _prompt_len(no_history) - 5
    s = encode(_history_conversation(screenshot), max_input_length=budget)
    kept = TASK + no_history[len(TASK) + 5 :]
    assert s.input_ids.tolist() == PRE + [U, NL, *IMG, *ids(kept), A, NL, *ids("ANSWER"), U]
    assert (s.truncation.history_steps_dropped, s.truncation.prompt_tokens_cut) == (3, 5)
    assert not s.truncation.task_line_cut
    # with a budget below the task line, the task line is cut from its left too, image still intact
    s = encode(_history_conversation(screenshot), max_input_length=_prompt_len("go"))
    assert s.input_ids.tolist() == PRE + [U, NL, *IMG, *ids("go"), A, NL, *ids("ANSWER"), U]
    assert s.truncation.task_line_cut


def test_prompt_that_cannot_fit_raises(screenshot):
    with pytest.raises(EncodingError, match=r"sample 7: the prompt needs 5 text tokens .* max_input_length=4"):
        encode(_history_conversation(screenshot), max_input_length=4, name="sample 7")


def test_answer_cut_from_the_right_drops_the_end_token(screenshot):
    s = encode(_history_conversation(screenshot, answer="ABCDEFGH"), max_output_length=4)
    assert s.input_ids.tolist()[-5:] == [A, NL, *ids("ABC")]
    assert s.labels.tolist()[-5:] == [X, NL, *ids("ABC")]
    assert s.truncation.answer_tokens_cut == 5 and s.truncation.end_of_turn_dropped
    fits = encode(_history_conversation(screenshot, answer="ABCDEFGH"), max_output_length=10)
    assert fits.input_ids.tolist()[-2:] == [ord("H"), U] and not fits.truncation.end_of_turn_dropped
    assert not fits.truncation.truncated
    one_short = encode(_history_conversation(screenshot, answer="ABCDEFGH"), max_output_length=9)
    assert one_short.input_ids.tolist()[-1] == ord("H") and one_short.truncation.answer_tokens_cut == 0
    assert one_short.truncation.end_of_turn_dropped and one_short.truncation.truncated  # only the stop token went


def test_prompt_is_cut_before_the_answer(screenshot):
    s = encode(
        _history_conversation(screenshot),
        max_input_length=_prompt_len(TASK + "\nHistory steps: " + TAIL),
        max_output_length=8,
    )
    assert s.truncation.history_steps_dropped == 3 and s.truncation.answer_tokens_cut == 0
    assert s.labels.tolist()[-8:] == [NL, *ids("ANSWER"), U]


def test_nothing_supervised_raises_naming_the_sample(screenshot):
    with pytest.raises(EncodingError, match=r"dev\.jsonl:9: no supervised token is left"):
        encode(_history_conversation(screenshot), max_output_length=0, name="dev.jsonl:9")


@settings(max_examples=60, deadline=None)
@given(
    max_in=st.integers(1, 60),
    max_out=st.integers(1, 12),
    n_img=st.integers(1, 20),
    max_model=st.one_of(st.none(), st.integers(10, 90)),
)
def test_truncation_invariants(screenshot, max_in, max_out, n_img, max_model):
    conversation = _history_conversation(screenshot, answer="CLICK(box=[[1,2,3,4]])")
    try:
        s = encode(
            conversation,
            num_image_tokens=n_img,
            max_input_length=max_in,
            max_output_length=max_out,
            max_model_length=max_model,
        )
    except EncodingError as error:
        assert "prompt needs" in str(error)
        answer = min(max_out, len(ids("\nCLICK(box=[[1,2,3,4]])")) + 1)
        # only when the fixed part alone (prefix, role, "\n", <|assistant|>) is too long
        assert 2 + 2 + 1 > max_in or (max_model is not None and 2 + 2 + 1 + n_img + 2 + answer > max_model)
        return
    ids_ = s.input_ids.tolist()
    assert ids_.count(TOK.boi_id) == 1 and ids_[ids_.index(TOK.boi_id) :][:3] == IMG
    assert s.model_length <= max_in + max_out + n_img + 2
    assert max_model is None or s.model_length <= max_model
    answer = [t for t in s.labels.tolist() if t != X]
    full = [NL, *ids("CLICK(box=[[1,2,3,4]])"), U]
    assert answer == full[: min(max_out, len(full) - 1)] or answer == full


# --- against the official template on the parity tokenizer --------------------------------------------------
def test_parity_tokenizer_hand_written(parity_tokenizer, parity_dir):
    s = encode_conversation(
        [{"role": "user", "content": "hello world", "image": "img0.png"}, {"role": "assistant", "content": "Hi!"}],
        parity_tokenizer,
        num_image_tokens=16,
        image_root=parity_dir,
    )
    # [gMASK] <sop> <|user|> \n boi pad eoi "hello" " world" <|assistant|> \n "Hi" "!" ... <|user|>
    assert s.input_ids.tolist() == [559, 561, 564, 158, 567, 557, 568, 488, 550, 565, 158, 140, 19, 128, 564]
    assert s.labels.tolist() == [X] * 10 + [158, 140, 19, 128, 564]
    assert s.image.shape == (3, 112, 112)
    official = encode_conversation(
        [{"role": "user", "content": "hello world", "image": "img0.png"}, {"role": "assistant", "content": "Hi!"}],
        parity_tokenizer,
        num_image_tokens=16,
        image_root=parity_dir,
        mode="official",
    )
    assert official.labels.tolist() == [X] * 9 + [565, 158, 140, 19, 128, X]


def test_ids_equal_the_official_chat_template(parity_tokenizer, parity_template_checks, parity_dir):
    """Without the appended end token, our ids are exactly the official apply_chat_template's."""
    compared = 0
    for check in parity_template_checks:
        conversations = check["conversations"]
        if check["add_generation_prompt"] or len(conversations) != 1 or conversations[0][-1]["role"] != "assistant":
            continue
        if not any(m.get("image") for m in conversations[0]):
            continue
        s = encode_conversation(conversations[0], parity_tokenizer, num_image_tokens=16, image_root=parity_dir)
        assert s.input_ids.tolist()[:-1] == check["expected"]["input_ids"][0], check["name"]
        assert s.input_ids.tolist()[-1] == parity_tokenizer.user_id
        compared += 1
    assert compared >= 5


# --- collator and dataset ----------------------------------------------------------------------------------
def _two_samples(screenshot):
    short = encode([{"role": "user", "content": "q", "image": screenshot}, {"role": "assistant", "content": "a"}])
    long = encode([{"role": "user", "content": "qqq", "image": screenshot}, {"role": "assistant", "content": "a"}])
    return short, long


def test_collator_right_padding(screenshot):
    short, long = _two_samples(screenshot)
    batch = TrainingCollator(TOK)([short, long])
    assert batch["input_ids"].tolist()[0] == short.input_ids.tolist() + [TOK.pad_token_id] * 2
    assert batch["labels"].tolist()[0] == short.labels.tolist() + [X, X]
    assert batch["attention_mask"].tolist()[0] == [1] * 12 + [0, 0]
    assert batch["position_ids"].tolist()[0] == list(range(12)) + [0, 0]
    assert batch["input_ids"].tolist()[1] == long.input_ids.tolist()
    assert batch["images"].shape == (2, 3, 28, 28)


def test_collator_left_padding_and_multiple(screenshot):
    short, long = _two_samples(screenshot)
    batch = TrainingCollator(TOK, padding_side="left", pad_to_multiple_of=8)([short, long])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"].tolist()[0] == [TOK.pad_token_id] * 4 + short.input_ids.tolist()
    assert batch["labels"].tolist()[0] == [X] * 4 + short.labels.tolist()
    assert batch["attention_mask"].tolist()[1] == [0, 0] + [1] * 14
    assert batch["position_ids"].tolist()[1] == [0, 0] + list(range(14))
    with pytest.raises(ValueError, match="padding_side"):
        TrainingCollator(TOK, padding_side="middle")


def test_conversation_dataset_from_file_and_split(tmp_path, screenshot):
    Image.open(screenshot).save(tmp_path / "s.png")
    prompt = "Task: Open Settings\nHistory steps: \n(Platform: WIN)\n(Answer in Action-Operation format.)\n"
    answer = "Action: Click OK.\nGrounded Operation: CLICK(box=[[1,2,3,4]], element_info='OK')"
    rows = [
        {"messages": [{"role": "user", "content": prompt, "image": "s.png"}, {"role": "assistant", "content": answer}]}
    ] * 2
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_split = ConversationDataset(tmp_path, TOK, 4, split="train")
    by_file = ConversationDataset(tmp_path / "train.jsonl", TOK, 4, max_output_length=8)
    assert len(by_split) == len(by_file) == 2
    assert by_split[1].input_ids.tolist() == PRE + [U, NL, *IMG, *ids(prompt), A, NL, *ids(answer), U]
    assert by_file[1].labels.tolist()[-8:] == [NL, *ids("Action:")]  # max_output_length reaches encoding
    assert by_file[1].name.endswith("train.jsonl sample 1")
    batch = TrainingCollator(TOK)([by_split[0], by_split[1]])
    assert batch["images"].shape == (2, 3, 28, 28)


def test_negative_budgets_are_rejected(screenshot):
    conversation = [{"role": "user", "content": "q", "image": screenshot}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match="max_output_length must be None or >= 0"):
        encode(conversation, max_output_length=-1)


@pytest.mark.slow
def test_demo_split_with_the_tiny_tokenizer(demo_data_dir, tmp_path):
    """Every demo dev sample encodes; ids match the tokenizer's own chat template on real data."""
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer, write_tokenizer_files

    if not (demo_data_dir / "dev.jsonl").exists():
        pytest.skip(f"demo data not found at {demo_data_dir} (cogagent-nb make-demo-data)")
    tokenizer = ChatGLM4Tokenizer.from_pretrained(
        str(write_tokenizer_files(tmp_path, TINY_TOKENIZER_FILE, image_size=224))
    )
    dataset = ConversationDataset(demo_data_dir, tokenizer, 64, split="dev")
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample.input_ids.tolist().count(tokenizer.boi_id) == 1
        assert sample.labels[-1].item() == tokenizer.user_id and sample.image.shape == (3, 224, 224)
    for index in (0, len(dataset) - 1):
        template = tokenizer.apply_chat_template(
            dataset.conversations[index]["messages"],
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            image_root=demo_data_dir,
        )
        assert dataset[index].input_ids.tolist()[:-1] == template["input_ids"][0].tolist()
