"""cogagent_nb: the package behind the cogagent-notebooks course.

Data format and validation, tokenizer and chat template, loss masks, a native CogAgent
(GLM-4V-9B architecture) model that loads the official checkpoint, and the tools the notebooks call.
"""

__version__ = "0.1.0"
