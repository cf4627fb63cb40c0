import time, torch
torch.set_num_threads(1)
from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.stream import calibrate, calibration_tokens
src = load_source("/work/assets/models/smollm2-135m")
for n, L in [(2, 512), (1, 4096)]:
    tok = calibration_tokens(source=src, data="/work/assets/text/enwiki.train.txt", samples=n, length=L)
    c0, w0 = time.process_time(), time.time()
    pre = calibrate(source=src, tokens=tok, value_contexts=False, progress=False)
    print(f"pre-pass {n}x{L}: cpu {time.process_time()-c0:.1f} s, wall {time.time()-w0:.1f} s (1 thread)", flush=True)
    del pre
