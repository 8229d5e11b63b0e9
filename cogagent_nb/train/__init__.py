"""Fine-tuning: the official config files, Trainer, DeepSpeed, resume, and a memory-lean optimizer."""
