"""accelerate's cpu_offload on the Llama shape of bench/cuda/llama_stream.lua: random bf16 weights in
CPU RAM, execution on cuda:0, forward of 1x512 tokens. Prints one JSON object."""
import json
import sys
import time

import torch
from accelerate import cpu_offload, init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 16
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
tiny = len(sys.argv) > 3 and sys.argv[3] == "tiny"
# A tiny dry run on a machine without a GPU (BENCH_SHAPE=tiny, the CUDA emulator) executes on the CPU.
device = torch.device("cuda:0" if torch.cuda.is_available() or not tiny else "cpu")
theta = 500000.0   # transformers 5 keeps it in rope_parameters, older versions as an attribute
cfg = LlamaConfig(vocab_size=256 if tiny else 32000, hidden_size=64 if tiny else 4096,
                  intermediate_size=128 if tiny else 14336, num_hidden_layers=layers,
                  num_attention_heads=4 if tiny else 32, num_key_value_heads=2 if tiny else 8,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=False)
with init_empty_weights():
    model = LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu").to(torch.bfloat16)
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.uniform_(-0.01, 0.01)
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            base, dim = theta, cfg.hidden_size // cfg.num_attention_heads
            buf.copy_(1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
model.eval()
cpu_offload(model, execution_device=device)
ids = torch.tensor([[(i * 7919) % cfg.vocab_size for i in range(1, 513)]])


def forward():
    with torch.no_grad():
        model(ids, logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.synchronize()


forward()
best = float("inf")
for _ in range(repeats):
    t0 = time.perf_counter()
    forward()
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"forward_s": best, "torch": torch.__version__, "device": str(device)}))
