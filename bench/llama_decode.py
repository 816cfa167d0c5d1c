#!/opt/ref/bin/python
"""PyTorch/transformers peer for bench/llama_decode.lua: the same Llama shape with grouped-query
attention (8 layers, d=1024, 16 query heads over 4 key/value heads, MLP 2816, vocab 32000),
random weights (float32 or --dtype; int8 is torch.ao.quantization.quantize_dynamic over the
linear layers), CPU, transformers' default (sdpa) attention.

Measures (1) prefill of the prompt with only the last position's logits, best of R; (2) greedy
generate of N new tokens after it with the KV cache, best of R; decode tokens/s from the
difference, as the Lua side does. Prints one JSON object.

Usage: python bench/llama_decode.py [--threads N] [--repeats R] [--prompt P] [--new N] [--dtype D]
"""
import argparse
import json

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from peerutil import best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    if a.dtype == "int8":
        # PyTorch's own int8 path for CPU inference: dynamic quantization of every nn.Linear
        # (int8 weights per output row, activations quantized on the fly)
        model = torch.ao.quantization.quantize_dynamic(LlamaForCausalLM(cfg).eval(), {torch.nn.Linear},
                                                      dtype=torch.qint8)
    else:
        model = LlamaForCausalLM(cfg).to(getattr(torch, a.dtype)).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, a.prompt))
    gen_kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, num_beams=1,
                  use_cache=True, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        prefill = best(a.repeats, lambda: model(ids, logits_to_keep=1))
        total = best(a.repeats, lambda: model.generate(ids, **gen_kw))
    decode = max(total - prefill, 1e-9)
    print(json.dumps({
        "peer": "torch", "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "dtype": a.dtype, "prompt": a.prompt, "new_tokens": a.new,
        "prefill_s": prefill, "generate_s": total, "decode_tokens_per_s": (a.new - 1) / decode,
    }))


if __name__ == "__main__":
    main()
