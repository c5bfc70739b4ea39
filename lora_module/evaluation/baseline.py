"""The untouched base model's evaluation, content-addressed so it is computed once per input.

    from lora_module.evaluation.baseline import evaluate_base
    res = evaluate_base("google/flan-t5-base", prepared_dir, home.evals_dir("summary"), GenerationConfig())
    res.path       # <evals_dir>/base-<key[:12]>/base.eval.json
    res.reused     # True when an earlier call with the same inputs had written it

The key hashes everything the result depends on: the prepared data's fingerprint, the base
model's files (or its Hub name), the generation settings, the evaluation protocol, the row limit and
the evaluation code itself, so a change to any of them evaluates again and nothing else does. The
eval JSON is written atomically, so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lora_module import contracts
from lora_module.code_identity import code_fingerprint
from lora_module.contracts import MANIFEST_FILE
from lora_module.errors import InputNotFoundError
from lora_module.evaluation import evaluate
from lora_module.evaluation.generation import GenerationConfig, ModelSpec
from lora_module.evaluation.protocol import EvalProtocol, resolve_protocol
from lora_module.files import sha256_dir, sha256_json

# Files that make up a model's identity; anything else in its folder (a README, logs) does not.
_MODEL_FILES = (".safetensors", ".bin", ".json", ".model")
BASE_NAME = "base"
# evaluate_model writes the evaluation; its import closure is all the code that shapes the result.
EVALUATION_CODE = ("lora_module.evaluation.evaluate",)


@dataclass(frozen=True)
class BaseEvaluation:
    """Where the base model's eval JSON is, the key it is stored under, and whether it was reused."""

    path: Path
    """`<evals_dir>/base-<key[:12]>/base.eval.json`."""
    key: str
    """Hex hash of the inputs (data, model, generation, limit, evaluation code)."""
    reused: bool
    """True when the file was already there and nothing was generated."""


def model_identity(name_or_path: str) -> str:
    """A base model's identity: a hash of a local folder's weight/config files, else `hub:<name>`."""
    if not Path(name_or_path).is_dir():
        return f"hub:{name_or_path}"
    return sha256_dir(name_or_path, _MODEL_FILES)


def code_identity() -> str:
    """Hash of the code that produces a base evaluation (EVALUATION_CODE's import closure: generation,
    metrics, data loading, model loading): changed code must not reuse old evaluations. Computed once
    per process: the code that runs is the code that was imported."""
    return code_fingerprint(EVALUATION_CODE)


def evaluation_key(base_model: str, prepared_dir: str | os.PathLike, gen: GenerationConfig,
                   limit: int | None, protocol: EvalProtocol | str | dict | None = None) -> str:
    """The content address of a base-model evaluation of `prepared_dir`'s test split."""
    from lora_pipeline.data.prepare import read_manifest

    manifest = read_manifest(prepared_dir)
    if manifest is None:
        raise InputNotFoundError(f"{prepared_dir} is not a complete prepared-data folder (no readable "
                                 f"{MANIFEST_FILE}); run `lora-pipeline prepare` and pass the folder it "
                                 "prints")
    return sha256_json({
        "data": manifest["fingerprint"], "model": model_identity(base_model), "generation": gen.to_dict(),
        "limit": limit, "split": "test", "code": code_identity(),
        "protocol": resolve_protocol(protocol).to_dict(),
    })


def evaluate_base(base_model: str, prepared_dir: str | os.PathLike, evals_dir: str | os.PathLike,
                  gen: GenerationConfig | None = None, limit: int | None = None,
                  protocol: EvalProtocol | str | dict | None = None) -> BaseEvaluation:
    """Evaluate the base model into `<evals_dir>/base-<key[:12]>/`, or reuse what an earlier call wrote."""
    gen = gen or GenerationConfig()
    key = evaluation_key(base_model, prepared_dir, gen, limit, protocol)
    out = Path(evals_dir) / f"base-{key[:12]}"
    path = out / contracts.eval_file(BASE_NAME)
    if path.is_file():
        return BaseEvaluation(path, key, reused=True)
    spec = ModelSpec(BASE_NAME, "base", base_model)
    written = evaluate.evaluate_model(spec, prepared_dir, out, gen, limit=limit, protocol=protocol)
    return BaseEvaluation(written, key, reused=False)
