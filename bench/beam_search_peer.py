#!/opt/ref/bin/python
"""transformers peer for bench/beam_search.lua: the same Llama shape (8 layers, d=1024, 16 query
heads over 4 key/value heads, MLP 2816, vocab 32000), random weights, float32, CPU; generate of N
tokens after a P-token prompt greedily and with num_beams = K (all K returned), best of R each.
Prints one JSON object.

Usage: python bench/beam_search_peer.py [--threads N] [--repeats R] [--prompt P] [--new N] [--beams K]
"""
import json

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from peerutil import best, parse, prompt


def main():
    a = parse(prompt=64, new=32, beams=4)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids, mask = prompt(a.prompt, cfg.vocab_size)

    def greedy():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new,
                                  do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)

    def beams():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new,
                                 do_sample=False, num_beams=a.beams, num_return_sequences=a.beams,
                                 eos_token_id=None, pad_token_id=0)
        assert out.shape == (a.beams, a.prompt + a.new)
        return out

    print(json.dumps({"peer": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": a.threads, "greedy_s": best(a.repeats, greedy), "beam_s": best(a.repeats, beams)}))


if __name__ == "__main__":
    main()
