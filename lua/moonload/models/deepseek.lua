--- DeepSeek-V2 and DeepSeek-V3 with Hugging Face parameter names (DeepseekV2ForCausalLM,
-- DeepseekV3ForCausalLM; V3's layout is also Kimi K2's and Moonlight's). Two things set them apart
-- from Llama:
--
-- Multi-head latent attention (MLA). Keys and values come from a kv_lora_rank latent per token
-- (kv_a_proj_with_mqa, then kv_a_layernorm) through kv_b_proj, plus one rotary key of
-- qk_rope_head_dim shared by all heads; queries are q_proj(x), or q_b_proj(norm(q_a_proj(x)))
-- through a q_lora_rank bottleneck. The cache keeps only the latent and the rotary key:
-- kv_lora_rank + qk_rope_head_dim values a token (576 for V3, where its 128 heads would cache
-- 128 x 2 x 128 expanded). Attention runs in one of two ways, whichever costs fewer
-- multiply-adds for this step:
--   expanded: kv_b_proj turns every cached latent into per-head keys and values (as transformers
--     does; the cheaper way for a long prompt);
--   absorbed: kv_b_proj's key half is folded into the queries and its value half applied after
--     attention (DeepSeek's own inference code), so a decoding step attends over the latents as
--     one shared key/value head and never expands the cache.
--
-- Routed experts beside shared ones. V3 scores experts with a sigmoid, adds a per-expert
-- e_score_correction_bias for the choice only, keeps the topk_group best of n_group groups (a
-- group's score: its best two) and takes the top num_experts_per_tok there; the chosen sigmoid
-- scores, renormalized with norm_topk_prob, are scaled by routed_scaling_factor. V2 scores with a
-- softmax, picks greedily or within the topk_group groups of the highest single score
-- (topk_method "group_limited_greedy"). Every MoE layer also runs n_shared_experts' worth of
-- shared MLP (shared_experts) on every token. The first first_k_dense_replace layers are dense.
-- Real V3 checkpoints carry num_nextn_predict_layers multi-token-prediction layers after the last
-- decoder layer; generation does not use them, so loading leaves them out, as transformers does.
--
-- GLM-4.7-Flash (Glm4MoeLiteForCausalLM, model_type "glm4_moe_lite") is V3's layout with GLM's
-- defaults (one group of experts, a dense first layer, mlp_layer_types saying which layers are
-- sparse). DeepSeek-V3.2 and GLM-5 add sparse attention to it: models/deepseek_sparse.lua.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local common = require("moonload.models.common")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local hooks = require("moonload.hooks")

local M = {}

-- YaRN's softmax factor for mscale m (DeepSeek's yarn_get_mscale).
local function yarn_mscale(factor, m)
   if factor <= 1 then return 1 end
   return 0.1 * m * math.log(factor) + 1
end

--- An integer config key, checked (default when absent): the checker moe_config, config and
-- models/deepseek_sparse.lua share.
function M.int_key(cfg, WHO, name, min, default)
   local v = cfg[name]
   if v == nil then v = default end
   cfg[name] = config.integer(cfg, WHO, name, v, min)
   return v
end

--- The routed and shared experts of a config read by llama.config (DeepSeek's, and GLM-4.5's
-- which routes as V3 does), checked into cfg: n_routed_experts, n_shared_experts,
-- moe_intermediate_size, num_experts_per_tok, routed_scaling_factor, norm_topk_prob,
-- topk_method ("noaux_tc" for V3's routing; V2's: "greedy" or "group_limited_greedy"), n_group,
-- topk_group, sparse_layers (per layer) and num_nextn_predict_layers. defaults: values where the
-- family's transformers config differs from V2's.
function M.moe_config(cfg, WHO, method, defaults)
   defaults = defaults or {}
   local function int(name, min, default) return M.int_key(cfg, WHO, name, min, default) end
   cfg.n_routed_experts = cfg.n_routed_experts or cfg.num_local_experts or cfg.num_experts
   int("n_routed_experts", 0, 0)
   int("n_shared_experts", 0, 0)
   int("moe_intermediate_size", 1, 1407)
   int("first_k_dense_replace", 0, defaults.first_k_dense_replace or 0)
   int("moe_layer_freq", 1, 1)
   if cfg.n_routed_experts > 0 then
      int("num_experts_per_tok", 1, defaults.num_experts_per_tok)
      if cfg.num_experts_per_tok > cfg.n_routed_experts then
         config.fail(cfg, WHO, "num_experts_per_tok %d is more than n_routed_experts %d", cfg.num_experts_per_tok,
            cfg.n_routed_experts)
      end
   end
   local rsf = cfg.routed_scaling_factor
   if rsf == nil then rsf = defaults.routed_scaling_factor or 1 end
   if type(rsf) ~= "number" or rsf <= 0 then
      config.fail(cfg, WHO, 'config key "routed_scaling_factor" must be a positive number, got %s', tostring(rsf))
   end
   cfg.routed_scaling_factor = rsf
   if cfg.norm_topk_prob == nil then cfg.norm_topk_prob = defaults.norm_topk_prob or false end   -- transformers' defaults
   cfg.norm_topk_prob = cfg.norm_topk_prob == true
   cfg.topk_method = method
   if method ~= "greedy" and cfg.n_routed_experts > 0 then
      int("n_group", 1, defaults.n_group)
      int("topk_group", 1, defaults.topk_group)
      local per = cfg.n_routed_experts / cfg.n_group
      if per ~= math.floor(per) then
         config.fail(cfg, WHO, "n_routed_experts %d is not a multiple of n_group %d", cfg.n_routed_experts, cfg.n_group)
      end
      if cfg.topk_group > cfg.n_group then
         config.fail(cfg, WHO, "topk_group %d is more than n_group %d", cfg.topk_group, cfg.n_group)
      end
      if M.METHODS[method].group_by_best_two and per < 2 then
         config.fail(cfg, WHO, "n_group %d leaves fewer than 2 experts a group (n_routed_experts %d)", cfg.n_group,
            cfg.n_routed_experts)
      end
      if cfg.topk_group * per < cfg.num_experts_per_tok then
         config.fail(cfg, WHO, "topk_group %d groups of %d experts hold fewer than num_experts_per_tok %d",
            cfg.topk_group, per, cfg.num_experts_per_tok)
      end
   end
   cfg.sparse_layers = {}
   local types = cfg.mlp_layer_types                -- (newer configs: "dense" or "sparse" per layer)
   if types ~= nil and (type(types) ~= "table" or #types ~= cfg.num_hidden_layers) then
      config.fail(cfg, WHO, 'config key "mlp_layer_types" must list %d layer types', cfg.num_hidden_layers)
   end
   for i = 1, cfg.num_hidden_layers do              -- transformers counts layers from 0
      if types then
         if types[i] ~= "dense" and types[i] ~= "sparse" then
            config.fail(cfg, WHO, 'mlp_layer_types[%d] must be "dense" or "sparse", got %s', i, tostring(types[i]))
         end
         cfg.sparse_layers[i] = types[i] == "sparse" and cfg.n_routed_experts > 0
      else
         cfg.sparse_layers[i] = cfg.n_routed_experts > 0 and i - 1 >= cfg.first_k_dense_replace
            and (i - 1) % cfg.moe_layer_freq == 0
      end
   end
   local mtp = cfg.num_nextn_predict_layers or cfg.num_mtp_layers
   cfg.num_nextn_predict_layers = type(mtp) == "number" and mtp >= 0 and math.floor(mtp) or 0
   return cfg
end

--- The routings by topk_method: sigmoid or softmax scores, and whether a group of experts scores
-- by its best two (else its best one). Only V3's (noaux_tc) adds a correction bias for the choice.
M.METHODS = {
   greedy = { sigmoid = false },
   group_limited_greedy = { sigmoid = false },
   noaux_tc = { sigmoid = true, group_by_best_two = true },
   softmax_best_two = { sigmoid = false, group_by_best_two = true },      -- Mistral Small 4's router
}

-- Per family: the routing (V2's from the file) and the values where its transformers config
-- differs from V2's.
local ROUTING = {
   deepseek_v2 = {},
   deepseek_v3 = { method = "noaux_tc", defaults = { routed_scaling_factor = 2.5, norm_topk_prob = true, n_group = 8,
      topk_group = 4, first_k_dense_replace = 3, num_experts_per_tok = 8 } },
   glm4_moe_lite = { method = "noaux_tc", defaults = { routed_scaling_factor = 1.8, norm_topk_prob = true, n_group = 1,
      topk_group = 1, first_k_dense_replace = 1, num_experts_per_tok = 4 } },
   sarvam_mla = { method = "noaux_tc", defaults = { routed_scaling_factor = 2.5, norm_topk_prob = true, n_group = 1,
      topk_group = 1, first_k_dense_replace = 1, num_experts_per_tok = 8 } },
   axk1 = { method = "noaux_tc", defaults = { routed_scaling_factor = 2.5, norm_topk_prob = true, n_group = 8,
      topk_group = 4, first_k_dense_replace = 1, num_experts_per_tok = 8 } },
   -- (models/deepseek_sparse.lua)
   deepseek_v32 = { method = "noaux_tc", defaults = { routed_scaling_factor = 2.5, norm_topk_prob = true, n_group = 8,
      topk_group = 4, first_k_dense_replace = 3, num_experts_per_tok = 8 } },
   glm_moe_dsa = { method = "noaux_tc", defaults = { routed_scaling_factor = 2.5, norm_topk_prob = true, n_group = 1,
      topk_group = 1, first_k_dense_replace = 3, num_experts_per_tok = 8 } },
   -- (models/axk2.lua: no groups, A.X-K2-Light's default, read as one group)
   axk2 = { method = "noaux_tc", defaults = { routed_scaling_factor = 2.5, norm_topk_prob = true, n_group = 1,
      topk_group = 1, first_k_dense_replace = 1, num_experts_per_tok = 8 } },
   mistral4 = { method = "softmax_best_two", defaults = { routed_scaling_factor = 1, norm_topk_prob = true, n_group = 1,
      topk_group = 1, first_k_dense_replace = 0, num_experts_per_tok = 4 } },
   -- (models/longcat_flash.lua: a softmax over the experts and its zero experts, routed there)
   longcat_flash = { method = "greedy", defaults = { routed_scaling_factor = 6, num_experts_per_tok = 12 } },
   minicpm3 = {},                -- (models/minicpm3.lua: dense layers only, no experts)
   youtu = {},                   -- (models/youtu.lua: likewise)
}

--- Reads and checks the config (path, folder or table) of a family with DeepSeek's latent
-- attention: "deepseek_v2", "deepseek_v3", "glm4_moe_lite" (GLM-4.7-Flash), "mistral4" (Mistral
-- Small 4), or the sparse attention ones of models/deepseek_sparse.lua.
function M.config(source, family)
   local WHO = "models." .. family
   local cfg = llama.config(source, family)
   local function int(name, min, default) return M.int_key(cfg, WHO, name, min, default) end
   int("kv_lora_rank", 1, 512)
   int("qk_rope_head_dim", 2, 64)
   int("qk_nope_head_dim", 0, 128)
   int("v_head_dim", 1, 128)
   if cfg.q_lora_rank ~= nil then int("q_lora_rank", 1) end       -- (JSON null: no query bottleneck)
   if cfg.qk_rope_head_dim % 2 ~= 0 then
      config.fail(cfg, WHO, "qk_rope_head_dim must be even, got %d", cfg.qk_rope_head_dim)
   end
   -- the rotary table turns the shared rotary key's dims (transformers sets head_dim to them)
   cfg.head_dim, cfg.rotary_dim = cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
   cfg.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
   cfg.rope_interleave = family == "deepseek_v2" or cfg.rope_interleave ~= false
   local scale = cfg.qk_head_dim ^ -0.5
   local rope = cfg.rope
   if rope.rope_type ~= "default" and rope.mscale_all_dim and rope.mscale_all_dim ~= 0 then
      local m = yarn_mscale(rope.factor, rope.mscale_all_dim)
      scale = scale * m * m
   end
   cfg.softmax_scale = scale
   local routing = ROUTING[family]
   local method = routing.method or cfg.topk_method or "greedy"
   if family == "deepseek_v2" and method ~= "greedy" and method ~= "group_limited_greedy" then
      config.fail(cfg, WHO, 'topk_method "%s" is not supported (supported: greedy, group_limited_greedy)', tostring(method))
   end
   return M.moe_config(cfg, WHO, method, routing.defaults)
end

-- --- multi-head latent attention --------------------------------------------------------------

local MLAttention = nn.Module:extend("MLAttention")
M.MLAttention = MLAttention

function MLAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, hidden = cfg.num_attention_heads, cfg.hidden_size
   local bias = cfg.attention_bias
   if cfg.q_lora_rank then
      self.q_a_proj = nn.Linear(hidden, cfg.q_lora_rank, { bias = bias })
      self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, { eps = 1e-6 })   -- DeepSeek's default eps, not the config's
      self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, { bias = false })
   else
      self.q_proj = nn.Linear(hidden, H * cfg.qk_head_dim, { bias = false })
   end
   self.kv_a_proj_with_mqa = nn.Linear(hidden, cfg.kv_lora_rank + cfg.qk_rope_head_dim, { bias = bias })
   self.kv_a_layernorm = nn.RMSNorm(cfg.kv_lora_rank, { eps = 1e-6 })
   self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), { bias = false })
   self.o_proj = nn.Linear(H * cfg.v_head_dim, hidden, { bias = bias })
   rawset(self, "n_head", H)
   rawset(self, "rank", cfg.kv_lora_rank)
   rawset(self, "nope", cfg.qk_nope_head_dim)
   rawset(self, "rope", cfg.qk_rope_head_dim)
   rawset(self, "v_dim", cfg.v_head_dim)
   rawset(self, "scale", cfg.softmax_scale)
   rawset(self, "interleaved", cfg.rope_interleave)
   rawset(self, "layer_idx", layer_idx)
   rawset(self, "query_scaled", cfg.query_scaling ~= nil)   -- Mistral Small 4 (models/llama.lua)
end

--- For memory planning (utils/runtime_memory.lua), which counts 2 x heads x head_dim values a
-- cached token: one head whose two halves are the latent and the rotary key.
function MLAttention:kv_cache_heads()
   return 1, (self.rank + self.rope) / 2, self.n_head, false
end

-- Whether absorbing costs fewer multiply-adds than expanding, for L queries over S cached tokens.
function MLAttention:absorbing_is_cheaper(L, S)
   local H, r, n, p, v = self.n_head, self.rank, self.nope, self.rope, self.v_dim
   local expanded = S * r * H * (n + v) + H * L * S * (n + p + v)
   local absorbed = H * L * n * r + H * L * S * (2 * r + p) + H * L * r * v
   return absorbed < expanded
end

--- For memory planning (utils/runtime_memory.lua): the values one batch row's attention holds at
-- once for L queries over S keys, the way it would run. Absorbed: the queries, their latent
-- form, the keys concatenated from the cache, the latent output and the values; expanded: the
-- queries, the keys and values expanded from every cached latent, the keys with the rotary
-- part, and the output.
function MLAttention:activation_values(L, S)
   local H, r, n, p, v = self.n_head, self.rank, self.nope, self.rope, self.v_dim
   -- q, this step's latent, and the cached latents (a copy when an int8 cache is dequantized)
   local common_part = L * (H * (n + p) + (r + p)) + S * (r + p)
   if self:absorbing_is_cheaper(L, S) then
      return common_part + L * H * (r + (r + p) + r + v) + S * (r + p)
   end
   return common_part + S * H * ((n + v) + (n + p)) + L * H * ((n + p) + v)
end

-- Whether this step absorbs: cheaper, and kv_b_proj's weight can be read.
function MLAttention:absorbs(L, S)
   if not self:absorbing_is_cheaper(L, S) then return false end
   -- kv_b_proj's weight is read as a tensor: a float, int8 or fp8 layer (not one under a LoRA
   -- adapter) whose weight is here, or on meta under a hook of its own that brings it
   local proj = self.kv_b_proj
   return type(proj.dense_weight) == "function" and proj.weight ~= nil
      and (proj.weight.device ~= "meta" or rawget(proj, "_hf_hook") ~= nil)
