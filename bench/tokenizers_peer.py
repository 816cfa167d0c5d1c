"""Peer of bench/tokenizers.lua: Hugging Face tokenizers' encode of the same text (the fixture's
texts repeated 200 times, joined by spaces), best of 5 after a warm-up; the file's own padding and
truncation off, as transformers leaves them. Prints one JSON object."""
import json
import sys
import time

import tokenizers
from tokenizers import Tokenizer

d = sys.argv[1]
tok = Tokenizer.from_file(d + "/tokenizer.json")
tok.no_padding()
tok.no_truncation()
exp = json.load(open(d + "/expected.json"))
text = " ".join(c["text"] for _ in range(200) for c in exp["cases"])
ids = tok.encode(text).ids
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter()
    ids = tok.encode(text).ids
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"best_s": best, "bytes": len(text.encode()), "tokenizers": tokenizers.__version__,
                  "ids_hash": f"{len(ids)}:{ids[-1]}:{ids[len(ids) // 2 - 1]}"}))
