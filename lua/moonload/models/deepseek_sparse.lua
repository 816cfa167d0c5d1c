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
-- and the attention keeps, among the keys causality and padding allow, the index_topk best. While
-- a sequence has at most index_topk tokens, every key is chosen: the indexer then only projects
-- and caches its keys. This is transformers' computation (the reference's Hadamard rotation
-- before the scores leaves dot products unchanged; its FP8 scoring is a precision shortcut).
--
-- How the choice reaches the attention:
--   decoding (one query a row): the chosen keys' latents are gathered, and the step attends over
--     index_topk of them however long the context (DSA's saving: a 128k-token context costs a
--     step what a 2k one does, beside the indexer's scores);
--   several queries: a mask (B, 1, L, S) of the keys each sees (those scoring at least the
--     index_topk-th best, ties kept), the scores made a few queries at a time so that per-head
--     scores never hold more than about SCORE_BYTES; the mask takes L x S bytes, which
--     prefill_chunk_size bounds for long prompts.
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

-- About the most bytes of per-head scores held at once while the indexer scores many queries.
M.SCORE_BYTES = 64 * 1024 * 1024

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
      config.fail(cfg, WHO, 'indexer_types[1] is "shared": a shared layer reuses the keys an earlier full layer chose')
   end
   return types
end

--- Reads and checks a DeepSeek-V3.2 ("deepseek_v32") or GLM-5 ("glm_moe_dsa") config (path,
-- folder or table): DeepSeek-V3's keys (models/deepseek.lua) plus index_topk, index_head_dim,
-- index_n_heads and, for GLM-5, the indexer types.
function M.config(source, family)
   local WHO = "models." .. family
   local cfg = deepseek.config(source, family)
   local function int(name, min, default) deepseek.int_key(cfg, WHO, name, min, default) end
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
   if self.interleaved then rot = common.deinterleave(self, rot) end
   rot = llama.apply_rotary(rot, cos, sin)
   if p == self.dim then return rot end
   return T.cat({ rot, t:narrow(4, p + 1, self.dim - p) }, 4)
end

--- This step's keys: x (B, L, hidden) -> (B, 1, L, dim), rotated.
function Indexer:keys(x, cos, sin)
   return self:rotate(self.k_norm(self.wk(x)):unsqueeze(2), cos, sin)
end

--- The index scores of L queries over S keys: x (B, L, hidden), q_bottleneck (B, L, q_lora_rank),
-- keys (B, 1, S, dim) -> (B, L, S) float32.
function Indexer:scores(x, q_bottleneck, cos, sin, keys)
   local B, L, H, D = x:size(1), x:size(2), self.n_head, self.dim
   local S = keys:size(3)
   local q = self:rotate(self.wq_b(q_bottleneck):view(B, L, H, D):transpose(2, 3), cos, sin)   -- (B, H, L, D)
   q = q:transpose(2, 3):float():contiguous():view(B, 1, L * H, D)
   -- one GEMM of the keys against every query head (the keys read in their layout: 4x faster
   -- than a product per head of q and the keys transposed)
   local per_head = keys:float():matmul(q:transpose(3, 4)):relu()                          -- (B, 1, S, L * H)
   local w = self.weights_proj(x):mul((H * D) ^ -0.5):unsqueeze(4)                          -- (B, L, H, 1)
   return per_head:view(B, S, L, H):permute(1, 3, 2, 4):matmul(w):squeeze(4)               -- (B, L, S)
end

-- scores (B, L, S) float32 with the keys allowed (L, S) or (B, 1, L, S) bool kept (nil: all), the
-- others -inf.
local function allowed_scores(scores, allowed)
   if allowed == nil then return scores end
   local a = allowed:dim() == 4 and allowed:squeeze(2) or allowed
   return scores:masked_fill(a:logical_not(), -math.huge)
end

-- The keys kept for each query, as a mask: scores (B, L, S) float32; allowed as above. Returns
-- (B, 1, L, S) bool: allowed, and at least the k-th best allowed score.
local function chosen_mask(scores, allowed, k)
   scores = allowed_scores(scores, allowed)
   local kth = scores:topk(k, 3):narrow(3, k, 1)                  -- (B, L, 1); -inf: fewer than k allowed
   local chosen = scores:ge(kth):unsqueeze(2)
   return allowed and chosen:logical_and(allowed) or chosen
end

-- The keys kept for one query a row, as positions: scores (B, 1, S). Returns {index (B, 1, k)
-- int64, mask (B, 1, 1, k) bool or nil}: the mask hides the positions taken when fewer than k
-- keys were allowed (padding).
local function chosen_index(scores, allowed, k)
   local best, index = allowed_scores(scores, allowed):topk(k, 3)
   local mask = nil
   if allowed then mask = best:gt(-math.huge):unsqueeze(2) end
   return { index = index, mask = mask }
end

-- The mask of the keys kept for L queries over keys (B, 1, S, dim), scored a few queries at a time.
function Indexer:choose_keys(x, q_bottleneck, cos, sin, keys, allowed, k)
   local B, L, S = x:size(1), x:size(2), keys:size(3)
   local step = math.max(1, math.floor(M.SCORE_BYTES / (4 * B * self.n_head * S)))
   if step >= L then return chosen_mask(self:scores(x, q_bottleneck, cos, sin, keys), allowed, k) end
   local parts = {}
   for first = 1, L, step do
      local n = math.min(step, L - first + 1)
      -- this chunk's queries: the next-to-last dim of cos, sin ((L, D) or (B, 1, L, D)) and allowed
      local function rows(t) return t and t:narrow(t:dim() - 1, first, n) end
      local scores = self:scores(x:narrow(2, first, n), q_bottleneck:narrow(2, first, n), rows(cos), rows(sin), keys)
      parts[#parts + 1] = chosen_mask(scores, rows(allowed), k)
   end
   return T.cat(parts, 3)
end

-- The indexer's keys of all S tokens: this step's k (B, 1, L, dim) appended to the cache's. They
-- are cached as a companion of the layer (KVCache:companion), k's two halves as its keys and
-- values, joined into one buffer, so that cropping, reordering, int8 storage and kv_cache_device
-- apply to them as to every layer.
local function cached_keys(cache, layer_idx, k)
   local slot, half = cache:companion(layer_idx, "indexer"), k:size(4) / 2
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

--- For memory planning: the latent attention's values, plus the indexer's keys and, when it
-- chooses, its queries, its per-head scores (a few queries at a time: at most SCORE_BYTES), the
-- scores and the mask.
function SparseAttention:activation_values(L, S)
   local v = deepseek.MLAttention.activation_values(self, L, S) + S * self.index_dim
   if S <= self.index_topk or not self.indexer then return v end
   local H = self.indexer.n_head
   return v + L * H * self.index_dim + math.min(L * H * S, M.SCORE_BYTES / 4) + 2 * L * S
end

--- The keys this layer's queries may see among the S of this step, or nil for all (see the
-- file's header): {index, mask} for one query a row, {mask} for more. A full layer's indexer
-- chooses (and caches its keys); a shared layer reuses the choice of the full layer before it,
-- for the same block.
function SparseAttention:key_choice(x, q_bottleneck, cos, sin, cache, pad, S)
   local key = cache and cache:block_key() or "whole"
   local choices = rawget(self, "choices")
   if not self.indexer then
      local made = choices[key]
      if made == nil then
         error(string.format("%s (layer %d): a shared indexer layer ran before any full one in this forward",
            self.__name, self.layer_idx), 3)
      end
      return made.choice
   end
   local keys = self.indexer:keys(x, cos, sin)
   if cache then keys = cached_keys(cache, self.layer_idx, keys) end
   local choice, k = nil, self.index_topk
   if S > k then
      if keys.device ~= x.device then keys = keys:to(x.device) end
      local L = x:size(2)
      local allowed = common.attention_mask(L, S, pad and pad:to(x.device), nil, x.device)
      if L == 1 then
         choice = chosen_index(self.indexer:scores(x, q_bottleneck, cos, sin, keys), allowed, k)
      else
         choice = { mask = self.indexer:choose_keys(x, q_bottleneck, cos, sin, keys, allowed, k) }
      end
   end
   choices[key] = { choice = choice }
   return choice
end

-- --- the families ---------------------------------------------------------------------------

--- The classes of a family with DeepSeek Sparse Attention, named as transformers names them, put
-- into `into` (default this module); returns the causal LM class. Attention: SparseAttention or
-- one extending it; read_config(source, family) reads the config (default M.config).
function M.sparse_family(family, prefix, Attention, into, read_config)
   into = into or M
   local Idx = Indexer:extend(prefix .. "Indexer")
   local LM = deepseek.latent_family(family, prefix, Attention or SparseAttention, into, read_config or M.config)
   into[prefix .. "Attention"].Indexer, into[prefix .. "Indexer"] = Idx, Idx
   local Model = into[prefix .. "Model"]
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

M.sparse_family("deepseek_v32", "DeepseekV32")
M.sparse_family("glm_moe_dsa", "GlmMoeDsa")

return M
