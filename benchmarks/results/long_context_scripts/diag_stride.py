import sys, torch, time
torch.set_num_threads(1)
from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.stream import calibrate, calibration_tokens
from mha2mla.conversion.schedule import choose_rope_stride
from mha2mla.conversion.latent import rope_frequency_scores
from mha2mla.conversion.layer import read_layer
from mha2mla.conversion.plan import make_plan
from mha2mla import Method
from mha2mla.ops.rope import expected_rotation
src = load_source("/work/assets/models/smollm2-135m")
for n, L in [(2, 512), (1, 4096)]:
    t0=time.time()
    tok = calibration_tokens(source=src, data="/work/assets/text/enwiki.train.txt", samples=n, length=L)
    pre = calibrate(source=src, tokens=tok, value_contexts=False, progress=False)
    plan = make_plan(source=src, rank=96, rope_dim=32, rope_stride=None, dtype="auto")
    scores = sum(rope_frequency_scores(weights=read_layer(src, i, torch.float64)[0], calib=c, n_heads=plan.n_heads,
                                       n_kv=plan.n_kv, head_dim=plan.head_dim, method=Method()) for i, c in enumerate(pre))
    stride, shares = choose_rope_stride(scores=scores, head_dim=plan.head_dim, rope_dim=plan.rope_dim)
    print(n, L, "stride", stride, shares, f"{time.time()-t0:.0f}s", flush=True)
    # distance distribution summary: attention mass beyond 512 / 1024
    h = torch.stack([c.distance_hist.sum(0) for c in pre]).sum(0); h = h / h.sum()
    cum = h.cumsum(0)
    print("  mass at Δ<16 %.3f <128 %.3f <512 %.3f" % (cum[15], cum[min(127,len(cum)-1)], cum[min(511,len(cum)-1)]))
    inv = pre[0].inv_freq
    rho = torch.stack([expected_rotation(distance_hist=c.distance_hist, inv_freq=inv).abs().mean(0) for c in pre]).mean(0)
    print("  |rho| per freq j:", " ".join(f"{j}:{float(r):.2f}" for j, r in enumerate(rho)), flush=True)
    torch.save({"hist": [c.distance_hist for c in pre]}, f"/tmp/lc/hist_{n}x{L}.pt")
