--- A checkpoint another quantizer wrote (GPTQ, AutoAWQ, llm-compressor's compressed-tensors),
-- loaded as it is under a RAM budget: its layers rewritten into moonload's int4 / int8 / float8
-- ones a batch at a time into the offload folder and mapped back, the rest planned into memory and
-- onto disk. The example prints the format, what each kind of layer became and its bytes, where
-- the weights went, and the tokens as they come.
--
--    luajit examples/quantized_checkpoint.lua [path/to/model] [cpu budget, e.g. 8GB]
--
-- Any such folder works: Qwen2.5-7B-Instruct-GPTQ-Int4 (5.6 GB: int4 layers), Qwen2.5-7B-Instruct-AWQ
-- (zero points: int8 layers), RedHatAI's Llama-3.1-8B-Instruct-quantized.w4a16 or FP8-dynamic.
-- Without one it runs the test folder tests/fixtures/models/llama_gptq_int4_tiny: a tiny
-- random-weight Llama as GPTQ stores it, so its tokens are noise, but every step is the real one
-- (tests/quantized_checkpoints_spec.lua checks its logits).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/llama_gptq_int4_tiny"
local budget = arg[2] or "85KB"
local folder = os.tmpname()
os.remove(folder)

local qc = require("moonload.utils.json").read(dir .. "/config.json").quantization_config or {}
local model = ml.models.from_pretrained(dir, { device_map = "auto", max_memory = { cpu = budget },
   offload_folder = folder })

-- what the layers became, counted with their bytes (weights and scales)
local kinds, order = {}, {}
for _, e in ipairs(model:named_modules_list()) do
   local m = e[2]
   local kind = m.__name == "QuantizedLinear" and ("int" .. m.bits) or m.__name == "Fp8Linear" and "float8"
      or m.__name == "Linear" and "float" or nil
   if kind then
      if not kinds[kind] then
         kinds[kind] = { n = 0, bytes = 0 }
         order[#order + 1] = kind
      end
      kinds[kind].n = kinds[kind].n + 1
      for _, p in m:named_parameters("", false) do kinds[kind].bytes = kinds[kind].bytes + p:nbytes() end
   end
end
local parts = {}
for _, kind in ipairs(order) do
   parts[#parts + 1] = string.format("%d %s (%.1f KB)", kinds[kind].n, kind, kinds[kind].bytes / 1024)
end
print(string.format("%s: %s, quant_method %s; linear layers: %s", dir, model.__name, tostring(qc.quant_method),
   table.concat(parts, ", ")))

local sizes = ml.utils.compute_module_sizes(model)
local by_place = {}
for prefix, dev in pairs(model.hf_device_map) do
   by_place[tostring(dev)] = (by_place[tostring(dev)] or 0) + sizes[prefix]
end
print(string.format("%.1f KB of weights in RAM, %.1f KB on disk", (by_place.cpu or 0) / 1024,
   (by_place.disk or 0) / 1024))

local tokenizer_ok, tokenizer = pcall(ml.tokenizers.from_pretrained, dir)
local prompt = tokenizer_ok and tokenizer:encode("The capital of France is") or { 1, 5, 17, 42, 3 }
model:generate(prompt, { max_new_tokens = 16, eos_token_id = false,
   on_token = function(ids) io.write(tokenizer_ok and tokenizer:decode({ ids[1] }) or (ids[1] .. " ")); io.flush() end })
print()
os.execute("rm -rf '" .. folder .. "'")
