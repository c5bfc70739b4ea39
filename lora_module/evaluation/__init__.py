"""Evaluation: load models for evaluation, batched generation, the metric registry (ROUGE, exact match,
chrF, BLEU, held-out loss, perplexity) under a named evaluation protocol, confidence intervals, and the
report that compares the base model, full fine-tuning and LoRA on one test set.

    lora-pipeline evaluate --prepared P --task summary --model base=M --model lora=RUN/adapter --out OUT
"""
