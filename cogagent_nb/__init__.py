"""cogagent_nb: the package behind the cogagent-notebooks course.

The package is laid out by the stages a user goes through, which are also the course's parts:

    cogagent_nb/
        data/    the CogAgent data format, validation, synthetic screens, tokenizer, encoding   (01, 02)
        model/   configuration, the native model, checkpoint loading, PEFT recipes               (03+)
        train/   fine-tuning: the official config files, Trainer, DeepSpeed, resume               (03-06)
        infer/   generation, action parsing into clicks, GUI metrics, evaluation                 (07)
        viz/     pictures for people: sample views, loss-mask views, training curves
        cli.py   the `cogagent-nb` command line;  course.py  runs the notebooks

The public API is the flat list `PUBLIC_API` below: `import cogagent_nb as cnb; cnb.load(...)`.
Every name is imported on first use, so `import cogagent_nb` is cheap and a data check never pays
for torch. Notebooks use only these names.

Auto classes: `import cogagent_nb.model` (which `cnb.load` and every model name do for you)
registers model type "chatglm" with transformers, after which `AutoModelForCausalLM.from_pretrained(dir)`
loads an official-format directory with this package's code and without `trust_remote_code`.
"""

from __future__ import annotations

import importlib
from typing import Any

from cogagent_nb.train.devices import protect_torch_import

__version__ = "0.1.0"

# A torch_npu installed without a working CANN toolkit would break every `import torch` through torch's device
# plug-in autoload; the plug-in is imported explicitly by `enable_npu()` instead (train/devices.py, docs/NPU.md).
protect_torch_import()

