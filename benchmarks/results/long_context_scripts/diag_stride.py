import sys, torch, time
torch.set_num_threads(1)
from mha2mla.source import load_source
from mha2mla.calibration import calibrate, calibration_tokens
from mha2mla.conversion import _choose_stride
from mha2mla.plan import make_plan
from mha2mla.attention import Method
from mha2mla.rope import expected_rotation
src = load_source("/work/assets/models/smollm2-135m")
for n, L in [(2, 512), (1, 4096)]:
    t0=time.time()
    tok = calibration_tokens(source=src, data="/work/assets/text/enwiki.train.txt", samples=n, length=L)
    pre = calibrate(source=src, tokens=tok, value_contexts=False, progress=False)
    plan = make_plan(source=src, rank=96, rope_dim=32, rope_stride=None, dtype="auto")
    plan2, shares = _choose_stride(src, plan, pre, Method(), 32, "auto", 96)
    print(n, L, "stride", plan2.rope_stride, shares, f"{time.time()-t0:.0f}s", flush=True)
    # distance distribution summary: attention mass beyond 512 / 1024
    h = torch.stack([c.distance_hist.sum(0) for c in pre]).sum(0); h = h / h.sum()
    cum = h.cumsum(0)
    print("  mass at Δ<16 %.3f <128 %.3f <512 %.3f" % (cum[15], cum[min(127,len(cum)-1)], cum[min(511,len(cum)-1)]))
    inv = pre[0].inv_freq
    rho = torch.stack([expected_rotation(distance_hist=c.distance_hist, inv_freq=inv).abs().mean(0) for c in pre]).mean(0)
    print("  |rho| per freq j:", " ".join(f"{j}:{float(r):.2f}" for j, r in enumerate(rho)), flush=True)
    torch.save({"hist": [c.distance_hist for c in pre]}, f"/tmp/lc/hist_{n}x{L}.pt")
