"""Stage 4, using the model: generation from a screenshot and a task, answers parsed into actions and
pixels, the agent loop, and the GUI metrics that training's evaluation and `cogagent-nb evaluate` share
(`metrics`)."""
