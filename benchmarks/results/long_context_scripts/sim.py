"""Source SmolLM2 with only some RoPE planes rotating (the rest unrotated, q folded by conj(rho)): isolates the RoPE
schedule's cost at long range from the latent's."""
import sys, json, time, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama as ml
from mha2mla.ops.rope import expected_rotation, kept_frequencies
from mha2mla.data import load_texts, pack_tokens
from mha2mla.eval.long_context import position_perplexity, passkey_retrieval
stride, hist_file, tag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
passkeys = [int(x) for x in sys.argv[4].split(",") if x] if len(sys.argv) > 4 else [4096]
SRC = "/work/assets/models/smollm2-135m"
m = AutoModelForCausalLM.from_pretrained(SRC, attn_implementation="sdpa").eval(); tok = AutoTokenizer.from_pretrained(SRC)
hd, half, nh = 64, 32, 9
drop = torch.ones(half, dtype=torch.bool)
if stride < 0:  # explicit kept set from KEPT env, e.g. "0-11,16-19"
    import os
    for part in os.environ["KEPT"].split(","):
        a, _, b = part.partition("-"); drop[int(a): int(b or a) + 1] = False
elif stride > 0:
    drop[kept_frequencies(head_dim=hd, rope_dim=32, stride=stride)] = False
else:
    drop[:] = False
mask = torch.cat((drop, drop))
orig = ml.apply_rotary_pos_emb
def patched(q, k, cos, sin, unsqueeze_dim=1):
    qr, kr = orig(q, k, cos, sin, unsqueeze_dim)
    return torch.where(mask, q, qr), torch.where(mask, k, kr)
ml.apply_rotary_pos_emb = patched
inv = 1.0 / (1e5 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
if hist_file != "none":
    hists = torch.load(hist_file)["hist"]
    for i, layer in enumerate(m.model.layers):
        rho = expected_rotation(distance_hist=hists[i], inv_freq=inv)  # [nh, 32]
        f = torch.where(drop, rho.conj(), torch.ones_like(rho)).to(torch.complex64)
        def hook(mod, inp, out, f=f):
            o = out.view(*out.shape[:-1], nh, hd)
            z = torch.complex(o[..., :half], o[..., half:]) * f
            return torch.cat((z.real, z.imag), -1).view_as(out)
        layer.self_attn.q_proj.register_forward_hook(hook)
tokens = pack_tokens(tok, load_texts("/work/assets/text/enwiki.test.txt"), max_tokens=8192)
t0 = time.time()
r = position_perplexity(model=m, tokens=tokens, window=4096, windows=2)
print(tag, "stride", stride, "hist", hist_file, "buckets", " ".join(f"{b['start']}-{b['end']}:{b['ppl']:.2f}" for b in r.buckets), f"{time.time()-t0:.0f}s", flush=True)
res = {"positions": r.to_dict(), "passkey": []}
for n in passkeys:
    p = passkey_retrieval(model=m, tokenizer=tok, length=n, trials=10, seed=0)
    res["passkey"].append(p.to_dict())
    print(tag, "passkey", n, f"{p.correct}/{p.trials}", f"{time.time()-t0:.0f}s", flush=True)
json.dump(res, open(f"/tmp/lc/sim_{tag}.json", "w"))
