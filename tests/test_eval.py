"""`mha2mla eval`, the evaluate API and perplexity, on tiny random models and a tiny local lm-eval task."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from mha2mla import evaluate as ev
from mha2mla.cli import main
from mha2mla.data import pack_tokens
from mha2mla.errors import Mha2mlaError
from mha2mla.eval_report import recovery, render_markdown
from mha2mla.eval_tasks import resolve_tasks
from mha2mla.perplexity import perplexity

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sat on the mat and looked at the warm sun.",
    "Question: What is water made of? Answer: hydrogen and oxygen.",
    "Plants use sunlight to make food from water and air.",
]
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


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama (the "source"), a tiny DeepseekV3 (the "converted"), a task directory and a text file."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("eval")
    tok = _tokenizer()
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
    text.write_text(" ".join(SENTENCES * 6) + "\n")
    return {"root": root, "source": str(root / "source"), "converted": str(root / "converted"), "tasks": str(tasks),
            "text": str(text), "tokenizer": tok, "models": {"source": src, "converted": conv}}


def _direct_ppl(model, tok, text, ctx, max_tokens):
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


def test_perplexity_matches_direct_loss(assets):
    model, tok = assets["models"]["source"], assets["tokenizer"]
    text = open(assets["text"]).read()
    r = perplexity(model=model, tokenizer=tok, text=text, ctx=16, max_tokens=70, batch_size=2)
    nll, n, n_bytes = _direct_ppl(model, tok, text, 16, 70)
    assert (r.tokens, r.windows, r.ctx, r.bytes) == (n, 5, 16, n_bytes)  # 4 full windows + one of 6 tokens
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(nll * n / math.log(2) / n_bytes, rel=1e-5)
    again = perplexity(model=model, tokenizer=tok, tokens=pack_tokens(tok, [text]), ctx=16, max_tokens=70)
    assert again.nll == pytest.approx(r.nll, rel=1e-5) and again.tokens == r.tokens


def test_perplexity_rejects_bad_arguments(assets):
    model, tok = assets["models"]["source"], assets["tokenizer"]
    with pytest.raises(Mha2mlaError, match="max_position_embeddings 128"):
        perplexity(model=model, tokenizer=tok, text="hello", ctx=4096)
    with pytest.raises(Mha2mlaError, match="at least 2 tokens"):
        perplexity(model=model, tokenizer=tok, tokens=torch.tensor([1]), ctx=16)


def test_recovery_direction():
    assert recovery(0.5, 0.4, higher_is_better=True) == pytest.approx(80.0)
    assert recovery(10.0, 12.5, higher_is_better=False) == pytest.approx(80.0)
    assert recovery(0.0, 0.4, higher_is_better=True) is None


def test_local_tasks_win_over_builtin_names(tmp_path):
    """`arc_easy` resolves to a local `arc_easy_local` (offline) even though lm-eval has a built-in `arc_easy`."""
    (tmp_path / "arc_easy_local.yaml").write_text(TASK_YAML.replace("tiny_mc_local", "arc_easy_local").format(data="x"))
    mapping, tm = resolve_tasks(names=["arc_easy"], include_path=str(tmp_path))
    assert mapping == {"arc_easy": "arc_easy_local"} and tm.all_tasks == ["arc_easy_local"]


def _eval_args(assets, *extra):
    return ["eval", assets["converted"], "--tasks", "tiny_mc", "--include-path", assets["tasks"], "--limit", "4",
            "--ppl-data", assets["text"], "--ppl-tokens", "70", "--ppl-ctx", "16", "--device", "cpu",
            "--batch-size", "2", "--cache-dir", str(assets["root"] / "cache"), *extra]


def test_eval_cli_table_json_plot_and_cache(assets, monkeypatch):
    out, png = assets["root"] / "results.json", assets["root"] / "recovery.png"
    args = _eval_args(assets, "--baseline", assets["source"], "--output", str(out), "--plot", str(png))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + res.stderr
    lines = res.stdout.strip().splitlines()
    assert all(line.startswith("|") for line in lines), res.stdout  # stdout holds the table only
    assert lines[0] == "| task | metric | source | converted | Δ | recovery % |"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[:2] for c in cells] == [
        ["tiny_mc (tiny_mc_local)", "acc"], ["tiny_mc (tiny_mc_local)", "acc_norm"],
        ["ppl: wiki.test.txt", "ppl"], ["ppl: wiki.test.txt", "bits_per_byte"],
        ["KV cache", "KV values/token/layer"], ["KV cache", "KV bytes @4k ctx"]]
    assert cells[4][2:5] == ["32", "12", "-20"]  # Llama 2·2·8 vs MLA 8+4
    assert "tiny_mc_local" in res.stderr and png.read_bytes()[:4] == b"\x89PNG"

    result = json.loads(out.read_text())
    s = result["settings"]
    assert (s["limit"], s["ppl_tokens"], s["ppl_ctx"], s["seed"], s["dtype"]) == (4, 70, 16, 1234, "float32")
    assert s["resolved_tasks"] == {"tiny_mc": "tiny_mc_local"} and s["versions"]["lm_eval"]
    for row in result["rows"][:4]:
        assert all(math.isfinite(row[k]) for k in ("source", "converted", "delta", "recovery")), row
    assert result["tasks"]["tiny_mc"]["converted"]["n_samples"]["effective"] == 4
    assert result["models"]["source"]["kv"]["bytes"] == 32 * 2 * 4096 * 2
    assert result["cache"] == {"dir": str(assets["root"] / "cache"), "hits": 0, "misses": 4}
    for role in ("source", "converted"):
        nll, n, _ = _direct_ppl(assets["models"][role], assets["tokenizer"], open(assets["text"]).read(), 16, 70)
        assert result["perplexity"][role]["nll"] == pytest.approx(nll, rel=1e-4)
        assert result["perplexity"][role]["tokens"] == n

    # Second run: everything from the cache, neither lm-eval nor a model load.
    def boom(*a, **k):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(ev, "run_lm_eval", boom)
    monkeypatch.setattr(ev, "_load_model", boom)
    again = CliRunner().invoke(main, _eval_args(assets, "--baseline", assets["source"]))
    assert again.exit_code == 0, again.output + again.stderr
    assert again.stdout == res.stdout
    # The model alone (no baseline) reuses its own cached results too.
    alone = ev.evaluate(model=assets["converted"], tasks="tiny_mc", include_path=assets["tasks"], limit=4,
                        ppl_data=assets["text"], ppl_tokens=70, ppl_ctx=16, batch_size=2,
                        cache_dir=str(assets["root"] / "cache"))
    assert alone["cache"]["hits"] == 2 and list(alone["models"]) == ["converted"]
    table = render_markdown(alone).splitlines()
    assert table[0] == "| task | metric | model |" and len(table) == 8


@pytest.mark.parametrize("case, expect", [
    ("missing_include", "include path"),
    ("bad_model", "cannot load model"),
    ("no_model_dir", "is not a directory"),
    ("missing_ppl", "does not exist"),
    ("unknown_task", "unknown task 'no_such_task_xyz'"),
])
def test_eval_errors_are_one_line(assets, case, expect):
    bad = assets["root"] / "bad_model"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text('{"model_type": "not_a_real_arch"}')
    args = {
        "missing_include": ["eval", assets["converted"], "--tasks", "tiny_mc",
                            "--include-path", str(assets["root"] / "nope")],
        "bad_model": ["eval", str(bad), "--tasks", ""],
        "no_model_dir": ["eval", assets["converted"], "--baseline", str(assets["root"] / "missing"), "--tasks", ""],
        "missing_ppl": ["eval", assets["converted"], "--tasks", "", "--ppl-data", str(assets["root"] / "nope.txt")],
        "unknown_task": ["eval", assets["converted"], "--tasks", "no_such_task_xyz", "--include-path", assets["tasks"]],
    }[case]
    res = CliRunner().invoke(main, args + ["--quiet", "--cache-dir", str(assets["root"] / "cache-err")])
    assert res.exit_code != 0
    assert res.stdout == ""
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], res.stderr
    assert "Traceback" not in res.output + res.stderr
