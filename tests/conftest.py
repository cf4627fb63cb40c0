"""Shared test fixtures: tiny random source checkpoints written to disk like real ones."""

from __future__ import annotations

import json
import os

import pytest
import torch


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


CORPUS = (
    "the cat sat on the mat and the dog sat on the log while the bird sang in the tree . "
    "a quick brown fox jumps over the lazy dog near the river bank in the morning light . "
    "rain fell on the old town and people walked home under grey skies with their coats . "
    "numbers like one two three four five six seven eight nine ten count the days of work . "
)


def build_tokenizer(path) -> None:
    """A word-level tokenizer over :data:`CORPUS` (ids < 64), saved to ``path``; no network needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(CORPUS.split()))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def build_source(path, *, arch: str = "llama", n_heads: int = 4, n_kv: int = 1, head_dim: int = 16, hidden: int = 64,
                 layers: int = 2, vocab: int = 97, eps: float = 1e-5, tied: bool = True, seed: int = 0,
                 max_shard_size: str | None = None, dtype=torch.float32, **extra) -> str:
    """Write a tiny random Llama / Qwen2 / Mistral checkpoint (safetensors) to ``path`` and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim, rms_norm_eps=eps,
                  tie_word_embeddings=tied, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(extra)
    config = cls[0](**kwargs)
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    _randomize(model, seed)
    model.to(dtype)
    os.makedirs(path, exist_ok=True)
    if max_shard_size:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path)
    build_tokenizer(path)
    return str(path)


@pytest.fixture
def tiny_source(tmp_path):
    """Factory: ``tiny_source(name="src", **kwargs)`` writes a tiny random checkpoint under tmp_path."""

    def make(name: str = "src", **kwargs) -> str:
        return build_source(tmp_path / name, **kwargs)

    return make


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
