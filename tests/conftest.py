"""Shared test fixtures and helpers (one copy each, imported as ``from tests.conftest import ...``).

- tiny random source checkpoints written to disk like real ones (:func:`build_source`, ``tiny_source``);
- calibrated conversions measured against their source (:func:`held_out_error`, :func:`first_layer`);
- the command line run as a user runs it, in a subprocess (:func:`run_cli`, :func:`assert_user_error`);
- tiny DeepseekV3 checkpoints for heal, check and eval, and the assets built once per session.

Nothing here imports mha2mla at module level: ``benchmarks/identity.py`` loads this file on its own for
:func:`build_source`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

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


# --- conversions and what they are measured by ------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> str:
    """Calibration text: :data:`CORPUS` 40 times, in a file."""
    path = tmp_path / "calib.txt"
    path.write_text(CORPUS * 40)
    return str(path)


def held_out_error(src_dir: str, out: str) -> float:
    """Relative logit error of the converted model ``out`` against its source on 64 tokens of :data:`CORPUS`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src_dir)
    ids = torch.tensor([tok(CORPUS * 2)["input_ids"][7:71]])
    outs = []
    for path in (src_dir, out):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            outs.append(m(ids).logits)
    return ((outs[1] - outs[0]).norm() / outs[0].norm()).item()


def logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    """The float32 logits of the checkpoint at ``path`` (stock transformers, no remote code) on ``ids``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        return model(ids).logits


def token_ids(*, vocab: int = 97, batch: int = 2, length: int = 24, low: int = 3) -> torch.Tensor:
    """``[batch, length]`` random token ids in ``low..vocab-1`` (seed 1)."""
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def tiny_plan(tiny_source, *, n_kv=2, head_dim=16, rank=12, rope_dim=8, seed=3, **kw):
    """A tiny source (loaded) and its float32 conversion plan."""
    from mha2mla.checkpoint.source import load_source
    from mha2mla.conversion.plan import make_plan

    src = load_source(tiny_source(n_kv=n_kv, head_dim=head_dim, seed=seed, **kw))
    return src, make_plan(source=src, rank=rank, rope_dim=rope_dim, rope_stride=None, dtype="float32")


def corpus_tokens(src, tmp_path, *, samples: int, length: int) -> torch.Tensor:
    """``[samples, length]`` calibration tokens of :data:`CORPUS` (20 times, written to ``tmp_path/c.txt``)."""
    from mha2mla.conversion.stream import calibration_tokens

    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 20)
    return calibration_tokens(source=src, data=str(corpus), samples=samples, length=length)


def first_layer(src, plan, tokens):
    """Layer 0 converted with calibration (default method, no query or output fit), in float64, and what measures it:
    ``(source weights, tensors, x, source angles, MLA angles)``."""
    from mha2mla.conversion.latent import convert_attention
    from mha2mla.conversion.layer import read_layer
    from mha2mla.conversion.options import Method
    from mha2mla.conversion.stream import Propagation
    from mha2mla.ops.rope import kept_frequencies

    attn, rest = read_layer(src, 0, torch.float64)
    prop = Propagation(source=src, tokens=tokens)
    calib = prop.layer_calibration(0)
    bound = math.sqrt(plan.hidden) * float(rest["input_layernorm.weight"].abs().max())
    tensors, _ = convert_attention(plan=plan, weights=attn, input_norm_bound=bound, calib=calib, method=Method())
    x = torch.cat(list(prop.inputs(0))).double()
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * calib.inv_freq
    mla_angles = angles[:, kept_frequencies(head_dim=plan.head_dim, rope_dim=plan.rope_dim, stride=plan.rope_stride)]
    return attn, tensors, x, angles, mla_angles


# --- the command line, as a user runs it ------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread per process: tiny matrices, two shared cores (threads only add contention), and no hub access.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny matrices: threads only add overhead and contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(*args, cwd=None, timeout=120, env=None) -> subprocess.CompletedProcess:
    """``python -m mha2mla ARGS`` in a subprocess (so that a traceback would show on stderr)."""
    return subprocess.run([sys.executable, "-m", "mha2mla", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, cwd=cwd or ROOT, timeout=timeout)


def convert_cli(src, out, *extra) -> subprocess.CompletedProcess:
    """``mha2mla convert SRC --output OUT --rank 8 -q EXTRA``."""
    return run_cli("convert", src, "--output", out, "--rank", 8, "-q", *extra)


def slow_cli(module: str, name: str, *, first: str = "") -> str:
    """A ``python -c`` script: the CLI with ``module.name`` slowed down by a minute per call (``first``: a statement
    each call runs before it sleeps), so that a signal reliably lands inside it. Its arguments follow the script."""
    return (f"import time\nimport {module} as c\nreal = c.{name}\n"
            f"def slow(*a, **kw):\n    {first}\n    time.sleep(60)\n    return real(*a, **kw)\n"
            f"c.{name} = slow\nfrom mha2mla.cli import main\nmain(prog_name='mha2mla')\n")


def leftovers(out) -> list[str]:
    """The temporary siblings (``.OUT.*``) a run left beside ``out``."""
    parent, name = os.path.split(os.path.abspath(out))
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def assert_user_error(r: subprocess.CompletedProcess, phrase: str, out=None) -> str:
    """A failed run with exactly one ``error: ...`` line on stderr containing ``phrase``, no traceback, and (given
    ``out``) nothing at ``out`` nor beside it. Returns the line."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: ") and phrase in line, line
    if out is not None:
        assert not os.path.exists(out), os.listdir(out)
        assert leftovers(out) == []
    return line


