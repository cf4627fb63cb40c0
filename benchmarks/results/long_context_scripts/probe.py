import sys, torch, json
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
from mha2mla.data import load_texts
from mha2mla.eval.perplexity import perplexity
for path in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(); t = AutoTokenizer.from_pretrained(path)
    r = perplexity(model=m, tokenizer=t, text=load_texts("/work/assets/text/enwiki.test.txt"), ctx=1024, max_tokens=16384)
    print(path, "probe1024 ppl %.3f" % r.ppl, flush=True)
