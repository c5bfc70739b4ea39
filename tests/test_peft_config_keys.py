"""Every key of PEFT's LoraConfig is honoured, bookkeeping, or refused with one line naming it: nothing
in an adapter_config.json is silently ignored. The table below lists each field of the installed
PEFT's LoraConfig dataclass; a key added by a newer PEFT fails `test_table_covers_every_peft_key`
until someone decides which kind it is.

Run: .venv/bin/pytest tests/test_peft_config_keys.py -q
"""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
from conftest import make_tiny_llama

from lora_module import LoraConfig, LoraConfigError
from lora_module.contracts import ADAPTER_CONFIG_FILE

HONOURED, BOOKKEEPING, REFUSED = "honoured", "bookkeeping", "refused"

# key -> (kind, a value other than PEFT's default). Bookkeeping: describes the file or parameterises an
# init that acts only through init_lora_weights (checked on load: tests/test_lora_init.py).
TABLE: dict[str, tuple[str, object]] = {
    "r": (HONOURED, 4),
    "lora_alpha": (HONOURED, 3),
    "lora_dropout": (HONOURED, 0.1),
    "target_modules": (HONOURED, ["q_proj"]),
    "use_rslora": (HONOURED, True),
    "bias": (HONOURED, "none"),
    "init_lora_weights": (HONOURED, "olora"),
    "modules_to_save": (HONOURED, ["lm_head"]),
    "layers_to_transform": (HONOURED, [0, 1]),
    "layers_pattern": (HONOURED, "layers"),
    "exclude_modules": (HONOURED, ["o_proj"]),
    "rank_pattern": (HONOURED, {"q_proj": 2}),
    "alpha_pattern": (HONOURED, {"v_proj": 4}),
    "use_dora": (HONOURED if "use_dora" in LoraConfig.field_names() else REFUSED, True),
    "peft_type": (BOOKKEEPING, "LORA"),
    "task_type": (BOOKKEEPING, "CAUSAL_LM"),
    "auto_mapping": (BOOKKEEPING, {"base_model_class": "X"}),
    "peft_version": (BOOKKEEPING, "0.21.2"),
    "base_model_name_or_path": (BOOKKEEPING, "some/base"),
    "revision": (BOOKKEEPING, "main"),
    "inference_mode": (BOOKKEEPING, True),
    "runtime_config": (BOOKKEEPING, {"ephemeral_gpu_offload": True}),
    "loftq_config": (BOOKKEEPING, {"loftq_bits": 4}),
    "eva_config": (BOOKKEEPING, {"rho": 2.0}),
    "corda_config": (BOOKKEEPING, {"cache_file": None}),
    "lora_ga_config": (BOOKKEEPING, {"direction": "ArB2r"}),
    "megatron_core": (BOOKKEEPING, "megatron.core"),
    "qalora_group_size": (BOOKKEEPING, 32),
    "fan_in_fan_out": (REFUSED, True),
    "lora_bias": (REFUSED, True),
    "megatron_config": (REFUSED, {"num_layers": 2}),
    "trainable_token_indices": (REFUSED, [1, 2]),
    "velora_config": (REFUSED, {"rank": 4}),
    "alora_invocation_tokens": (REFUSED, [5, 6]),
    "use_qalora": (REFUSED, True),
    "monteclora_config": (REFUSED, {"num_samples": 2}),
    "layer_replication": (REFUSED, [[0, 1]]),
    "target_parameters": (REFUSED, ["mlp.experts.down_proj"]),
    "use_bdlora": (REFUSED, {"lora_a_is_blockdiagonal": True}),
    "arrow_config": (REFUSED, {"top_k": 2}),
    "kasa_config": (REFUSED, {"rank": 4}),
    "ensure_weight_tying": (REFUSED, True),
}
PEFT_FIELDS = {f.name for f in dataclasses.fields(peft.LoraConfig)}
NEEDS = {"layers_pattern": {"layers_to_transform": [0]}}  # keys PEFT only accepts together with another


def test_table_covers_every_peft_key():
    assert set(TABLE) == PEFT_FIELDS, (
        f"new PEFT keys {sorted(PEFT_FIELDS - set(TABLE))} / gone {sorted(set(TABLE) - PEFT_FIELDS)}: "
        "decide honoured / bookkeeping / refused in lora_module/config.py and here"
    )


def test_every_key_peft_writes_loads_at_its_default(tmp_path):
    peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    written = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert set(written) == PEFT_FIELDS - {"runtime_config"}  # PEFT drops runtime_config when writing
    config = LoraConfig.from_dict(written)  # strict: an unknown key would raise
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, 8, True)


@pytest.mark.parametrize("key", [k for k, (kind, _) in TABLE.items() if kind == HONOURED])
def test_honoured_key_is_kept(key):
    _, value = TABLE[key]
    base = {"r": 8, "target_modules": ["q_proj", "v_proj"], **NEEDS.get(key, {})}
    config = LoraConfig.from_dict({**base, key: value})
    assert getattr(config, key) == value
    assert config.to_dict()[key] == value


@pytest.mark.parametrize("key", [k for k, (kind, _) in TABLE.items() if kind == BOOKKEEPING])
def test_bookkeeping_key_changes_nothing(key):
    _, value = TABLE[key]
    assert LoraConfig.from_dict({"r": 4, key: value}) == LoraConfig(r=4)


@pytest.mark.parametrize("key", [k for k, (kind, _) in TABLE.items() if kind == REFUSED])
def test_refused_key_names_key_value_and_fix_in_one_line(key):
    _, value = TABLE[key]
    with pytest.raises(LoraConfigError) as err:
        LoraConfig.from_dict({"r": 4, key: value})
    message = str(err.value)
    assert "\n" not in message
    assert f"{key}={value!r}" in message
    assert "PEFT's default" in message


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("bias", "all", "LoraConfig.bias must be 'none'"),
    ("init_lora_weights", "corda", "init_lora_weights='corda' is not supported"),
    ("init_lora_weights", "pissa_niter_x", "init_lora_weights='pissa_niter_x' is not supported"),
    ("modules_to_save", "lm_head", "LoraConfig.modules_to_save must be a list"),
    ("layers_to_transform", [-1], "LoraConfig.layers_to_transform must be a layer index >= 0"),
    ("rank_pattern", {"q_proj": 2.5}, "LoraConfig.rank_pattern['q_proj'] must map"),
    ("alpha_pattern", {"(": 2}, "does not compile as a regex"),
    ("exclude_modules", "(", "does not compile as a regex"),
])
def test_honoured_key_with_a_bad_value_is_refused(key, value, fragment):
    with pytest.raises(LoraConfigError) as err:
        LoraConfig.from_dict({"r": 4, "target_modules": ["q_proj"], key: value})
    assert fragment in str(err.value) and "\n" not in str(err.value)