end

--- The keys each query may see beyond causality and padding, or nil for all of them: DeepSeek
-- Sparse Attention's choice (models/deepseek_sparse.lua), {index = (B, 1, k) positions to gather,
-- mask = (B, 1, 1, k) or nil} or {mask = (B, 1, L, S)}. Plain latent attention sees all.
function MLAttention:key_choice()
   return nil
end

-- The cached rows at positions index (B, 1, k) of t (B, 1, S, D): (B, 1, k, D). (Row by row:
-- index_select copies whole rows, 5x faster than gather's element by element.)
local function gather_keys(t, index)
   local B = t:size(1)
   if B == 1 then return t:index_select(3, index:view(index:size(3))) end
   local rows = {}
   for b = 1, B do rows[b] = t:narrow(1, b, 1):index_select(3, index:select(1, b):view(index:size(3))) end
   return T.cat(rows, 1)
end

-- Attention over S keys of which the last L are this step's queries': causal and not padding,
-- within mask (B, 1, L, S) bool when there is one (models/common.lua).
local function attend(q, k, v, past, scale, pad, mask)
   if mask == nil then return common.causal_attention(q, k, v, past, scale, pad) end
   if mask.device ~= k.device then mask = mask:to(k.device) end
   return common.attention(q, k, v, mask, false, scale)
end

--- x (B, T, hidden) -> the queries (B, T, H * (n + p)), the query latent (B, T, q_lora_rank; nil
-- without a bottleneck) and a gate (B, T, H * v_dim) through a sigmoid onto the heads' output, or
-- nil (A.X-K2's: models/axk2.lua).
function MLAttention:queries(x)
   if self.q_proj then return self.q_proj(x) end
   local q_bottleneck = self.q_a_layernorm(self.q_a_proj(x))
   return self.q_b_proj(q_bottleneck), q_bottleneck
end

--- x (B, T, hidden); cos, sin (T, rope) or (B, 1, T, rope); cache optional; pad (B, past + T) or nil.
function MLAttention:forward(x, cos, sin, cache, pad)
   local B, L = x:size(1), x:size(2)
   local H, r, n, p, vd = self.n_head, self.rank, self.nope, self.rope, self.v_dim
   local q, q_bottleneck, gate = self:queries(x)
   q = q:view(B, L, H, n + p):transpose(2, 3)                                 -- (B, H, T, n + p)
   if self.query_scaled then
      local query_scale
      cos, sin, query_scale = llama.split_query_scale(cos, sin)
      q = q * query_scale
   end
   local q_nope, q_rot = q:narrow(4, 1, n), q:narrow(4, n + 1, p)
   local ckv = self.kv_a_proj_with_mqa(x)                                     -- (B, T, r + p)
   local latent = self.kv_a_layernorm(ckv:narrow(3, 1, r)):unsqueeze(2)       -- (B, 1, T, r)
   local k_rot = ckv:narrow(3, r + 1, p):unsqueeze(2)                         -- (B, 1, T, p)
   if self.interleaved then q_rot, k_rot = common.deinterleave(self, q_rot), common.deinterleave(self, k_rot) end
   q_rot, k_rot = llama.apply_rotary(q_rot, cos, sin), llama.apply_rotary(k_rot, cos, sin)
   local past, joint = 0, nil          -- joint: [latent, k_rot] as the cache holds them side by side
   if cache then
      past = cache.length
      cache:join(self.layer_idx)
      latent, k_rot, joint = cache:update(self.layer_idx, latent, k_rot)
   end
   if rawget(latent, "_q8_scales") then                                      -- an int8 cache
      local floats = require("moonload.models.kv_cache").floats
      latent, k_rot = floats(latent, x.dtype), floats(k_rot, x.dtype)
   end
   local S = latent:size(3)
   local choice = self:key_choice(x, q_bottleneck, cos, sin, cache, pad, S)
   local mask = choice and choice.mask
   if choice and choice.index then         -- attend over the chosen keys alone
      local index = choice.index
      if index.device ~= latent.device then index = index:to(latent.device) end
      if joint then
         joint = gather_keys(joint, index)
         latent, k_rot = joint:narrow(4, 1, r), joint:narrow(4, r + 1, p)
      else
         latent, k_rot = gather_keys(latent, index), gather_keys(k_rot, index)
      end
      S, past, pad = latent:size(3), latent:size(3) - L, nil
   end
   local y
   if self:absorbs(L, S) then
      -- (under a hook of kv_b_proj's own, its weight is brought here for this block)
      y = hooks.with_weights(self.kv_b_proj, function()
         local w = self.kv_b_proj:dense_weight(x.dtype):view(H, n + vd, r)
         if w.device ~= x.device then w = w:to(x.device) end
         local q_latent = q_nope:matmul(w:narrow(2, 1, n))                    -- (B, H, T, r)
         local keys = joint or T.cat({ latent, k_rot }, 4)                    -- (B, 1, S, r + p)
         local qa, pa, back = common.queries_to_keys(T.cat({ q_latent, q_rot }, 4), keys, pad)
         local o = attend(qa, keys, keys:narrow(4, 1, r), past, self.scale, pa, mask)   -- (B, H, T, r)
         if back then o = o:to(back) end
         return o:matmul(w:narrow(2, n + 1, vd):transpose(2, 3))              -- (B, H, T, vd)
      end)
   else
      if latent.device ~= x.device then latent, k_rot = latent:to(x.device), k_rot:to(x.device) end
      local kv = self.kv_b_proj(latent:squeeze(2)):view(B, S, H, n + vd):transpose(2, 3)   -- (B, H, S, n + vd)
      local keys = T.cat({ kv:narrow(4, 1, n), k_rot:expand(B, H, S, p) }, 4)
      y = attend(T.cat({ q_nope, q_rot }, 4), keys, kv:narrow(4, n + 1, vd), past, self.scale, pad, mask)
   end
   y = y:transpose(2, 3):reshape(B, L, H * vd)
   if gate then y = y * gate:sigmoid() end
   return self.o_proj(y)
end

-- --- routing ----------------------------------------------------------------------------------

-- The router: a float32 (n_routed_experts, hidden) weight (kept float32 whatever the model's dtype,
-- as transformers keeps it) and, for V3, the correction bias added to scores for the choice.
local Router = nn.Module:extend("DeepseekTopkRouter")
M.DeepseekTopkRouter = Router
Router.keep_float32_buffers = { weight = true, e_score_correction_bias = true }

function Router:__init(cfg)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ cfg.n_routed_experts, cfg.hidden_size })
   if cfg.topk_method == "noaux_tc" then
      self:register_buffer("e_score_correction_bias", nn.Module.new_buffer({ cfg.n_routed_experts }, 0))
   end
end

--- flat (N, hidden) -> the router's logits (N, E), float32.
function Router:forward(flat)
   return flat:float():matmul(self.weight:float():t())
end

-- The k largest of v[1..E] whose allowed[e] is set (all when allowed is nil): their indices
-- (1-based here), highest first.
local function top_indices(v, k, E, allowed)
   local picked, taken = {}, {}
   for j = 1, k do
      local best, bi = -math.huge, nil
      for e = 1, E do
         if not taken[e] and (allowed == nil or allowed[e]) and (bi == nil or v[e] > best) then best, bi = v[e], e end
      end
      taken[bi] = true
      picked[j] = bi
   end
   return picked
end

-- The groups (1-based) a token may route to: the topk_group best by score(group values).
local function allowed_experts(choice, E, groups, keep, group_score)
   local per = E / groups
   local gs = {}
   for g = 1, groups do gs[g] = group_score(choice, (g - 1) * per + 1, g * per) end
   local allowed = {}
   for _, g in ipairs(top_indices(gs, keep, groups)) do
      for e = (g - 1) * per + 1, g * per do allowed[e] = true end
   end
   return allowed
end

local function best_two_sum(v, a, b)
   local m1, m2 = -math.huge, -math.huge
   for e = a, b do
      if v[e] > m1 then m1, m2 = v[e], m1 elseif v[e] > m2 then m2 = v[e] end
   end
   return m1 + m2
end

local function best_one(v, a, b)
   local m = -math.huge
   for e = a, b do if v[e] > m then m = v[e] end end
   return m
end

local DeepseekMoE = nn.Module:extend("DeepseekMoE")
M.DeepseekMoE = DeepseekMoE

function DeepseekMoE:__init(cfg, Expert)
   nn.Module.__init(self)
   -- one module per expert, as the hub stores DeepSeek's, or stacked per projection as
   -- transformers writes them (the checkpoint says which: moe.builds_experts_as_stored)
   self.experts = moe.experts_for(setmetatable({ num_experts = cfg.n_routed_experts }, { __index = cfg }),
      "models." .. tostring(cfg.model_type or "deepseek"), Expert, "apart")
   self.gate = Router(cfg)
   if cfg.n_shared_experts > 0 then
      self.shared_experts = Expert(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)
   end
   self:set_routing(cfg)
end

--- Keeps cfg's routing keys (num_experts_per_tok as top_k, topk_method, n_group, topk_group,
-- norm_topk_prob, routed_scaling_factor) on the block, where route reads them.
function DeepseekMoE:set_routing(cfg)
   rawset(self, "top_k", cfg.num_experts_per_tok)
   for _, k in ipairs({ "topk_method", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor" }) do
      rawset(self, k, cfg[k])
   end
end

--- The experts of each of flat's rows and their weights: top_w (N, k) float32, top_i a list per
-- row of k 0-based experts (see the file's header for the two routings).
function DeepseekMoE:route(flat)
   local logits = self.gate(flat)
   local method = M.METHODS[self.topk_method]
   local sigmoid = method.sigmoid
   local scores = (sigmoid and logits:sigmoid() or logits:softmax(-1)):tolist()
   local bias = self.gate.e_score_correction_bias and self.gate.e_score_correction_bias:tolist()
   local E, k = #scores[1], self.top_k
   local top_w, top_i = {}, {}
   for t, s in ipairs(scores) do
      local choice = s
      if bias then
         choice = {}
         for e = 1, E do choice[e] = s[e] + bias[e] end
      end
      local allowed
      if self.topk_method ~= "greedy" then
         allowed = allowed_experts(choice, E, self.n_group, self.topk_group,
            method.group_by_best_two and best_two_sum or best_one)
      end
      local picked = top_indices(choice, k, E, allowed)
      local w, sum = {}, 0
      for j, e in ipairs(picked) do
         w[j] = s[e]
         sum = sum + s[e]
      end
      local norm = self.norm_topk_prob and 1 / (sum + 1e-20) or 1
      for j = 1, k do
         w[j] = w[j] * norm * self.routed_scaling_factor
         picked[j] = picked[j] - 1
      end
      top_w[t], top_i[t] = w, picked
   end
   return T.tensor(top_w, { dtype = "float32" }), top_i
end

--- x (B, T, hidden): the routed experts' weighted sum plus the shared experts'.
function DeepseekMoE:forward(x)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local flat = x:reshape(B * L, H)
   local top_w, top_i = self:route(flat)
   local experts = self.experts
   local y = (experts.takes_routing and experts(flat, top_w, top_i) or moe.run_experts(experts, flat, top_w, top_i))
      :view(B, L, H)
   if self.shared_experts then y = y + self.shared_experts(x) end
   return y
end

-- --- layers and models ------------------------------------------------------------------------

-- An expert, a shared expert or a dense layer's MLP: Llama's gate/up/down of the given width.
local function mlp_class(prefix)
   local MLP = llama.LlamaMLP:extend(prefix .. "MLP")
   function MLP:__init(cfg, intermediate)
      llama.LlamaMLP.__init(self, setmetatable({ intermediate_size = intermediate or cfg.intermediate_size },
         { __index = cfg }))
   end
   return MLP
end

--- The MLP classes of a family routed as DeepSeek routes, named prefix .. "MLP" (an expert, a
-- shared expert, a dense layer's MLP) and prefix .. moe_name; returns them and the layer's MLP
-- maker: the MoE block where cfg.sparse_layers says so, the dense MLP elsewhere.
function M.moe_layer_classes(prefix, moe_name)
   local MLP = mlp_class(prefix)
   local MoE = DeepseekMoE:extend(prefix .. moe_name)
   function MoE:__init(cfg) DeepseekMoE.__init(self, cfg, MLP) end
   local function mlp(cfg, layer_idx) return cfg.sparse_layers[layer_idx] and MoE(cfg) or MLP(cfg) end
   return MLP, MoE, mlp
end

--- For a causal LM class of such a family: leaves out the multi-token-prediction layers stored
-- after the last decoder layer when loading (num_nextn_predict_layers of them).
function M.skip_mtp_layers(model)
   local skip = { unpack(model.ignore_unexpected) }             -- (the class's own, first)
   for i = 0, model.config.num_nextn_predict_layers - 1 do
      skip[#skip + 1] = "^model%.layers%." .. (model.config.num_hidden_layers + i) .. "%."
   end
   rawset(model, "ignore_unexpected", skip)
end

--- A family whose folders may also be a multimodal model's (model_types in multimodal): its
-- config read from text_config there, its tensors under language_model.* renamed, and the
-- other towers' tensors (ignore: patterns) left out. Returns the read_config to give
-- latent_family, and mark(LM), which sets the class's renames and ignores.
local function language_model_of(family, multimodal, ignore)
   local read = function(source)
      return config.read_text_config(source, "models." .. family, multimodal,
         function(src) return M.config(src, family) end)
   end
   local function mark(LM)
      LM.checkpoint_renames = config.LANGUAGE_MODEL_RENAMES
      LM.ignore_unexpected = { "rotary_emb%.inv_freq$", unpack(ignore) }
      return LM
   end
   return read, mark
end

--- The classes of a family with latent attention (Attention: MLAttention or one extending it)
-- and DeepSeek's experts, named as transformers names them, put into `into`; returns the causal
-- LM class. read_config(source, family) reads the family's config (default M.config).
function M.latent_family(family, prefix, Attention, into, read_config)
   local MLP, MoE, mlp = M.moe_layer_classes(prefix, family == "deepseek_v2" and "Moe" or "MoE")
   local LM = moe.decoder_family(family, prefix, Attention, mlp, "mlp", read_config or M.config, into)
   moe.builds_experts_as_stored(LM)
   local init = LM.__init
   function LM:__init(cfg, opts)
      init(self, cfg, opts)
      M.skip_mtp_layers(self)
   end
   into[prefix .. "MLP"], into[MoE.__name] = MLP, MoE
   return LM
end

M.latent_family("deepseek_v2", "DeepseekV2", MLAttention, M)
-- (also Kimi K2.5's folders, model_type kimi_k25: the language model from text_config and
-- language_model.*, the vision tower and projector left out)
local read_v3, mark_v3 = language_model_of("deepseek_v3", { kimi_k25 = true },
   { "^vision_tower%.", "^mm_projector%.", "^model%.vision_tower%.", "^model%.mm_projector%." })
mark_v3(M.latent_family("deepseek_v3", "DeepseekV3", MLAttention, M, read_v3))
M.latent_family("glm4_moe_lite", "Glm4MoeLite", MLAttention, M)   -- GLM-4.7-Flash: V3's layout, GLM's defaults
-- Mistral Small 4: V3's layout, softmax routing by groups' best two, Llama 4's query scaling;
-- alone, or as a Mistral 3 folder's language model (text_config, language_model.*, the Pixtral
-- tower left out: models/llama.lua's Mistral 3)
local read_m4, mark_m4 = language_model_of("mistral4", { mistral3 = true }, llama.MISTRAL3_VISION)
mark_m4(M.latent_family("mistral4", "Mistral4", MLAttention, M, read_m4))

-- Sarvam MLA (model_type sarvam_mla: sarvamai/sarvam-105b; transformers builds a
-- DeepseekV3ForCausalLM): V3's layout with SarvamMLAConfig's defaults (no query bottleneck, one group
-- of experts, a dense first layer). Its hub config is written for the original remote code, and is
-- read as transformers translates it: rope_scaling of type "deepseek_yarn" is YaRN, head_dim and
-- q_head_dim are derived (whatever the file says), num_experts and num_shared_experts are
-- n_routed_experts and n_shared_experts.
local SARVAM_MLA_DEFAULTS = { vocab_size = 262144, hidden_size = 4096, intermediate_size = 16384, num_hidden_layers = 32,
   num_attention_heads = 64, n_routed_experts = 128, n_shared_experts = 1, moe_intermediate_size = 2048 }
local SARVAM_MLA_ALIASES = { num_experts = "n_routed_experts", num_local_experts = "n_routed_experts",
   num_shared_experts = "n_shared_experts", num_mtp_layers = "num_nextn_predict_layers" }

--- Reads and checks a Sarvam MLA config (path, folder or table), the hub's format or transformers'.
function M.sarvam_mla_config(source)
   local raw, src, fixed = config.read_with_defaults(source, "models.sarvam_mla", SARVAM_MLA_DEFAULTS)
   for alias, key in pairs(SARVAM_MLA_ALIASES) do
      if raw[key] == nil and raw[alias] ~= nil then fixed[key] = raw[alias] end
   end
   fixed.head_dim, fixed.q_head_dim = nil, nil
   local scaling = raw.rope_scaling
   if type(scaling) == "table" and (scaling.type == "deepseek_yarn" or scaling.rope_type == "deepseek_yarn") then
      local rope = {}
      for k, v in pairs(scaling) do if k ~= "type" then rope[k] = v end end
      rope.rope_type, fixed.rope_scaling, fixed.rope_parameters = "yarn", nil, rope
   end
   local cfg = M.config(fixed, "sarvam_mla")
   cfg._source, cfg._raw = src, raw
   return cfg
end

M.latent_family("sarvam_mla", "SarvamMLA", MLAttention, M, M.sarvam_mla_config)

-- A.X-K1 (AXK1ForCausalLM, model_type axk1: skt/A.X-K1): V3's layout, its queries always through the
-- q_lora_rank bottleneck, and an RMSNorm over each sparse block's output (mlp.post_mlp_layernorm).
-- The released checkpoints store that norm at the layer level (post_mlp_layernorm, renamed as
-- transformers' conversion mapping renames it), the dense layers' too (unused, left out), and have
-- no e_score_correction_bias: their routers then choose without one, as transformers' zeros do.
local AXK1_DEFAULTS = { vocab_size = 163840, hidden_size = 7168, intermediate_size = 18432, moe_intermediate_size = 2048,
   num_hidden_layers = 61, num_attention_heads = 64, n_shared_experts = 1, n_routed_experts = 192, q_lora_rank = 1536,
   max_position_embeddings = 32768 }

--- Reads and checks an A.X-K1 config (path, folder or table) with AXK1Config's defaults.
function M.axk1_config(source)
   local raw, src, fixed = config.read_with_defaults(source, "models.axk1", AXK1_DEFAULTS)
   local cfg = M.config(fixed, "axk1")
   cfg._source, cfg._raw = src, raw
   return cfg
end

local AXK1LM = M.latent_family("axk1", "AXK1", MLAttention, M, M.axk1_config)
AXK1LM.checkpoint_renames = { { "%.post_mlp_layernorm%.", ".mlp.post_mlp_layernorm." } }
AXK1LM.ignore_unexpected = { "rotary_emb%.inv_freq$", "%.mlp%.post_mlp_layernorm%." }

local AXK1MoE = M.AXK1MoE

function AXK1MoE:__init(cfg)
   DeepseekMoE.__init(self, cfg, M.AXK1MLP)
   if cfg.no_correction_bias then self.gate:register_buffer("e_score_correction_bias", nil) end
   self.post_mlp_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

--- x (B, T, hidden): V3's routed and shared experts' sum, normed.
function AXK1MoE:forward(x)
   return self.post_mlp_layernorm(DeepseekMoE.forward(self, x))
end

-- (whether the checkpoint has correction biases, beside the experts' layout)
local axk1_opts, axk1_init, axk1_read = AXK1LM.build_opts_for, AXK1LM.__init, AXK1LM.read_config

function AXK1LM.build_opts_for(names, shape_of)
   local opts = axk1_opts(names, shape_of) or {}
   opts.no_correction_bias = true
   for _, name in ipairs(names) do
      if name:find("%.e_score_correction_bias$") then opts.no_correction_bias = nil break end
   end
   return opts
end

function AXK1LM:__init(cfg, opts)
   rawset(self, "_no_correction_bias", opts and opts.no_correction_bias)
   axk1_init(self, cfg, opts)
end

function AXK1LM:read_config(source)
   local cfg = axk1_read(self, source)
   cfg.no_correction_bias = rawget(self, "_no_correction_bias")
   return cfg
end

return M
