"""Evaluation: load models for evaluation, batched generation, ROUGE with confidence intervals, and
the report that compares the base model, full fine-tuning and LoRA on one test set.

    lora-pipeline evaluate --prepared P --task summary --model base=M --model lora=RUN/adapter --out OUT
"""
