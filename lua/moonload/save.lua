--- ml.save_model(model, dir[, {max_shard_size = "10GB"}]) -> the files written: a model as a
-- Hugging Face folder that ml.models.from_pretrained (and transformers, for float models) loads:
-- config.json (the model's config, its dtype, and quantization_config when it has quantized
-- layers), generation_config.json for a causal model, and model.safetensors, or shards model-00001-of-0000N.safetensors with
-- model.safetensors.index.json (Accelerate's save_model, whose default shard size this keeps).
-- The weights are taken from wherever they are, one shard at a time: CPU tensors as they are
-- (views of a mapped checkpoint included), GPU ones copied to the CPU, offloaded ones read from
-- their hooks' weights maps (a disk weight is a view of its file), in the dtype the model
-- computes with. A tensor tied to another (GPT-2's lm_head) is saved once, under its first name.
-- Every file is written under a temporary name and renamed into place once all are written;
-- files of an earlier save in dir that the new one does not have (other shards) are removed last.
local Tensor = require("moonload.tensor")

local M = {}
local WHO = "save_model"

local json = require("moonload.utils.json")
local encode_json = json.encode

local function tmp_name(path) return string.format("%s.tmp-%d", path, math.random(1, 2 ^ 30)) end

-- Writes text to path through a temporary name.
local function write_text(path, text)
   local tmp = tmp_name(path)
   local f, err = io.open(tmp, "wb")
   if not f then error(string.format("%s: cannot write %s (%s)", WHO, path, tostring(err)), 0) end
   local ok, werr = f:write(text)
   f:close()
   if not ok then os.remove(tmp); error(string.format("%s: cannot write %s (%s)", WHO, path, tostring(werr)), 0) end
   return tmp
end

-- The value to save for state-dict entry key (tensor t): t on the CPU, or for a meta tensor what
-- the offloading hook of its module or of the nearest block above it holds (a block hook of
-- preload_module_classes keys its weights map by the name inside the block).
local function value_of(model, key, t)
   if not t:is_meta() then return t.device == "cpu" and t or t:to("cpu") end
   local hooks = require("moonload.hooks")
   local path = key
   while true do
      local owner = path:match("^(.*)%.[^.]+$")
      local m = owner and model:get_submodule(owner) or (path ~= "" and model or nil)
      if m == nil then break end
      local hook = rawget(m, "_hf_hook")
      if hook ~= nil and hook.weights_map ~= nil then
         local rel = owner and key:sub(#owner + 2) or key
         local v = hooks.weights_map_get(hook.weights_map, rel)
         if Tensor.is_tensor(v) and not v:is_meta() then
            if v.dtype ~= t.dtype then v = v:to(t.dtype) end                 -- (the raw checkpoint dtype)
            return v.device == "cpu" and v or v:to("cpu")
         end
      end
      if not owner then break end
      path = owner
   end
   error(string.format('%s: "%s" is on the meta device and no hook holds its weights', WHO, key), 0)
end

-- The model's LoRA-wrapped layers (nn.LoraLinear), by the state-dict prefix of each ("name.").
-- Their float base weights are saved with the adapter merged in, under the layer's own names,
-- so the folder is the adapted model (peft's merge_and_unload, then save_pretrained); an
-- adapter over quantized weights cannot be merged and is an error.
local function lora_layers(model)
   local out = {}
   for _, e in ipairs(model:named_modules_list()) do
      if e[2].__name == "LoraLinear" then
         local base = e[2].base_layer
         if base.__name ~= "Linear" and base.__name ~= "Conv1D" then
            error(string.format('%s: "%s" has a LoRA adapter over %s weights, which cannot be merged into them; save the model without the adapter and keep its folder',
               WHO, e[1], base.__name), 0)
         end
         out[e[1] .. "."] = e[2]
      end
   end
   return out
end

-- For state-dict key: the name to save it under and the LoRA layer to merge into it (nil, nil:
-- an adapter weight, not saved on its own).
local function saved_name(loras, key)
   for prefix, m in pairs(loras) do
      if key:sub(1, #prefix) == prefix then
         local rest = key:sub(#prefix + 1)
         if rest:find("^lora_[AB]%.") then return nil, nil end
         local inner = rest:match("^base_layer%.(.*)$")
         if inner then return prefix .. inner, inner == "weight" and m or nil end
      end
   end
   return key, nil
end

-- A LoRA layer's base weight w (on the CPU) with its adapter merged in.
local function merged(m, w)
   return m.merged_weight(w, m.lora_A.weight, m.lora_B.weight, m.scaling, m.base_layer.nf ~= nil)
end

-- The config to write: the model's as read (model.config._raw), with its dtype and its int8 layers.
local function config_of(model)
   local cfg = rawget(model, "config") or model.config
   local raw = type(cfg) == "table" and cfg._raw or nil
   if type(raw) ~= "table" then
      error(WHO .. ": the model has no config read from a config.json or table (build it with ml.models)", 0)
   end
   local out = {}
   for k, v in pairs(raw) do out[k] = v end
   json.float_keys[out] = json.float_keys[raw]            -- (its floats written as floats)
   local dtype = require("moonload.quantize").compute_dtype(model)
   if dtype then out.dtype, out.torch_dtype = dtype, dtype end
   local ok, qc = pcall(require("moonload.quantize").config_for, model)
   if not ok then error(WHO .. ": " .. tostring(qc), 0) end
   out.quantization_config = qc
   return out
end

local function check_args(model, dir, opts)
   if type(model) ~= "table" or type(model.state_dict) ~= "function" then
      error(WHO .. ": model must be an nn.Module, got " .. type(model), 3)
   end
   if type(dir) ~= "string" or dir == "" then error(WHO .. ": dir must be a folder path, got " .. type(dir), 3) end
   if type(opts) ~= "table" then error(WHO .. ": options must be a table {max_shard_size}, got " .. type(opts), 3) end
   for k in pairs(opts) do
      if k ~= "max_shard_size" then
         error(string.format('%s: unknown option "%s" (expected max_shard_size)', WHO, tostring(k)), 3)
      end
   end
end

-- Groups the entries (in state-dict order) into shards of at most max bytes (a larger tensor
-- alone), as transformers' and Accelerate's sharding does.
local function plan_shards(entries, max)
   local shards, current, size = {}, {}, 0
   for _, e in ipairs(entries) do
      if size + e.bytes > max and #current > 0 then
         shards[#shards + 1] = current
         current, size = {}, 0
      end
      current[#current + 1] = e
      size = size + e.bytes
   end
   if #current > 0 or #shards == 0 then shards[#shards + 1] = current end
   return shards
end

local function is_weights_file(name)
   return name == "model.safetensors" or name == "model.safetensors.index.json"
      or name:match("^model%-%d+%-of%-%d+%.safetensors$") ~= nil
end

function M.save_model(model, dir, opts)
   opts = opts or {}
   check_args(model, dir, opts)
   local max = require("moonload.utils.sizes").parse_size(opts.max_shard_size or "10GB", WHO)
   dir = dir:gsub("/+$", "")
   local config = config_of(model)
   local sd, keys = model:state_dict({ keep_vars = true })
   local loras = lora_layers(model)
   local entries, seen, total = {}, {}, 0
   for _, key in ipairs(keys) do
      local t = sd[key]
      local name, lora = saved_name(loras, key)
      if name and not seen[t] then                        -- tied: the first name keeps it
         seen[t] = true
         local bytes = t:numel() * t:element_size()
         entries[#entries + 1] = { key = name, source = key, tensor = t, bytes = bytes, lora = lora }
         total = total + bytes
      end
   end
   local shards = plan_shards(entries, max)
   require("moonload.utils.offload").mkdir_p(dir, WHO)

   local written, pending = {}, {}                        -- final names; {tmp, final} to rename
   local ok, err = pcall(function()
      local weight_map = {}
      for i, shard in ipairs(shards) do
         local name = #shards == 1 and "model.safetensors"
            or string.format("model-%05d-of-%05d.safetensors", i, #shards)
         local tensors = {}
         for _, e in ipairs(shard) do
            local v = value_of(model, e.source, e.tensor)
            tensors[e.key] = e.lora and merged(e.lora, v) or v
            weight_map[e.key] = name
         end
         local tmp = tmp_name(dir .. "/" .. name)
         pending[#pending + 1] = { tmp, dir .. "/" .. name }
         require("moonload.safetensors").save_file(tensors, tmp, { format = "pt" })
         tensors = nil
         collectgarbage()                                 -- (a shard's CPU copies of GPU weights)
         written[#written + 1] = name
      end
      if #shards > 1 then
         local index = encode_json({ metadata = { total_size = total }, weight_map = weight_map }) .. "\n"
         pending[#pending + 1] = { write_text(dir .. "/model.safetensors.index.json", index),
                                   dir .. "/model.safetensors.index.json" }
         written[#written + 1] = "model.safetensors.index.json"
      end
      pending[#pending + 1] = { write_text(dir .. "/config.json", encode_json(config) .. "\n"), dir .. "/config.json" }
      written[#written + 1] = "config.json"
      -- a causal model's generation defaults (as read, else config.json's token ids), as
      -- transformers' save_pretrained writes them
      local gc = type(model.generate) == "function" and require("moonload.models.generation_config").of(model) or nil
      if gc and next(gc) ~= nil then
         pending[#pending + 1] = { write_text(dir .. "/generation_config.json", encode_json(gc) .. "\n"),
                                   dir .. "/generation_config.json" }
         written[#written + 1] = "generation_config.json"
      end
   end)
   if not ok then
      for _, p in ipairs(pending) do os.remove(p[1]) end
      error(tostring(err), 2)
   end
   for _, p in ipairs(pending) do
      local rok, rerr = os.rename(p[1], p[2])
      if not rok then error(string.format("%s: cannot rename %s to %s (%s)", WHO, p[1], p[2], tostring(rerr)), 2) end
   end
   -- an earlier save's weights files that this one does not have
   local keep = {}
   for _, name in ipairs(written) do keep[name] = true end
   for _, name in ipairs(require("moonload.utils.offload").list_dir(dir)) do
      if is_weights_file(name) and not keep[name] then os.remove(dir .. "/" .. name) end
   end
   return written
end

return M
