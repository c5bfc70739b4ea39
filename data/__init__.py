"""Dataset preparation: sources (Hub, files, demo corpus), validation, templating, tokenization, caching.

from lora_pipeline.data import DataConfig, prepare, load_prepared, load_tokenizer
prepared = prepare(DataConfig.from_yaml("deploy/configs/data_demo_summary.yaml"))
dataset, manifest = load_prepared(prepared.path)

lora-pipeline prepare --config deploy/configs/data_demo_summary.yaml   # command line: lora_pipeline.data.cli
"""

from lora_pipeline.data.config import DataConfig, DataConfigError
from lora_pipeline.data.prepare import PreparedData, load_prepared, load_tokenizer, prepare
from lora_pipeline.data.sources import DataSourceError
from lora_pipeline.data.validate import DataValidationError

__all__ = [
    "DataConfig",
    "DataConfigError",
    "DataSourceError",
    "DataValidationError",
    "PreparedData",
    "load_prepared",
    "load_tokenizer",
    "prepare",
]
