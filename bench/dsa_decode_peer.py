#!/opt/ref/bin/python
"""transformers peer for bench/dsa_decode.lua: the same DeepSeek-V3.2 shape shrunk to 4 layers
(d=1024, 16 heads, kv_lora_rank 512, rotary 64, other query/key dims 128, values 128, q_lora_rank
768; indexers of 32 heads of 128 keeping 1024 keys; the first layer dense, then 16 experts of width
352, 4 per token, one shared; vocab 32000), random weights, float32, CPU, sdpa attention. Times
each token's arrival through a streamer: the prompt (to the first new token) and the decoding
steps after it (first to last new token), best of R each. Prints one JSON object.

Usage: python bench/dsa_decode_peer.py [--threads N] [--repeats R] [--prompt P] [--new N]
"""
import json
import time

import torch
import transformers
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

from peerutil import parse, prompt


def main():
    a = parse(prompt=4096, new=16)
    cfg = DeepseekV32Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=352,
                            num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=16,
                            n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1,
                            first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=768, qk_rope_head_dim=64,
                            qk_nope_head_dim=128, v_head_dim=128, index_topk=1024, index_head_dim=128,
                            index_n_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-6,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(cfg).eval()
    ids, mask = prompt(a.prompt, cfg.vocab_size)

    class Arrivals:
        """A streamer: put() is called with the prompt, then with each new token."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    prefill, step = float("inf"), float("inf")
    for _ in range(a.repeats):
        arrivals = Arrivals()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new,
                                 do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0,
                                 streamer=arrivals)
        new = arrivals.times[1:]
        assert out.shape == (1, a.prompt + a.new) and len(new) == a.new
        prefill = min(prefill, new[0] - t0)
        step = min(step, (new[-1] - new[0]) / (a.new - 1))
    print(json.dumps({"peer": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": a.threads, "prefill_s": prefill, "decode_step_s": step}))


if __name__ == "__main__":
    main()
