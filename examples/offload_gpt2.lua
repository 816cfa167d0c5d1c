-- A GPT-2 with a hand-written device map: embeddings and the first block in CPU RAM, the other
-- blocks on "disk" (read from the checkpoint file at their forward), and where each block lives
-- before, during and after a forward.
--
--    luajit examples/offload_gpt2.lua                 -- the tiny test checkpoint
--    luajit examples/offload_gpt2.lua path/to/gpt2    -- any GPT-2 folder (config.json + safetensors)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")
local hooks = require("moonload.hooks")

local dir = arg[1] or "tests/fixtures/models/gpt2_tiny"
local cfg = ml.models.config.read(dir .. "/config.json", "offload_gpt2")
local n_layer = cfg.n_layer

-- cpu for the embeddings, the first block, the final norm and the (tied) head; disk for the rest
local device_map = {
   ["transformer.wte"] = "cpu", ["transformer.wpe"] = "cpu", ["transformer.drop"] = "cpu",
   ["transformer.ln_f"] = "cpu", lm_head = "cpu",
}
for i = 0, n_layer - 1 do device_map["transformer.h." .. i] = i == 0 and "cpu" or "disk" end

local offload_folder = os.tmpname()
os.remove(offload_folder)
local model = ml.models.from_pretrained(dir, { device_map = device_map, offload_folder = offload_folder })

local function where(block)
   local w = block.attn.c_attn.weight
   return string.format("%-4s (%s)", w.device, block._hf_hook and tostring(block._hf_hook.__name) or "no hook")
end

print("where each block lives after dispatch:")
for i = 1, n_layer do
   print(string.format("  transformer.h.%-3d map: %-5s weight now on %s", i - 1, device_map["transformer.h." .. (i - 1)],
      where(model.transformer.h[i])))
end

-- Look inside a disk block while it runs: each layer with weights (here its attention input
-- projection) has its own offloading hook, so they are materialized only for that layer's forward.
local block = model.transformer.h[n_layer]
local c_attn = block.attn.c_attn
local inner = c_attn._old_forward
local seen
c_attn._old_forward = function(self, ...)
   seen = string.format("%s, %d bytes at %#x", self.weight.device, self.weight:nbytes(), self.weight:data_ptr())
   return inner(self, ...)
end

local ids = { 5, 17, 42, 3 }
local logits = model(ml.tensor({ ids }, { dtype = "int64" }))
print(string.format("\nlast block's c_attn.weight during its forward: %s; after: %s", seen,
   block.attn.c_attn.weight.device))
print("logits shape: [" .. table.concat(logits.shape, ", ") .. "]")
print("greedy continuation: " .. table.concat(model:generate(ids, { max_new_tokens = 8 }), " "))

local s = hooks.runtime_stats()
print(string.format("hook runtime: %d materializations, %d bytes viewed zero-copy from the checkpoint, %d bytes copied",
   s.materialize_calls, s.bytes_viewed, s.bytes_copied))
os.execute("rm -rf '" .. offload_folder .. "'")
