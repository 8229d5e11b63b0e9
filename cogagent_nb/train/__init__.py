"""Fine-tuning: the official config files and command line, the Trainer, DeepSpeed, checkpoints and resume, and
a memory-lean optimizer (`optim`)."""
