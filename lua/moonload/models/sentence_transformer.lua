--- A sentence-transformers folder (modules.json) as one model, text in and embeddings out, as
-- sentence-transformers' SentenceTransformer(dir).encode gives them: the transformer (any
-- encoder from_pretrained reads: BERT, RoBERTa / XLM-R, T5's encoder, BART's encoder; or a
-- decoder's last hidden states, as Qwen3-Embedding's last-token pooling reads them), its
-- Pooling, its Dense layers, Normalize. Both the folders sentence-transformers 6 writes
-- ("pooling_mode", the tokenizer's model_max_length) and older ones ("pooling_mode_*_token"
-- flags, sentence_bert_config.json's max_seq_length) are read.
--
--    local st = ml.models.sentence_transformer.from_pretrained(dir)   -- from_pretrained's options too
--    local emb = st:encode({"first text", "second text"})              -- (2, dim) float32
--    local sim = emb:matmul(emb:t())                                    -- cosines, when normalized
local T = require("moonload.tensor")
local common = require("moonload.models.common")
local json = require("moonload.utils.json")

local M = {}
local WHO = "sentence_transformer"

-- Pooling modes in sentence-transformers' order, and their legacy flags.
M.MODES = { "cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken" }
local LEGACY = { pooling_mode_cls_token = "cls", pooling_mode_max_tokens = "max", pooling_mode_mean_tokens = "mean",
   pooling_mode_mean_sqrt_len_tokens = "mean_sqrt_len_tokens", pooling_mode_weightedmean_tokens = "weightedmean",
   pooling_mode_lasttoken = "lasttoken" }
local KNOWN = {}
for _, m in ipairs(M.MODES) do KNOWN[m] = true end

-- Dense activations by their torch class names.
local ACTIVATIONS = {
   ["torch.nn.modules.linear.Identity"] = function(x) return x end,
   ["torch.nn.modules.activation.Tanh"] = function(x) return x:tanh() end,
   ["torch.nn.modules.activation.ReLU"] = function(x) return x:relu() end,
   ["torch.nn.modules.activation.GELU"] = function(x) return x:gelu() end,
   ["torch.nn.modules.activation.Sigmoid"] = function(x) return x:sigmoid() end,
}

-- Each row's first and last real position (1-based) of a 0/1 mask given as Lua lists.
local function ends(rows)
   local first, last = {}, {}
   for b, row in ipairs(rows) do
      first[b], last[b] = 1, #row
      local seen = false
      for i, v in ipairs(row) do
         if v ~= 0 then
            if not seen then first[b], seen = i, true end
            last[b] = i
         end
      end
   end
   return first, last
end

-- The rows (B, H) of hidden (B, L, H) at the 1-based positions pos[b].
local function pick_rows(hidden, pos)
   local out = {}
   for b, p in ipairs(pos) do out[b] = hidden:select(1, b):narrow(1, p, 1) end
   return T.cat(out, 1)
end

--- pool(hidden (B, L, H), mask ((B, L) 0/1 Lua lists, a tensor, or nil), modes (a mode or a list)) ->
-- (B, H x #modes) float32: sentence-transformers' Pooling, modes concatenated in the order given.
function M.pool(hidden, mask, modes)
   if type(modes) == "string" then modes = { modes } end
   local B, L = hidden:size(1), hidden:size(2)
   local h = hidden:to("float32")
   local m = mask ~= nil and common.mask_tensor(mask, B, L, WHO):to("int64") or T.ones({ B, L }, { dtype = "int64" })
   m = m:to(h.device)
   local rows = m:tolist()
   local first, last = ends(rows)
   local mf = m:to("float32"):unsqueeze(3)                     -- (B, L, 1)
   local out = {}
   for _, mode in ipairs(modes) do
      if mode == "cls" then
         out[#out + 1] = pick_rows(h, first)
      elseif mode == "max" then
         out[#out + 1] = h:masked_fill(mf:eq(0), -math.huge):max(2)
      elseif mode == "mean" or mode == "mean_sqrt_len_tokens" then
         local count = mf:sum(2):clamp(1e-9)
         out[#out + 1] = (h * mf):sum(2) / (mode == "mean" and count or count:sqrt())
      elseif mode == "weightedmean" then
         -- weights 1, 2, ... from each row's first real token (left padding does not shift them)
         local w = {}
         for b = 1, B do
            local r = {}
            for i = 1, L do r[i] = { (i - first[b] + 1) * rows[b][i] } end
            w[b] = r
         end
         local wt = T.tensor(w, { dtype = "float32" }):to(h.device)   -- (B, L, 1)
         out[#out + 1] = (h * wt):sum(2) / wt:sum(2):clamp(1e-9)
      elseif mode == "lasttoken" then
         out[#out + 1] = pick_rows(h * mf, last)
      else
         error(string.format('%s: pooling mode %q is not one of %s', WHO, tostring(mode), table.concat(M.MODES, ", ")), 2)
      end
   end
   return #out == 1 and out[1] or T.cat(out, 2)
end

--- Rows scaled to unit L2 norm (clamped at 1e-12, as torch.nn.functional.normalize).
function M.normalize(x)
   return x / (x * x):sum(-1, true):sqrt():clamp(1e-12)
end

local function read_json(path) return json.read(path, WHO, true) end

--- The pooling modes of a Pooling module's config.json (sentence-transformers 6 or older).
function M.pooling_modes(cfg, where)
   local modes = cfg.pooling_mode
   if type(modes) == "string" then modes = { modes } end
   if type(modes) ~= "table" then
      modes = {}
      for _, mode in ipairs(M.MODES) do
         for flag, m in pairs(LEGACY) do
            if m == mode and cfg[flag] == true then modes[#modes + 1] = mode end
         end
      end
   end
   if #modes == 0 then modes = { "mean" } end
   for _, mode in ipairs(modes) do
      if not KNOWN[mode] then
         error(string.format('%s: %s asks for pooling mode %q (supported: %s)', WHO, where, tostring(mode),
            table.concat(M.MODES, ", ")), 3)
      end
   end
   return modes
end

local ST = {}
ST.__index = ST

--- from_pretrained(dir[, opts]) -> a SentenceTransformer: modules.json's transformer loaded by
-- ml.models.from_pretrained (opts passed on: device_map, dtype, quantize, ...), its tokenizer,
-- pooling, Dense layers and Normalize.
function M.from_pretrained(dir, opts)
   if type(dir) ~= "string" then error(WHO .. ".from_pretrained: expected a folder path, got " .. type(dir), 2) end
   dir = dir:gsub("/+$", "")
   local modules = read_json(dir .. "/modules.json")
   if type(modules) ~= "table" or #modules == 0 then
      error(string.format("%s.from_pretrained: no modules.json in %s (not a sentence-transformers folder)", WHO, dir), 2)
   end
   local self = setmetatable({ dir = dir, dense = {}, modes = nil, normalize = false }, ST)
   for i, m in ipairs(modules) do
      local kind = type(m.type) == "string" and m.type:match("([%w_]+)$") or tostring(m.type)
      local path = (type(m.path) == "string" and m.path ~= "") and (dir .. "/" .. m.path) or dir
      if kind == "Transformer" then
         self.model = require("moonload.models").from_pretrained(path, opts)
         self.tokenizer = require("moonload.tokenizers").from_pretrained(path)
         local sb = read_json(path .. "/sentence_bert_config.json") or {}
         local tc = read_json(path .. "/tokenizer_config.json") or {}
         local n = tonumber(sb.max_seq_length) or tonumber(tc.model_max_length)
         if n and n > 0 and n < 1e6 then self.max_seq_length = n end
      elseif kind == "Pooling" then
         self.modes = M.pooling_modes(read_json(path .. "/config.json") or {}, path .. "/config.json")
      elseif kind == "Dense" then
         local cfg = read_json(path .. "/config.json") or {}
         local act = ACTIVATIONS[cfg.activation_function or "torch.nn.modules.linear.Identity"]
         if not act then
            error(string.format("%s.from_pretrained: %s/config.json's activation %s is not supported", WHO, path,
               tostring(cfg.activation_function)), 2)
         end
         local file = path .. "/model.safetensors"
         local f = io.open(file, "rb")
         if not f then
            error(string.format("%s.from_pretrained: %s has no model.safetensors (pickled weights are not read)", WHO, path), 2)
         end
         f:close()
         local sd = require("moonload.safetensors").load_file(file)
         if not sd["linear.weight"] then
            error(string.format("%s.from_pretrained: %s has no linear.weight", WHO, file), 2)
         end
         self.dense[#self.dense + 1] = { weight = sd["linear.weight"], bias = sd["linear.bias"], act = act }
      elseif kind == "Normalize" then
         self.normalize = true
      else
         error(string.format("%s.from_pretrained: module %d of %s/modules.json is a %s (supported: Transformer, "
            .. "Pooling, Dense, Normalize)", WHO, i, dir, tostring(m.type)), 2)
      end
   end
   if not self.model then
      error(string.format("%s.from_pretrained: %s/modules.json has no Transformer module", WHO, dir), 2)
   end
   self.modes = self.modes or { "mean" }
   return self
end

--- The transformer's last hidden states (B, L, H) for ids and mask.
function ST:hidden_states(ids, mask)
   local model = self.model
   if type(model.encode) == "function" then return model:encode(ids, { attention_mask = mask }) end
   if type(model.new_cache) == "function" then              -- a decoder (Qwen3-Embedding, E5-Mistral)
      return model(ids, { attention_mask = mask, output_hidden_states = true })
   end
   local out = model(ids, { attention_mask = mask })
   if type(out) == "table" and out.last_hidden_state then return out.last_hidden_state end
   error(string.format("%s: the transformer (%s) gives no hidden states to pool", WHO, tostring(model.__name)), 3)
end

--- Runs rows (encoded texts: lists of ids) through fn(batch indices) in batches of at most
-- batch_size, longest rows first, as sentence-transformers orders them (each batch then pads only
-- to its own longest); fn returns (n, ...) float32 rows. Returns them all in the rows' own order.
function M.length_sorted(rows, batch_size, fn)
   if type(batch_size) ~= "number" or batch_size < 1 or batch_size % 1 ~= 0 then
      error(WHO .. ": batch_size must be an integer >= 1, got " .. tostring(batch_size), 3)
   end
   local order = {}
   for i = 1, #rows do order[i] = i end
   table.sort(order, function(a, b)
      if #rows[a] ~= #rows[b] then return #rows[a] > #rows[b] end
      return a < b
   end)
   local parts = {}
   for first = 1, #order, batch_size do
      parts[#parts + 1] = fn({ unpack(order, first, math.min(first + batch_size - 1, #order)) }):to("cpu")
   end
   local sorted = #parts == 1 and parts[1] or T.cat(parts, 1)
   local back = {}                                      -- (0-based) where each row went
   for pos, i in ipairs(order) do back[i] = pos - 1 end
   return sorted:index_select(1, T.tensor(back, { dtype = "int64" }))
end

--- encode(texts or ids[, {attention_mask, batch_size = 32}]) -> (B, dim) float32 embeddings.
-- texts: a string or a list of strings (the folder's tokenizer, truncated to its max_seq_length,
-- padded on the side its tokenizer_config.json says), run in batches of batch_size, longest
-- first; or ids as generate takes them, with their attention_mask, run as one batch.
function ST:encode(input, opts)
   opts = opts or {}
   if type(input) == "string" then input = { input } end
   if type(input) == "table" and type(input[1]) == "string" then
      local rows = {}
      for i, text in ipairs(input) do
         rows[i] = self.tokenizer:encode(text, { truncation = self.max_seq_length ~= nil, max_length = self.max_seq_length })
      end
      return M.length_sorted(rows, opts.batch_size or 32, function(batch)
         local picked = {}
         for k, i in ipairs(batch) do picked[k] = rows[i] end
         local ids, mask = self.tokenizer:pad(picked)
         return self:embed(ids, mask)
      end)
   end
   return self:embed(input, opts.attention_mask)
end

--- The embeddings (B, dim) of ids (B, T) and their mask: the transformer, pooling, Dense
-- layers and Normalize.
function ST:embed(ids, mask)
   local x = M.pool(self:hidden_states(ids, mask), mask, self.modes)
   for _, d in ipairs(self.dense) do
      local w = d.weight:to(x.device):to("float32")
      x = x:matmul(w:t())
      if d.bias then x = x + d.bias:to(x.device):to("float32") end
      x = d.act(x)
   end
   if self.normalize then x = M.normalize(x) end
   return x
end

return M
