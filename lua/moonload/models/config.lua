--- Reading and validating Hugging Face config.json files for ml.models.
-- A config is given as a path (a config.json file or the folder holding one) or as a Lua table.
-- Each model declares a schema (key -> kind, default); a missing key or a value of the wrong
-- kind is an error naming the key and the file ("config table" for a table).
local cjson = require("cjson")
local json = require("moonload.utils.json")

local M = {}

local function read_file(path)
   local f, err = io.open(path, "rb")
   if not f then return nil, err end
   local s = f:read("*a")
   f:close()
   return s
end

local function is_dir(path)
   local f = io.open(path .. "/config.json", "rb")
   if f then f:close() return true end
   return false
end

--- JSON null (cjson.null) becomes nil, recursively, so an explicit null reads as absent.
local function strip_nulls(v)
   if v == cjson.null then return nil end
   if type(v) == "table" then
      local out = {}
      for k, x in pairs(v) do out[k] = strip_nulls(x) end
      return out
   end
   return v
end

--- Loads a config: `source` is a table, a path to a JSON file, or a folder with config.json.
-- Returns the raw table (JSON nulls removed) and a description of where it came from.
function M.read(source, who)
   who = who or "models"
   if type(source) == "table" then     -- (a table made from a file may say which: _source)
      local raw = strip_nulls(source)
      json.float_keys[raw] = json.float_keys[source]
      return raw, type(source._source) == "string" and source._source or "config table"
   end
   if type(source) ~= "string" then
      error(string.format("%s: config must be a path to config.json or a table, got %s", who, type(source)), 3)
   end
   local path = source
   if not path:match("%.json$") and is_dir(path) then path = path .. "/config.json" end
   local text, err = read_file(path)
   if not text then
      error(string.format("%s: cannot read config %s (%s)", who, path, tostring(err)), 3)
   end
   local ok, t = pcall(cjson.decode, text)
   if not ok then
      error(string.format("%s: %s is not valid JSON (%s)", who, path, tostring(t)), 3)
   end
   if type(t) ~= "table" then
      error(string.format("%s: %s does not hold a JSON object", who, path), 3)
   end
   local raw = strip_nulls(t)
   json.float_keys[raw] = json.float_key_names(text)       -- (ml.save_model writes 1.0 back as 1.0)
   return raw, path
end

--- read_with_defaults(source, who, defaults) -> raw (as read), src, and a copy of raw with
-- defaults (key -> value) filled in where raw has none and its _source the file, for a family whose
-- transformers config class defaults differently from Llama's to read through models/llama.lua's
-- config (whose errors then name the file).
function M.read_with_defaults(source, who, defaults)
   local raw, src = M.read(source, who)
   local fixed = {}
   for k, v in pairs(raw) do fixed[k] = v end
   for k, v in pairs(defaults) do if fixed[k] == nil then fixed[k] = v end end
   fixed._source = src
   return raw, src, fixed
end

local KIND_NAMES = {
   int = "a positive integer", int0 = "a non-negative integer", number = "a number",
   posnum = "a positive number", bool = "a boolean", string = "a string", table = "an object",
}

local function kind_ok(kind, v)
   if kind == "int" then return type(v) == "number" and v == math.floor(v) and v > 0 end
   if kind == "int0" then return type(v) == "number" and v == math.floor(v) and v >= 0 end
   if kind == "number" then return type(v) == "number" end
   if kind == "posnum" then return type(v) == "number" and v > 0 end
   if kind == "bool" then return type(v) == "boolean" end
   if kind == "string" then return type(v) == "string" end
   if kind == "table" then return type(v) == "table" end
   error("config: unknown kind " .. tostring(kind))
end

local function describe(v)
   if type(v) == "string" then return string.format("string %q", v) end
   if type(v) == "table" then return "an object" end
   return string.format("%s %s", type(v), tostring(v))
end

