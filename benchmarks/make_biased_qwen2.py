"""Build a Qwen2-architecture model with learned attention biases, to check the converter's defaults on a biased source
family it was not tuned on (no Qwen2 checkpoint is reachable offline here).

SmolLM2-135M's weights go into ``Qwen2ForCausalLM`` (q/k/v projections with biases, zero-initialised); then only the
biases are trained (Adam) on ``enwiki.train``, everything else frozen::

    python benchmarks/make_biased_qwen2.py --assets /work/assets --out /tmp/qwen2-biased          # ~2.5 min, 2 cores
    python benchmarks/quality.py --assets /work/assets --source /tmp/qwen2-biased --tasks= \
        --calibration /work/assets/text/enwiki.train.txt --budgets 96+32,32+32

It is a proxy: real Qwen2 models have far larger key biases than ~30 steps of training give.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default=os.environ.get("MHA2MLA_ASSETS", os.path.expanduser("~/.cache/mha2mla-assets")))
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    src = os.path.join(args.assets, "models", "smollm2-135m")
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    c = llama.config
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
                      tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
                      eos_token_id=c.eos_token_id, use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    if unexpected or not all(k.endswith(".bias") for k in missing):
        raise SystemExit(f"unexpected weight names: missing {missing}, unexpected {unexpected}")
    del llama
    biases = [model.get_parameter(k) for k in missing]
    for prm in model.parameters():
        prm.requires_grad_(False)
    for b in biases:
        b.data.zero_()
        b.requires_grad_(True)
    tok = AutoTokenizer.from_pretrained(src)
    with open(os.path.join(args.assets, "text", "enwiki.train.txt"), encoding="utf-8") as f:
        ids = tok(f.read(3_000_000), return_tensors="pt").input_ids[0]
    opt = torch.optim.Adam(biases, lr=args.lr)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        start = torch.randint(0, ids.numel() - args.seq_len - 1, (args.batch,)).tolist()
        x = torch.stack([ids[o : o + args.seq_len] for o in start])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            rms = float(torch.cat([b.detach().flatten() for b in biases]).pow(2).mean().sqrt())
            print(f"step {step} loss {loss.item():.4f} bias rms {rms:.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    k_max = max(float(layer.self_attn.k_proj.bias.detach().abs().max()) for layer in model.model.layers)
    print(f"wrote {args.out}: Qwen2ForCausalLM, {len(biases)} bias tensors, max |k bias| {k_max:.3f}")


if __name__ == "__main__":
    main()
