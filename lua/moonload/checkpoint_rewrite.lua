--- checkpoint_rewrite: checkpoints stored in another quantizer's layout (compressed-tensors,
-- AutoAWQ, GPTQ) whose layers' tensors are rewritten into moonload's as they load. A reader builds
-- the model's layers and sets model.rewrite_checkpoint = rewrite.new(...); models.load_into then
-- loads rewrite.in_memory's state dict (every rewritten tensor in RAM), and from_pretrained with a
-- device_map and an offload_folder loads rewrite.into_folder's checkpoint instead: the rewritten
-- tensors written a batch at a time under <offload_folder>/rewritten/ beside links to the files of
-- the rest, so that a model bigger than RAM is never whole in it and its disk layers stay in those
-- files (dispatched as a checkpoint of moonload's own layout is).
local M = {}

local Rewrite = {}
Rewrite.__index = Rewrite

--- new(schemes, fields, convert_one, label[, dropped]) -> a rewrite: schemes {checkpoint layer
-- name -> its scheme, with out_features and in_features}; fields {field = true}: the tensors of a
-- layer it replaces ("<layer>.<field>"); convert_one(owner, scheme, need, sd, who) -> {name -> tensor},
-- the layer's tensors in moonload's layout under checkpoint names, need(field) giving the layer's
-- tensor (an error naming it, and label, when the checkpoint lacks it). dropped {field = true}:
-- tensors of any layer it drops (activation scales).
function M.new(schemes, fields, convert_one, label, dropped)
   local owners = {}
   for owner in pairs(schemes) do owners[#owners + 1] = owner end
   table.sort(owners)
   return setmetatable({ schemes = schemes, fields = fields, dropped = dropped or {}, owners = owners,
      convert_one = convert_one, label = label }, Rewrite)
end

--- consumes(name) -> true for a checkpoint tensor the rewrite replaces or drops.
function Rewrite:consumes(name)
   local owner, field = name:match("^(.*)%.([%w_]+)$")
   if not owner then return false end
   return (self.schemes[owner] ~= nil and self.fields[field] == true) or self.dropped[field] == true
end

--- convert(sd, who[, only]) -> the rewritten tensors of every layer (or of the set only).
function Rewrite:convert(sd, who, only)
   local out = {}
   for _, owner in ipairs(self.owners) do
      if only == nil or only[owner] then
         local function need(field)
            local t = sd[owner .. "." .. field]
            if t == nil then
               error(string.format('%s: the checkpoint lacks "%s.%s" (%s)', who, owner, field, self.label), 0)
            end
            return t
         end
         for name, t in pairs(self.convert_one(owner, self.schemes[owner], need, sd, who)) do out[name] = t end
      end
   end
   return out
end

-- The tensors the rewrite keeps as they are.
local function kept(rw, sd)
   local out = {}
   for name, t in pairs(sd) do
      if not rw:consumes(name) then out[name] = t end
   end
   return out
end

--- in_memory(rw, sd, who) -> sd with its rewritten layers in RAM.
function M.in_memory(rw, sd, who)
   local out = kept(rw, sd)
   for name, t in pairs(rw:convert(sd, who)) do out[name] = t end
   return out
end

-- Rewritten bytes gathered before a batch is written (the RAM a load needs beyond one layer).
M.BATCH_BYTES = 256 * 1024 * 1024

-- What a rewritten folder was made from: the source files (path, size, modification time) and
-- every layer's scheme, as one string; a folder whose index records the same one is reused.
local function stamp(rw, ckpt, label)
   local parts = { "moonload rewrite 1", label }
   local files = ckpt.kind == "sharded" and ckpt.files or { ckpt.path }
   for _, path in ipairs(files) do
      local p = io.popen("stat -L -c '%s %Y' " .. require("moonload.utils.offload").shell_quote(path) .. " 2>/dev/null")
      parts[#parts + 1] = path .. " " .. (p:read("*l") or "?")
      p:close()
   end
   for _, owner in ipairs(rw.owners) do
      local s, fields = rw.schemes[owner], {}
      for k, v in pairs(s) do
         if type(v) == "number" or type(v) == "string" or type(v) == "boolean" then
            fields[#fields + 1] = k .. "=" .. tostring(v)
         elseif type(v) == "table" then
            fields[#fields + 1] = k .. "=" .. table.concat(v, "x")
         end
      end
      table.sort(fields)
      parts[#parts + 1] = owner .. " " .. table.concat(fields, ",")
   end
   return table.concat(parts, "\n")
end

-- The index of a previous rewrite of the same source, when its files are all there (else nil).
local function reusable(index, want)
   local f = io.open(index, "rb")
   if not f then return nil end
   local ok, t = pcall(require("cjson").decode, f:read("*a"))
   f:close()
   if not ok or type(t) ~= "table" or type(t.metadata) ~= "table" or t.metadata.moonload_rewrite ~= want then
      return nil
   end
   local dir = index:match("^(.*)/[^/]*$")
   for _, file in pairs(t.weight_map or {}) do
      if not require("moonload.utils.offload").file_exists(dir .. "/" .. file) then return nil end
   end
   return index
end

--- into_folder(rw, ckpt, folder, who) -> the path of a sharded checkpoint index under
-- folder/rewritten/ holding the rewritten layers (rewritten-00001.safetensors, ...; each written to a
-- temporary name and renamed, about BATCH_BYTES of RAM at a time) and the tensors kept as they are,
-- through links to ckpt's own files (source-<name>): loaded as any checkpoint, its disk layers stay
-- in those files. A folder rewritten from the same files (sizes and modification times) with the
-- same schemes is used again as it is; another is replaced. ckpt: models.find_checkpoint's.
function M.into_folder(rw, ckpt, folder, who)
   local models = require("moonload.models")
   local st = require("moonload.safetensors")
   local offload = require("moonload.utils.offload")
   local dir = folder .. "/rewritten"
   local index = dir .. "/model.safetensors.index.json"
   local made_from = stamp(rw, ckpt, rw.label)
   if reusable(index, made_from) then return index end
   offload.mkdir_p(dir, who)
   os.remove(index)                      -- (no index until every file it lists is whole)
   local sd = models.read_checkpoint(ckpt)
   local weight_map = {}
   local function link(path)
      local name = "source-" .. path:match("([^/]+)$")
      local target = require("moonload.utils.modeling").abspath(path)
      os.remove(dir .. "/" .. name)
      local ok = os.execute(string.format("ln -s %s %s", offload.shell_quote(target), offload.shell_quote(dir .. "/" .. name)))
      if ok ~= 0 and ok ~= true then error(string.format("%s: cannot link %s into %s", who, path, dir), 0) end
      return name
   end
   local linked = {}
   for name in pairs(sd) do
      if not rw:consumes(name) then
         local path = ckpt.kind == "sharded" and ckpt.weight_map[name] or ckpt.path
         linked[path] = linked[path] or link(path)
         weight_map[name] = linked[path]
      end
   end
   local batch, bytes, n = {}, 0, 0
   local function flush()
      if next(batch) == nil then return end
      n = n + 1
      local file = string.format("rewritten-%05d.safetensors", n)
      local tensors = rw:convert(sd, who, batch)
      st.save_file(tensors, dir .. "/" .. file)
      for name in pairs(tensors) do weight_map[name] = file end
      batch, bytes, tensors = {}, 0, nil
      collectgarbage()                  -- the batch's RAM goes back before the next one fills
   end
   for _, owner in ipairs(rw.owners) do
      local s = rw.schemes[owner]
      batch[owner] = true
      bytes = bytes + s.out_features * s.in_features
      if bytes >= M.BATCH_BYTES then flush() end
   end
   flush()
   sd = nil
   collectgarbage()
   require("moonload.C").lib.ml_cpu_empty_cache()  -- (the batches' blocks: the allocator would keep them)
   offload.write_atomic(index, who, function(f)
      f:write(require("cjson").encode({ metadata = { moonload_rewrite = made_from }, weight_map = weight_map }))
   end)
   return index
end

return M
