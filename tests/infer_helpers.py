"""A scripted stand-in for the model, for tests of the code *around* generation (parsing, pixels, the
agent loop, evaluation): its `generate` answers each prompt with a text chosen by the test."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ScriptedModel(torch.nn.Module):
    """`generate` returns prompt ids + the tokens of `answer(prompt_text)` + a stop id, left-aligned, padded.

    `answer` gets the user prompt (decoded back from the ids) and returns the answer text. The calls are
    recorded in `prompts` so a test can check what the model was asked.
    """

    def __init__(self, tokenizer, answer: Callable[[str], str]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.tokenizer, self.answer = tokenizer, answer
        self.prompts: list[str] = []
        self.images: list[torch.Tensor] = []

    def generate(self, input_ids, images=None, eos_token_id=None, pad_token_id=None, **_) -> torch.Tensor:
        rows = []
        for row, image in zip(input_ids.tolist(), images):
            prompt = self.tokenizer.decode(row, skip_special_tokens=True).lstrip("\n")
            self.prompts.append(prompt)
            self.images.append(image)
            rows.append(self.tokenizer.encode_text(self.answer(prompt)) + [eos_token_id[0]])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)
