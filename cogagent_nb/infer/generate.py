"""One step of a GUI agent: screenshot + task -> prompt -> generated answer -> action -> pixels.

This is what the official demo (THUDM/CogAgent `inference/cli_demo.py`) does for each screenshot, as
package functions that notebooks, `cogagent-nb infer` and `cogagent-nb evaluate` share:

1. `build_prompt` writes the user turn (task, history, platform, answer format; `data/prompts.py`);
2. the tokenizer's chat template adds the image markers and `<|assistant|>` (`data/tokenizer.py`);
3. the model decodes greedily by default and stops on the official stop set, which the tokenizer
   reports (`eos_token_ids_for_generation`: `<|endoftext|>`, `<|user|>`, `<|observation|>`); the image
   marker ids are never generated (`modeling.ImageMarkerSuppressor`). Greedy decoding runs the static
   KV-cache decoder (`static_decode.py`: one CUDA graph replay per token, the same ids as
   `model.generate`); sampling runs `model.generate`;
4. `parse_answer` reads the fields and the Grounded Operation (`data/actions.py`); an answer that does
   not parse is kept with its error, never raised: an untrained model writes anything;
5. `to_pixels` turns the box from thousandths into pixels of *this* screenshot, and the click point
   is the box centre, as the official action-space document defines (`data/boxes.py`).

Batches are left-padded (the tokenizer's padding side), so every row's last prompt token sits in the
last column and greedy answers equal the one-by-one answers (`tests/test_infer.py` checks this).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from cogagent_nb.data.actions import Action, ActionParseError, Answer, parse_answer
from cogagent_nb.data.boxes import box_center, to_pixels
from cogagent_nb.data.images import load_image
from cogagent_nb.data.prompts import HistoryLike, HistoryStep, build_prompt, parse_prompt

if TYPE_CHECKING:
    from cogagent_nb.data.tokenizer import ChatGLM4Tokenizer

DEFAULT_PLATFORM = "WIN"
DEFAULT_FORMAT = "Action-Operation-Sensitive"
"""The official demo's defaults (cli_demo.py: platform WIN, format Action-Operation-Sensitive)."""


# --- loading ---------------------------------------------------------------------------------------------
class InferenceInputError(ValueError):
    """Input that inference cannot use (a model folder without tokenizer, a missing image); names the file."""


