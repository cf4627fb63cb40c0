"""Calibration: run the source model layer by layer on real text and keep what the conversion needs per layer.

Memory is one source layer plus the hidden states of the calibration batch; per layer we keep the second moment of the
attention input ``E[[x;1][x;1]ᵀ]``, the attention-distance histogram per head, and a few sequences of ``x`` on which
candidate conversions are measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mha2mla.data import load_texts, pack_tokens, token_blocks
from mha2mla.errors import Mha2mlaError
from mha2mla.source import SourceModel

__all__ = ["LayerCalibration", "calibrate", "calibration_tokens"]


@dataclass
class LayerCalibration:
    """Statistics of one layer's attention input on the calibration data.

    Attributes:
        sigma: ``[hidden+1, hidden+1]`` float64 ``E[[x;1][x;1]ᵀ]`` (the last row/column carries biases).
        distance_hist: ``[n_heads, L]`` attention mass at query−key distance Δ.
        inv_freq: ``[head_dim/2]`` source rotary frequencies (with the source's rope scaling).
        x_sample: ``[S, L, hidden]`` attention inputs of a few sequences, to measure candidates on.
        sigma_ctx: ``[n_kv, hidden, hidden]`` second moment of the attention-averaged inputs ``x̄ = Σ_n p_mn x_n``
            seen by the value path, summed over the query heads of each KV group.
    """

    sigma: torch.Tensor
    distance_hist: torch.Tensor
    inv_freq: torch.Tensor
    x_sample: torch.Tensor
    sigma_ctx: torch.Tensor | None = None


def calibration_tokens(*, source: SourceModel, data: str | list[str], samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """Tokenise calibration text (a data spec, or a list of documents) into ``[samples, length]`` blocks."""
    from transformers import AutoTokenizer

    if samples <= 0 or length < 16:
        raise Mha2mlaError(f"--calibration-samples must be ≥ 1 and --calibration-length ≥ 16, got {samples} and {length}")
    if source.gguf is not None:
        tok = AutoTokenizer.from_pretrained(source.gguf[0], gguf_file=source.gguf[1])
    else:
        tok = AutoTokenizer.from_pretrained(source.path)
    texts = load_texts(data) if isinstance(data, str) else [t for t in data if t.strip()]
    if not texts:
        raise Mha2mlaError("calibration data is empty: no text found")
    tokens = pack_tokens(tok, texts, max_tokens=samples * length * 4)
    blocks = token_blocks(tokens, seq_len=length, seed=seed)
    if blocks.shape[0] < samples:
        raise Mha2mlaError(f"calibration data {data!r} gives {blocks.shape[0]} blocks of {length} tokens, fewer than "
                           f"--calibration-samples {samples}; give more text or lower the samples/length")
    return blocks[:samples]


def _hf_config(source: SourceModel):
    from transformers import AutoConfig

    cfg = {k: v for k, v in source.config.items() if k not in ("architectures", "model_type", "auto_map", "transformers_version")}
    config = AutoConfig.for_model(source.config["model_type"], **cfg)
    config._attn_implementation = "sdpa"
    return config


def _decoder_layer(source: SourceModel, config, i: int, dtype: torch.dtype):
    import importlib

    mt = source.config["model_type"]
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    cls = getattr(mod, {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}[mt])
    with torch.device("meta"):
        layer = cls(config, layer_idx=i)
    prefix = f"model.layers.{i}."
    state = {n: source.get(prefix + n).to(dtype) for n, _ in layer.named_parameters()}
    layer.load_state_dict(state, assign=True)
    return layer.eval()


def _rotary(source: SourceModel, config):
    import importlib

    mt = source.config["model_type"]
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    return getattr(mod, {"llama": "LlamaRotaryEmbedding", "mistral": "MistralRotaryEmbedding", "qwen2": "Qwen2RotaryEmbedding"}[mt])(config)


@torch.no_grad()
def _attention_stats(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int,
                     hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass per head at each distance Δ = m − n (summed over queries and sequences), and per KV group the
    summed second moment of the attention-averaged inputs ``x̄_h = Σ_n p_h,mn x_n``."""
    attn = layer.self_attn
    b, l, _ = x.shape
    q = attn.q_proj(x).view(b, l, n_heads, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, l, n_kv, hd).transpose(1, 2)
    half = hd // 2

    def rot(t):
        t1, t2 = t[..., :half], t[..., half:]
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    q, k = rot(q), rot(k).repeat_interleave(n_heads // n_kv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * hd**-0.5
    mask = torch.ones(l, l, dtype=torch.bool).tril()
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # [B, H, L, L]
    idx = (torch.arange(l)[:, None] - torch.arange(l)[None, :]).clamp_min(0)  # Δ for every (m, n)
    hist = torch.zeros(n_heads, l, dtype=torch.float64)
    flat = (p * mask).sum(0).reshape(n_heads, -1).double()
    hist.scatter_add_(1, idx.reshape(1, -1).expand(n_heads, -1), flat)
    xbar = (p @ x[:, None]).transpose(0, 1).reshape(n_heads, b * l, -1)  # [H, B·L, hidden], float32 matmuls
    per_head = (xbar.transpose(1, 2) @ xbar).double()
    group = torch.arange(n_heads) // (n_heads // n_kv)
    ctx = torch.zeros(n_kv, x.shape[-1], x.shape[-1], dtype=torch.float64).index_add_(0, group, per_head)
    return hist, ctx


@torch.no_grad()
def calibrate(*, source: SourceModel, tokens: torch.Tensor, sample_sequences: int = 4, batch: int = 8,
              progress: bool = True) -> list[LayerCalibration]:
    """Run the source layer by layer on ``tokens [N, L]`` and collect each layer's :class:`LayerCalibration`.

    Runs in float32 on CPU; the hidden states of all ``N`` sequences are kept (``N·L·hidden`` floats).
    """
    config = _hf_config(source)
    rotary = _rotary(source, config)
    n, l = tokens.shape
    pos = torch.arange(l)[None]
    h = torch.nn.functional.embedding(tokens, source.get("model.embed_tokens.weight").float())
    cos, sin = rotary(h[:1], pos)
    inv_freq = rotary.inv_freq.double().clone()
    hd, nh, nkv = source.head_dim, source.n_heads, source.n_kv
    out = []
    for i in tqdm(range(source.n_layers), desc="calibrating layers", unit="layer", disable=not progress):
        layer = _decoder_layer(source, config, i, torch.float32)
        sigma = torch.zeros(source.hidden + 1, source.hidden + 1, dtype=torch.float64)
        hist = torch.zeros(nh, l, dtype=torch.float64)
        ctx = torch.zeros(nkv, source.hidden, source.hidden, dtype=torch.float64)
        sample = []
        for s in range(0, n, batch):
            hb = h[s : s + batch]
            x = layer.input_layernorm(hb)
            xa = torch.cat((x, torch.ones(*x.shape[:-1], 1)), dim=-1).reshape(-1, source.hidden + 1).double()
            sigma += xa.T @ xa
            dh, dc = _attention_stats(layer, x, cos[:, None], sin[:, None], nh, nkv, hd)
            hist += dh
            ctx += dc
            if sum(t.shape[0] for t in sample) < sample_sequences:
                sample.append(x[: sample_sequences - sum(t.shape[0] for t in sample)].clone())
            h[s : s + batch] = layer(hb, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        sigma /= n * l
        if not math.isfinite(float(sigma.diagonal().sum())):
            raise Mha2mlaError(f"layer {i}: calibration activations are not finite; the source overflows in float32 on this data")
        out.append(LayerCalibration(sigma=sigma, distance_hist=hist, inv_freq=inv_freq, x_sample=torch.cat(sample),
                                    sigma_ctx=(ctx / (n * l)).float()))
        del layer
    return out
