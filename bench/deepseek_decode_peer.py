#!/opt/ref/bin/python
"""transformers peer for bench/deepseek_decode.lua: the same DeepSeek-V2-Lite shape shrunk to 6
layers (d=1024, 16 heads, kv_lora_rank 512, rotary 64, other query/key dims 128, values 128; the
first layer dense, then 16 experts of width 352, 4 per token, 2 shared; vocab 32000), random
weights, float32, CPU. Times the prompt (generate of 1 token) and the decoding steps after it
(generate of N tokens, less the prompt, per step), best of R each. Prints one JSON object.

Usage: python bench/deepseek_decode_peer.py [--threads N] [--repeats R] [--prompt P] [--new N]
"""
import json

import torch
import transformers
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from peerutil import best, parse, prompt


def main():
    a = parse(prompt=512, new=32)
    cfg = DeepseekV2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=352,
                           num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=16,
                           n_shared_experts=2, num_experts_per_tok=4, topk_method="greedy", first_k_dense_replace=1,
                           kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
                           v_head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(cfg).eval()
    ids, mask = prompt(a.prompt, cfg.vocab_size)

    def generate(n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 num_beams=1, eos_token_id=None, pad_token_id=0)
        assert out.shape == (1, a.prompt + n)

    prefill = best(a.repeats, lambda: generate(1))
    total = best(a.repeats, lambda: generate(a.new))
    print(json.dumps({"peer": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": a.threads, "prefill_s": prefill, "decode_step_s": (total - prefill) / (a.new - 1)}))


if __name__ == "__main__":
    main()
