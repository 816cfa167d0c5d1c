-- Measures what a forward holds live, for utils_runtime_memory_spec.lua: for each fixture model
-- named on the command line, one JSON line {name, generate, prefill, decode, blocked}, each
-- {estimate = activation_size's bytes, measured = the allocator's peak minus the cache}.
-- Garbage is collected at every new tensor (a gc cap of 1 byte), so the peak counts live
-- tensors and at most the one that died last. The block schedule ("blocked") is measured for one
-- family per decoder loop and attention kind: its many small tensors make collecting at each slow. Run from the repository root.
package.path = "lua/?.lua;lua/?/init.lua;tests/?.lua;" .. package.path
local ml = require("moonload")
local models = require("moonload.models")
local rm = require("moonload.utils.runtime_memory")
local cjson = require("cjson")

local function sum(t)
   local s = 0
   for _, v in pairs(t) do s = s + v end
   return s
end

local prompts = require("models_helpers").padded_prompts

local function peak_of(fn)
   -- twice: what a finalizer freed in the first cycle may hold the last garbage (tensors that
   -- died before fn and were freed inside it would lower the peak below the base)
   collectgarbage()
   collectgarbage()
   ml.set_gc_cap("cpu", 1)
   local base = ml.memory_allocated("cpu")
   ml.reset_peak_memory("cpu")
   fn()
   local _, peak = ml.memory_allocated("cpu")
   ml.set_gc_cap("cpu", 0)
   return peak - base
end

local BLOCKED = { gpt2_tiny = true, llama_tiny_untied = true, mistral_tiny = true, gemma2_tiny = true,
   gpt_neox_tiny = true, qwen3_moe_tiny = true, deepseek_v3_tiny = true }

for _, name in ipairs(arg) do
   local model = models.from_pretrained("tests/fixtures/models/" .. name)
   local out = { name = name }
   -- generate, padded batch: the cache is part of the peak
   local r = { batch_size = 2, max_length = 16, prompt_length = 12 }
   local ids, mask = prompts(model, 2, 12)
   local measured = peak_of(function() model:generate(ids, { max_new_tokens = 4, attention_mask = mask }) end)
   out.generate = { estimate = rm.activation_size(model, r), measured = measured - sum(rm.kv_cache_sizes(model, r)) }
   -- a long prompt in one forward
   local P = 56
   ids = prompts(model, 1, P)
   local cache = model:new_cache(P + 1)
   r = { max_length = P + 1, prompt_length = P }
   measured = peak_of(function() model(ids, { cache = cache, logits_to_keep = 1 }) end)
   out.prefill = { estimate = rm.activation_size(model, r), measured = measured - sum(rm.kv_cache_sizes(model, r)) }
   -- then one token over all of it (the cache is there already)
   measured = peak_of(function() model({ { 1 } }, { cache = cache, logits_to_keep = 1 }) end)
   out.decode = { estimate = rm.activation_size(model, { max_length = P + 1, prompt_length = 1 }), measured = measured }
   -- generate in a block schedule: 2 rows and 8 tokens at a time
   if BLOCKED[name] then
      r = { batch_size = 4, max_length = 28, prompt_length = 24, micro_batch_size = 2, prefill_chunk_size = 8 }
      ids, mask = prompts(model, 4, 24)
      measured = peak_of(function()
         model:generate(ids, { max_new_tokens = 4, attention_mask = mask, micro_batch_size = 2, prefill_chunk_size = 8 })
      end)
      out.blocked = { estimate = rm.activation_size(model, r), measured = measured - sum(rm.kv_cache_sizes(model, r)) }
   end
   print(cjson.encode(out))
end
