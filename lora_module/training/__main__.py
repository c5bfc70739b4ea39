"""The training process that `run_fit` starts: `python -m lora_module.training fit --config X.yaml ...`.

People use `lora-pipeline fit|validate|test|predict-ckpt` (see lora_module.training.cli); this module
entry is for the launcher's subprocess, which needs an entry point that every rank of a multi-device
run can re-launch and that does not depend on the `lora_pipeline` command-line package.
"""

from lora_module.training.cli import main

main()
