"""Peer of bench/tokenizers.lua's SentencePiece cases: the sentencepiece library's encode of a
model file (tokenizer.model), or transformers' MarianTokenizer for a Marian folder, over the same
text (the fixture's texts repeated 200 times, joined by spaces), best of 5 after a warm-up. Prints
one JSON object."""
import json
import os
import sys
import time

d = sys.argv[1]
exp = json.load(open(d + "/expected.json"))
text = " ".join(c["text"] for _ in range(200) for c in exp["cases"] if "text" in c)
if os.path.exists(d + "/tokenizer.model"):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=d + "/tokenizer.model")
    encode, peer = (lambda: sp.encode(text)), "sentencepiece " + spm.__version__
else:
    import transformers
    from transformers import MarianTokenizer
    tok = MarianTokenizer.from_pretrained(d)
    encode, peer = (lambda: tok(text)["input_ids"]), "transformers MarianTokenizer " + transformers.__version__
ids = encode()
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter()
    ids = encode()
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"best_s": best, "bytes": len(text.encode()), "peer": peer,
                  "ids_hash": f"{len(ids)}:{ids[-1]}:{ids[len(ids) // 2 - 1]}"}))
