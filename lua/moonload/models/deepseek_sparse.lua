--- DeepSeek Sparse Attention (DSA): DeepSeek-V3.2 (DeepseekV32ForCausalLM, model_type
-- "deepseek_v32") and GLM-5 (GlmMoeDsaForCausalLM, "glm_moe_dsa"), with Hugging Face parameter
-- names. Both are DeepSeek-V3's latent attention and experts (models/deepseek.lua) where each
-- query attends to at most index_topk keys, chosen by a lightning indexer:
--
--   q_i = wq_b(query latent) split into index_n_heads heads of index_head_dim;
--   k   = k_norm(wk(x)) (a LayerNorm), one key per token, cached beside the latent;
--   both rotated over their first qk_rope_head_dims (DeepSeek-V3.2: in halves; GLM-5: in
--   interleaved pairs, as the latent attention's);
--   score(query, key) = sum over heads of weights_proj(x)_h / sqrt(heads) * relu(q_h . k) / sqrt(dim)
--
-- and the attention keeps, among the keys causality and padding allow, those whose score is at
-- least the index_topk-th best (keys tied with it are all kept). While a sequence has at most
-- index_topk tokens, every key is chosen: the indexer then only projects and caches its keys.
-- This is transformers' computation (the reference's Hadamard rotation before the scores leaves
-- dot products unchanged; its FP8 scoring is a precision shortcut).
--
-- GLM-5's layers may reuse the choice of the nearest full layer before them (indexer_types:
-- "full" runs an indexer, "shared" has none), passed from layer to layer within a forward, one
-- per block of a block schedule.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local common = require("moonload.models.common")
local config = require("moonload.models.config")
local deepseek = require("moonload.models.deepseek")
local kv_cache = require("moonload.models.kv_cache")
local llama = require("moonload.models.llama")

local M = {}