def tree(root) -> dict:
    """Every file under ``root`` with its size and mtime: 'the same files on disk as before'."""
    out = {}
    for d, _, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Sources built once for the whole session (tests copy what they damage): ``src`` (2 KV heads), ``sharded``
    (the same in 20 KB shards), ``text`` (calibration/training text) and their ``root``."""
    root = tmp_path_factory.mktemp("sources")
    (root / "text.txt").write_text(CORPUS * 20)
    return {
        "root": root,
        "src": build_source(root / "src", n_kv=2),
        "sharded": build_source(root / "sharded", n_kv=2, max_shard_size="20KB"),
        "text": str(root / "text.txt"),
    }


@pytest.fixture(scope="session")
def mla(sources) -> str:
    """A converted (MLA) checkpoint of ``sources["src"]`` at rank 16, for heal and eval; tests copy what they damage."""
    import mha2mla

    out = sources["root"] / "mla"
    mha2mla.convert(source=sources["src"], output=str(out), rank=16, progress=False)
    return str(out)


def copy_source(sources: dict, tmp_path, which: str = "src") -> str:
    """A copy of ``sources[which]`` under ``tmp_path`` (to damage)."""
    import shutil

    dst = tmp_path / which
    shutil.copytree(sources[which], dst)
    return str(dst)


# --- tiny DeepseekV3 checkpoints: heal ----------------------------------------------------------------------------

HEAL_SENTENCES = [
    "the quick brown fox jumps over the lazy dog .",
    "a latent attention model compresses keys and values into a small cache .",
    "healing a converted model recovers most of the lost quality .",
    "multi head latent attention caches one latent vector per token .",
]
# A short, fast heal run.
HEAL_FAST = dict(seq_len=16, micro_batch_size=2, lr=3e-3, log_every=100)
# The latent scale α, norm eps and rank of :func:`tiny_mla`.
TINY_MLA_ALPHA, TINY_MLA_EPS, TINY_MLA_RANK = 2.0**-12, 1e-6, 16


def heal_tokenizer():
    """A word-level tokenizer trained on :data:`HEAL_SENTENCES` (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(HEAL_SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_mla(path, *, seed: int = 0, vocab_extra: int = 0, tied_scale: float | None = None) -> str:
    """A random tiny DeepseekV3 with the converter's linear latent norm (latent rows × α, norm weight sqrt(eps)/α),
    its tokenizer, a model card and a record: it looks converted. With ``tied_scale`` s it looks converted from a
    tied source: the embedding is s × the head and the record's residual scale is s."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    alpha, eps, rank = TINY_MLA_ALPHA, TINY_MLA_EPS, TINY_MLA_RANK
    tok = heal_tokenizer()
    cfg = DeepseekV3Config(
        vocab_size=len(tok) + vocab_extra, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=rank,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=2, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, rms_norm_eps=eps,
        max_position_embeddings=1024, eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_a_proj_with_mqa.weight[:rank] *= alpha
            layer.self_attn.kv_a_layernorm.weight.fill_(math.sqrt(eps) / alpha)
        if tied_scale is not None:
            model.model.embed_tokens.weight.copy_(model.lm_head.weight * tied_scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("# tiny converted model\n")
    with open(os.path.join(path, "mha2mla.json"), "w") as f:
        record = {"format": "test", "options": {"rank": rank}}
        json.dump(record if tied_scale is None else {**record, "plan": {"residual_scale": tied_scale}}, f)
    return str(path)


@pytest.fixture(scope="session")
def heal_assets(tmp_path_factory):
    """Tiny converted-looking models (``model``, ``teacher``, ``bad_teacher`` with 5 more logits), training text
    (``text``) and an empty file (``empty``), built once."""
    root = tmp_path_factory.mktemp("heal")
    text = root / "train.txt"
    text.write_text(" ".join(HEAL_SENTENCES * 12))
    (root / "empty.txt").write_text("   \n")
    return {
        "root": root,
        "model": tiny_mla(root / "mla"),
        "teacher": tiny_mla(root / "teacher", seed=1),
        "bad_teacher": tiny_mla(root / "bad_teacher", seed=2, vocab_extra=5),
        "text": str(text),
        "empty": str(root / "empty.txt"),
    }


def frozen_model(path):
    """The checkpoint at ``path`` in float32, eval mode, without gradients."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def mla_config(vocab: int = 53, **kw):
    """A tiny DeepseekV3 config whose query/key heads (16 + 8) are wider than its value heads (16), as in every
    converted checkpoint."""
    from transformers import DeepseekV3Config

    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=2, n_routed_experts=2, n_shared_experts=1,
                num_experts_per_tok=1, n_group=1, topk_group=1, max_position_embeddings=256, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return DeepseekV3Config(**{**base, **kw})


def random_mla(seed: int = 0, **kw):
    """A float32 DeepseekV3 of :func:`mla_config` with weights 4× the init's, so that logits and KL are far from
    uniform."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(mla_config(**kw)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.ndim >= 2 else None
    return model


# --- tiny DeepseekV3 checkpoints: check and portability ----------------------------------------------------------


def small_mla_config(**overrides):
    """A tiny DeepseekV3 config at 16+8 (not a shape vLLM's MLA kernels take)."""
    from transformers import DeepseekV3Config

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
              v_head_dim=16, first_k_dense_replace=2, n_routed_experts=4, rope_interleave=True, rms_norm_eps=1e-6,
              max_position_embeddings=128)
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def save_small_mla(path, max_shard_size=None, **overrides) -> str:
    """A random :func:`small_mla_config` checkpoint (seed 0) saved to ``path``."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(small_mla_config(**overrides))
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return str(path)


# --- eval -------------------------------------------------------------------------------------------------------

EVAL_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sat on the mat and looked at the warm sun.",
    "Question: What is water made of? Answer: hydrogen and oxygen.",
    "Plants use sunlight to make food from water and air.",
]
# A tiny multiple-choice lm-eval task over a local JSON file (``.format(data=PATH)``).
TASK_YAML = """task: tiny_mc_local
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {data}}}}}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""


