"""A tokenizer that needs no download: byte-level BPE trained locally with `tokenizers`.

    from lora_pipeline.data.tokenizer import train_tokenizer
    path = train_tokenizer(texts, "runs/tokenizer", vocab_size=4000, style="seq2seq")
    tok = transformers.AutoTokenizer.from_pretrained(path)

The special tokens follow T5's ids (pad=0, eos=1, unk=2) so a T5 config works unchanged
(`pad_token_id=0`, `eos_token_id=1`, `decoder_start_token_id=0`); `<s>` is id 3 for causal LMs.
`style="seq2seq"` appends `</s>` to every encoded text (like T5's tokenizer); `style="causal"`
prepends `<s>` (like Llama's). Sentinels `<extra_id_N>` serve span-corruption pretraining.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lora_pipeline.data.config import DataConfigError

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]
NUM_SENTINELS = 20
STYLES = ("seq2seq", "causal")


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 4000,
    style: str = "seq2seq",
) -> Path:
    """Train a byte-level BPE on `texts` and save a standard tokenizer folder; returns its path."""
    if style not in STYLES:
        raise DataConfigError(f"tokenizer style (model_type) must be one of {STYLES}, got {style!r}")
    sentinels = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
    min_vocab = 256 + len(SPECIAL_TOKENS) + NUM_SENTINELS
    if vocab_size < min_vocab:
        raise DataConfigError(
            f"tokenizer vocab_size must be at least {min_vocab} (bytes + special tokens), got {vocab_size}"
        )

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + sentinels,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if style == "seq2seq":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 3)]
        )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        additional_special_tokens=sentinels,
        padding_side="right" if style == "seq2seq" else "left",
        model_max_length=1024,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out
