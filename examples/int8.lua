-- int8 end to end: quantize a model as it loads, save it once with ml.save_model, load the saved
-- folder back (its int8 weights are views of the file: nothing to quantize), and generate with
-- an int8 key-value cache. Prints the times, the bytes, and whether the reloaded model gives the
-- same logits. Then the same model with int4 weights (half int8's bytes): its size, its speed, and
-- how often its top token agrees with the float model's; and both with int8 activations.
--
--    luajit examples/int8.lua [dir]     (default: the demo's GPT-2-small-shaped checkpoint,
--                                        written by examples/demo.lua --write-only)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")
local ffi = require("ffi")

pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } ml_int8_timespec; int clock_gettime(int, ml_int8_timespec *);")
local ts = ffi.new("ml_int8_timespec")
local function now()
   ffi.C.clock_gettime(1, ts)
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local function timed(fn)
   local t0 = now()
   local a, b = fn()
   return now() - t0, a, b
end
local function mb(n) return string.format("%.1f MB", n / 1e6) end

local dir = arg[1]
if not dir then
   local p = io.popen((os.getenv("LUAJIT") or "luajit") .. " examples/demo.lua --write-only")
   dir = p:read("*a"):match("([^\n]+)%s*$")
   p:close()
end

-- 1. quantize as it loads: every linear layer becomes int8 with a scale per 32 weights
local t_quant, model = timed(function() return ml.models.from_pretrained(dir, { quantize = "int8" }) end)
local _, report = ml.quantize(ml.models.from_pretrained(dir))                  -- (for its byte counts)
print(string.format("from_pretrained with quantize = \"int8\": %.3f s; linear weights %s -> %s (%d layers; %d left in floats)",
   t_quant, mb(report.bytes_before), mb(report.bytes_after), #report.quantized,
   (function() local n = 0; for _ in pairs(report.skipped) do n = n + 1 end; return n end)()))

-- 2. save it once, as a Hugging Face folder with a quantization_config
local saved = os.tmpname()
os.remove(saved)
local t_save, files = timed(function() return ml.save_model(model, saved) end)
local bytes = 0
for _, f in ipairs(files) do
   local h = io.open(saved .. "/" .. f, "rb")
   bytes = bytes + h:seek("end")
   h:close()
end
print(string.format("ml.save_model: %.3f s, %s in %s", t_save, mb(bytes), table.concat(files, ", ")))

-- 3. load the int8 folder: views of the saved file
local t_load, back = timed(function() return ml.models.from_pretrained(saved) end)
local vocab = model.config.vocab_size
local prompt = {}
for i = 1, 12 do prompt[i] = (i * 7919) % vocab end
local ids = ml.tensor({ prompt }, { dtype = "int64" })
print(string.format("from_pretrained of the saved folder: %.3f s (%.0fx faster); same logits: %s", t_load,
   t_quant / math.max(t_load, 1e-9), tostring(ml.equal(back(ids), model(ids)))))

-- 4. generate with the key-value cache in floats and in int8 (1.125 bytes a value)
local new = 16
local sizes = ml.utils.kv_cache_sizes(back, { max_length = #prompt + new })
local float_bytes = 0
for _, b in pairs(sizes) do float_bytes = float_bytes + b end
local int8_bytes = 0
for _, b in pairs(ml.utils.kv_cache_sizes(back, { max_length = #prompt + new, kv_cache_dtype = "int8" })) do
   int8_bytes = int8_bytes + b
end
for _, kv in ipairs({ { "floats", nil, float_bytes }, { "int8", "int8", int8_bytes } }) do
   local t, out = timed(function() return back:generate(prompt, { max_new_tokens = new, kv_cache_dtype = kv[2] }) end)
   print(string.format("generate %d tokens, cache in %-6s (%s): %.3f s (%.1f tokens/s) -> %s", new, kv[1], mb(kv[3]), t,
      new / t, table.concat({ unpack(out, #prompt + 1) }, " ")))
end
os.execute("rm -rf '" .. saved .. "'")

-- 5. int4 weights: two values a byte, the same scale per 32
local t_q4, q4 = timed(function() return ml.models.from_pretrained(dir, { quantize = "int4" }) end)
local q4_bytes = 0
for _, m in ipairs(q4:modules_list()) do
   if m.__name == "QuantizedLinear" then q4_bytes = q4_bytes + m.weight:nbytes() + m.weight_scale:nbytes() end
end
local float_top = ml.models.from_pretrained(dir)(ids):argmax(3)
local agree = {}
for _, m in ipairs({ { "int8", model }, { "int4", q4 } }) do
   agree[#agree + 1] = string.format("%s %d", m[1], m[2](ids):argmax(3):eq(float_top):sum():item())
end
local t_gen, out = timed(function() return q4:generate(prompt, { max_new_tokens = new }) end)
print(string.format("from_pretrained with quantize = \"int4\": %.3f s; linear weights %s; top token as the float model's at %s of %d positions; generate %d tokens: %.3f s (%.1f tokens/s) -> %s",
   t_q4, mb(q4_bytes), table.concat(agree, ", "), #prompt, new, t_gen, new / t_gen,
   table.concat({ unpack(out, #prompt + 1) }, " ")))

-- 6. int8 activations: the input rows rounded to int8 as well, integer products (faster on the CPU)
for _, m in ipairs({ { "int8", model }, { "int4", q4 } }) do
   local t_float = timed(function() return m[2]:generate(prompt, { max_new_tokens = new }) end)
   ml.set_quantized_activations("int8")
   local t_int8, rounded = timed(function() return m[2]:generate(prompt, { max_new_tokens = new }) end)
   local top = m[2](ids):argmax(3):eq(float_top):sum():item()
   ml.set_quantized_activations("float32")
   print(string.format("%s weights with int8 activations: generate %d tokens %.3f s against %.3f s (%.2fx); top token as the float model's at %d of %d positions -> %s",
      m[1], new, t_int8, t_float, t_float / t_int8, top, #prompt, table.concat({ unpack(rounded, #prompt + 1) }, " ")))
end
