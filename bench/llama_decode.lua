--- Llama-shaped model with grouped-query attention (8 layers, d=1024, 16 query heads over 4
-- key/value heads, MLP 2816, vocab 32000), random weights, CPU: (1) prefill of a prompt (1024
-- tokens in float32, 256 in bfloat16, int8 and int4), (2) greedy decode of 32 tokens after it with the KV cache,
-- where attention over the long context and the grouped heads matter. Next to
-- PyTorch/transformers measured in the same run with the same thread count
-- (bench/llama_decode.py through BENCH_PYTHON; skipped with a note when absent). One JSON object
-- per dtype. Run from the repository root.
-- Environment: BENCH_THREADS (default: all cores), BENCH_REPEATS (3), BENCH_PROMPT (overrides
-- both lengths), BENCH_DTYPE (float32 | bfloat16 | int8 | int4; default all four). int8 and int4:
-- ml.quantize over the bfloat16 model (int8 or int4 weights, bfloat16 activations), both next to
-- PyTorch's dynamic int8 quantization of the float32 model (PyTorch has no int4 CPU path of its own);
-- their prefill and decode are timed again with int8 activations (ml.set_quantized_activations).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3
local NEW = 32
C.lib.ml_set_num_threads(threads)

local cfg = { model_type = "llama", vocab_size = 32000, hidden_size = 1024, intermediate_size = 2816,
   num_hidden_layers = 8, num_attention_heads = 16, num_key_value_heads = 4, max_position_embeddings = 4096,
   rms_norm_eps = 1e-5, rope_theta = 10000.0, tie_word_embeddings = false, hidden_act = "silu" }

-- One dtype: prefill, then generate; prints its JSON object next to the peer's.
local function run(dtype, prompt_len)
   ml.manual_seed(0)
   local model = ml.models.llama.LlamaForCausalLM(cfg)
   -- int8, int4: a bfloat16 model (as hub checkpoints are) with its linear layers quantized
   if dtype == "int8" or dtype == "int4" then ml.quantize(model:to("bfloat16"), { dtype = dtype }) else model:to(dtype) end
   local prompt, seed = {}, 12345
   for i = 1, prompt_len do
      seed = (seed * 1103515245 + 12345) % 2147483648
      prompt[i] = seed % cfg.vocab_size
   end
   local input = ml.tensor({ prompt }, { dtype = "int64" })
   local prefill_s = B.best(repeats, function() return model(input, { logits_to_keep = 1 }) end)
   local total_s = B.best(repeats, function()
      local out = model:generate(prompt, { max_new_tokens = NEW, eos_token_id = false })
      assert(#out == prompt_len + NEW)
      return out
   end)
   -- decode time: generate's total less one prefill (generate runs the prompt once, then NEW - 1 steps)
   local decode_s = math.max(total_s - prefill_s, 1e-9)
   local result = {
      bench = "llama_decode", threads = threads, dtype = dtype, prompt = prompt_len, new_tokens = NEW,
      prefill_s = prefill_s, generate_s = total_s, decode_tokens_per_s = (NEW - 1) / decode_s,
   }
   -- int8, int4: decoding again with the activations rounded to int8 (ml.set_quantized_activations)
   if dtype == "int8" or dtype == "int4" then
      ml.set_quantized_activations("int8")
      local rounded_prefill_s = B.best(repeats, function() return model(input, { logits_to_keep = 1 }) end)
      local rounded_s = B.best(repeats, function() return model:generate(prompt, { max_new_tokens = NEW, eos_token_id = false }) end)
      ml.set_quantized_activations("float32")
      result.prefill_s_int8_activations = rounded_prefill_s
      result.decode_tokens_per_s_int8_activations = (NEW - 1) / math.max(rounded_s - rounded_prefill_s, 1e-9)
   end
   if B.have_python() then
      local ok, peer = pcall(B.run_json, string.format(
         "%s bench/llama_decode.py --threads %d --repeats %d --prompt %d --new %d --dtype %s",
         B.python, threads, repeats, prompt_len, NEW, dtype == "int4" and "int8" or dtype))
      if ok and type(peer) == "table" then
         result.peer = peer
         result.prefill_ratio = prefill_s / peer.prefill_s                                -- < 1: moonload faster
         result.decode_speedup = result.decode_tokens_per_s / peer.decode_tokens_per_s    -- > 1: moonload faster
         if result.decode_tokens_per_s_int8_activations then
            result.decode_speedup_int8_activations = result.decode_tokens_per_s_int8_activations / peer.decode_tokens_per_s
            result.prefill_ratio_int8_activations = result.prefill_s_int8_activations / peer.prefill_s
         end
      else
         result.peer_note = "peer failed: " .. tostring(peer)
      end
   else
      result.peer_note = "no Python peer at " .. B.python .. " (set BENCH_PYTHON)"
   end
   print(require("cjson").encode(result))
end

for _, dtype in ipairs(os.getenv("BENCH_DTYPE") and { os.getenv("BENCH_DTYPE") } or { "float32", "bfloat16", "int8", "int4" }) do
   run(dtype, tonumber(os.getenv("BENCH_PROMPT") or "") or (dtype == "float32" and 1024 or 256))
   collectgarbage(); collectgarbage()
end
