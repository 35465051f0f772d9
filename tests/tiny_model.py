"""A tiny Llama-style model and BPE tokenizer built offline (no model hub here).

The code under test loads it with the same ``from_pretrained(path)`` a user gives a hub
name to. Random weights: it learns the demo data's patterns within a few hundred steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL = [
    "<unk>",
    "<s>",
    "</s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def build_tiny_model(
    target: Path, corpus: Iterable[str], vocab_size: int = 600, hidden: int = 64, *, llama2_vocab: bool = False
) -> Path:
    """``llama2_vocab``: a Llama 2 style tokenizer (BPE with byte fallback, ``▁`` for spaces), one
    that llama.cpp's converter reads without knowing it (a byte-level BPE must be a known one)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if llama2_vocab:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        specials = SPECIAL + [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=specials)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    target.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(target)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def mistral_workspace(root: Path) -> Path:
    """A demo database, its mistral extraction (dataset ``m``, 10 % eval) and a tiny model trained
    on its examples, under ``root``: what the checkpoint and preference tests train from."""
    from saige_k8s.dataset.extract import ExtractRequest, extract
    from saige_k8s.experiences.demo import DemoOptions, create_database
    from saige_k8s.training.data import load_dataset_dir

    create_database(str(root / "saige.db"), DemoOptions(rows=1500, seed=11, response_median_bytes=100))
    result = extract(
        ExtractRequest(
            db=str(root / "saige.db"),
            data_root=root / "data",
            format="mistral",
            eval_fraction=0.1,
            dataset_id="m",
            kto=True,
        )
    )
    build_tiny_model(root / "model", [str(row) for row in load_dataset_dir(result.path).train[:300]])
    return root
