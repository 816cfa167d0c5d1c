#!/opt/ref/bin/python
"""transformers peer for bench/t5_generate.lua: the same FLAN-T5-base shape (12 + 12 blocks,
d_model 768, 12 heads of 64, gated-GELU MLP 2048, vocab 32128), random weights, float32, CPU;
generate of N tokens (min_new_tokens = N) after encoding a P-token input, greedily and with
num_beams = K, best of R each. Prints one JSON object.

Usage: python bench/t5_generate_peer.py [--threads N] [--repeats R] [--input P] [--new N] [--beams K]
"""
import json

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

from peerutil import best, parse, prompt


def main():
    a = parse(input=128, new=32, beams=4)
    cfg = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                   eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).eval()
    x, mask = prompt(a.input, cfg.vocab_size)

    def run(beams):
        def go():
            with torch.no_grad():
                out = model.generate(x, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new,
                                     do_sample=False, num_beams=beams)
            assert out.shape == (1, a.new + 1)
        return go

    print(json.dumps({"peer": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": a.threads, "greedy_s": best(a.repeats, run(1)), "beam_s": best(a.repeats, run(a.beams))}))


if __name__ == "__main__":
    main()
