"""Mixed-adapter batches: row i of one batch through adapter `adapter_names[i]` on one base.

Checked against PEFT's `adapter_names` (the same adapters copied into a PeftModel: same logits,
same greedy generations) and against running each row alone with its adapter set.

Run: .venv/bin/pytest tests/test_mixed_batch.py -q
"""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_tiny_llama, make_tiny_t5

from lora_module import LoraConfig, LoraConfigError, LoraModel
from lora_module.mixed_batch import BASE_ROW

ARCHS = {
    "t5": (make_tiny_t5, "SEQ_2_SEQ_LM", ["q", "v", "wo"]),
    "llama": (make_tiny_llama, "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"]),
}
ADAPTERS = ("a", "b", "c")
# Rows deliberately not grouped by adapter, plus one base row. Several adapters (of different ranks)
# take the per-row weights path (STACKED_MIN_ADAPTERS), one adapter the per-adapter groups path.
MIXES = {"stacked": ["b", "a", BASE_ROW, "c", "a", "b"], "two": ["b", "a", BASE_ROW, "a", "b", "b"],
         "groups": ["b", BASE_ROW, "b", "b", BASE_ROW, "b"]}
NAMES = MIXES["stacked"]


def build_pair(arch: str) -> tuple[LoraModel, peft.PeftModel]:
    """Three adapters with different ranks and random non-zero A, B, identical in ours and PEFT's."""
    make, task, targets = ARCHS[arch]
    ours = LoraModel(make(), None)
    theirs = None
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(ADAPTERS):
        kwargs = {"r": 2 + i, "lora_alpha": 4 + 3 * i, "target_modules": targets[: 2 + (i % 2)]}
        ours.add_adapter(name, LoraConfig(**kwargs))
        config = peft.LoraConfig(task_type=task, **kwargs)
        if theirs is None:
            theirs = peft.get_peft_model(make(), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
        with torch.no_grad():
            for path, layer in ours.lora_layers():
                if name not in layer.lora_A:
                    continue
                for part in ("lora_A", "lora_B"):
                    weight = getattr(layer, part)[name].weight
                    weight.copy_(torch.randn(weight.shape, generator=g) * 0.3)
                    theirs.get_parameter(f"base_model.model.{path}.{part}.{name}.weight").copy_(weight)
    return ours.eval(), theirs.eval()


def inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 500, (len(NAMES), 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :2] = mask[4, :3] = 0  # some padding (left, as for causal prompts)
    batch = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        batch["decoder_input_ids"] = torch.randint(4, 500, (len(NAMES), 4), generator=g)
    return batch


def assert_rows_match_alone(ours: LoraModel, mixed: torch.Tensor, batch: dict[str, torch.Tensor],
                            names: list[str]) -> None:
    """Each row of a mixed batch's logits equals that row run alone under its own adapter (or none)."""
    for row, name in enumerate(names):
        alone = {k: v[row : row + 1] for k, v in batch.items()}
        if name == BASE_ROW:
            with ours.disable_adapter():
                expected = ours(**alone).logits
        else:
            ours.set_adapter(name)
            expected = ours(**alone).logits
        # 1e-4, not 1e-5: a batch of 1 takes other BLAS kernels than a batch of 6 (float rounding).
        torch.testing.assert_close(mixed[row : row + 1], expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request):
    return request.param, *build_pair(request.param)


@pytest.mark.parametrize("mix", list(MIXES))
@torch.inference_mode()
def test_logits_match_peft_and_rows_alone(pair, mix):
    arch, ours, theirs = pair
    names = MIXES[mix]
    batch = inputs(arch)
    mixed = ours(**batch, adapter_names=names).logits
    reference = theirs(**batch, adapter_names=names).logits
    if mix == "groups":  # PEFT's very arithmetic: bit-identical
        assert torch.equal(mixed, reference)
    else:  # other (batched) kernels: fp32 rounding, 1e-5 of the logits' scale (T5's reach ~30)
        torch.testing.assert_close(mixed, reference, atol=1e-5 * float(reference.abs().max()), rtol=0)
    assert_rows_match_alone(ours, mixed, batch, names)
    # The adapters really differ per row: the same input under another adapter gives other logits.
    swapped = ours(**batch, adapter_names=["a"] * len(names)).logits
    assert not torch.allclose(swapped[0], mixed[0], atol=1e-3)


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("num_beams", [1, 2])
@torch.inference_mode()
def test_generation_matches_peft(pair, num_beams, mix):
    arch, ours, theirs = pair
    names = MIXES[mix]
    batch = {k: v for k, v in inputs(arch).items() if k != "decoder_input_ids"}
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams, "pad_token_id": 0}
    out = ours.generate(**batch, adapter_names=names, **kwargs)
    expected = theirs.generate(**batch, adapter_names=names, **kwargs)
    assert torch.equal(out, expected)
    # Rows sorted by adapter (slices, no gathers) give the same rows as the scattered order.
    order = sorted(range(len(names)), key=names.__getitem__)
    grouped = ours.generate(**{k: v[order] for k, v in batch.items()},
                            adapter_names=[names[i] for i in order], **kwargs)
    assert torch.equal(grouped, out[order])


def test_bad_adapter_names_and_state_are_refused(pair):
    _, ours, _ = pair
    with pytest.raises(LoraConfigError, match=r"unknown adapter\(s\) \['nope'\].*'a', 'b', 'c'"):
        ours(**inputs("llama"), adapter_names=["nope"])
    ours.set_adapter("a")
    ours.merge_adapter()
    try:
        with pytest.raises(LoraConfigError, match="merged"), ours.mixed_batch(["a"]):
            pass
    finally:
        ours.unmerge_adapter()
    ours.train()
    try:
        with pytest.raises(LoraConfigError, match="inference"), ours.mixed_batch(["a"]):
            pass
    finally:
        ours.eval()
    assert all("forward" not in vars(layer) for _, layer in ours.lora_layers())
