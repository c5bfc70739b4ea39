"""Dataset preparation: sources (Hub, files, demo corpus), validation, templating, tokenization, caching.

from data import DataConfig, prepare, load_prepared, load_tokenizer
prepared = prepare(DataConfig.from_yaml("deploy/configs/data_demo_summary.yaml"))
dataset, manifest = load_prepared(prepared.path)

python -m data prepare --config deploy/configs/data_demo_summary.yaml
"""

from data.config import DataConfig, DataConfigError
from data.prepare import PreparedData, load_prepared, load_tokenizer, prepare
from data.sources import DataSourceError
from data.validate import DataValidationError

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