--- Validates `raw` against `schema`, a list of {key, kind, default} (default nil = required;
-- a function default is called with the config built so far). Returns a fresh table with
-- every schema key set; keys outside the schema are copied as they are.
function M.validate(raw, schema, src, who, level)
   level = (level or 1) + 1
   local cfg = {}
   for k, v in pairs(raw) do cfg[k] = v end
   for _, entry in ipairs(schema) do
      local key, kind, default = entry[1], entry[2], entry[3]
      local v = raw[key]
      if v == nil then
         if default == nil then
            error(string.format('%s: config key "%s" is missing in %s', who, key, src), level)
         end
         if type(default) == "function" then v = default(cfg) else v = default end
      elseif not kind_ok(kind, v) then
         error(string.format('%s: config key "%s" in %s must be %s, got %s',
            who, key, src, KIND_NAMES[kind], describe(v)), level)
      end
      cfg[key] = v
   end
   cfg._source = src
   cfg._raw = raw               -- (as read: what ml.save_model writes back)
   return cfg
end

--- Reads and validates in one go (used by the model constructors).
function M.load(source, schema, who)
   local raw, src = M.read(source, who)
   return M.validate(raw, schema, src, who, 3)
end

--- A schema made from another family's: base's entries in order, each key of `changes` replaced by
-- its entry there (false drops it), then `extra`'s entries.
function M.schema_from(base, changes, extra)
   local out = {}
   for _, entry in ipairs(base) do
      local change = changes[entry[1]]
      if change ~= false then out[#out + 1] = change or entry end
   end
   for _, entry in ipairs(extra or {}) do out[#out + 1] = entry end
   return out
end

--- Raises an error about a config value that has the right kind but is not usable.
function M.fail(cfg, who, fmt, ...)
   error(string.format("%s: %s in %s", who, string.format(fmt, ...), cfg._source or "config"), 3)
end

--- cfg[key] checked to be a multiple of cfg[of] (hidden_size of num_attention_heads, ...).
function M.multiple(cfg, who, key, of)
   if cfg[key] % cfg[of] ~= 0 then M.fail(cfg, who, "%s %d is not a multiple of %s %d", key, cfg[key], of, cfg[of]) end
end

--- v, the value of config key name (its default already applied), checked to be an integer >= min.
function M.integer(cfg, who, name, v, min)
   if type(v) ~= "number" or v ~= math.floor(v) or v < min then
      M.fail(cfg, who, 'config key "%s" must be an integer >= %d, got %s', name, min, tostring(v))
   end
   return v
end

--- cfg.layer_types checked and returned: the file's list, one per layer, each one of `kinds` (a
-- list, as the error names them), or when the file has none, default(i) for layer i (1-based).
function M.layer_types(cfg, who, kinds, default)
   local types = cfg.layer_types
   if types == nil then
      types = {}
      for i = 1, cfg.num_hidden_layers do types[i] = default(i) end
   elseif type(types) ~= "table" or #types ~= cfg.num_hidden_layers then
      M.fail(cfg, who, 'config key "layer_types" must list %d layer types', cfg.num_hidden_layers)
   end
   local known = {}
   for _, k in ipairs(kinds) do known[k] = true end
   for i, kind in ipairs(types) do
      if not known[kind] then
         M.fail(cfg, who, 'layer_types[%d] is "%s" (supported: %s)', i, tostring(kind), table.concat(kinds, ", "))
      end
   end
   cfg.layer_types = types
   return types
end

--- The language model's config of a multimodal checkpoint (model_type one of `multimodal`, a set:
-- Gemma 3, Mistral 3, Qwen3-VL, Qwen3.5): read(its text_config) with the top level's
-- tie_word_embeddings when it has one (transformers ties the composite model by it: Qwen3-VL-MoE's
-- text config class defaults to True under a False), its source marked "(text_config)"; any
-- other config is read(source) as it is.
function M.read_text_config(source, who, multimodal, read)
   local raw, src = M.read(source, who)
   if not multimodal[raw.model_type] then return read(source) end
   local text = raw.text_config
   if type(text) ~= "table" then
      error(string.format('%s: a %s config needs its "text_config", in %s', who, tostring(raw.model_type), src), 3)
   end
   if raw.tie_word_embeddings ~= nil then text.tie_word_embeddings = raw.tie_word_embeddings end
   local cfg = read(text)
   cfg._source = src .. " (text_config)"
   return cfg
end

-- A multimodal checkpoint's language-model tensors under transformers' names: the older llava
-- layout (language_model.model., language_model.lm_head.) and the newer (model.language_model.).
M.LANGUAGE_MODEL_RENAMES = { { "^language_model%.model%.", "model." }, { "^language_model%.lm_head%.", "lm_head." },
   { "^model%.language_model%.", "model." } }

return M
