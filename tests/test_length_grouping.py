"""`train_sampling_strategy: group_by_length` groups samples by their text length, without opening an image,
and evaluation keeps the file's order (answers are matched to references by index)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from cogagent_nb.data.encoding import ConversationDataset
from cogagent_nb.data.tokenizer import ChatGLM4Tokenizer
from cogagent_nb.train.trainer import CogAgentTrainer


def _dataset(repo_root, tiny_model_dir) -> ConversationDataset:
    tokenizer = ChatGLM4Tokenizer.from_pretrained(tiny_model_dir)
    return ConversationDataset(repo_root / "data/CogAgentData/train.jsonl", tokenizer, 64)


def _args(strategy: str) -> SimpleNamespace:
    return SimpleNamespace(train_sampling_strategy=strategy, train_batch_size=4, gradient_accumulation_steps=1)


def test_text_lengths_order_samples_as_their_encoded_lengths(repo_root, tiny_model_dir):
    dataset = _dataset(repo_root, tiny_model_dir)
    picked = range(0, len(dataset), 17)
    text = [dataset.text_lengths()[i] for i in picked]
    encoded = [len(dataset[i].input_ids) for i in picked]
    # one image per sample: the encoded length is the text length plus a constant (specials, image ids)
    assert len({e - t for e, t in zip(encoded, text)}) <= 2, list(zip(text, encoded))


def test_grouped_batches_waste_less_padding_than_the_file_order(repo_root, tiny_model_dir):
    dataset = _dataset(repo_root, tiny_model_dir)
    trainer = SimpleNamespace(args=_args("group_by_length"), train_dataset=dataset)
    torch.manual_seed(0)
    order = list(CogAgentTrainer._get_train_sampler(trainer))
    assert sorted(order) == list(range(len(dataset)))  # a permutation: every sample once
    lengths = dataset.text_lengths()

    def waste(indices: list[int]) -> float:
        batches = [[lengths[i] for i in indices[k : k + 4]] for k in range(0, len(indices), 4)]
        padded = sum(max(b) * len(b) for b in batches)
        return 1 - sum(map(sum, batches)) / padded

    assert waste(order) < 0.5 * waste(list(range(len(dataset)))), (waste(order), waste(list(range(len(dataset)))))


def test_evaluation_keeps_the_file_order_under_grouping(repo_root, tiny_model_dir):
    dataset = _dataset(repo_root, tiny_model_dir)
    trainer = SimpleNamespace(args=_args("group_by_length"))
    assert list(CogAgentTrainer._get_eval_sampler(trainer, dataset)) == list(range(len(dataset)))
