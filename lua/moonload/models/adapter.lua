--- ml.models.load_adapter(model, dir[, {merge = false}]) -> model, report: a LoRA adapter saved by
-- peft (adapter_config.json + adapter_model.safetensors) put on a loaded model, as peft's
-- PeftModel.from_pretrained does for inference.
--  * Every linear layer the file has lora_A and lora_B weights for becomes an nn.LoraLinear around
--    it: y = base(x) + lora_B(lora_A(x)) * scaling, with scaling = lora_alpha / r (alpha_pattern
--    per module; lora_alpha / sqrt(r) with use_rslora). The layer itself is left as it is, so it
--    may be int8 or int4 (QLoRA), offloaded, or streamed to a GPU by its hook; the adapter's
--    weights (r x in and out x r) are put where the layer computes (its hook's execution device,
--    else its weight's device) in the model's dtype.
--  * With merge = true, a float layer whose weight is in memory (CPU or GPU) and not tied to
--    another module gets W + (B A) * scaling instead (peft's merge_and_unload): no cost per
--    token. Others are wrapped, and report.kept says why.
--  * Other tensors in the file are modules_to_save (a whole module trained with the adapter, such
--    as lm_head): they replace the model's, in memory or in the module's offloading hook (a
--    quantized layer's weight is quantized again to its width).
-- report: adapted (names wrapped), merged, replaced (tensor names), kept ({name = reason}).
-- What peft can save that this does not read (DoRA, LoRA on embeddings, trained biases, target
-- parameters) is an error that names it, as are weights for modules the model does not have or
-- shapes that do not fit.
local LoraLinear = require("moonload.nn.lora_linear")

local M = {}
local WHO = "load_adapter"
local PREFIX = "base_model.model."

local function fail(fmt, ...) error(WHO .. ": " .. string.format(fmt, ...), 0) end

-- adapter_config.json, checked for what this loader computes.
local function read_config(dir)
   local path = dir .. "/adapter_config.json"
   local json = require("moonload.utils.json")
   local cfg = json.read(path, WHO, true)
   if not cfg then fail("no adapter_config.json in %s", dir) end
   json.without_nulls(cfg)
   if cfg.peft_type ~= "LORA" then
      fail('%s has peft_type "%s"; only LoRA adapters ("LORA") are read', path, tostring(cfg.peft_type))
   end
   local unsupported = {
      { cfg.use_dora == true, "use_dora (DoRA's magnitude vectors)" },
      { cfg.bias ~= nil and cfg.bias ~= "none", string.format('bias "%s" (trained biases)', tostring(cfg.bias)) },
      { cfg.lora_bias == true, "lora_bias" },
      { type(cfg.target_parameters) == "table" and next(cfg.target_parameters) ~= nil, "target_parameters" },
      { cfg.layer_replication ~= nil, "layer_replication" },
   }
   for _, u in ipairs(unsupported) do
      if u[1] then fail("%s uses %s, which moonload does not read", path, u[2]) end
   end
   if type(cfg.lora_alpha) ~= "number" then fail("%s has no numeric lora_alpha", path) end
   return cfg, path
end

-- peft's get_pattern_key: the alpha_pattern entry whose key is the module's name or ends it
-- after a dot (the longest such key), else nil.
local function pattern_value(patterns, name)
   local best, value = -1, nil
   for key, v in pairs(type(patterns) == "table" and patterns or {}) do
      if (name == key or name:sub(-#key - 1) == "." .. key) and #key > best then best, value = #key, v end
   end
   return value
end

-- The adapter file's tensors: {module = {lora_A, lora_B}} by the model's module names, and the
-- whole tensors (modules_to_save) by the model's tensor names.
local function read_weights(model, dir)
   local path = dir .. "/adapter_model.safetensors"
   local fh = io.open(path, "rb")
   if not fh then
      fail("no adapter_model.safetensors in %s (only safetensors adapters are read)", dir)
   end
   fh:close()
   local tensors = require("moonload.safetensors").load_file(path)
   local map_name = require("moonload.models").name_mapper(model)
   local lora, whole = {}, {}
   local names = {}
   for k in pairs(tensors) do names[#names + 1] = k end
   table.sort(names)
   for _, key in ipairs(names) do
      local k = key:sub(1, #PREFIX) == PREFIX and key:sub(#PREFIX + 1) or key
      k = k:gsub("%.modules_to_save%.[^.]+%.", ".")                    -- (older files name the copy)
      local mod, which = k:match("^(.*)%.(lora_[AB])%.weight$")
      if not mod then mod, which = k:match("^(.*)%.(lora_[AB])%.[^.]+%.weight$") end   -- (an adapter name)
      if mod then
         mod = map_name(mod .. ".weight"):gsub("%.weight$", "")
         lora[mod] = lora[mod] or {}
         lora[mod][which] = tensors[key]
      elseif k:find("lora_", 1, true) then
         fail('%s holds "%s", a kind of LoRA weight moonload does not read (LoRA on embeddings, DoRA)', path, key)
      else
         whole[map_name(k)] = tensors[key]
      end
   end
   return lora, whole, path
end

-- The execution device of a hook (a SequentialHook's first that has one), as "cpu" / "cuda:N".
local function hook_device(hook)
   local hooks = require("moonload.hooks")
   if hook.execution_device ~= nil then return hooks.norm_device(hook.execution_device) end
   for _, h in ipairs(hook.hooks or {}) do
      if h.execution_device ~= nil then return hooks.norm_device(h.execution_device) end
   end
   return nil
end

-- Where module name computes: the execution device of the nearest hook on it or above it, else
-- its weight's device (the CPU for a weight on meta with no hook).
local function compute_device(model, name, m)
   local path = name
   while true do
      local mod = path == "" and model or model:get_submodule(path)
      local hook = rawget(mod, "_hf_hook")
      local dev = hook and hook_device(hook)
      if dev then return dev end
      if path == "" then break end
      path = path:match("^(.*)%.[^.]+$") or ""
   end
   local w = m.weight
   if w ~= nil and not w:is_meta() then return w.device end
   return "cpu"
end

-- The number of modules holding each parameter tensor (tied weights: more than one).
local function owner_counts(model)
   local count = {}
   for _, e in ipairs(model:named_modules_list("", false)) do
      for _, p in e[2]:named_parameters("", false) do count[p] = (count[p] or 0) + 1 end
   end
   return count
end

-- Why layer m cannot take the adapter merged into its weight (nil when it can).
local function unmergeable(m, owners)
   if m.__name ~= "Linear" and m.__name ~= "Conv1D" then return m.__name .. " weights (kept beside them)" end
   if m.weight:is_meta() then return "offloaded (its weights come through its hook)" end
   if (owners[m.weight] or 0) > 1 then return "its weight is tied to another module's" end
   return nil
end

-- The module holding tensor name (a modules_to_save weight), its slot and the tensor there,
-- checked against t's shape.
local function tensor_slot(model, name, t)
   local parent, leaf = name:match("^(.*)%.([^.]+)$")
   local ok, owner = pcall(model.get_submodule, model, parent or "")
   leaf = leaf or name
   local old = ok and type(owner) == "table" and rawget(owner, "_parameters") and owner._parameters:get(leaf)
   if not old then old = ok and type(owner) == "table" and rawget(owner, "_buffers") and owner._buffers:get(leaf) end
   if not old then fail('the adapter holds "%s", which is not a tensor of the model', name) end
   if owner.__name == "QuantizedLinear" and leaf == "weight" then
      -- a whole float weight for a quantized layer: quantized again to the layer's width
      if table.concat({ owner.out_features, owner.in_features }, ",") ~= table.concat(t.shape, ",") then
         fail('the adapter\'s "%s" has shape [%s]; the model\'s layer is %d -> %d', name, table.concat(t.shape, ", "),
            owner.in_features, owner.out_features)
      end
      if old:is_meta() then
         fail('"%s" is an offloaded int%d layer; load the adapter before quantizing (quantize after it)', name, owner.bits or 8)
      end
      return owner, leaf, old
   end
   if table.concat(old.shape, ",") ~= table.concat(t.shape, ",") then
      fail('the adapter\'s "%s" has shape [%s]; the model\'s is [%s]', name, table.concat(t.shape, ", "),
         table.concat(old.shape, ", "))
   end
   if old:is_meta() then
      if not require("moonload.hooks").offload_hook(owner) then
         fail('"%s" is offloaded with its block; load the adapter before dispatching the model', name)
      end
   end
   return owner, leaf, old
end

-- Puts t in the slot: in memory in place of the old tensor, or in the weights map of the
-- module's own offloading hook (a new hook over the same weights but this one).
local function replace_tensor(owner, leaf, old, t)
   if owner.__name == "QuantizedLinear" and leaf == "weight" then
      local q, scales = owner.quantize_weight(t:to(old.device), owner.bits or 8)
      owner.weight, owner.weight_scale = q, scales
      return
   end
   local value = t:to(old.dtype)
   if not old:is_meta() then
      owner[leaf] = value:to(old.device)
      return
   end
   local hooks = require("moonload.hooks")
   local hook = rawget(owner, "_hf_hook")
   local wm = {}
   for tname in pairs(owner:state_dict({ keep_vars = true })) do
      if not tname:find(".", 1, true) then wm[tname] = hooks.weights_map_get(hook.weights_map, tname) end
   end
   wm[leaf] = value
   hooks.offload_like(owner, hook, wm)
end

function M.load_adapter(model, dir, opts)
   opts = opts or {}
   if type(model) ~= "table" or type(model.named_modules_list) ~= "function" then
      error(WHO .. ": model must be an nn.Module, got " .. type(model), 2)
   end
   if type(dir) ~= "string" then error(WHO .. ": dir must be a folder path, got " .. type(dir), 2) end
   if type(opts) ~= "table" then error(WHO .. ": options must be a table {merge}, got " .. type(opts), 2) end
   for k in pairs(opts) do
      if k ~= "merge" then error(string.format('%s: unknown option "%s" (expected merge)', WHO, tostring(k)), 2) end
   end
   dir = dir:gsub("/+$", "")
   local cfg = read_config(dir)
   local lora, whole, path = read_weights(model, dir)
   local quantize = require("moonload.quantize")
   local dtype = quantize.compute_dtype(model) or "float32"
   local owners = owner_counts(model)
   local report = { adapted = {}, merged = {}, replaced = {}, kept = {} }
   -- check everything before changing anything
   local plan = {}
   local mods = {}
   for name in pairs(lora) do mods[#mods + 1] = name end
   table.sort(mods)
   for _, name in ipairs(mods) do
      local w = lora[name]
      local ok, m = pcall(model.get_submodule, model, name)
      if not ok or type(m) ~= "table" then
         fail('%s has LoRA weights for "%s", which is not a module of the model', path, name)
      end
      local in_f, out_f = m.in_features or m.nx, m.out_features or m.nf
      if not in_f or not out_f or m.__name == "LoraLinear" then
         fail('%s has LoRA weights for "%s", a %s (a linear layer without an adapter expected)', path, name, m.__name)
      end
      if not w.lora_A or not w.lora_B then
         fail('%s has %s but no %s for "%s"', path, w.lora_A and "lora_A" or "lora_B", w.lora_A and "lora_B" or "lora_A", name)
      end
      local A, B = w.lora_A, w.lora_B
      local r = A:size(1)
      if A:dim() ~= 2 or B:dim() ~= 2 or A:size(2) ~= in_f or B:size(1) ~= out_f or B:size(2) ~= r then
         fail('"%s": lora_A [%s] and lora_B [%s] do not fit a layer of %d -> %d features (expected [r, %d] and [%d, r])',
            name, table.concat(A.shape, ", "), table.concat(B.shape, ", "), in_f, out_f, in_f, out_f)
      end
      local alpha = pattern_value(cfg.alpha_pattern, name) or cfg.lora_alpha
      local scaling = cfg.use_rslora and alpha / math.sqrt(r) or alpha / r
      plan[#plan + 1] = { name = name, m = m, A = A, B = B, scaling = scaling }
   end
   local slots = {}
   for tname, t in pairs(whole) do
      local owner, leaf, old = tensor_slot(model, tname, t)
      slots[#slots + 1] = { owner, leaf, old, t }
      report.replaced[#report.replaced + 1] = tname
   end
   table.sort(report.replaced)
   for _, s in ipairs(slots) do replace_tensor(s[1], s[2], s[3], s[4]) end
   for _, p in ipairs(plan) do
      local why = opts.merge and unmergeable(p.m, owners) or nil
      if opts.merge and not why then
         p.m.weight = LoraLinear.merged_weight(p.m.weight, p.A, p.B, p.scaling, p.m.nf ~= nil)
         report.merged[#report.merged + 1] = p.name
      else
         if opts.merge then report.kept[p.name] = why end
         local dev = compute_device(model, p.name, p.m)
         local layer_dtype = quantize.compute_dtype(p.m) or dtype
         model:set_submodule(p.name, LoraLinear(p.m, p.A:to(dev):to(layer_dtype), p.B:to(dev):to(layer_dtype), p.scaling))
         report.adapted[#report.adapted + 1] = p.name
      end
   end
   return model, report
end

return M
