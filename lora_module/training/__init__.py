"""Training: the LightningModule (LoRA, QLoRA or full fine-tuning), the DataModule over prepared
data, the Lightning CLI, and the launcher that runs `fit` as its own process.

    lora-pipeline fit --config deploy/configs/demo_summary_lora.yaml --data.prepared_dir P
"""
