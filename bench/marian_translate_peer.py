#!/opt/ref/bin/python
"""transformers peer for bench/marian_translate.lua: the same opus-mt-en-de shape (6 + 6 layers,
d_model 512, 8 heads, MLP 2048, SiLU, vocabulary 58101), random weights, float32, CPU; generate of
N tokens (min_new_tokens = N) after encoding a P-token input with K beams and the pad token banned
(bad_words_ids), best of R. Prints one JSON object.

Usage: python bench/marian_translate_peer.py [--threads N] [--repeats R] [--input P] [--new N] [--beams K]
"""
import json

import torch
import transformers
from transformers import MarianConfig, MarianMTModel

from peerutil import best, parse, prompt

PAD = 58100


def main():
    a = parse(input=64, new=32, beams=4)
    cfg = MarianConfig(vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                       decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="swish",
                       scale_embedding=True, max_position_embeddings=512, pad_token_id=PAD, decoder_start_token_id=PAD,
                       eos_token_id=0, forced_eos_token_id=0)
    torch.manual_seed(0)
    model = MarianMTModel(cfg).eval()
    x, mask = prompt(a.input, PAD)

    def go():
        with torch.no_grad():
            out = model.generate(x, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                                 num_beams=a.beams, bad_words_ids=[[PAD]], eos_token_id=0, forced_eos_token_id=0)
        assert out.shape == (1, a.new + 1)

    print(json.dumps({"peer": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": a.threads, "beam_s": best(a.repeats, go)}))


if __name__ == "__main__":
    main()
