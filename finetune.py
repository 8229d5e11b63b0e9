"""The official command line: `python finetune.py DATA_DIR MODEL_DIR CONFIG [RESUME]`.

Same arguments as THUDM/CogAgent `finetune/finetune.py` (and `cogagent-nb finetune`); runs under
`torchrun --nproc_per_node=N finetune.py ...` and the `deepspeed` launcher. `--set KEY=VALUE` overrides a
config key without editing the file, e.g. `--set training_args.max_steps=2`. See docs/TRAINING.md.
"""

import sys

from cogagent_nb.train.finetune import main

if __name__ == "__main__":
    sys.exit(main())
