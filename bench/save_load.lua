--- Saving and loading back (ml.save_model, from_pretrained), on the Llama-shaped checkpoint of
-- bench/fit_context.lua (16 layers, hidden 512, about 340 MB in float32):
--   float32  save_model of the loaded model (its weights views of the checkpoint) against
--            transformers' save_pretrained of the same model (bench/save_load_peer.py), same run;
--   int8     from_pretrained with quantize = "int8" (quantizing as it loads) against
--            from_pretrained of that model saved by save_model (int8 views of the saved file),
--            with the same logits.
-- Best of 2 for each save; loads from the page cache (each file read once before).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local dir = ".bench/fit-context-llama"
local made, err = B.run_peer("bench/fit_context_peer.py make --dir " .. dir)
if not made then
   print(cjson.encode({ bench = "save_load", skipped = "cannot make the checkpoint: " .. tostring(err) }))
   return
end

local function tmpdir()
   local p = os.tmpname()
   os.remove(p)
   return p
end

local function best_save(model)
   local best
   for _ = 1, 2 do
      local out = tmpdir()
      local t = B.best(1, function() ml.save_model(model, out) end)
      os.execute("rm -rf '" .. out .. "'")
      best = best and math.min(best, t) or t
   end
   return best
end

local ids = ml.tensor({ B.minstd_prompts(1, 16, 32000)[1] }, { dtype = "int64" })
local float_model = ml.models.from_pretrained(dir)
local float_save_s = best_save(float_model)
float_model = nil
collectgarbage()

local t_quantize = B.best(1, function() return ml.models.from_pretrained(dir, { quantize = "int8" }) end)
local int8_model = ml.models.from_pretrained(dir, { quantize = "int8" })
local want = int8_model(ids)
local saved = tmpdir()
local int8_save_s = B.best(1, function() ml.save_model(int8_model, saved) end)
int8_model = nil
collectgarbage()
ml.models.from_pretrained(saved)                                         -- (the file in the page cache)
local t_saved = B.best(3, function() return ml.models.from_pretrained(saved) end)
local same = ml.equal(ml.models.from_pretrained(saved)(ids), want)
local saved_mb = 0
for _, f in ipairs(require("moonload.utils.offload").list_dir(saved)) do
   local h = io.open(saved .. "/" .. f, "rb")
   saved_mb = saved_mb + h:seek("end") / 2 ^ 20
   h:close()
end
os.execute("rm -rf '" .. saved .. "'")

local peer, peer_err = B.run_peer("bench/save_load_peer.py --dir " .. dir)
print(cjson.encode({
   bench = "save_load", float32_save_s = float_save_s, transformers_save_s = peer and peer.save_s or nil,
   save_ratio = peer and float_save_s / peer.save_s or nil, peer_note = not peer and tostring(peer_err) or nil,
   int8_quantize_on_load_s = t_quantize, int8_save_s = int8_save_s, int8_saved_load_s = t_saved,
   int8_saved_mb = saved_mb, load_ratio = t_saved / t_quantize, same_logits = same,
   versions = peer and { torch = peer.torch, transformers = peer.transformers } or nil,
}))