-- The indexer types of a GLM-5 config: indexer_types as given, or transformers' derivation from
-- index_topk_pattern ("F"/"S" per layer) or index_topk_freq and index_skip_topk_offset.
local function glm_indexer_types(cfg, WHO)
   local types, n = cfg.indexer_types, cfg.num_hidden_layers
   if types == nil and cfg.index_topk_pattern ~= nil then
      local pattern = cfg.index_topk_pattern
      if type(pattern) == "string" then
         types = {}
         for c in pattern:gmatch(".") do types[#types + 1] = ({ F = "full", S = "shared" })[c] or c end
      else
         types = pattern
      end
   elseif types == nil then
      local freq = math.max(tonumber(cfg.index_topk_freq) or 1, 1)
      local offset = tonumber(cfg.index_skip_topk_offset) or 2
      types = {}
      for i = 0, n - 1 do types[i + 1] = math.max(i - offset + 1, 0) % freq == 0 and "full" or "shared" end
   end
   if type(types) ~= "table" or #types ~= n then
      config.fail(cfg, WHO, 'config key "indexer_types" must list %d indexer types', n)
   end
   for i, t in ipairs(types) do
      if t ~= "full" and t ~= "shared" then
         config.fail(cfg, WHO, 'indexer_types[%d] must be "full" or "shared", got %s', i, tostring(t))
      end
   end
   if types[1] ~= "full" then
      config.fail(cfg, WHO, 'indexer_types[1] is "shared", but a shared layer reuses the keys an earlier full layer chose')
   end
   return types
end

--- Reads and checks a DeepSeek-V3.2 ("deepseek_v32") or GLM-5 ("glm_moe_dsa") config (path,
-- folder or table): DeepSeek-V3's keys (models/deepseek.lua) plus index_topk, index_head_dim,
-- index_n_heads and, for GLM-5, the indexer types.
function M.config(source, family)
   local WHO = "models." .. family
   local cfg = deepseek.config(source, family)
   local function int(name, min, default)
      local v = cfg[name]
      if v == nil then v = default end
      cfg[name] = config.integer(cfg, WHO, name, v, min)
   end
   int("index_topk", 1, 2048)
   int("index_head_dim", 2, 128)
   int("index_n_heads", 1, family == "glm_moe_dsa" and 32 or 64)
   if cfg.q_lora_rank == nil then
      config.fail(cfg, WHO, "q_lora_rank is missing: the indexer's queries come from the query latent")
   end
   if cfg.index_head_dim < cfg.qk_rope_head_dim or cfg.index_head_dim % 2 ~= 0 then
      config.fail(cfg, WHO, "index_head_dim %d must be even and at least qk_rope_head_dim %d", cfg.index_head_dim,
         cfg.qk_rope_head_dim)
   end
   cfg.rope_interleave = true                   -- (both always interleave the latent attention's pairs)
   cfg.indexer_rope_interleave = family == "glm_moe_dsa"
   if family == "glm_moe_dsa" then
      cfg.indexer_types = glm_indexer_types(cfg, WHO)
   else
      cfg.indexer_types = {}
      for i = 1, cfg.num_hidden_layers do cfg.indexer_types[i] = "full" end
   end
   return cfg
end

-- --- the indexer ----------------------------------------------------------------------------

-- weights_proj: kept in float32 whatever the model's dtype, and run in float32 (as transformers
-- keeps it); left out of ml.quantize (not an nn.Linear by name).
local WeightsProjection = nn.Linear:extend("IndexerWeightsProjection")
M.IndexerWeightsProjection = WeightsProjection
WeightsProjection.keep_float32_buffers = { weight = true }

function WeightsProjection:forward(x)
   local w = self.weight
   if w.device ~= x.device then w = w:to(x.device) end
   return x:float():matmul(w:float():t())
end

local Indexer = nn.Module:extend("DsaIndexer")
M.DsaIndexer = Indexer

function Indexer:__init(cfg)
   nn.Module.__init(self)
   local H, D = cfg.index_n_heads, cfg.index_head_dim
   self.wq_b = nn.Linear(cfg.q_lora_rank, H * D, { bias = false })
   self.wk = nn.Linear(cfg.hidden_size, D, { bias = false })
   self.k_norm = nn.LayerNorm(D, { eps = 1e-6 })
   self.weights_proj = WeightsProjection(cfg.hidden_size, H, { bias = false })
   rawset(self, "n_head", H)
   rawset(self, "dim", D)
   rawset(self, "rope", cfg.qk_rope_head_dim)
   rawset(self, "interleaved", cfg.indexer_rope_interleave)
end

-- t (..., dim) with its first `rope` dims rotated (cos, sin as the latent attention's).
function Indexer:rotate(t, cos, sin)
   local p = self.rope
   local rot = t:narrow(4, 1, p)
   if self.interleaved then rot = deepseek.MLAttention.deinterleave(self, rot) end
   rot = llama.apply_rotary(rot, cos, sin)
   if p == self.dim then return rot end
   return T.cat({ rot, t:narrow(4, p + 1, self.dim - p) }, 4)
end

--- This step's keys: x (B, L, hidden) -> (B, 1, L, dim), rotated.
function Indexer:keys(x, cos, sin)
   return self:rotate(self.k_norm(self.wk(x)):unsqueeze(2), cos, sin)
end

--- The index scores of L queries over S keys: x (B, L, hidden), q_latent (B, L, q_lora_rank),
-- keys (B, 1, S, dim) -> (B, L, S) float32.
function Indexer:scores(x, q_latent, cos, sin, keys)
   local B, L, H, D = x:size(1), x:size(2), self.n_head, self.dim
   local q = self:rotate(self.wq_b(q_latent):view(B, L, H, D):transpose(2, 3), cos, sin)   -- (B, H, L, D)
   local per_head = q:float():matmul(keys:float():transpose(3, 4)):relu()                 -- (B, H, L, S)
   local w = self.weights_proj(x):mul((H * D) ^ -0.5)                                     -- (B, L, H)
   return w:unsqueeze(3):matmul(per_head:permute(1, 3, 2, 4)):squeeze(3)                  -- (B, L, S)
end

-- The keys kept for each query: scores (B, L, S) float32; allowed (L, S) or (B, 1, L, S) bool, or
-- nil for all. Returns (B, 1, L, S) bool: allowed, and at least the k-th best allowed score.
local function choose(scores, allowed, k)
   if allowed then
      local a = allowed:dim() == 4 and allowed:squeeze(2) or allowed
      scores = scores:masked_fill(a:logical_not(), -math.huge)
   end
   local kth = scores:topk(k, 3):narrow(3, k, 1)                  -- (B, L, 1); -inf: fewer than k allowed
   local chosen = scores:ge(kth):unsqueeze(2)
   return allowed and chosen:logical_and(allowed) or chosen
end

-- The indexer's keys of all S tokens: this step's k (B, 1, L, dim) appended to the cache's. They
-- are cached as a layer of their own ("indexer:<layer>"), k's two halves as its keys and values,
-- joined into one buffer, so that cropping, reordering, int8 storage and kv_cache_device apply
-- to them as to every layer.
local function cached_keys(cache, layer_idx, k)
   local slot, half = "indexer:" .. layer_idx, k:size(4) / 2
   cache:join(slot)
   local a, b, joint = cache:update(slot, k:narrow(4, 1, half):contiguous(), k:narrow(4, half + 1, half):contiguous())
   if joint then return joint end
   return T.cat({ kv_cache.floats(a, k.dtype), kv_cache.floats(b, k.dtype) }, 4)
end

-- --- the attention --------------------------------------------------------------------------

local SparseAttention = deepseek.MLAttention:extend("DsaAttention")
M.DsaAttention = SparseAttention
SparseAttention.Indexer = Indexer                -- (each family's own class: its name)

function SparseAttention:__init(cfg, layer_idx)
   deepseek.MLAttention.__init(self, cfg, layer_idx)
   if cfg.indexer_types[layer_idx] == "full" then self.indexer = self.Indexer(cfg) end
   rawset(self, "index_topk", cfg.index_topk)
   rawset(self, "index_dim", cfg.index_head_dim)
   rawset(self, "choices", {})                  -- (the model gives its layers one table to share)
end

--- For memory planning: the latent, the rotary key and the indexer's key a cached token.
function SparseAttention:kv_cache_heads()
   return 1, (self.rank + self.rope + self.index_dim) / 2, self.n_head, false
end

--- For memory planning: the latent attention's values, plus the indexer's scores per head.
function SparseAttention:activation_values(L, S)
   local v = deepseek.MLAttention.activation_values(self, L, S)
   if S <= self.index_topk or not self.indexer then return v + S * self.index_dim end
   return v + S * self.index_dim + L * self.indexer.n_head * (self.index_dim + 2 * S)
end

--- The keys this layer's queries may see among the S of this step, or nil for all (see the
-- file's header): a full layer's indexer chooses (and caches its keys); a shared layer reuses
-- the choice of the full layer before it, for the same block.
function SparseAttention:key_mask(x, q_latent, cos, sin, cache, pad, S)
   local key = cache and cache:block_key() or "whole"
   local choices = rawget(self, "choices")
   if not self.indexer then
      local made = choices[key]
      if made == nil then
         error(string.format("%s (layer %d): a shared indexer layer ran before any full one in this forward",
            self.__name, self.layer_idx), 3)
      end
      return made.mask
   end
   local keys = self.indexer:keys(x, cos, sin)
   if cache then keys = cached_keys(cache, self.layer_idx, keys) end
   local mask = nil
   if S > self.index_topk then
      if keys.device ~= x.device then keys = keys:to(x.device) end
      local L = x:size(2)
      local allowed = common.attention_mask(L, S, pad and pad:to(x.device), nil, x.device)
      mask = choose(self.indexer:scores(x, q_latent, cos, sin, keys), allowed, self.index_topk)
   end
   choices[key] = { mask = mask }
   return mask
end

-- --- the families ---------------------------------------------------------------------------

local function sparse_family(family, prefix)
   local Idx = Indexer:extend(prefix .. "Indexer")
   local LM = deepseek.latent_family(family, prefix, SparseAttention, M, M.config)
   M[prefix .. "Attention"].Indexer, M[prefix .. "Indexer"] = Idx, Idx
   local Model = M[prefix .. "Model"]
   Model.blocks_need_cache = true               -- (a block's choice is kept under its key)
   function Model:__init(cfg)
      llama.LlamaModel.__init(self, cfg)
      local choices = {}
      for i = 1, cfg.num_hidden_layers do rawset(self.layers[i].self_attn, "choices", choices) end
      rawset(self, "choices", choices)
   end
   function Model:forward(...)
      local choices = rawget(self, "choices")
      for k in pairs(choices) do choices[k] = nil end   -- (a forward's choices are its own)
      return llama.LlamaModel.forward(self, ...)
   end
   return LM
end

sparse_family("deepseek_v32", "DeepseekV32")
sparse_family("glm_moe_dsa", "GlmMoeDsa")

return M
