"""Loading a source checkpoint: resolve it, validate its config, and read its tensors lazily.

A source is a local Hugging Face directory (single or sharded safetensors), a hub id (resolved through the HF cache,
downloading when online), or a ``.gguf`` file (dequantised by transformers' GGUF loader). Weights are never unpickled.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from mha2mla.errors import Mha2mlaError, UnsupportedSourceError
from mha2mla.loading import quiet_loading

__all__ = ["SourceModel", "load_source", "copy_tokenizer_files", "SUPPORTED_ARCHITECTURES", "TOKENIZER_FILES"]

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_SUPPORTED = "LlamaForCausalLM, MistralForCausalLM (no sliding window) and Qwen2ForCausalLM"
_WHY_NOT = {
    "qwen3": "it normalises queries and keys per head (q_norm/k_norm), which MLA's shared latent cannot carry",
    "gemma": "it uses (1+γ) norms, scaled embeddings and a GeGLU MLP that DeepseekV3 does not have",
    "gemma2": "it uses soft-capping, sliding windows and extra norms that DeepseekV3 does not have",
    "gemma3": "it uses q/k norms, sliding windows and extra norms that DeepseekV3 does not have",
    "gpt2": "it has learned absolute positions, LayerNorm and a fused c_attn, not RoPE attention",
    "deepseek_v3": "it is already an MLA checkpoint",
    "deepseek_v2": "it is already an MLA checkpoint",
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def _all_finite(t: torch.Tensor, chunk: int = 2**24) -> bool:
    """Whether every value is finite, checked a chunk of elements at a time (no full-size temporaries for a large
    embedding table)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


