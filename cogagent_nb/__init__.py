"""cogagent_nb: the package behind the cogagent-notebooks course.

Data format and validation, tokenizer and chat template, loss masks, a native CogAgent
(GLM-4V-9B architecture) model that loads the official checkpoint, and the tools the notebooks call.

Importing the package registers model type "chatglm" with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads an official-format directory with this package's
code and without `trust_remote_code`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`cogagent_nb.load(...)` and friends, imported on first use."""
    if name in ("load", "make_tiny_model", "register_auto_classes"):
        from cogagent_nb import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'cogagent_nb' has no attribute {name!r}")


try:
    from cogagent_nb.loading import register_auto_classes as _register_auto_classes

    _register_auto_classes()
except ImportError:  # a GPU box with only torch + transformers: the model and data tools still work
    pass
