"""Calibration: run the source model layer by layer on real text and keep what the conversion needs per layer.

Memory is one source layer plus the hidden states of the calibration batch; per layer we keep the second moment of the
attention input ``E[[x;1][x;1]ᵀ]``, the attention-distance histogram per head, and a few sequences of ``x`` on which
candidate conversions are measured.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from mha2mla.data import load_texts, pack_tokens, token_blocks
from mha2mla.loading import load_tokenizer
from mha2mla.errors import Mha2mlaError
from mha2mla.progress import Steps
from mha2mla.ops.mlp_fit import GRAM_BLOCKS, DownProjectionFit
from mha2mla.ops.moments import add_lower_gram, block_edges, context_moment_from_columns, symmetric_from_lower
from mha2mla.ops.attention import causal_score_blocks, weighted_sum
from mha2mla.allocator import release_freed_memory
from mha2mla.checkpoint.source import SUPPORTED_ARCHITECTURES, SourceModel

__all__ = ["CalibrationSet", "LayerCalibration", "Propagation", "calibrate", "calibration_set", "calibration_tokens",
           "attention_stats", "cpu_flags", "native_bfloat16"]

# The MLP refit keeps the calibration tokens' MLP activations between its two passes when they take at most this many
# floats (N·L·intermediate); above it they are computed again.
MLP_ACTIVATION_CACHE_MAX_FLOATS = 256 * 2**20
# The statistics' attention runs in this many blocks of queries (causal: each reads the keys up to its last query).
STATS_QUERY_BLOCKS = 4


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX-BF16,
    :func:`cpu_flags`), so bfloat16 matmuls are faster than float32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@dataclass
class LayerCalibration:
    """Statistics of one layer's attention input on the calibration data.

    Attributes:
        sigma: ``[hidden+1, hidden+1]`` float64 ``E[[x;1][x;1]ᵀ]`` (the last row/column carries biases).
        distance_hist: ``[n_heads, L]`` attention mass at query−key distance Δ.
        inv_freq: ``[head_dim/2]`` source rotary frequencies (with the source's rope scaling).
        x_sample: ``[S, L, hidden]`` attention inputs of a few sequences, to measure candidates on.
        sigma_ctx: ``[n_kv, hidden, hidden]`` second moment of the attention-averaged inputs ``x̄_h = Σ_n p_h,mn x_n``
            seen by the value path, summed over the query heads of each KV group (measured on the first
            ``context_sequences`` sequences).
        sigma_key: ``[hidden+1, hidden+1]`` second moment of ``[x;1]`` over keys, each key weighted by the attention
            it receives (``Σ_h Σ_m p_h,mn``, normalised): a key's error costs in proportion to how much it is read
            (attention sinks above all).
        head_outputs: per batch of :meth:`Propagation.inputs`, each source head's attention output before ``o_proj``
            (``[b, n_heads, L, head_dim]``, on the calibration device), when asked for: the output fit's targets.
    """

    sigma: torch.Tensor
    distance_hist: torch.Tensor
    inv_freq: torch.Tensor
    x_sample: torch.Tensor
    sigma_ctx: torch.Tensor | None = None
    sigma_key: torch.Tensor | None = None
    head_outputs: list[torch.Tensor] | None = None


def calibration_tokens(*, source: SourceModel, data: str | list[str], samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """Tokenise calibration text (a data spec, or a list of documents) into ``[samples, length]`` blocks."""
    if samples <= 0 or length < 16:
        raise Mha2mlaError(f"--calibration-samples must be ≥ 1 and --calibration-length ≥ 16, got {samples} and {length}")
    texts = load_texts(data) if isinstance(data, str) else [t for t in data if t.strip()]  # (before the tokenizer)
    if not texts:
        raise Mha2mlaError("calibration data is empty: no text found")
    folder, gguf_file = source.gguf if source.gguf is not None else (source.path, None)
    tok = load_tokenizer(folder, what="source", gguf_file=gguf_file, vocab_size=source.config.get("vocab_size"))
    tokens = pack_tokens(tok, texts, max_tokens=samples * length * 4)
    blocks = token_blocks(tokens, seq_len=length, seed=seed)
    if blocks.shape[0] < samples:
        raise Mha2mlaError(f"calibration data {data!r} gives {blocks.shape[0]} blocks of {length} tokens, fewer than "
                           f"--calibration-samples {samples}; give more text or lower the samples/length")
    return blocks[:samples]


@dataclass
class CalibrationSet:
    """The calibration sequences of one conversion.

    Attributes:
        data: the calibration data as given (a data spec or a list of documents).
        tokens: ``[samples, length]`` token ids.
        length: tokens per sequence: the request, capped at the source's ``max_position_embeddings``.
        requested_length: the length asked for.
        max_positions: the source's ``max_position_embeddings`` (None when its config has none).
    """

    data: str | list[str]
    tokens: torch.Tensor
    length: int
    requested_length: int
    max_positions: int | None


def calibration_set(*, source: SourceModel, data: str | list[str], samples: int, length: int) -> CalibrationSet:
    """Tokenise the calibration data into ``samples`` sequences of ``length`` tokens, within the context the source
    was trained for."""
    max_pos = source.config.get("max_position_embeddings")
    max_pos = max_pos if isinstance(max_pos, int) else None
    used = max_pos if max_pos is not None and 16 <= max_pos < length else length
    tokens = calibration_tokens(source=source, data=data, samples=samples, length=used)
    return CalibrationSet(data=data, tokens=tokens, length=used, requested_length=length, max_positions=max_pos)


def _hf_class(model_type: str, part: str) -> str:
    """transformers' class name of a source family's ``part``, e.g. ``("qwen2", "DecoderLayer")`` → Qwen2DecoderLayer."""
    return SUPPORTED_ARCHITECTURES[model_type].removesuffix("ForCausalLM") + part


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
    cls = getattr(mod, _hf_class(mt, "DecoderLayer"))
    with torch.device("meta"):
        layer = cls(config, layer_idx=i)
    _read_weights(layer, source, f"model.layers.{i}.", dtype)
    return layer.eval()


def _read_weights(module: torch.nn.Module, source: SourceModel, prefix: str, dtype: torch.dtype) -> None:
    """Give ``module`` its parameters from the source's tensors ``prefix + name``, in ``dtype``."""
    state = {n: source.get(prefix + n).to(dtype) for n, _ in module.named_parameters()}
    module.load_state_dict(state, assign=True)


def _rotary(source: SourceModel, config):
    import importlib

    mt = source.config["model_type"]
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    return getattr(mod, _hf_class(mt, "RotaryEmbedding"))(config)


@torch.no_grad()
def attention_stats(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int,
                     hd: int, contexts: bool, ctx_rows: int = 0, ctx_stride: int = 1, ctx_offset: int = 0,
                     outputs: bool = False, lower: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor | None, int, torch.Tensor, torch.Tensor | None]:
    """For one batch ``x [B, L, hidden]``: attention mass per head at each distance Δ = m − n; per KV group the summed
    second moment of the attention-averaged inputs ``x̄_h = Σ_n p_h,mn x_n`` over the queries ``m`` of the first
    ``ctx_rows`` sequences (all of them as ``Xᵀ(Σ_h P_hᵀP_h)X``; with ``ctx_stride > 1`` only the positions
    ``m ≡ ctx_offset (mod ctx_stride)``, directly from their ``x̄``) and how many query positions per sequence it
    summed; the attention each key receives (``[B·L, 1]``, summed over heads and queries); and, with ``outputs``, each
    head's attention output ``[B, H, L, hd]`` (before ``o_proj``).

    The moment is returned in float64; with ``lower`` (and ``ctx_stride > 1``) instead as the float32 accumulator whose
    lower triangle holds it (:func:`mha2mla.ops.moments.symmetric_from_lower` gives the matrix): summed over batches
    first and symmetrised once, it costs a fraction of the memory."""
    attn = layer.self_attn
    b, l, _ = x.shape
    q = attn.q_proj(x).view(b, l, n_heads, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, l, n_kv, hd).transpose(1, 2)
    half = hd // 2

    def rot(t):
        t1, t2 = t[..., :half], t[..., half:]
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    # the g = n_heads/n_kv query heads of a KV group as one batch entry reading its keys (no per-head copies of k, v)
    g = n_heads // n_kv
    q = (rot(q) * hd**-0.5).reshape(b * n_kv, g, l, hd)  # (scaling q, not the L×L scores)
    k = rot(k).reshape(b * n_kv, l, hd)
    v = attn.v_proj(x).view(b, l, n_kv, hd).transpose(1, 2).reshape(b * n_kv, l, hd) if outputs else None
    dev = x.device
    hist = torch.zeros(n_heads, l, dtype=torch.float64, device=dev)
    received = torch.zeros(b, l, device=dev)
    heads = torch.empty(b, n_heads, l, hd, device=dev) if outputs else None
    # the probabilities a block of queries at a time, over the keys up to its last query only (5/8 of the score matrix
    # at 4 blocks); rows[r] = P[..., block r, :e_{r+1}]
    rows, sampled = [], contexts and ctx_stride > 1
    ctx, ctx_queries = None, l if contexts else 0
    if sampled:
        ctx, ctx_queries = torch.zeros(n_kv, x.shape[-1], x.shape[-1], device=dev), 0
    for r0, r1, s in causal_score_blocks(q, k, STATS_QUERY_BLOCKS):
        pr = s.softmax(-1).view(b, n_heads, r1 - r0, r1)
        delta = (torch.arange(r0, r1, device=dev)[:, None] - torch.arange(r1, device=dev)[None, :]).clamp_min(0)
        hist.scatter_add_(1, delta.reshape(1, -1).expand(n_heads, -1), pr.sum(0).reshape(n_heads, -1).double())
        received[:, :r1] += pr.sum(dim=(1, 2))
        if outputs:
            heads[..., r0:r1, :] = weighted_sum(pr.view(b * n_kv, g, r1 - r0, r1), v[:, :r1]).view(b, n_heads, r1 - r0, hd)
        if sampled:  # x̄ of the sampled queries, then Σ_{h∈g} x̄_hᵀ x̄_h per group
            sel = torch.arange(r0 + (ctx_offset - r0) % ctx_stride, r1, ctx_stride, device=dev)
            if len(sel):
                xb = pr[:ctx_rows, :, sel - r0].reshape(ctx_rows, -1, r1) @ x[:ctx_rows, :r1]  # [b, H·s, hidden]
                xb = xb.view(ctx_rows, n_kv, g * len(sel), -1).transpose(0, 1).reshape(n_kv, -1, xb.shape[-1])
                add_lower_gram(ctx, xb, block_edges(xb.shape[-1], GRAM_BLOCKS))  # (symmetrised below)
                ctx_queries += len(sel)
        elif contexts:
            rows.append(pr[:ctx_rows])
    if contexts and not sampled:  # Σ_{h∈g} Xᵀ P_hᵀ P_h X, from each key block's column of the blocks of queries that see it
        edges = block_edges(l, STATS_QUERY_BLOCKS)
        columns = [torch.cat([rows[r][..., i0:i1] for r in range(i, len(rows))], dim=-2)
                   for i, (i0, i1) in enumerate(zip(edges[:-1], edges[1:]))]
        ctx = context_moment_from_columns(columns, edges, x[:ctx_rows], n_kv)
    received = received.reshape(-1, 1)  # [B·L, 1]: attention each key gets, over heads and queries
    if sampled and lower:
        return hist, ctx, ctx_queries, received, heads
    if sampled:
        ctx = symmetric_from_lower(ctx)
    return hist, None if ctx is None else ctx.double(), ctx_queries, received, heads


@torch.no_grad()
def calibrate(*, source: SourceModel, tokens: torch.Tensor, sample_sequences: int = 4, batch: int = 8,
              value_contexts: bool = True, device: str | torch.device = "cpu", progress: bool = True,
              desc: str = "calibrating layers") -> list[LayerCalibration]:
    """Run the source layer by layer on ``tokens [N, L]`` and collect each layer's :class:`LayerCalibration`
    (``sigma_ctx`` only with ``value_contexts``).

    Runs in float32 on ``device``; the hidden states of all ``N`` sequences are kept (``N·L·hidden`` floats).
    """
    prop = Propagation(source=source, tokens=tokens, batch=batch, device=device)
    out = []
    for i in Steps(source.n_layers, desc=desc, enabled=progress):
        out.append(prop.layer_calibration(i, sample_sequences=sample_sequences, value_contexts=value_contexts))
        prop.advance(i)
    return out


class Propagation:
    """The calibration tokens' hidden states, carried layer by layer (one decoder layer in memory at a time).

    For layer ``i``: :meth:`layer_calibration` measures its statistics, :meth:`inputs` yields its attention inputs
    (after the layer's input RMSNorm), and :meth:`advance` moves the hidden states past it, through the source layer or,
    for sequential conversion, through the converted attention block and the source MLP (the next layer is then
    calibrated on what the converted model really feeds it).

    Memory: one source layer plus ``N·L·hidden`` floats, on ``device`` (the statistics are returned on the CPU).
    ``source_sequences``: with ``track_source``, the source's own stream is carried for this many sequences only (the
    first ones, rounded up to whole batches; None: all), and what reads it (:meth:`source_inputs`, the MLP refit's
    moments) sees only those.
    ``mlp_dtype``: the precision of the MLP forwards that move the streams in :meth:`advance` and of the source
    stream's attention (the streams themselves, the statistics and the fits stay float32; ``Method.mlp_dtype``).
    """

    def __init__(self, *, source: SourceModel, tokens: torch.Tensor, batch: int = 8, device: str | torch.device = "cpu",
                 track_source: bool = False, source_sequences: int | None = None,
                 mlp_dtype: torch.dtype = torch.float32):
        self.source, self.batch, self.device = source, batch, torch.device(device)
        self.mlp_dtype = mlp_dtype
        self._mlp_copy = None  # the loaded layer's MLP in mlp_dtype (see _load)
        self.config = _hf_config(source)
        rotary = _rotary(source, self.config)
        self.pos = torch.arange(tokens.shape[1], device=self.device)[None]
        embed = source.get("model.embed_tokens.weight")
        # looked up in the stored dtype, then widened: no float32 copy of the whole table
        self.h = torch.nn.functional.embedding(tokens.to(self.device), embed.to(self.device)).float()
        del embed
        # the source model's own hidden states, carried alongside (for the output fit's drift correction and the MLP refit)
        n = tokens.shape[0] if source_sequences is None else min(tokens.shape[0], -(-source_sequences // batch) * batch)
        self.h_src = self.h[:n].clone() if track_source else None
        self.cos, self.sin = rotary.to(self.device)(self.h[:1], self.pos)
        self.inv_freq = rotary.inv_freq.double().cpu().clone()
        self._layer = None

    def _load(self, i: int, *, full: bool = True):
        """Layer ``i``'s decoder layer; with ``full``, its attention and MLP weights read again if :meth:`park` freed
        them (the same values)."""
        if self._layer is None or self._layer[0] != i:
            layer = _decoder_layer(self.source, self.config, i, torch.float32).to(self.device)
            self._layer = (i, layer)
            self._set_mlp(layer)
        elif full and self._mlp_copy is None:  # parked
            layer = self._layer[1]
            for name in ("self_attn", "mlp"):
                _read_weights(getattr(layer, name), self.source, f"model.layers.{i}.{name}.", torch.float32)
                getattr(layer, name).to(self.device)
            self._set_mlp(layer)
        return self._layer[1]

    def _set_mlp(self, layer) -> None:
        # the MLP the streams move through (a copy in ``mlp_dtype``; the layer's own stays float32)
        low = self.mlp_dtype != torch.float32
        self._mlp_copy = copy.deepcopy(layer.mlp).to(self.mlp_dtype) if low else layer.mlp

    def park(self, i: int) -> None:
        """Free layer ``i``'s attention and MLP weights until :meth:`advance` needs them (they are read again then):
        the stages between the statistics and the move past the layer read only its input norm."""
        if self._layer is not None and self._layer[0] == i and self._mlp_copy is not None:
            self._layer[1].self_attn.to("meta")
            self._layer[1].mlp.to("meta")
            self._mlp_copy = None

    @torch.no_grad()
    def inputs(self, i: int):
        """Yields batches ``[b, L, hidden]`` of layer ``i``'s attention input."""
        layer = self._load(i, full=False)
        for s in range(0, self.h.shape[0], self.batch):
            yield layer.input_layernorm(self.h[s : s + self.batch])

    def _mlp(self, layer, h: torch.Tensor) -> torch.Tensor:
        """The layer's MLP output on the stream ``h`` (float32), computed in ``mlp_dtype``. (bfloat16 is faster on
        CPUs with AVX512-BF16; its rounding enters the difference of the two streams that the drift corrections fit,
        so exactness checks use float32.)"""
        return self._mlp_copy(layer.post_attention_layernorm(h).to(self.mlp_dtype)).float()

    @property
    def tracks_source(self) -> bool:
        return self.h_src is not None

    @torch.no_grad()
    def source_inputs(self, i: int):
        """Yields ``(x_src, h_src − h)`` per batch: layer ``i``'s attention input in the *source* model, and how far the
        converted model's residual stream has drifted from the source's (needs ``track_source``), for the batches of
        :meth:`inputs` whose source stream is tracked (the first ones, see ``source_sequences``)."""
        layer = self._load(i, full=False)
        for s in range(0, self.h_src.shape[0], self.batch):
            hs = self.h_src[s : s + self.batch]
            yield layer.input_layernorm(hs), hs - self.h[s : s + self.batch]

    @torch.no_grad()
    def layer_calibration(self, i: int, *, sample_sequences: int = 4, value_contexts: bool = True,
                          context_sequences: int | None = None, context_stride: int = 1,
                          head_outputs: bool = False) -> LayerCalibration:
        """Layer ``i``'s :class:`LayerCalibration` on the current hidden states (``sigma_ctx`` only with
        ``value_contexts``, on the first ``context_sequences`` sequences, all when None, and on every
        ``context_stride``-th query position of each: it is the costly part; ``head_outputs`` keeps the source heads' outputs, ``N·L·hidden`` floats)."""
        src, layer = self.source, self._load(i)
        hd, nh, nkv, hidden = src.head_dim, src.n_heads, src.n_kv, src.hidden
        n, l = self.h.shape[:2]
        dev = self.device
        sigma = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64, device=dev)
        hist = torch.zeros(nh, l, dtype=torch.float64, device=dev)
        ctx = torch.zeros(nkv, hidden, hidden, dtype=torch.float64, device=dev)
        key = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64, device=dev)
        sample, kept, n_ctx, ctx_count, outs = [], 0, 0, 0, []
        ctx_limit = n if context_sequences is None else min(n, context_sequences)
        edges = block_edges(hidden + 1, GRAM_BLOCKS)  # (symmetric moments: lower blocks)
        for batch, x in enumerate(self.inputs(i)):
            xa = torch.cat((x, torch.ones(*x.shape[:-1], 1, device=dev)), dim=-1).reshape(-1, hidden + 1)
            add_lower_gram(sigma, xa, edges)  # float32 within a batch, float64 across batches
            rows = min(x.shape[0], ctx_limit - n_ctx) if value_contexts else 0
            n_ctx += rows
            dh, dc, queries, received, ho = attention_stats(
                layer, x, self.cos[:, None], self.sin[:, None], nh, nkv, hd, rows > 0, ctx_rows=rows,
                ctx_stride=context_stride, ctx_offset=batch % context_stride, outputs=head_outputs, lower=True)
            ctx_count += rows * queries
            if ho is not None:
                outs.append(ho)
            hist += dh
            add_lower_gram(key, xa * received.sqrt(), edges)  # Σ received·[x;1][x;1]ᵀ
            if dc is not None:
                ctx += dc  # (float32 into float64: exact widening, no float64 copy of the batch's moment)
            if kept < sample_sequences:
                sample.append(x[: sample_sequences - kept].cpu())
                kept += sample[-1].shape[0]
            del dc, xa
            release_freed_memory()  # (each batch frees the same large temporaries: see mha2mla.allocator)
        sigma, key = symmetric_from_lower(sigma), symmetric_from_lower(key)
        if value_contexts and context_stride > 1:  # summed as lower triangles (attention_stats(lower=True))
            for group in ctx:
                group.copy_(symmetric_from_lower(group))
        sigma, hist, ctx, key = (t.cpu() for t in (sigma, hist, ctx, key))
        sigma /= n * l
        if not math.isfinite(float(sigma.diagonal().sum())):
            raise Mha2mlaError(f"layer {i}: calibration activations are not finite; the source overflows in float32 on this data")
        return LayerCalibration(sigma=sigma, distance_hist=hist, inv_freq=self.inv_freq, x_sample=torch.cat(sample),
                                sigma_ctx=ctx.div_(max(ctx_count, 1)).float() if value_contexts else None, sigma_key=key / (n * l * nh),
                                head_outputs=outs if head_outputs else None)

    @torch.no_grad()
    def advance(self, i: int, attention=None, source_outputs: list[torch.Tensor] | None = None,
                mlp_drift: float = 0.0, last: bool = False, mlp_down: torch.Tensor | None = None) -> torch.Tensor | None:
        """Move past layer ``i``: through the source layer, or with a converted attention block in place of the source
        attention (source residual scale): a function ``attention(x)`` of the attention input, or a list of its outputs
        per batch of :meth:`inputs` (already computed). When the source's own hidden states are tracked they move
        through the source layer (``source_outputs``: its attention outputs on them per batch, when already computed)
        together with a converted attention only: a plain source move (``attention`` None, conversion that is not
        sequential, which tracks no source stream) moves the converted stream alone.

        With ``mlp_drift > 0`` (a converted attention, the source tracked) the layer's MLP down-projection is refit so
        its output moves that fraction of the way to the source's stream (:mod:`mha2mla.ops.mlp_fit`); the converted
        stream moves through the refit MLP, and the refit weight ``[hidden, intermediate]`` (float64, CPU) is returned.
        Otherwise returns None.

        ``last``: nothing reads the streams past this layer (the model's last): they are left where they are, and only
        the MLP refit runs (the converted stream past the attention, which it reads; the source's, tracked, is read as
        it stands after the layer, so the source layer still moves it). Afterwards the hidden states are undefined.

        ``mlp_down``: a down-projection ``[hidden, intermediate]`` the converted stream's MLP uses instead of the
        source's (one another stream's refit chose), with a converted attention and no refit here."""
        layer = self._load(i)
        if mlp_down is not None:
            self._mlp_copy.down_proj.weight.data = mlp_down.to(self.device, self.mlp_dtype)
        fit_mlp = (mlp_drift > 0 and attention is not None and self.h_src is not None
                   and getattr(layer.mlp.down_proj, "bias", None) is None)  # (no intercept is fitted)
        if last and not fit_mlp:
            self._layer = self._mlp_copy = None
            return None
        for n, s in enumerate(range(0, self.h.shape[0], self.batch)):
            sl = slice(s, s + self.batch)
            if self.h_src is not None and attention is not None and s < self.h_src.shape[0]:
                if source_outputs is None:
                    self.h_src[sl] = layer(self.h_src[sl], attention_mask=None, position_ids=self.pos,
                                           position_embeddings=(self.cos, self.sin))
                else:
                    hs = self.h_src[sl] + source_outputs[n]
                    self.h_src[sl] = hs + self._mlp(layer, hs)
            if fit_mlp:
                continue  # the converted stream moves below, once the down-projection is refit
            h = self.h[sl]
            if attention is None:
                self.h[sl] = layer(h, attention_mask=None, position_ids=self.pos, position_embeddings=(self.cos, self.sin))
            else:
                h = h + (attention[n] if isinstance(attention, list) else attention(layer.input_layernorm(h)))
                self.h[sl] = h + self._mlp(layer, h)
        down = self._refit_mlp(layer, attention, mlp_drift, last) if fit_mlp else None
        self._layer = self._mlp_copy = None
        return down

    def _refit_mlp(self, layer, attention, beta: float, last: bool) -> torch.Tensor:
        """The converted stream past the attention and the refit MLP (see :meth:`advance`; with ``last`` only what the
        fit reads); returns the refit weight."""
        mlp, dt = self._mlp_copy, self.mlp_dtype
        w0 = layer.mlp.down_proj.weight
        fit = DownProjectionFit(features=w0.shape[1], out_features=w0.shape[0])
        n_tok = self.h.shape[0] * self.h.shape[1]
        tracked = self.h_src.shape[0]
        keep = n_tok * w0.shape[1] <= MLP_ACTIVATION_CACHE_MAX_FLOATS
        acts = []

        def activations(h_mid):  # in mlp_dtype
            u = layer.post_attention_layernorm(h_mid).to(dt)
            return mlp.act_fn(mlp.gate_proj(u)) * mlp.up_proj(u)

        for n, s in enumerate(range(0, self.h.shape[0], self.batch)):
            if last and s >= tracked:
                break  # (the untracked sequences feed no moment, and nothing reads their stream further)
            sl = slice(s, s + self.batch)
            h = self.h[sl]
            h_mid = h + (attention[n] if isinstance(attention, list) else attention(layer.input_layernorm(h)))
            a = activations(h_mid)
            # on every token: moments on every 2nd one were faster but lost quality at small ranks
            if s < tracked:  # (the moments need the source's stream)
                fit.add(activations=a, residual=self.h_src[sl] - h_mid)
            self.h[sl] = h_mid  # the stream after the attention; the refit MLP's output is added below
            if keep:
                acts.append(a)
        w = fit.solve(prior=w0.detach().double().cpu(), beta=beta)
        if last:
            return w
        w_dev = w.to(self.device, dt)
        for n, s in enumerate(range(0, self.h.shape[0], self.batch)):
            sl = slice(s, s + self.batch)
            a = acts[n] if keep else activations(self.h[sl])
            self.h[sl] = self.h[sl] + (a @ w_dev.T).float()
        return w
