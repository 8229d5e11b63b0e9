"""Worked solutions to the exercises of notebook 02 (the loss mask), each ending in a check.

Run `python solutions/02_loss_mask.py [DATA_DIR]`: one line per exercise, an AssertionError with a
message where a check fails. `tests/test_course_solutions.py` runs this file on the demo set.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import cogagent_nb as cnb

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "CogAgentData"


def tiny_tokenizer(image_size: int = 224) -> cnb.ChatGLM4Tokenizer:
    folder = cnb.write_tokenizer_files(
        tempfile.mkdtemp(prefix="tok02s_"), cnb.TINY_TOKENIZER_FILE, image_size=image_size
    )
    return cnb.ChatGLM4Tokenizer.from_pretrained(str(folder))


def exercise_1(conversation: dict, tokenizer, data_dir: Path) -> torch.Tensor:
    """With end_of_turn="<|endoftext|>" the stop target is the pad id, so masking pads erases it."""
    sample = cnb.encode_conversation(
        conversation, tokenizer, num_image_tokens=64, image_root=data_dir, end_of_turn="<|endoftext|>"
    )
    assert sample.labels[-1].item() == tokenizer.eos_id, "the last target is now <|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_id, "and <|endoftext|> is also the padding id"
    labels = sample.labels.clone()
    labels[labels == tokenizer.pad_token_id] = cnb.IGNORE_INDEX  # what a pad-masking collator does
    assert labels[-1].item() == cnb.IGNORE_INDEX, "the stop target is gone: the model would never learn to stop"
    return labels


def exercise_2(conversations: list[dict], tokenizer, data_dir: Path) -> dict[str, float]:
    """At full size the image dominates; 512 + 512 text tokens + 1602 image positions bound a sample."""
    samples = [
        cnb.encode_conversation(c, tokenizer, num_image_tokens=1600, image_root=data_dir) for c in conversations[:8]
    ]
    share = sum(cnb.mask_counts(s)["image"] for s in samples) / sum(s.model_length for s in samples)
    bound = 512 + 512 + 1602  # max_input_length + max_output_length (text) + the image on top
    longest = max(s.model_length for s in samples)
    assert share > 0.85, f"at full size the image is most of the sequence ({share:.0%})"
    assert longest <= bound, f"a sample never exceeds the two text budgets plus the image ({longest} > {bound})"
    # max_model_length 2048 budgets everything the model sees: 2048 - 1602 = 446 text ids for prompt + answer
    capped = cnb.encode_conversation(
        conversations[0], tokenizer, num_image_tokens=1600, image_root=data_dir, max_model_length=2048
    )
    assert capped.model_length <= 2048, capped.model_length
    return {"image_share": share, "longest": longest, "bound": bound}


def exercise_3(conversation: dict, tokenizer, data_dir: Path) -> tuple[int, str]:
    """Lower the budget until the task line is cut, then until encode_conversation refuses."""

    def encode(budget: int):
        return cnb.encode_conversation(
            conversation, tokenizer, num_image_tokens=64, image_root=data_dir, max_input_length=budget
        )

    budget = 200
    while not encode(budget).truncation.task_line_cut:
        budget -= 1
    task_cut_at = budget
    while budget > 0:
        try:
            encode(budget)
        except ValueError as error:
            return task_cut_at, str(error)
        budget -= 1
    raise AssertionError("encode_conversation never refused, even at max_input_length=1")


def exercise_4(tokenizer, data_dir: Path, image: str) -> int:
    """An observation turn after an answer: <|observation|> ends the assistant turn, and is its target."""
    conversation = [
        {"role": "user", "content": "Check the weather.", "image": image},
        {"role": "assistant", "content": "CALL_API(api='weather')"},
        {"role": "observation", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    sample = cnb.encode_conversation(conversation, tokenizer, num_image_tokens=64, image_root=data_dir)
    ids = sample.input_ids.tolist()
    position = ids.index(tokenizer.convert_tokens_to_ids("<|observation|>"))
    assert sample.labels[position].item() == ids[position], "the role token that ends an answer is its target"
    return position


def main(data_dir: Path = DEMO_DIR) -> None:
    tokenizer = tiny_tokenizer()
    conversations = cnb.load_split(data_dir, "train")
    longest = max(conversations, key=lambda c: len(c["messages"][0]["content"]))
    exercise_1(conversations[0], tokenizer, data_dir)
    print("exercise 1: with <|endoftext|> as end of turn, pad masking erases the stop target")
    print("exercise 2:", exercise_2(conversations, tokenizer, data_dir))
    task_cut_at, error = exercise_3(longest, tokenizer, data_dir)
    print(f"exercise 3: the task line is cut at max_input_length={task_cut_at}; then: {error}")
    print(
        "exercise 4: <|observation|> at position",
        exercise_4(tokenizer, data_dir, conversations[0]["messages"][0]["image"]),
        "is a target",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_DIR)
