"""The contracts between the stages: file and artifact names, tag keys, and the lineage builders.

Every writer and every reader of a file, an MLflow artifact or a tag imports its name from here,
so a name is spelled once:

    from lora_module import contracts as c
    (prepared / c.MANIFEST_FILE).read_text()
    client.set_model_version_tag(name, version, c.TAG_TASK, task)

Standard library only, and no logic beyond building names and tag dicts: the data stage, the
stages of `lora_module` and the flows all import it, and the served model ships it.
"""

from __future__ import annotations

# ---- files of a prepared data set (data.prepare) -------------------------------------------
MANIFEST_FILE = "manifest.json"
"""The prepared folder's manifest: config, fingerprint, prompt settings, row counts."""

# ---- files of a tokenizer folder -----------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "tokenizer.model")
"""Files that make a folder a tokenizer folder (any one of them is enough to load from it)."""

# ---- files of a PEFT-format adapter folder -------------------------------------------------
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""PEFT's adapter config, unchanged."""
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
"""PEFT's adapter tensors."""
ADAPTER_SIDECAR_FILE = "lora_pipeline.json"
"""Our keys beside PEFT's config: base fingerprint, training metadata, prompt settings."""

# ---- files of a training output (training.export) ------------------------------------------
ADAPTER_DIR = "adapter"
"""The exported adapter folder of a LoRA run (and the logged model's artifact name)."""
MODEL_DIR = "model"
"""The exported model folder of a full fine-tuning run."""
METRICS_FILE = "metrics.json"
"""Training metrics and identities written beside the exported adapter or model."""
CONFIG_FILE = "config.yaml"
"""The resolved training config written beside the export."""
TRAIN_FILES = (CONFIG_FILE, METRICS_FILE)
"""The files a registration copies from a training output."""

# ---- files of an evaluation (evaluation.report) --------------------------------------------
REPORT_FILE = "report.json"
REPORT_FILES = (REPORT_FILE, "report.md", "rouge.png", "predictions.csv")
"""What an evaluation writes into its output folder."""

# ---- artifacts of a logged model (registry, serving) ---------------------------------------
PROMPT_ARTIFACT = "prompt"
PROMPT_FILE = "prompt.json"
"""The prompt settings the adapter was trained with, in the logged model's `prompt` artifact."""
TOKENIZER_ARTIFACT = "tokenizer"
BASE_ARTIFACT = "base"
MULTITASK_ARTIFACT = "multitask"
TASKS_FILE = "tasks.json"
"""The tasks a multi-task model serves, in its `multitask` artifact."""
LINEAGE_FILE = "lineage.json"
"""Everything about a registration that does not fit in tags, logged with its run."""
