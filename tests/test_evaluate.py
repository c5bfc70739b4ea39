"""Generation and evaluation with tiny models: base vs full vs LoRA end to end, and bad inputs.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from conftest import make_tiny_t5, tokenizer_corpus
from transformers import AutoTokenizer

from lora_module import FingerprintMismatchError, LoraConfig, LoraModel, load_base_model
from lora_module.contracts import REPORT_FILES
from lora_module.evaluation.evaluate import (
    EvalInputError,
    GenerationConfig,
    ModelLoadError,
    ModelSpec,
    evaluate_model,
    main,
    parse_model_arg,
)
from lora_module.evaluation.generation import generate, load_model_for_spec
from lora_module.evaluation.rouge import ROUGE_TYPES
from lora_pipeline.data import DataConfig, prepare
from lora_pipeline.flows.cli import main as lora_pipeline

GEN = GenerationConfig(batch_size=8, max_new_tokens=12)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, seq2seq_tokenizer_dir, tiny_t5_dir) -> dict:
    """Prepared demo data (20 test rows) + a base, a perturbed 'full' model and a random-B LoRA adapter."""
    root = tmp_path_factory.mktemp("eval")
    prepared = prepare(
        DataConfig(
            name="demo_eval",
            source="demo",
            demo_train_size=30,
            demo_validation_size=5,
            demo_test_size=20,
            tokenizer=str(seq2seq_tokenizer_dir),
            output_root=str(root / "data"),
            max_source_length=96,
            max_target_length=24,
        )
    ).path
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)

    full_dir = root / "full_run" / "model"
    full = make_tiny_t5(len(tok))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    full.save_pretrained(full_dir)
    tok.save_pretrained(full_dir)

    lora = LoraModel(load_base_model(str(tiny_t5_dir)), LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    run_dir = root / "lora_run"
    lora.save_pretrained(run_dir / "adapter", base_model_name_or_path=str(tiny_t5_dir))
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    (run_dir / "metrics.json").write_text(json.dumps({"finetune": "lora", "trainable_params": lora_params}))
    return {
        "root": root,
        "prepared": prepared,
        "base": tiny_t5_dir,
        "full": full_dir,
        "lora": run_dir / "adapter",
        "lora_run": run_dir,
        "lora_params": lora_params,
        "tokenizer": tok,
    }


def test_end_to_end_base_full_lora_via_cli(setup, capsys):
    out = setup["root"] / "report"
    rc = main(
        [
            "--prepared",
            str(setup["prepared"]),
            "--task",
            "demo",
            "--model",
            f"base={setup['base']}",
            "--model",
            f"full={setup['full'].parent}",
            "--model",
            f"lora={setup['lora_run']}",
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--max-new-tokens",
            "12",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    for name in (*REPORT_FILES, "base.eval.json", "full.eval.json", "lora.eval.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((Path(setup["prepared"]) / "manifest.json").read_text())
    assert report["n"] == 20 and report["data"]["fingerprint"] == manifest["fingerprint"]
    models = {m["name"]: m for m in report["models"]}
    assert [models[n]["kind"] for n in ("base", "full", "lora")] == ["base", "full", "lora"]
    for m in models.values():
        for t in ROUGE_TYPES:
            s = m["metrics"][t]
            assert 0.0 <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= 1.0
            assert s["n"] == 20

    # Parameters and sizes: LoRA counts only its A/B tensors; the full model counts everything.
    lora_weights = setup["lora"] / "adapter_model.safetensors"
    assert models["lora"]["params"]["trainable"] == setup["lora_params"] == 12 * 4 * (32 + 32)
    assert models["lora"]["params"]["disk_bytes"] == lora_weights.stat().st_size
    assert models["full"]["params"]["trainable"] == models["full"]["params"]["total"]
    assert models["base"]["params"]["trainable"] == 0
    assert models["lora"]["training_metrics"]["finetune"] == "lora"
    # Fingerprints: the adapter hash is the file's, and the adapter sits on the evaluated base.
    assert (
        models["lora"]["fingerprints"]["adapter_sha256"]
        == hashlib.sha256(lora_weights.read_bytes()).hexdigest()
    )
    assert models["lora"]["fingerprints"]["base"] == models["base"]["fingerprints"]["base"]
    assert models["full"]["fingerprints"]["model"] not in (None, models["base"]["fingerprints"]["base"])
    assert {(c["a"], c["b"]) for c in report["comparisons"]} == {
        ("lora", "full"),
        ("full", "base"),
        ("lora", "base"),
    }

    md = (out / "report.md").read_text()
    assert "| lora |" in md and "(lora)" not in md and "3,072" in md
    assert "Change vs base" in md and "lora vs full" in md
    assert "report written" in capsys.readouterr().out
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and {"input", "reference_1", "output_base", "output_full", "output_lora"} <= set(
        rows[0]
    )

    # The LoRA predictions are what the unmerged adapter generates: merging changed nothing.
    lora_eval = json.loads((out / "lora.eval.json").read_text())
    prompts = lora_eval["examples"]["prompt"]
    assert rows[3]["input"] == prompts[3] and rows[3]["output_lora"] == lora_eval["examples"]["prediction"][3]
    # Prompts were cut where training cut them: the prepared data's max_source_length (96), not a default.
    trained_length = manifest["config"]["max_source_length"]
    assert lora_eval["generation"]["max_source_length"] == trained_length == 96
    assert lora_eval["generation"]["max_new_tokens"] == 12  # given explicitly: wins over max_target_length
    unmerged = LoraModel.from_pretrained(load_base_model(str(setup["base"])), setup["lora"]).eval()
    gen = GenerationConfig(batch_size=8, max_new_tokens=12, max_source_length=trained_length)
    assert generate(unmerged, setup["tokenizer"], prompts, gen) == lora_eval["examples"]["prediction"]
    # And the base predictions match a plain one-by-one transformers generate: batching is invisible.
    base_eval = json.loads((out / "base.eval.json").read_text())
    model = load_base_model(str(setup["base"]))
    tok = setup["tokenizer"]
    for i in (0, 7, 19):
        ids = tok(prompts[i], return_tensors="pt", truncation=True, max_length=trained_length)
        out_ids = model.generate(**ids, max_new_tokens=12, do_sample=False, num_beams=1)
        assert (
            tok.decode(out_ids[0], skip_special_tokens=True).strip() == base_eval["examples"]["prediction"][i]
        )
    assert lora_eval["examples"]["prediction"] != base_eval["examples"]["prediction"]


def _prompts(n: int) -> list[str]:
    corpus = tokenizer_corpus(n)
    # Very different lengths, so sorting and padding matter.
    return [" ".join(corpus[i : i + 1 + i % 5]) for i in range(n)]


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_batched_sorted_equals_one_at_a_time(arch, tiny_t5_dir, tiny_llama_dir):
    path = tiny_t5_dir if arch == "t5" else tiny_llama_dir
    model, tok = load_model_for_spec(ModelSpec("m", "base", str(path)))
    prompts = _prompts(12)
    batched = generate(model, tok, prompts, GenerationConfig(batch_size=5, max_new_tokens=8))
    single = generate(
        model, tok, prompts, GenerationConfig(batch_size=1, max_new_tokens=8, sort_by_length=False)
    )
    assert batched == single
    assert any(batched)  # not all empty: the comparison means something
    if arch == "llama":
        # Causal models return only the continuation, not the prompt.
        ids = tok(prompts[2], return_tensors="pt")
        full = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = tok.decode(full[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert batched[2] == expected
        assert not batched[2].startswith(prompts[2][:20])
        # Over-long causal prompts keep their end: only the last tokens decide the output.
        tail = " the train leaves from platform four. summary:"
        short = GenerationConfig(max_new_tokens=6, max_source_length=10)
        assert generate(model, tok, ["alice meets bob" + tail], short) == generate(
            model, tok, ["please book a table for two people" + tail], short
        )
    beams = generate(model, tok, prompts[:4], GenerationConfig(batch_size=4, max_new_tokens=8, num_beams=3))
    assert beams == generate(
        model, tok, prompts[:4], GenerationConfig(batch_size=2, max_new_tokens=8, num_beams=3)
    )
    assert generate(model, tok, [], GEN) == []


def test_bad_model_inputs(setup, tmp_path, tiny_t5_dir):
    prepared = setup["prepared"]
    with pytest.raises(ModelLoadError, match="does not exist"):
        evaluate_model(ModelSpec("full", "full", str(tmp_path / "missing")), prepared, tmp_path, GEN)
    with pytest.raises(ModelLoadError, match="not an adapter folder"):
        evaluate_model(ModelSpec("lora", "lora", str(setup["full"])), prepared, tmp_path, GEN)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_for_spec(ModelSpec("base", "base", "./no/such/model"))
    # An adapter whose recorded base is gone (moved machines): say so and how to fix it.
    moved = tmp_path / "moved_adapter"
    shutil.copytree(setup["lora"], moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "/gone/base"}))
    with pytest.raises(ModelLoadError, match="cannot load the base /gone/base .*--lora-base"):
        load_model_for_spec(ModelSpec("lora", "lora", str(moved)))
    assert load_model_for_spec(ModelSpec("lora", "lora", str(moved), base=str(tiny_t5_dir)))[0] is not None
    # An adapter for another base: a base with different weights (seed 1) is refused, with context.
    other = tmp_path / "other_base"
    make_tiny_t5(len(setup["tokenizer"]), seed=1).save_pretrained(other)
    setup["tokenizer"].save_pretrained(other)
    spec = ModelSpec("lora", "lora", str(setup["lora"]), base=str(other))
    with pytest.raises(FingerprintMismatchError, match="trained on a different base than .*other_base"):
        evaluate_model(spec, prepared, tmp_path, GEN)
    assert not (tmp_path / "lora.eval.json").exists()


def _broken_prepared(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("dataset"))
    ds = datasets.load_from_disk(str(src / "dataset"))
    ds["test"] = edit(ds["test"])
    ds.save_to_disk(str(dst / "dataset"))
    return dst


def test_bad_data_inputs(setup, tmp_path):
    prepared = Path(setup["prepared"])
    spec = ModelSpec("base", "base", str(setup["base"]))
    no_refs = _broken_prepared(prepared, tmp_path / "no_refs", lambda t: t.remove_columns("references"))
    with pytest.raises(EvalInputError, match=r"lacks column\(s\) \['references'\]"):
        evaluate_model(spec, no_refs, tmp_path, GEN)
    empty = _broken_prepared(
        prepared,
        tmp_path / "empty_refs",
        lambda t: t.map(lambda r, i: {"references": [] if i == 3 else r["references"]}, with_indices=True),
    )
    with pytest.raises(EvalInputError, match="row 3 .* no non-empty reference"):
        evaluate_model(spec, empty, tmp_path, GEN)
    with pytest.raises(EvalInputError, match="split 'dev' not in prepared data"):
        evaluate_model(spec, prepared, tmp_path, GEN, split="dev")
    with pytest.raises(EvalInputError, match="limit must be >= 1"):
        evaluate_model(spec, prepared, tmp_path, GEN, limit=0)
    with pytest.raises(EvalInputError, match="does not exist"):
        evaluate_model(spec, tmp_path / "nowhere", tmp_path, GEN)
    # --limit evaluates the first rows only.
    ev = json.loads(evaluate_model(spec, prepared, tmp_path / "lim", GEN, limit=5).read_text())
    assert ev["n"] == 5 and ev["examples"]["index"] == [0, 1, 2, 3, 4]


def _evaluate_cli_error(capsys, *args: str) -> str:
    """Run `lora-pipeline evaluate ARGS` in-process; it must fail with status 2 and one `error:` line."""
    assert lora_pipeline(["evaluate", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_cli_and_config_errors(setup, tmp_path, capsys):
    common = ["--task", "t", "--out", str(tmp_path)]
    assert "cannot tell the kind of 'mine'" in _evaluate_cli_error(
        capsys, "--prepared", "x", *common, "--model", "mine=/some/path")
    assert "num_beams must be an integer >= 1" in _evaluate_cli_error(
        capsys, "--prepared", "x", *common, "--model", "base=p", "--num-beams", "0")
    assert "does not exist" in _evaluate_cli_error(
        capsys, "--prepared", str(tmp_path / "none"), *common, "--model", f"base={setup['base']}")
    assert "model names must be unique" in _evaluate_cli_error(
        capsys, "--prepared", "x", *common, "--model", f"base={setup['base']}", "--model",
        f"base={setup['base']}")
    # Called directly (not through the command line), the stage raises the typed error itself.
    with pytest.raises(EvalInputError, match="expected NAME=PATH"):
        main(["--prepared", "x", *common, "--model", "no-equals-sign"])

    assert parse_model_arg("r8:lora=runs/a") == ModelSpec("r8", "lora", "runs/a")
    assert parse_model_arg("full=x=y").path == "x=y"
    with pytest.raises(ValueError, match="kind 'adapter' is not valid"):
        ModelSpec("a", "adapter", "p")
    with pytest.raises(ValueError, match="name"):
        ModelSpec("../evil", "base", "p")
    with pytest.raises(ValueError, match="only used with kind='lora'"):
        ModelSpec("a", "base", "p", base="q")
    with pytest.raises(ValueError, match=r"unknown GenerationConfig keys \['beams'\]; valid keys"):
        GenerationConfig.from_dict({"beams": 2})
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        GenerationConfig(batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        GenerationConfig(dtype="fp8")
    assert GenerationConfig.from_dict({"num_beams": 4}).num_beams == 4


def test_models_load_concurrently_from_threads(setup):
    """Two tasks evaluate in one process at once (the many-task flow): loads from threads are correct."""
    from concurrent.futures import ThreadPoolExecutor

    specs = [ModelSpec("lora", "lora", str(setup["lora"])), ModelSpec("base", "base", str(setup["base"]))] * 3
    x = torch.tensor([[5, 6, 7, 8, 1]])

    def logits(spec: ModelSpec) -> torch.Tensor:
        model, _ = load_model_for_spec(spec, GEN)
        with torch.no_grad():
            return model(input_ids=x, decoder_input_ids=torch.zeros_like(x[:, :1])).logits

    alone = [logits(s) for s in specs[:2]]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(logits, specs))
    for i, out in enumerate(together):
        assert torch.equal(out, alone[i % 2]), specs[i].name