def eval_tokenizer():
    """A byte-level BPE tokenizer trained on :data:`EVAL_SENTENCES` (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(EVAL_SENTENCES * 3, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


@pytest.fixture(scope="session")
def eval_assets(tmp_path_factory):
    """A tiny Llama (the "source"), a tiny DeepseekV3 (the "converted"), a task directory and a text file."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("eval")
    tok = eval_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    conv = DeepseekV3ForCausalLM(DeepseekV3Config(
        num_key_value_heads=4, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        first_k_dense_replace=2, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, **common))
    for name, model in (("source", src), ("converted", conv)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    tasks = root / "tasks"
    tasks.mkdir()
    docs = [{"question": f"What is {w}?", "choices": {"text": ["water", "the sun", "a cat"], "label": ["A", "B", "C"]},
             "answerKey": "ABC"[i % 3]} for i, w in enumerate(["rain", "light", "a pet", "ice", "a star", "a dog"])]
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "tiny_mc_local.yaml").write_text(TASK_YAML.format(data=tasks / "tiny.jsonl"))
    text = root / "wiki.test.txt"
    text.write_text(" ".join(EVAL_SENTENCES * 6) + "\n")
    return {"root": root, "source": str(root / "source"), "converted": str(root / "converted"), "tasks": str(tasks),
            "text": str(text), "tokenizer": tok, "models": {"source": src, "converted": conv}}


def direct_perplexity(model, tok, text, ctx, max_tokens):
    """Mean NLL, predicted tokens and bytes of ``text`` in non-overlapping windows of ``ctx``, from the model's own
    loss: what :func:`mha2mla.eval.perplexity.perplexity` must reproduce."""
    from mha2mla.data import pack_tokens

    tokens = pack_tokens(tok, [text], max_tokens=max_tokens)
    total, n, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for w in tokens.split(ctx):
            if w.numel() < 2:
                continue
            total += float(model(input_ids=w[None], labels=w[None]).loss) * (w.numel() - 1)
            n += w.numel() - 1
            n_bytes += len(tok.decode(w, skip_special_tokens=True).encode()) - len(tok.decode(w[:1]).encode())
    return total / n, n, n_bytes