PUBLIC_API: dict[str, str] = {
    # data: format, prompts, validation
    "ANSWER_FORMATS": "cogagent_nb.data.actions",
    "PLATFORMS": "cogagent_nb.data.actions",
    "Action": "cogagent_nb.data.actions",
    "Answer": "cogagent_nb.data.actions",
    "parse_operation": "cogagent_nb.data.actions",
    "format_operation": "cogagent_nb.data.actions",
    "parse_answer": "cogagent_nb.data.actions",
    "format_answer": "cogagent_nb.data.actions",
    "to_pixels": "cogagent_nb.data.boxes",
    "from_pixels": "cogagent_nb.data.boxes",
    "box_center": "cogagent_nb.data.boxes",
    "HistoryStep": "cogagent_nb.data.prompts",
    "build_prompt": "cogagent_nb.data.prompts",
    "parse_prompt": "cogagent_nb.data.prompts",
    "ROLES": "cogagent_nb.data.chat_format",
    "conversation_problems": "cogagent_nb.data.chat_format",
    "render_conversation": "cogagent_nb.data.chat_format",
    "SPLITS": "cogagent_nb.data.validation",
    "Problem": "cogagent_nb.data.validation",
    "validate_paths": "cogagent_nb.data.validation",
    "validate_file": "cogagent_nb.data.validation",
    "load_conversations": "cogagent_nb.data.validation",
    "load_split": "cogagent_nb.data.validation",
    "held_out_split": "cogagent_nb.data.validation",
    "present_splits": "cogagent_nb.data.validation",
    "conversation_image": "cogagent_nb.data.validation",
    "episode_around": "cogagent_nb.data.validation",
    "make_demo_data": "cogagent_nb.data.synthetic",
    "make_episode": "cogagent_nb.data.synthetic",
    "episode_samples": "cogagent_nb.data.synthetic",
    "write_flawed_example": "cogagent_nb.data.synthetic",
    # data: tokenizer and encoding
    "load_image": "cogagent_nb.data.images",
    "image_to_tensor": "cogagent_nb.data.images",
    "ChatGLM4Tokenizer": "cogagent_nb.data.tokenizer",
    "TINY_TOKENIZER_FILE": "cogagent_nb.data.tokenizer",
    "write_tokenizer_files": "cogagent_nb.data.tokenizer",
    "make_tiny_tokenizer": "cogagent_nb.data.bpe",
    "IGNORE_INDEX": "cogagent_nb.data.encoding",
    "encode_conversation": "cogagent_nb.data.encoding",
    "TrainingCollator": "cogagent_nb.data.encoding",
    "ConversationDataset": "cogagent_nb.data.encoding",
    # model
    "CogAgentConfig": "cogagent_nb.model.configuration",
    "VisionConfig": "cogagent_nb.model.configuration",
    "CogAgentForConditionalGeneration": "cogagent_nb.model.modeling",
    "load": "cogagent_nb.model.loading",
    "init_model": "cogagent_nb.model.loading",
    "save_pretrained": "cogagent_nb.model.loading",
    "make_tiny_model": "cogagent_nb.model.loading",
    "make_random_model": "cogagent_nb.model.loading",
    "register_auto_classes": "cogagent_nb.model.loading",
    "add_lora": "cogagent_nb.model.peft_recipes",
    "add_prefix_tuning": "cogagent_nb.model.peft_recipes",
    "freeze_vision_tower": "cogagent_nb.model.peft_recipes",
    "save_adapter": "cogagent_nb.model.peft_recipes",
    "load_adapter": "cogagent_nb.model.peft_recipes",
    "merge_adapter": "cogagent_nb.model.peft_recipes",
    "trainable_parameters_table": "cogagent_nb.model.peft_recipes",
    "adapted_modules": "cogagent_nb.model.peft_recipes",
    # training
    "FinetuneConfig": "cogagent_nb.train.config",
    "load_config": "cogagent_nb.train.config",
    "format_config": "cogagent_nb.train.config",
    "finetune": "cogagent_nb.train.finetune",
    "FinetuneResult": "cogagent_nb.train.finetune",
    "build_model": "cogagent_nb.train.finetune",
    "build_training_args": "cogagent_nb.train.finetune",
    "list_checkpoints": "cogagent_nb.train.checkpoints",
    "resolve_resume": "cogagent_nb.train.checkpoints",
    "LiveLossPlot": "cogagent_nb.train.callbacks",
    "StopAfterSteps": "cogagent_nb.train.callbacks",
    "loss_points": "cogagent_nb.train.callbacks",
    "merge_lora": "cogagent_nb.train.export",
    "plot_parameter_tables": "cogagent_nb.train.report",
    "plot_loss_curves": "cogagent_nb.train.report",
    "preview_answers": "cogagent_nb.train.report",
    "mean_answer_loss": "cogagent_nb.train.report",
    # training: devices, processes, DeepSpeed
    "detect_device": "cogagent_nb.train.devices",
    "device_report": "cogagent_nb.train.devices",
    "enable_npu": "cogagent_nb.train.devices",
    "npu_status": "cogagent_nb.train.devices",
    "prepare_distributed": "cogagent_nb.train.distributed",
    "free_port": "cogagent_nb.train.distributed",
    "torchrun_command": "cogagent_nb.train.distributed",
    "deepspeed_command": "cogagent_nb.train.distributed",
    "launch": "cogagent_nb.train.distributed",
    "build_cpu_ops": "cogagent_nb.train.distributed",
    "shell_form": "cogagent_nb.train.distributed",
    "deepspeed_config": "cogagent_nb.train.distributed",
    "write_deepspeed_config": "cogagent_nb.train.distributed",
    "explain_deepspeed_config": "cogagent_nb.train.distributed",
    "consolidate_zero_checkpoint": "cogagent_nb.train.distributed",
    "parameter_counts": "cogagent_nb.train.zero_memory",
    "zero_memory": "cogagent_nb.train.zero_memory",
    "zero_memory_table": "cogagent_nb.train.zero_memory",
    "plot_zero_memory": "cogagent_nb.train.zero_memory",
    # training: the tiny grounding recipe (fresh episodes, plain loop) and its proof
    "grounding_samples": "cogagent_nb.data.synthetic",
    "COURSE_MINUTES": "cogagent_nb.train.grounding",
    "EpisodeStream": "cogagent_nb.train.grounding",
    "train_tiny": "cogagent_nb.train.grounding",
    "grounding_report": "cogagent_nb.train.grounding",
    "rectangle_report": "cogagent_nb.train.grounding",
    "rectangle_held_out": "cogagent_nb.train.grounding",
    "rectangle_conversation": "cogagent_nb.data.synthetic",
    "format_report": "cogagent_nb.train.grounding",
    # training: lesson 02's experiment, the official mask against the fixed one
    "compare_masks": "cogagent_nb.train.mask_demo",
    "stop_probabilities": "cogagent_nb.train.mask_demo",
    # inference and evaluation
    "GuiScore": "cogagent_nb.infer.metrics",
    "score_answer": "cogagent_nb.infer.metrics",
    "score_answers": "cogagent_nb.infer.metrics",
    "summarize": "cogagent_nb.infer.metrics",
    "summarize_by": "cogagent_nb.infer.metrics",
    "action_confusion": "cogagent_nb.infer.metrics",
    "gui_metrics": "cogagent_nb.infer.metrics",
    "Prediction": "cogagent_nb.infer.generate",
    "load_for_inference": "cogagent_nb.infer.generate",
    "load_finetuned": "cogagent_nb.infer.generate",
    "find_adapter": "cogagent_nb.infer.generate",
    "find_finetuned": "cogagent_nb.infer.generate",
    "generation_kwargs": "cogagent_nb.infer.generate",
    "make_prediction": "cogagent_nb.infer.generate",
    "generate_answers": "cogagent_nb.infer.generate",
    "predict": "cogagent_nb.infer.generate",
    "predict_batch": "cogagent_nb.infer.generate",
    "EvaluationReport": "cogagent_nb.infer.evaluate",
    "evaluate": "cogagent_nb.infer.evaluate",
    "read_eval_samples": "cogagent_nb.infer.evaluate",
    "blank_like": "cogagent_nb.infer.evaluate",
    "compare_reports": "cogagent_nb.infer.evaluate",
    "baseline_report": "cogagent_nb.infer.evaluate",
    "EpisodeRun": "cogagent_nb.infer.agent",
    "run_episode": "cogagent_nb.infer.agent",
    "run_episodes": "cogagent_nb.infer.agent",
    "history_step": "cogagent_nb.infer.agent",
    # train
    "BackwardFusedAdamW": "cogagent_nb.train.optim",
    # views
    "read_sample": "cogagent_nb.viz.plots",
    "show_sample": "cogagent_nb.viz.plots",
    "show_samples": "cogagent_nb.viz.plots",
    "sample_browser": "cogagent_nb.viz.plots",
    "show_dataset_overview": "cogagent_nb.viz.plots",
    "mask_counts": "cogagent_nb.viz.loss_mask",
    "counts_table_html": "cogagent_nb.viz.loss_mask",
    "segments_table_html": "cogagent_nb.viz.loss_mask",
    "render_html": "cogagent_nb.viz.loss_mask",
    "plot_loss_mask": "cogagent_nb.viz.loss_mask",
    "plot_token_cells": "cogagent_nb.viz.loss_mask",
    "plot_stop_probability": "cogagent_nb.viz.loss_mask",
    "mask_browser": "cogagent_nb.viz.loss_mask",
    "draw_prediction": "cogagent_nb.viz.predictions",
    "show_prediction": "cogagent_nb.viz.predictions",
    "compare_predictions": "cogagent_nb.viz.predictions",
    "show_box_predictions": "cogagent_nb.viz.predictions",
    "plot_scores": "cogagent_nb.viz.predictions",
    "plot_learning_report": "cogagent_nb.viz.predictions",
    "show_clicks": "cogagent_nb.viz.predictions",
    "plot_confusion": "cogagent_nb.viz.predictions",
    "show_episode_run": "cogagent_nb.viz.predictions",
    "prediction_image": "cogagent_nb.viz.predictions",
    "prediction_browser": "cogagent_nb.viz.predictions",
    # the course runner
    "record": "cogagent_nb.course",
}
"""Each public name and the module that defines it; `cnb.<name>` imports the module on first use."""

__all__ = sorted(PUBLIC_API)


def __getattr__(name: str) -> Any:
    """Import the defining module on first use and cache the name on the package."""
    module = PUBLIC_API.get(name)
    if module is None:
        raise AttributeError(f"module 'cogagent_nb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC_API))
