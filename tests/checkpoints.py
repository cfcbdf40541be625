"""Tiny random Hugging Face checkpoints and the transformers reference (test-only: uses torch).

Each checkpoint is made by transformers itself with a fixed seed, saved as bf16 safetensors, with a
byte-level tokenizer so that onnxruntime-genai can load the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

VOCAB = 256

# One entry per architecture and variant the tests build. head_dim is a multiple of 16, which
# GroupQueryAttention on CPU requires.
TINY = {
    "qwen3": dict(
        arch="Qwen3ForCausalLM", config="Qwen3Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=True, max_position_embeddings=256),
    "llama": dict(
        arch="LlamaForCausalLM", config="LlamaConfig", vocab_size=VOCAB, hidden_size=128,
        intermediate_size=192, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, tie_word_embeddings=False, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        rope_theta=500000.0),
    "mistral": dict(
        arch="MistralForCausalLM", config="MistralConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, tie_word_embeddings=False, max_position_embeddings=256,
        sliding_window=8),  # shorter than the test sequences: the window really binds
}


def make_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with 256 tokens and no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])
    fast.save_pretrained(folder)


def make_checkpoint(folder: Path, name: str, *, seed: int = 0, shard: bool = False,
                    **overrides) -> Path:
    """Write a tiny random checkpoint of variant ``name`` into ``folder``."""
    spec = dict(TINY[name])
    spec.update(overrides)
    arch, config_name = spec.pop("arch"), spec.pop("config")
    spec.setdefault("bos_token_id", 1)
    spec.setdefault("eos_token_id", 2)
    spec.setdefault("pad_token_id", 0)
    config = getattr(transformers, config_name)(**spec)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    with torch.no_grad():  # larger than default init: logits with clear winners
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model = model.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "10GB")
    make_tokenizer(folder)
    return folder


def hf_model(folder: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(folder: Path, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Full-sequence logits [B, T, V] with positions from the mask, as generate() computes them."""
    model = hf_model(folder)
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    m = torch.from_numpy(np.asarray(mask, np.int64))
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=m, position_ids=pos).logits.numpy()


def hf_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = hf_model(folder)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[0].tolist()


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


if __name__ == "__main__":  # regenerate the shipped example: python tests/checkpoints.py
    import shutil
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/tiny-qwen3")
    shutil.rmtree(target, ignore_errors=True)
    make_checkpoint(target, "qwen3", shard=True)
