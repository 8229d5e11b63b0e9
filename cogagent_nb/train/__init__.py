"""Fine-tuning: the official config files and command line, the Trainer, checkpoints and resume."""
