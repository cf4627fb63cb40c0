"""quick: 1024-probe ppl and position ppl (2 windows of 4096) for each model dir."""
import sys, torch, json, time
torch.set_num_threads(int(__import__("os").environ.get("T", "2")))
from transformers import AutoModelForCausalLM, AutoTokenizer
from mha2mla.data import load_texts, pack_tokens
from mha2mla.eval.perplexity import perplexity
from mha2mla.eval.long_context import position_perplexity
texts = load_texts("/work/assets/text/enwiki.test.txt")
for path in sys.argv[1:]:
    t0 = time.time()
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval(); t = AutoTokenizer.from_pretrained(path)
    r = perplexity(model=m, tokenizer=t, text=texts, ctx=1024, max_tokens=16384)
    tokens = pack_tokens(t, texts, max_tokens=8192)
    p = position_perplexity(model=m, tokens=tokens, window=4096, windows=2)
    print(path, "probe1024 %.3f" % r.ppl, "buckets", " ".join(f"{b['start']}-{b['end']}:{b['ppl']:.2f}" for b in p.buckets), f"{time.time()-t0:.0f}s", flush=True)
