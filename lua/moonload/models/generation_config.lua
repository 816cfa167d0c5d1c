--- A causal model's generation defaults, as transformers' GenerationConfig keeps them: read from
-- the checkpoint folder's generation_config.json by from_pretrained (model.generation_config),
-- else taken from config.json's bos/eos/pad token ids (GenerationConfig.from_model_config).
-- generate fills the options a call leaves out from it (see defaults): so a model stops at its
-- end-of-sequence ids (Llama 3's list, Qwen's <|im_end|>) and samples when its file says
-- do_sample, as transformers' generate does.
local cjson = require("cjson")

local M = {}

local TOKEN_KEYS = { "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id", "forced_eos_token_id" }
-- What transformers' GenerationConfig defaults to for keys its file leaves out (the file stores
-- only the values that differ).
local SAMPLING_DEFAULTS = { temperature = 1.0, top_k = 50, top_p = 1.0 }
-- Keys the call's options take from the config as they are when the call leaves them out.
local PASSED_KEYS = { "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "num_beams", "num_return_sequences",
   "length_penalty", "early_stopping", "forced_bos_token_id", "forced_eos_token_id" }

--- read(dir, who) -> the table in dir/generation_config.json, or nil when there is none. A file
-- that is not a JSON object is an error naming it.
function M.read(dir, who)
   local json = require("moonload.utils.json")
   local t = json.read(dir .. "/generation_config.json", who, true)
   return t and json.without_nulls(t)
end

--- from_model_config(raw) -> {bos_token_id, eos_token_id, pad_token_id} of a config.json table
-- (a multimodal config's text_config when the top level has none).
function M.from_model_config(raw)
   local out = {}
   for _, k in ipairs(TOKEN_KEYS) do
      local v = raw[k]
      if (v == nil or v == cjson.null) and type(raw.text_config) == "table" then v = raw.text_config[k] end
      if v ~= cjson.null then out[k] = v end
   end
   return out
end

--- of(model) -> the model's generation config: model.generation_config when from_pretrained
-- read one, else the token ids of its config.
function M.of(model)
   local gc = rawget(model, "generation_config")
   if gc then return gc end
   local cfg = model.config
   local raw = type(cfg) == "table" and (cfg._raw or cfg) or {}
   return M.from_model_config(raw)
end

--- defaults(model, opts) -> opts with what the call left out taken from the model's generation
-- config: eos_token_id (false: none), pad_token_id, max_new_tokens or max_length, min_new_tokens
-- or min_length, repetition_penalty, no_repeat_ngram_size, bad_words_ids, forced_bos_token_id, forced_eos_token_id, num_beams, num_return_sequences, length_penalty,
-- early_stopping; and when
-- sampling is on without a temperature (do_sample = true, from the call or else the config), the
-- config's temperature, top_k, top_p and min_p (transformers' defaults 1.0, 50, 1.0 and none for those it
-- leaves out).
function M.defaults(model, opts)
   local gc = M.of(model)
   local out = {}
   for k, v in pairs(opts) do out[k] = v end
   if out.eos_token_id == nil then out.eos_token_id = gc.eos_token_id end
   if out.eos_token_id == false then out.eos_token_id = nil end
   if out.pad_token_id == nil then out.pad_token_id = gc.pad_token_id end
   -- lengths: the call's new-token counts, else its total lengths, else the config's (its
   -- max_new_tokens before its max_length, as transformers reads them)
   if out.max_new_tokens == nil and out.max_length == nil then
      out.max_new_tokens = gc.max_new_tokens
      if out.max_new_tokens == nil and gc.max_length ~= nil then
         -- (often the context the model was trained with, or transformers' 20: never more
         -- positions than the model has, or than its config says it was trained for)
         local cfg = type(model.config) == "table" and model.config or {}
         local limit = model.max_length and model:max_length() or tonumber(cfg.max_position_embeddings)
         out.max_length = limit and math.min(gc.max_length, limit) or gc.max_length
      end
   end
   if out.min_new_tokens == nil and out.min_length == nil then
      out.min_new_tokens = gc.min_new_tokens
      if out.min_new_tokens == nil then out.min_length = gc.min_length end
   end
   for _, k in ipairs(PASSED_KEYS) do
      if out[k] == nil then out[k] = gc[k] end
   end
   local sample = out.do_sample
   if sample == nil then sample = gc.do_sample end
   if out.temperature == nil and sample == true then
      for k, v in pairs(SAMPLING_DEFAULTS) do
         if out[k] == nil then out[k] = gc[k] == nil and v or gc[k] end
      end
      if out.min_p == nil then out.min_p = gc.min_p end
   end
   return out
end

return M
