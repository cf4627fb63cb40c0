"""position ppl on 1 window of 8192 + passkey at 4096 for each model dir."""
import sys, torch, time, os
torch.set_num_threads(int(os.environ.get("T", "2")))
from transformers import AutoModelForCausalLM, AutoTokenizer
from mha2mla.data import load_texts, pack_tokens
from mha2mla.eval.long_context import position_perplexity, passkey_retrieval
texts = load_texts("/work/assets/text/enwiki.test.txt")
for path in sys.argv[1:]:
    t0 = time.time()
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval(); t = AutoTokenizer.from_pretrained(path)
    tokens = pack_tokens(t, texts, max_tokens=8192 * 2)
    p = position_perplexity(model=m, tokens=tokens, window=8192, windows=int(os.environ.get("W", "1")))
    print(path, "w8192", " ".join(f"{b['start']}-{b['end']}:{b['ppl']:.2f}" for b in p.buckets), f"{time.time()-t0:.0f}s", flush=True)
    for n in [int(v) for v in os.environ.get("PK", "").split(",") if v]:
        r = passkey_retrieval(model=m, tokenizer=t, length=n, trials=10, seed=0)
        print(path, "passkey", n, f"{r.correct}/{r.trials}", f"{time.time()-t0:.0f}s", flush=True)
