#!/opt/ref/bin/python
"""sentence-transformers peer for bench/cross_encoder.lua: CrossEncoder loaded from the folder the
Lua side saved (ms-marco-MiniLM-L-6-v2's shape, random weights, all-MiniLM-L6-v2's tokenizer),
predict over the same pairs (its pairs.json), tokenizing included, best of R. Prints one JSON
object with the scores (compared there).

Usage: python bench/cross_encoder_peer.py --dir DIR [--threads N] [--repeats R]
"""
import json
import os

import torch
import sentence_transformers
from sentence_transformers import CrossEncoder

from peerutil import best, parse


def main():
    a = parse(dir="")
    pairs = json.load(open(os.path.join(a.dir, "pairs.json")))
    ce = CrossEncoder(a.dir, device="cpu")
    out = {}

    def go():
        out["scores"] = ce.predict(pairs, batch_size=32)

    print(json.dumps({"peer": "sentence-transformers", "torch": torch.__version__,
                      "sentence_transformers": sentence_transformers.__version__, "threads": a.threads,
                      "predict_s": best(a.repeats, go), "scores": [float(s) for s in out["scores"]]}))


if __name__ == "__main__":
    main()
