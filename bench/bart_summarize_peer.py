#!/opt/ref/bin/python
"""transformers peer for bench/bart_summarize.lua: the same bart-base shape (6 + 6 layers,
d_model 768, 12 heads, MLP 3072, vocab 50265), random weights, float32, CPU; generate of N tokens
(min_new_tokens = N) after encoding a P-token input with K beams, 3-gram blocking, length penalty
2, forced BOS and EOS, best of R. Prints one JSON object.

Usage: python bench/bart_summarize_peer.py [--threads N] [--repeats R] [--input P] [--new N] [--beams K]
"""
import json

import torch
import transformers
from transformers import BartConfig, BartForConditionalGeneration

from peerutil import best, parse, prompt


def main():
    a = parse(input=256, new=32, beams=4)
    cfg = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                     max_position_embeddings=1024, decoder_start_token_id=2, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2)
    torch.manual_seed(0)
    model = BartForConditionalGeneration(cfg).eval()
    x, mask = prompt(a.input, cfg.vocab_size)

    def go():
        with torch.no_grad():
            out = model.generate(x, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                                 num_beams=a.beams, no_repeat_ngram_size=3, length_penalty=2.0, forced_bos_token_id=0,
                                 forced_eos_token_id=2, eos_token_id=2)
        assert out.shape == (1, a.new + 1)

    print(json.dumps({"peer": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": a.threads, "beam_s": best(a.repeats, go)}))


if __name__ == "__main__":
    main()