def load_for_inference(
    model_dir: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    merge: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[ChatGLM4Tokenizer, torch.nn.Module]:
    """`(tokenizer, model)` ready to generate: a base checkpoint plus, optionally, a LoRA adapter.

    adapter: a folder written by `save_adapter` / `cogagent-nb finetune` (adapter_config.json +
      adapter_model.safetensors), or a finetune output_dir (its newest checkpoint is used); it is
      attached to the freshly loaded base model (`cnb.load(model_dir, adapter=...)`).
    merge: fold the adapter into the base weights (faster generation, no PEFT wrapper afterwards).
    The tokenizer comes from `model_dir` (an adapter folder does not change it).
    """
    from cogagent_nb.model.loading import load

    directory = Path(model_dir)
    check_model_dir(directory)
    if adapter is not None:
        adapter = resolve_adapter(adapter)
    if merge and adapter is None:
        raise InferenceInputError("--merge needs an adapter to merge (pass --adapter DIR)")
    tokenizer, model = load(directory, dtype=dtype, adapter=adapter)
    if merge:
        from cogagent_nb.model.peft_recipes import merge_adapter

        model = merge_adapter(model)
    if device is not None:
        model = model.to(device)
    return tokenizer, model.eval()


def load_finetuned(
    base_dir: str | os.PathLike, run_dir: str | os.PathLike, **options: Any
) -> tuple[ChatGLM4Tokenizer, torch.nn.Module]:
    """What a fine-tuning run left in `run_dir`, ready to generate.

    `run_dir` may be an adapter folder or a finetune output_dir with LoRA / prefix-tuning checkpoints
    (then: `base_dir` + the newest adapter), or a full model folder or an output_dir of full fine-tuning
    (then: the newest full checkpoint; `base_dir` is not needed). options: `load_for_inference` options.
    """
    found = find_finetuned(run_dir)
    if found is None:
        raise InferenceInputError(
            f"{run_dir}: holds no adapter_config.json or config.json (nor does any checkpoint-N inside); "
            "pass what `cogagent-nb finetune` wrote"
        )
    if (found / "adapter_config.json").is_file():
        return load_for_inference(base_dir, adapter=found, **options)
    return load_for_inference(found, **options)


def find_finetuned(run_dir: str | os.PathLike) -> Path | None:
    """The adapter (preferred) or full model folder a fine-tuning run left in `run_dir`, or None."""
    return find_adapter(run_dir) or find_checkpoint(run_dir, "config.json")


def find_checkpoint(path: str | os.PathLike, marker: str) -> Path | None:
    """`path` when it holds the file `marker`, else its newest `checkpoint-N` that does, else None."""
    path = Path(path)
    if (path / marker).is_file():
        return path
    if not path.is_dir():
        return None
    numbered = []
    for child in path.glob("checkpoint-*"):
        suffix = child.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (child / marker).is_file():
            numbered.append((int(suffix), child))
    return max(numbered)[1] if numbered else None


def check_model_dir(directory: Path) -> None:
    """Fail early, naming the file, when a model folder cannot serve inference (no weights check: `load` does)."""
    if not directory.is_dir():
        raise InferenceInputError(f"{directory}: no such model directory")
    for name, why in (("config.json", "the model configuration"), ("tokenizer.model", "the tokenizer's BPE ranks")):
        if not (directory / name).is_file():
            raise InferenceInputError(
                f"{directory / name}: missing ({why}); a model directory for inference holds config.json, "
                "model.safetensors, tokenizer.model and tokenizer_config.json (`cogagent-nb make-tiny-model` writes one)"
            )


def find_adapter(path: str | os.PathLike) -> Path | None:
    """The adapter folder at `path`: `path` itself when it holds PEFT's adapter_config.json, else its newest
    `checkpoint-N` that does (so a finetune `output_dir` works too); None when there is none."""
    return find_checkpoint(path, "adapter_config.json")


def resolve_adapter(path: str | os.PathLike) -> Path:
    """`find_adapter`, or an error that names the file that is missing."""
    found = find_adapter(path)
    if found is None:
        raise InferenceInputError(
            f"{Path(path) / 'adapter_config.json'}: missing (and no checkpoint-N inside holds one); pass the "
            "folder that `save_adapter` or `cogagent-nb finetune` wrote"
        )
    return found


# --- the result ------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """Everything one inference step produced: the request, the raw answer, and what it means on screen.

    `answer` is None when the generated text does not parse; `error` then says why. Boxes are in
    thousandths (`box`) and in pixels of the screenshot (`box_pixels`); `click` is the pixel the
    official executor would click (the box centre).
    """

    task: str
    platform: str
    answer_format: str
    history: tuple[HistoryStep, ...]
    prompt: str
    text: str
    answer: Answer | None
    error: str | None
    image_size: tuple[int, int]
    new_tokens: int
    stopped: bool  # ended on a stop token (False: ran into max_new_tokens)
    image: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def operation(self) -> Action | None:
        return self.answer.operation if self.answer is not None else None

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        return self.operation.box if self.operation is not None else None

    @property
    def box_pixels(self) -> tuple[int, int, int, int] | None:
        return to_pixels(self.box, *self.image_size) if self.box is not None else None

    @property
    def click(self) -> tuple[int, int] | None:
        if self.box_pixels is None:
            return None
        x, y = box_center(self.box_pixels)
        return int(round(x)), int(round(y))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no image)."""
        operation = self.operation
        return {
            "task": self.task,
            "platform": self.platform,
            "answer_format": self.answer_format,
            "history": [[s.grounded_operation, s.action] for s in self.history],
            "prompt": self.prompt,
            "text": self.text,
            "parsed": self.answer is not None,
            "error": self.error,
            "action": operation.name if operation is not None else None,
            "operation": str(operation) if operation is not None else None,
            "box": list(self.box) if self.box is not None else None,
            "box_pixels": list(self.box_pixels) if self.box_pixels is not None else None,
            "click": list(self.click) if self.click is not None else None,
            "end": bool(self.answer.end) if self.answer is not None else False,
            "image_size": list(self.image_size),
            "new_tokens": self.new_tokens,
            "stopped": self.stopped,
        }

    def __str__(self) -> str:
        lines = ["--- prompt", self.prompt.rstrip("\n"), "--- generated", self.text]
        if self.answer is None:
            lines.append(f"--- not parsed: {self.error}")
        else:
            operation = self.operation
            lines.append(f"--- action: {operation.name if operation else '(no Grounded Operation)'}")
            if self.box is not None:
                lines.append(
                    f"    box {list(self.box)} (thousandths) = {list(self.box_pixels)} px, click at {self.click}"
                )
            for key, value in operation.args.items() if operation else ():
                if key != "box":
                    lines.append(f"    {key} = {value!r}")
            if self.answer.end:
                lines.append("    <<END>>: the model says the task is done")
        stop = "stop token" if self.stopped else "max_new_tokens"
        lines.append(f"--- {self.new_tokens} new tokens, ended by {stop}")
        return "\n".join(lines)


def read_answer(text: str) -> tuple[Answer | None, str | None]:
    """(parsed answer, None) or (None, why not); an answer without a Grounded Operation counts as unparsed."""
    try:
        answer = parse_answer(text)
    except ActionParseError as err:
        return None, str(err)
    if answer.operation is None:
        return None, "no 'Grounded Operation:' line"
    return answer, None


# --- generation --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generated:
    """One generated answer: the text (special tokens removed), its length, and how it ended."""

    text: str
    new_tokens: int
    stopped: bool


def generation_kwargs(
    tokenizer: ChatGLM4Tokenizer,
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
) -> dict[str, Any]:
    """The `generate` arguments: greedy unless `do_sample`; stop ids and pad id from the tokenizer."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "eos_token_id": list(tokenizer.eos_token_ids_for_generation),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # silence "temperature is set but do_sample is False" from a checkpoint's generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def generate_answers(
    model: torch.nn.Module,
    tokenizer: ChatGLM4Tokenizer,
    images: Sequence[Image.Image | str | os.PathLike],
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
    seed: int | None = None,
    **settings: Any,
) -> list[Generated]:
    """Generate one answer per (screenshot, user prompt), `batch_size` at a time with left padding.

    settings: `generation_kwargs` options (max_new_tokens, do_sample, temperature, top_p, top_k).
    seed: seeds torch before each batch, so sampled answers repeat run to run.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    kwargs = generation_kwargs(tokenizer, **settings)
    stop_ids = set(kwargs["eos_token_id"])
    device = next(model.parameters()).device
    results: list[Generated] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generating", unit="batch")
    for start in starts:
        conversations = [
            [{"role": "user", "content": prompt, "image": load_image(image)}]
            for image, prompt in zip(images[start : start + batch_size], prompts[start : start + batch_size])
        ]
        batch = tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        batch = {key: value.to(device) for key, value in batch.items()}
        if seed is not None:
            torch.manual_seed(seed + start)
        new_ids = _generate_batch(model, batch, kwargs)
        results += [_decoded(tokenizer, row, stop_ids) for row in new_ids.tolist()]
    return results


def _generate_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> torch.Tensor:
    """The new ids (B, T) of one batch: greedy through the static decoder where it can serve the model
    (a CUDA graph per token, `static_decode.py`), otherwise (sampling, prefix tuning, a stand-in, the
    switch `SPEEDUPS.static_decode` off) through `model.generate`."""
    from cogagent_nb.infer.static_decode import greedy_generate, static_decoder_for
    from cogagent_nb.model.modeling import SPEEDUPS

    native = None if kwargs["do_sample"] else static_decoder_for(model)
    if native is not None:
        return greedy_generate(
            native,
            **batch,
            max_new_tokens=kwargs["max_new_tokens"],
            stop_ids=kwargs["eos_token_id"],
            pad_token_id=kwargs["pad_token_id"],
            compile_step=SPEEDUPS.compile_decode_step and batch["input_ids"].device.type == "cuda",
        )
    with torch.no_grad():
        output = model.generate(**batch, **kwargs)
    return output[:, batch["input_ids"].shape[1] :]


def _decoded(tokenizer: ChatGLM4Tokenizer, ids: list[int], stop_ids: set[int]) -> Generated:
    """Cut a generated row at its first stop id (what follows is padding) and decode it."""
    end = next((i for i, token in enumerate(ids) if token in stop_ids), None)
    kept = ids if end is None else ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Generated(text, len(kept) + (end is not None), end is not None)


def predict(
    model: torch.nn.Module,
    tokenizer: ChatGLM4Tokenizer,
    image: Image.Image | str | os.PathLike,
    task: str,
    *,
    platform: str = DEFAULT_PLATFORM,
    answer_format: str = DEFAULT_FORMAT,
    history: Iterable[HistoryLike] = (),
    **settings: Any,
) -> Prediction:
    """One agent step: build the official prompt, generate, parse, convert the box to pixels."""
    return predict_batch(
        model, tokenizer, [image], [task], platform=platform, answer_format=answer_format, history=[history], **settings
    )[0]


def predict_batch(
    model: torch.nn.Module,
    tokenizer: ChatGLM4Tokenizer,
    images: Sequence[Image.Image | str | os.PathLike],
    tasks: Sequence[str],
    *,
    platform: str | Sequence[str] = DEFAULT_PLATFORM,
    answer_format: str | Sequence[str] = DEFAULT_FORMAT,
    history: Sequence[Iterable[HistoryLike]] | None = None,
    **settings: Any,
) -> list[Prediction]:
    """`predict` for many screenshots at once (platform, format and history per sample or shared)."""
    n = len(tasks)
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} tasks")
    platforms = [platform] * n if isinstance(platform, str) else list(platform)
    formats = [answer_format] * n if isinstance(answer_format, str) else list(answer_format)
    steps = list(history) if history is not None else [()] * n
    for name, values in (("platforms", platforms), ("answer formats", formats), ("histories", steps)):
        if len(values) != n:  # zip would silently drop the samples beyond the shorter list
            raise ValueError(f"{len(values)} {name} for {n} tasks; give one per task, or one string for all")
    opened = [_open(image) for image in images]
    prompts = [build_prompt(t, p, f, h) for t, p, f, h in zip(tasks, platforms, formats, steps)]
    histories = [parse_prompt(prompt).history for prompt in prompts]  # HistoryStep objects, whatever came in
    generated = generate_answers(model, tokenizer, opened, prompts, **settings)
    return [
        make_prediction(image, prompt, gen, task, p, f, h)
        for image, prompt, gen, task, p, f, h in zip(opened, prompts, generated, tasks, platforms, formats, histories)
    ]


def make_prediction(
    image: Image.Image,
    prompt: str,
    generated: Generated,
    task: str,
    platform: str,
    answer_format: str,
    history: tuple[HistoryStep, ...],
) -> Prediction:
    """Assemble a `Prediction` from a generated answer and its request."""
    answer, error = read_answer(generated.text)
    return Prediction(
        task=task,
        platform=platform,
        answer_format=answer_format,
        history=history,
        prompt=prompt,
        text=generated.text,
        answer=answer,
        error=error,
        image_size=image.size,
        new_tokens=generated.new_tokens,
        stopped=generated.stopped,
        image=image,
    )


def _open(image: Image.Image | str | os.PathLike) -> Image.Image:
    try:
        return load_image(image)
    except FileNotFoundError as err:
        raise InferenceInputError(str(err)) from None
    except OSError as err:  # PIL's "cannot identify image file"
        raise InferenceInputError(f"{image}: not a readable image ({err})") from None