@dataclass
class SourceModel:
    """A validated source checkpoint whose tensors are read on demand.

    Attributes:
        name: what the user gave (path, hub id or GGUF file).
        path: local directory holding config and tokenizer files (None for GGUF).
        config: the source ``config.json`` as a dict.
        n_layers, hidden, n_heads, n_kv, head_dim, eps: attention geometry.
        rope: ``rope_parameters`` dict (``rope_type``, ``rope_theta`` and type-specific keys).
        bias: which attention projections carry a bias (``q``, ``k``, ``v``, ``o``).
        tied: whether the LM head is tied to the embedding.
    """

    name: str
    path: str | None
    config: dict
    n_layers: int
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    rope: dict
    bias: dict
    tied: bool
    dtype: torch.dtype
    _files: dict = field(default_factory=dict, repr=False)  # tensor name -> shard path
    _memory: dict | None = field(default=None, repr=False)  # GGUF: the dequantised state dict
    gguf: tuple | None = None  # (directory, file name) of a GGUF source
    _finite: set = field(default_factory=set, repr=False)  # tensors already checked finite (a layer is read several times)

    def keys(self) -> list[str]:
        return sorted(self._memory) if self._memory is not None else sorted(self._files)

    def has(self, name: str) -> bool:
        return name in (self._memory if self._memory is not None else self._files)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (validated finite) in its stored dtype."""
        if self._memory is not None:
            if name not in self._memory:
                raise Mha2mlaError(f"source {self.name} has no tensor {name!r}; the checkpoint is incomplete")
            t = self._memory[name]
        else:
            shard = self._files.get(name)
            if shard is None:
                raise Mha2mlaError(f"source {self.name} has no tensor {name!r}; the checkpoint is incomplete")
            try:
                t = self._read(shard, name)
            except Exception as e:  # truncated/corrupt shard
                try:  # a Ctrl-C/SIGTERM inside safetensors' reader can surface as an unrelated ValueError
                    self._read(shard, name)
                except Exception:
                    raise Mha2mlaError(f"cannot read tensor {name!r} from {shard}: {str(e).splitlines()[0][:160]} (truncated or corrupt shard?)") from None
                raise KeyboardInterrupt from None  # the shard reads fine: the failed read was interrupted
        if name not in self._finite and t.is_floating_point():
            if not _all_finite(t):
                raise Mha2mlaError(f"source tensor {name!r} contains NaN or Inf values; refusing to convert a broken checkpoint")
            self._finite.add(name)
        return t

    def _read(self, shard: str, name: str) -> torch.Tensor:
        # Open per read: a cached handle keeps the whole shard memory-mapped, and every page touched so far counts
        # in the process's resident memory; reopening costs only the header parse.
        with safe_open(shard, framework="pt") as h:
            return h.get_tensor(name)


def _fail_unsupported(model_type: str, arch: str, reason: str | None = None) -> None:
    why = reason or _WHY_NOT.get(model_type, "its attention layout is not a Llama-style RoPE attention")
    raise UnsupportedSourceError(f"{arch or model_type} is not supported: {why}. mha2mla converts {_SUPPORTED}")


def validate_config(cfg: dict, name: str) -> dict:
    """Check a source config and return the attention geometry. Raises UnsupportedSourceError with one line."""
    if not isinstance(cfg, dict):
        raise Mha2mlaError(f"{name}: config.json is not a JSON object")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else ""
    if model_type not in SUPPORTED_ARCHITECTURES:
        _fail_unsupported(str(model_type), arch)
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise Mha2mlaError(f"{name}: config.json has no valid {key!r} (got {cfg.get(key)!r}); the config is malformed")
    if cfg.get("q_norm") or cfg.get("use_qk_norm") or cfg.get("qk_norm"):
        _fail_unsupported(model_type, arch, "it normalises queries and keys per head (q/k norms)")
    sw = cfg.get("sliding_window")
    if model_type == "mistral" and sw is not None:
        _fail_unsupported(model_type, arch, f"it uses sliding-window attention (sliding_window={sw}); MLA here is full attention")
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
        _fail_unsupported(model_type, arch, "it uses sliding-window attention (use_sliding_window=true)")
    if cfg.get("mlp_bias"):
        _fail_unsupported(model_type, arch, "its MLP has biases (mlp_bias=true), which DeepseekV3's MLP cannot hold")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        _fail_unsupported(model_type, arch, f"its MLP activation is {cfg.get('hidden_act')!r}, not SiLU")
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise Mha2mlaError(f"{name}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    if not cfg.get("head_dim") and cfg["hidden_size"] % n_heads:
        raise Mha2mlaError(f"{name}: hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads {n_heads} "
                           "and config.json gives no head_dim; the config is malformed")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    if head_dim % 2:
        raise Mha2mlaError(f"{name}: head_dim {head_dim} is odd; RoPE needs an even head dimension")
    rope = dict(cfg.get("rope_parameters") or {})
    if not rope:
        rope = dict(cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    rope.pop("type", None)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        _fail_unsupported(model_type, arch, f"its rope type {rope['rope_type']!r} is not one of {', '.join(SUPPORTED_ROPE_TYPES)}")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        _fail_unsupported(model_type, arch, f"it rotates only part of each head (partial_rotary_factor={cfg['partial_rotary_factor']})")
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    if not (0 < eps < 1) or math.isnan(eps):
        raise Mha2mlaError(f"{name}: rms_norm_eps {eps} is not a small positive number")
    attn_bias = bool(cfg.get("attention_bias", False))
    if model_type == "qwen2":
        bias = {"q": True, "k": True, "v": True, "o": False}
    else:
        bias = {"q": attn_bias, "k": attn_bias, "v": attn_bias, "o": attn_bias}
    return dict(
        n_layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
        eps=eps, rope=rope, bias=bias, tied=bool(cfg.get("tie_word_embeddings", False)),
    )


def _read_config(path: str, name: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise Mha2mlaError(f"{name}: no config.json; give a Hugging Face model directory, a hub id or a .gguf file")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Mha2mlaError(f"{name}: config.json is not valid JSON ({e}); the config is malformed") from None


def _index_safetensors(path: str, name: str) -> dict:
    index = os.path.join(path, "model.safetensors.index.json")
    files: dict[str, str] = {}
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise Mha2mlaError(f"{name}: model.safetensors.index.json is malformed ({e})") from None
        for tensor, shard in weight_map.items():
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise Mha2mlaError(f"{name}: the index names shard {shard!r}, which is missing; re-download the checkpoint")
            files[tensor] = shard_path
        shards = sorted(set(files.values()))
    else:
        shards = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not shards:
        pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickles:
            raise Mha2mlaError(
                f"{name}: weights only in pickle files ({', '.join(sorted(pickles)[:3])}); mha2mla never unpickles "
                "untrusted files — convert them to safetensors with a tool you trust first"
            )
        raise Mha2mlaError(f"{name}: no .safetensors weights found")
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as h:
                names = list(h.keys())
        except Exception as e:
            raise Mha2mlaError(f"{name}: cannot open {os.path.basename(shard)} ({str(e).splitlines()[0][:120]}); the shard is truncated or corrupt") from None
        if not os.path.isfile(index):
            for n in names:
                files[n] = shard
        elif not set(n for n, s in files.items() if s == shard) <= set(names):
            raise Mha2mlaError(f"{name}: {os.path.basename(shard)} lacks tensors that the index assigns to it")
    return files


def _resolve_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a transformers dependency
        raise Mha2mlaError(f"{repo_id!r} is not a local path and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Mha2mlaError(f"{repo_id!r} is not a local path and could not be fetched from the hub ({msg[:160]})") from None


def _load_gguf(file: str, name: str) -> tuple[dict, dict, torch.dtype]:
    if importlib.util.find_spec("gguf") is None:
        raise Mha2mlaError("reading .gguf sources needs the gguf package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, fname = os.path.split(os.path.abspath(file))
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    except Exception as e:
        raise Mha2mlaError(f"{name}: not a readable GGUF model ({str(e).splitlines()[0][:160]})") from None
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    validate_config(cfg, name)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    return cfg, dict(model.state_dict()), torch.float32


def load_source(source: str | os.PathLike) -> SourceModel:
    """Resolve and validate a source checkpoint.

    Args:
        source: local directory, hub id (``org/name``), or ``.gguf`` file.

    Raises:
        Mha2mlaError: missing, malformed, pickle-only or unsupported sources (one line naming what is supported).
    """
    name = os.fspath(source)
    memory = None
    gguf_ref = None
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise Mha2mlaError(f"source {name} does not exist")
        cfg, memory, dtype = _load_gguf(name, name)
        path = None
        gguf_ref = os.path.split(os.path.abspath(name))
    else:
        if os.path.isdir(name):
            path = name
        elif os.path.exists(name):
            raise Mha2mlaError(f"source {name} is a file; give a model directory, a hub id or a .gguf file")
        elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
            path = _resolve_hub(name)
        else:
            raise Mha2mlaError(f"source {name} does not exist (not a directory, .gguf file or hub id)")
        cfg = _read_config(path, name)
        validate_config(cfg, name)  # before touching weights: unsupported sources fail fast
        files = _index_safetensors(path, name)
        dtype = _stored_dtype(files)
    geo = validate_config(cfg, name)
    src = SourceModel(name=name, path=path, config=cfg, dtype=dtype, gguf=gguf_ref, **geo)
    if memory is not None:
        src._memory = memory
    else:
        src._files = files
    _check_tensors(src)
    return src


def _stored_dtype(files: dict) -> torch.dtype:
    name = next((n for n in files if n.endswith("q_proj.weight")), None) or next(iter(files))
    with safe_open(files[name], framework="pt") as h:
        return _DTYPES.get(h.get_slice(name).get_dtype(), torch.float32)


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _check_tensors(src: SourceModel) -> None:
    """Every tensor the conversion needs must be present before we start writing."""
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    if not src.tied:
        need.append("lm_head.weight")
    for i in range(src.n_layers):
        p = f"model.layers.{i}."
        need += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        need += [p + f"self_attn.{x}_proj.bias" for x in "qkvo" if src.bias[x]]
        need += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        need += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    missing = [n for n in need if not src.has(n)]
    if missing == ["lm_head.weight"]:
        src.tied = True  # some checkpoints omit a tied head even when the flag is unset
    elif missing:
        raise Mha2mlaError(f"source {src.name} lacks {len(missing)} tensor(s) it needs, e.g. {missing[0]!r}; the checkpoint is incomplete")
    # Anything else would be dropped without a word (e.g. q/k norms, a bias the config does not declare).
    known = set(need) | {"lm_head.weight"}
    unknown = [n for n in src.keys() if n not in known and not n.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise Mha2mlaError(f"source {src.name} has {len(unknown)} tensor(s) mha2mla does not know how to convert, e.g. "
                           f"{unknown[0]!r}; converting would drop them (is config.json right for these weights?)")


def _drop_auto_map(path: str) -> None:
    """Remove ``auto_map`` (a pointer to remote code, which is never copied) from a copied JSON config."""
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(cfg, dict) and cfg.pop("auto_map", None) is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")


def copy_tokenizer_files(src: SourceModel, out: str) -> None:
    """Copy the source's tokenizer and generation config next to the converted weights (``auto_map`` dropped: remote
    code is never copied)."""
    if src.path is not None:
        for n in TOKENIZER_FILES:
            f = os.path.join(src.path, n)
            if os.path.isfile(f):
                shutil.copyfile(f, os.path.join(out, n))
        _drop_auto_map(os.path.join(out, "tokenizer_config.json"))
    elif src.gguf is not None:
        from transformers import AutoTokenizer

        folder, fname = src.gguf
        AutoTokenizer.from_pretrained(folder, gguf_file=fname).save_pretrained(out)
