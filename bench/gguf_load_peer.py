#!/opt/ref/bin/python
"""Peer and file maker for bench/gguf_load.lua (run through BENCH_PYTHON, default /opt/ref/bin/python).

  make --src DIR --out FILE --type Q4_0|Q8_0
                  converts the Hugging Face Llama checkpoint in DIR to a GGUF file (once) with
                  gguf-py, as llama.cpp's convert_hf_to_gguf.py lays it out (tensor names, q and k
                  rows permuted, metadata); 2-D weights in --type, norms in F32
  run --dir DIR --file NAME [--prompt P --new N]
                  transformers' GGUF loading (from_pretrained(DIR, gguf_file=NAME): the weights
                  dequantized to float32), then N greedy tokens after a P-token prompt. Reports
                  seconds to load, the growth of the process's resident memory over the load,
                  seconds to generate and the ids.

Each prints one JSON object with the library versions.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

from fit_context_peer import kib  # (/proc/self/status fields in KiB)


BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")
    return f"blk.{parts[2]}.{BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"


def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make(args):
    import gguf
    from safetensors.numpy import load_file
    if os.path.exists(args.out):
        return {"file": args.out, "made": False}
    cfg = json.load(open(os.path.join(args.src, "config.json")))
    qtype = getattr(gguf.GGMLQuantizationType, args.type)
    tmp = args.out + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    names = sorted(f for f in os.listdir(args.src) if f.endswith(".safetensors"))
    for f in names:
        for hf, x in load_file(os.path.join(args.src, f)).items():
            if hf.endswith("q_proj.weight"):
                x = permute(x, cfg["num_attention_heads"])
            elif hf.endswith("k_proj.weight"):
                x = permute(x, cfg["num_key_value_heads"])
            if x.ndim == 2:
                w.add_tensor(gguf_name(hf), gguf.quants.quantize(x.astype(np.float32), qtype), raw_dtype=qtype)
            else:
                w.add_tensor(gguf_name(hf), x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.rename(tmp, args.out)
    return {"file": args.out, "made": True}


def run(args):
    import transformers
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads or torch.get_num_threads())
    rss0 = kib("VmRSS")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.dir, gguf_file=args.file).eval()
    load_s = time.perf_counter() - t0
    rss = kib("VmRSS") - rss0
    seed, prompt = 1, []
    vocab = model.config.vocab_size
    for _ in range(args.prompt):                      # MINSTD, as bench/lib/benchutil.lua
        seed = seed * 48271 % 2147483647
        prompt.append(seed % vocab)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        gen_s = time.perf_counter() - t0
    return {"peer": "transformers", "load_s": load_s, "rss_growth_mb": rss / 1024, "generate_s": gen_s,
            "generated": out[0, args.prompt:].tolist(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["make", "run"])
    ap.add_argument("--src")
    ap.add_argument("--out")
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("--dir")
    ap.add_argument("--file")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(make(a) if a.cmd == "make" else run(a)))


if __name__ == "__main__":
    main()
