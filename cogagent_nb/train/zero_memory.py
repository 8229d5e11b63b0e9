"""How much GPU memory the model states of a training run need per GPU, under each ZeRO stage.

The arithmetic is the one of the ZeRO paper (Rajbhandari et al., "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", SC 2020, arXiv:1910.02054, section 3.1 and figure 1). Mixed-precision
Adam keeps, per trainable parameter:

    2 bytes   bf16 weights (what forward and backward use)
    2 bytes   bf16 gradient
    12 bytes  optimizer state in fp32: master weights 4 + Adam momentum 4 + Adam variance 4

and 2 bytes per frozen parameter (weights only). With N data-parallel GPUs:

    stage 0 (plain DDP)   every GPU holds everything
    stage 1               optimizer state / N
    stage 2               optimizer state and gradients / N               (configs/ds_zero_2.json)
    stage 3               optimizer state, gradients and weights / N      (configs/ds_zero_3.json)

Activations, the CUDA context and temporary buffers come on top; docs/BENCHMARKS.md has measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_BYTES = 2  # bf16
GRADIENT_BYTES = 2  # bf16
OPTIMIZER_BYTES = 12  # fp32 master copy + Adam m + Adam v
GIB = 1024**3
BYTES_PER_PARAMETER = {"weights": WEIGHT_BYTES, "gradients": GRADIENT_BYTES, "optimizer": OPTIMIZER_BYTES}


@dataclass(frozen=True)
class ZeroMemory:
    """Bytes of model states per GPU, split into weights, gradients and optimizer state."""

    stage: int
    world_size: int
    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def zero_memory(total_params: int, trainable_params: int, *, stage: int, world_size: int) -> ZeroMemory:
    """Model-state bytes per GPU for `stage` (0-3) on `world_size` GPUs (the paper's formula, see above)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1 or not 0 <= trainable_params <= total_params:
        raise ValueError(
            f"need world_size >= 1 and 0 <= trainable <= total, got {world_size}, {trainable_params}, {total_params}"
        )
    weights = float(WEIGHT_BYTES * total_params)
    gradients = float(GRADIENT_BYTES * trainable_params)
    optimizer = float(OPTIMIZER_BYTES * trainable_params)
    if stage >= 1:
        optimizer /= world_size
    if stage >= 2:
        gradients /= world_size
    if stage >= 3:
        weights /= world_size
    return ZeroMemory(stage, world_size, weights, gradients, optimizer)


def parameter_counts(
    preset: str = "cogagent-9b-20241220", *, lora_rank: int | None = None, freeze_vision: bool = False
) -> tuple[int, int]:
    """(total parameters, trainable parameters) of a model preset, counted without allocating it.

    The model is built on the `meta` device (shapes only). lora_rank=None: full fine-tuning, everything
    trains except the vision tower when `freeze_vision` (freezeV: true, the official sft.yaml); otherwise
    LoRA of that rank on every `query_key_value` (the official lora.yaml scope), counted as r x (in + out)
    per adapted linear layer.
    """
    import torch

    from cogagent_nb.model.configuration import CogAgentConfig
    from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

    with torch.device("meta"):
        model = CogAgentForConditionalGeneration(CogAgentConfig.from_preset(preset))
    total = sum(p.numel() for p in model.parameters())
    if lora_rank is None:
        frozen = sum(p.numel() for p in model.transformer.vision.parameters()) if freeze_vision else 0
        return total, total - frozen
    adapted = [m for name, m in model.named_modules() if name.endswith("query_key_value")]
    lora = sum(lora_rank * (m.in_features + m.out_features) for m in adapted)
    return total + lora, lora


def zero_memory_table(total_params: int, trainable_params: int, world_sizes: tuple[int, ...] = (1, 8)) -> list[dict]:
    """Rows (stage, GPUs, GiB of weights / gradients / optimizer / total per GPU) for a table or a plot."""
    rows = []
    for world_size in world_sizes:
        for stage in (0, 1, 2, 3):
            memory = zero_memory(total_params, trainable_params, stage=stage, world_size=world_size)
            rows.append(
                {
                    "stage": stage,
                    "gpus": world_size,
                    "weights_gib": memory.weights / GIB,
                    "gradients_gib": memory.gradients / GIB,
                    "optimizer_gib": memory.optimizer / GIB,
                    "total_gib": memory.total / GIB,
                }
            )
    return rows


def plot_zero_memory(
    total_params: int,
    trainable_params: int,
    *,
    world_size: int = 8,
    gpu_gib: float | None = 80.0,
    title: str | None = None,
    ax=None,
):
    """Stacked bars of model-state GiB per GPU: one GPU, then ZeRO stages 0-3 on `world_size` GPUs.

    (On one GPU every stage is the same: there is nobody to share with.) gpu_gib draws the memory of one
    GPU as a dashed line (80 for an A100/H100 80 GB; None for none). Returns the figure.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.8))
    else:
        fig = ax.figure
    cases = [(0, 1)] + [(stage, world_size) for stage in (0, 1, 2, 3)]
    labels = ["1 GPU"] + [f"ZeRO-{stage}\n{world_size} GPUs" for stage in (0, 1, 2, 3)]
    parts: dict[str, list[float]] = {"weights": [], "gradients": [], "optimizer": []}
    for stage, gpus in cases:
        memory = zero_memory(total_params, trainable_params, stage=stage, world_size=gpus)
        for part in parts:
            parts[part].append(getattr(memory, part) / GIB)
    bottom = [0.0] * len(labels)
    colours = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer": "#55a868"}
    for part, values in parts.items():
        ax.bar(
            labels,
            values,
            bottom=bottom,
            label=f"{part} ({BYTES_PER_PARAMETER[part]} bytes per parameter)",
            color=colours[part],
        )
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, height in enumerate(bottom):
        ax.text(x, height, f"{height:.1f}", ha="center", va="bottom", fontsize=8)
    if gpu_gib is not None:
        ax.axhline(gpu_gib, color="grey", linestyle="--", linewidth=1)
        ax.text(-0.4, gpu_gib, f"one {gpu_gib:.0f} GiB GPU", ha="left", va="bottom", fontsize=8)
    ax.set_ylim(0, max(max(bottom), gpu_gib or 0) * 1.15)
    ax.set_ylabel("GiB per GPU (model states)")
    ax.set_title(title or f"{total_params / 1e9:.1f} B parameters, {trainable_params / 1e9:.3g} B trainable")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
