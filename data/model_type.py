"""The data's model type from the base model's own config, and the check that they agree.

    from lora_pipeline.data.model_type import resolve_model_type
    cfg = resolve_model_type(cfg)   # cfg.model_type set: the declared one (checked) or the base's

The base is where the tokenizer comes from (flows pass the base model as `tokenizer`): when that
location has a model config (`AutoConfig`), `is_encoder_decoder` says "seq2seq" or "causal". A
declared `model_type` that disagrees is refused before any work (it used to fail deep in the loss
with a batch-size mismatch); an undeclared one takes the base's. Where there is no model config (a
tokenizer-only folder, the demo tokenizer, a Hub name that cannot be read offline) the declared
value stands, else "seq2seq".
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from lora_pipeline.data.config import DEMO_TOKENIZER, DataConfig, DataConfigError

log = logging.getLogger(__name__)
FALLBACK_MODEL_TYPE = "seq2seq"


def base_model_type(location: str) -> str | None:
    """"seq2seq"/"causal" from the model config at `location` (folder or Hub name), None without one."""
    if location == DEMO_TOKENIZER:
        return None
    path = Path(location).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        return None  # a tokenizer-only folder: no model to ask
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path) if path.is_dir() else location)
    except Exception as e:  # offline, no config, or not a model repository: nothing to check against
        log.info("no model config at %s (%s: %s); model_type is not checked", location, type(e).__name__, e)
        return None
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def resolve_model_type(cfg: DataConfig) -> DataConfig:
    """`cfg` with model_type set (the base's when not declared); DataConfigError when they disagree."""
    found = base_model_type(cfg.tokenizer)
    if cfg.model_type is not None:
        if found is not None and found != cfg.model_type:
            raise DataConfigError(
                f"model_type={cfg.model_type!r} disagrees with the base at tokenizer={cfg.tokenizer!r}: its "
                f"config says is_encoder_decoder={found == 'seq2seq'}, so model_type must be {found!r} "
                "(or leave model_type out: it defaults to the base's)")
        return cfg
    resolved = found or FALLBACK_MODEL_TYPE
    if cfg.prompt_format == "chat" and resolved == "seq2seq":
        what = "an encoder-decoder" if found else "unknown (no model config there)"
        raise DataConfigError(
            f"prompt_format='chat' needs a causal (decoder-only) model; the base at "
            f"tokenizer={cfg.tokenizer!r} is {what}: give a causal model's folder, or model_type: causal")
    return dataclasses.replace(cfg, model_type=resolved)
