"""Stage 2, the model: `configuration` (CogAgentConfig and presets), `modeling` (the native GLM-4V /
CogAgent, read top to bottom like the architecture diagram), `loading` (official checkpoints, the tiny
model) and `peft_recipes` (LoRA and prefix tuning as the official recipes apply them).

Importing this subpackage registers model type "chatglm" with the transformers Auto classes, the one
place where that happens, so that `AutoModelForCausalLM.from_pretrained(dir)` reads an official-format
directory with this package's code and without `trust_remote_code`.
"""

from cogagent_nb.model.loading import register_auto_classes

register_auto_classes()
