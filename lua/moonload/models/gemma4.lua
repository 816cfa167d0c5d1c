--- Gemma 4 text (transformers' Gemma4ForCausalLM, model_type gemma4_text; and the language model
-- of a multimodal Gemma 4 checkpoint, model_type gemma4, as every Gemma 4 on the hub) with
-- Hugging Face parameter names. Gemma 3's layer (four norms, a GELU-tanh MLP, sliding layers
-- with full ones between them) with these changes:
--  * RMSNorms scale by weight (not 1 + weight); queries and keys are normed per head, values too
--    (without a weight); attention is not scaled (the norms set its range).
--  * Full layers have wider heads (global_head_dim) and may have fewer key/value heads, whose keys
--    are also their values (attention_k_eq_v: no v_proj). Their rotary embedding is
--    "proportional": a quarter of each head's frequency pairs turn, the rest stay at angle 0.
--  * The last num_kv_shared_layers layers compute no keys or values: each reuses those of the last
--    earlier layer of its kind (sliding or full), and their MLPs may be twice as wide.
--  * Per-layer inputs (PLE, the E models: gemma-4-E2B): a second embedding gives each token
--    hidden_size_per_layer_input values per layer, mixed with a projection of the first
--    embedding; each layer adds gate(x) * its input, projected back and normed, to its output.
--  * A mixture of experts beside the MLP (enable_moe_block, the 26B-A4B model): a router of its
--    own (a weightless norm, a scale per channel, softmax, top k renormalized, a scale per
--    expert), stacked experts; the MLP's and the experts' outputs are normed apart and summed.
--  * Each layer's output is multiplied by its layer_scalar.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local common = require("moonload.models.common")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local gemma = require("moonload.models.gemma")
local moe = require("moonload.models.moe")
local block_schedule = require("moonload.models.block_schedule")

local M = {}
local WHO = "models.gemma4"

-- Gemma4TextConfig's keys and defaults (transformers' class; Gemma-4-E2B's sizes)
local SCHEMA = {
   { "vocab_size", "int", 262144 },
   { "hidden_size", "int", 2304 },
   { "intermediate_size", "int", 9216 },
   { "num_hidden_layers", "int", 30 },
   { "num_attention_heads", "int", 8 },
   { "num_key_value_heads", "int", 4 },
   { "head_dim", "int", 256 },
   { "hidden_activation", "string", "gelu_pytorch_tanh" },
   { "max_position_embeddings", "int", 131072 },
   { "rms_norm_eps", "posnum", 1e-6 },
   { "tie_word_embeddings", "bool", true },
   { "attention_bias", "bool", false },
   { "sliding_window", "int", 512 },
   { "final_logit_softcapping", "posnum", function() return nil end },
   { "vocab_size_per_layer_input", "int", 262144 },
   { "hidden_size_per_layer_input", "int0", 256 },
   { "attention_k_eq_v", "bool", false },
   { "num_kv_shared_layers", "int0", 0 },
   { "enable_moe_block", "bool", false },
   { "use_double_wide_mlp", "bool", false },
   { "rope_parameters", "table", function() return {} end },
}

-- Each layer type's rotary embedding when the file gives none (transformers' defaults)
local DEFAULT_ROPE = {
   sliding_attention = { rope_type = "default", rope_theta = 10000 },
   full_attention = { rope_type = "proportional", partial_rotary_factor = 0.25, rope_theta = 1000000 },
}

-- A layer type's rotary parameters, checked: {rope_type = default | linear | proportional,
-- rope_theta, factor, partial_rotary_factor}.
local function rope_of(cfg, kind)
   local rope = cfg.rope_parameters[kind]
   if rope == nil then return DEFAULT_ROPE[kind] end
   local where = "rope_parameters." .. kind
   if type(rope) ~= "table" then config.fail(cfg, WHO, 'config key "%s" must be an object', where) end
   local kind_of = rope.rope_type or "default"
   if kind_of ~= "default" and kind_of ~= "linear" and kind_of ~= "proportional" then
      config.fail(cfg, WHO, '%s: rope type "%s" is not supported (supported: default, linear, proportional)', where,
         tostring(kind_of))
   end
   local out = { rope_type = kind_of }
   for _, k in ipairs({ "rope_theta", "factor", "partial_rotary_factor" }) do
      local v = rope[k]
      if v ~= nil and (type(v) ~= "number" or v <= 0) then
         config.fail(cfg, WHO, 'config key "%s.%s" must be a positive number, got %s', where, k, tostring(v))
      end
      out[k] = v
   end
   out.rope_theta = out.rope_theta or DEFAULT_ROPE[kind].rope_theta
   if kind_of == "linear" and out.factor == nil then
      config.fail(cfg, WHO, 'config key "%s.factor" is missing (needed by rope type "linear")', where)
   end
   if (out.partial_rotary_factor or 1) > 1 then
      config.fail(cfg, WHO, 'config key "%s.partial_rotary_factor" must be at most 1, got %s', where,
         tostring(out.partial_rotary_factor))
   end
   return out
end

-- Each layer's head size and key/value heads: per_layer_config's overrides (a file transformers
-- wrote: {"<0-based layer>": {head_dim, num_key_value_heads}}), else the full layers' from
-- global_head_dim and, when keys are values, num_global_key_value_heads (the hub's files).
local function layer_geometry(cfg, raw)
   local heads, dims = {}, {}
   local per_layer = raw.per_layer_config
   if per_layer ~= nil and type(per_layer) ~= "table" then
      config.fail(cfg, WHO, 'config key "per_layer_config" must be an object')
   end
   local global_dim = raw.global_head_dim or 512
   local global_kv = cfg.attention_k_eq_v and raw.num_global_key_value_heads or nil
   for i = 1, cfg.num_hidden_layers do
      local over
      if per_layer then
         over = per_layer[tostring(i - 1)] or {}
      else
         over = cfg.layer_types[i] == "full_attention" and { head_dim = global_dim, num_key_value_heads = global_kv } or {}
      end
      if type(over) ~= "table" then config.fail(cfg, WHO, 'per_layer_config["%d"] must be an object', i - 1) end
      for k in pairs(over) do
         if k ~= "head_dim" and k ~= "num_key_value_heads" then
            config.fail(cfg, WHO, 'per_layer_config["%d"].%s is not supported (supported: head_dim, num_key_value_heads)',
               i - 1, tostring(k))
         end
      end
      dims[i] = config.integer(cfg, WHO, string.format("head_dim of layer %d", i - 1), over.head_dim or cfg.head_dim, 1)
      heads[i] = config.integer(cfg, WHO, string.format("num_key_value_heads of layer %d", i - 1),
         over.num_key_value_heads or cfg.num_key_value_heads, 1)
      if cfg.num_attention_heads % heads[i] ~= 0 then
         config.fail(cfg, WHO, "num_attention_heads %d is not a multiple of layer %d's %d key/value heads",
            cfg.num_attention_heads, i - 1, heads[i])
      end
   end
   return dims, heads
end

-- The layer whose keys and values each layer reuses (kv_source[i], or nil: its own), as
-- transformers' kv_sharing_modes: from layer n - num_kv_shared_layers on, the last earlier layer
-- of the same kind.
local function kv_sources(cfg)
   local n, shared = cfg.num_hidden_layers, cfg.num_kv_shared_layers
   if shared > n then
      config.fail(cfg, WHO, "num_kv_shared_layers %d is more than num_hidden_layers %d", shared, n)
   end
   local first = n - shared + 1
   local last_of, sources, producers = {}, {}, {}
   for i = 1, first - 1 do last_of[cfg.layer_types[i]] = i end
   for i = first, n do
      local src = last_of[cfg.layer_types[i]]
      if src == nil then
         config.fail(cfg, WHO, 'layer %d (%s) shares keys and values, but no earlier layer of that kind computes them',
            i - 1, cfg.layer_types[i])
      end
      sources[i], producers[src] = src, true
   end
   return sources, producers
end

--- Reads and checks a Gemma 4 text config (path, folder or table).
function M.config(source)
   local raw, src = config.read(source, WHO)
   local cfg = config.validate(raw, SCHEMA, src, WHO, 2)
   cfg.family = "gemma4_text"
   cfg.hidden_act = cfg.hidden_activation
   common.activation(cfg.hidden_act, WHO, src)
   local bidirectional = cfg.use_bidirectional_attention
   if bidirectional ~= nil and bidirectional ~= "vision" then
      config.fail(cfg, WHO, 'use_bidirectional_attention "%s" is not supported (text attends causally)', tostring(bidirectional))
   end
   local types = config.layer_types(cfg, WHO, { "sliding_attention", "full_attention" },
      function(i) return i % 6 ~= 0 and "sliding_attention" or "full_attention" end)
   types[#types] = "full_attention"                -- (transformers forces the last layer to attend fully)
   cfg.layer_windows = {}
   for i, kind in ipairs(types) do cfg.layer_windows[i] = kind == "sliding_attention" and cfg.sliding_window or false end
   cfg.layer_head_dims, cfg.layer_kv_heads = layer_geometry(cfg, raw)
   for _, kind in ipairs({ "sliding_attention", "full_attention" }) do     -- one rotary table per kind
      local dim
      for i, k in ipairs(types) do
         if k == kind then
            if dim and cfg.layer_head_dims[i] ~= dim then
               config.fail(cfg, WHO, "the %s layers' head sizes differ (%d and %d)", kind, dim, cfg.layer_head_dims[i])
            end
            dim = cfg.layer_head_dims[i]
         end
      end
   end
   cfg.rope_sliding, cfg.rope_full = rope_of(cfg, "sliding_attention"), rope_of(cfg, "full_attention")
   cfg.kv_source, cfg.kv_producers = kv_sources(cfg)
   if cfg.enable_moe_block then
      local function int(name, min) return config.integer(cfg, WHO, name, cfg[name], min) end
      int("num_experts", 1)
      int("top_k_experts", 1)
      int("moe_intermediate_size", 1)
      if cfg.top_k_experts > cfg.num_experts then
         config.fail(cfg, WHO, "top_k_experts %d is more than num_experts %d", cfg.top_k_experts, cfg.num_experts)
      end
   end
   return cfg
end

-- The config a layer's attention and MLP read: its head size, key/value heads and MLP width.
local function layer_config(cfg, i)
   local wide = cfg.use_double_wide_mlp and cfg.kv_source[i] ~= nil
   return setmetatable({ head_dim = cfg.layer_head_dims[i], num_key_value_heads = cfg.layer_kv_heads[i],
      intermediate_size = cfg.intermediate_size * (wide and 2 or 1), mlp_bias = false }, { __index = cfg })
end

-- --- shared keys and values ---------------------------------------------------------------------

-- t (keys or values update returned) copied, with an int8 cache's scales.
local function kept(t)
   local c = t:clone()
   local scales = rawget(t, "_q8_scales")
   if scales then rawset(c, "_q8_scales", scales:clone()) end
   return c
end

-- --- layers --------------------------------------------------------------------------------------

local Gemma4TextAttention = llama.LlamaAttention:extend("Gemma4TextAttention")
M.Gemma4TextAttention = Gemma4TextAttention

function Gemma4TextAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local c = layer_config(cfg, layer_idx)
   local H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
   local bias, eps = cfg.attention_bias, cfg.rms_norm_eps
   local reuses = cfg.kv_source[layer_idx]
   local keys_are_values = cfg.attention_k_eq_v and cfg.layer_types[layer_idx] == "full_attention"
   self.q_proj = nn.Linear(cfg.hidden_size, H * D, { bias = bias })
   self.q_norm = nn.RMSNorm(D, { eps = eps })
   if not reuses then
      self.k_norm = nn.RMSNorm(D, { eps = eps })
      self.v_norm = nn.RMSNorm(D, { eps = eps, elementwise_affine = false })
      self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, { bias = bias })
      if not keys_are_values then self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, { bias = bias }) end
   end
   self.o_proj = nn.Linear(H * D, cfg.hidden_size, { bias = bias })
   llama.attention_geometry(self, c, layer_idx)
   rawset(self, "scale", 1)                               -- (q and k are normed per head)
   rawset(self, "kv_source", reuses)
   rawset(self, "kv_shared", cfg.kv_producers[layer_idx] == true)
   -- a layer reusing another's keys and values keeps none in the cache (utils/runtime_memory.lua)
   if reuses then rawset(self, "cache_role", "none") end
end

--- x (B, T, hidden); cos, sin for this layer's kind; cache optional; pad (B, past + T) or nil.
-- The keys and values of a layer that later layers reuse go to the model's shared_kv table, under
-- the block of the forward (a block schedule's rows and tokens, or "whole") and the layer's index,
-- with where its queries start (past), its padding mask and its query count; a reusing layer
-- reads them there.
function Gemma4TextAttention:forward(x, cos, sin, cache, pad)
   local B, L = x:size(1), x:size(2)
   local H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
   local q = self.q_norm(self.q_proj(x):view(B, L, H, D)):transpose(2, 3)
   q = llama.apply_rotary(q, cos, sin)
   local k, v, past
   local key = cache and cache:block_key() or "whole"
   local shared = rawget(self, "shared_kv")
   if self.kv_source then
      local s = shared[key] and shared[key][self.kv_source]
      if s == nil then
         error(string.format("%s (layer %d): it reuses layer %d's keys and values, which this forward has not computed",
            WHO, self.layer_idx - 1, self.kv_source - 1), 3)
      end
      -- (past: where this layer's queries start among the keys; the last L of the producer's)
      k, v, past, pad = s.k, s.v, s.past + s.L - L, s.pad
      if k.device ~= q.device and (not cache or not cache.device) then k, v = k:to(q.device), v:to(q.device) end
      if pad and pad.device ~= q.device and (not cache or not cache.device) then pad = pad:to(q.device) end
   else
      k = self.k_proj(x):view(B, L, Hkv, D)
      v = self.v_proj and self.v_proj(x):view(B, L, Hkv, D) or k          -- (keys are values: before k's norm)
      k = llama.apply_rotary(self.k_norm(k):transpose(2, 3), cos, sin)
      v = self.v_norm(v):transpose(2, 3)
      past = 0
      if cache then
         past = cache.length
         k, v = cache:update(self.layer_idx, k, v, self.window or nil)
         local S = k:size(3)          -- (a sliding layer's cache gives the last keys only)
         if pad and S < past + L then pad = pad:narrow(2, past + L - S + 1, S) end
      end
      if self.kv_shared then
         -- (a sliding layer's next block may move its cached keys: a block keeps a copy of its own)
         if self.window and key ~= "whole" then k, v = kept(k), kept(v) end
         shared[key] = shared[key] or {}
         shared[key][self.layer_idx] = { k = k, v = v, past = past, pad = pad, L = L }
      end
   end
   return self.o_proj(self:attend_heads(q, k, v, past, pad))
end

local Gemma4TextMLP = llama.LlamaMLP:extend("Gemma4TextMLP")
M.Gemma4TextMLP = Gemma4TextMLP

function Gemma4TextMLP:__init(cfg, layer_idx)
   llama.LlamaMLP.__init(self, layer_config(cfg, layer_idx))
end

local Gemma4TextRouter = nn.Module:extend("Gemma4TextRouter")
M.Gemma4TextRouter = Gemma4TextRouter

function Gemma4TextRouter:__init(cfg)
   nn.Module.__init(self)
   local Hd, E = cfg.hidden_size, cfg.num_experts
   self.norm = nn.RMSNorm(Hd, { eps = cfg.rms_norm_eps, elementwise_affine = false })
   self.proj = nn.Linear(Hd, E, { bias = false })
   self.scale = nn.Parameter(T.ones({ Hd }))
   self.per_expert_scale = nn.Parameter(T.ones({ E }))
   rawset(self, "top_k", cfg.top_k_experts)
   rawset(self, "root_size", Hd ^ -0.5)
end

--- flat (N, hidden) -> top_w (N, k) float32, top_i (a list per row of k 0-based experts): the
-- top k of a softmax over proj(norm(x) * scale / sqrt(hidden)), renormalized to sum to 1, each
-- times its expert's per_expert_scale.
function Gemma4TextRouter:forward(flat)
   local h = self.norm(flat) * self.scale * self.root_size
   local probs = self.proj(h):float():softmax(-1)
   local top_w, top_i = probs:topk(self.top_k, 2)
   top_w = top_w / top_w:sum(2, true)
   local N, k = top_i:size(1), top_i:size(2)
   local scales = self.per_expert_scale:float():index_select(1, top_i:reshape(N * k)):view(N, k)
   return top_w * scales, top_i:tolist()
end

local Gemma4TextDecoderLayer = nn.Module:extend("Gemma4TextDecoderLayer")
M.Gemma4TextDecoderLayer = Gemma4TextDecoderLayer

function Gemma4TextDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local Hd, o = cfg.hidden_size, { eps = cfg.rms_norm_eps }
   self.self_attn = Gemma4TextAttention(cfg, layer_idx)
   self.mlp = Gemma4TextMLP(cfg, layer_idx)
   self.input_layernorm = nn.RMSNorm(Hd, o)
   self.post_attention_layernorm = nn.RMSNorm(Hd, o)
   self.pre_feedforward_layernorm = nn.RMSNorm(Hd, o)
   self.post_feedforward_layernorm = nn.RMSNorm(Hd, o)
   self:register_buffer("layer_scalar", T.ones({ 1 }))
   local P = cfg.hidden_size_per_layer_input
   if P > 0 then
      self.per_layer_input_gate = nn.Linear(Hd, P, { bias = false })
      self.per_layer_projection = nn.Linear(P, Hd, { bias = false })
      self.post_per_layer_input_norm = nn.RMSNorm(Hd, o)
      self.act_fn = common.activation_module(cfg.hidden_act, WHO, cfg._source)
   end
   if cfg.enable_moe_block then
      self.router = Gemma4TextRouter(cfg)
      local ecfg = setmetatable({ moe_intermediate_size = cfg.moe_intermediate_size }, { __index = cfg })
      self.experts = moe.StackedExperts(ecfg, WHO)
      self.post_feedforward_layernorm_1 = nn.RMSNorm(Hd, o)
      self.post_feedforward_layernorm_2 = nn.RMSNorm(Hd, o)
      self.pre_feedforward_layernorm_2 = nn.RMSNorm(Hd, o)
   end
end

--- x (B, T, hidden), cos, sin, cache, pad as Llama's layer; per_layer (B, T, P) this layer's
-- per-layer input (nil without PLE).
function Gemma4TextDecoderLayer:forward(x, cos, sin, cache, pad, per_layer)
   x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, pad))
   local h = self.mlp(self.pre_feedforward_layernorm(x))
   if self.router then                             -- the experts read the layer's input, not the MLP's output
      local B, L, Hd = x:size(1), x:size(2), x:size(3)
      local flat = x:reshape(B * L, Hd)
      local top_w, top_i = self.router(flat)
      -- (the stacked experts, or one module each once quantize has split them)
      local routed = moe.SparseMoeBlock.routed(self, self.pre_feedforward_layernorm_2(flat), top_w, top_i):view(B, L, Hd)
      h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)
   end
   x = x + self.post_feedforward_layernorm(h)
   if per_layer then
      local g = self.act_fn(self.per_layer_input_gate(x)) * per_layer
      x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
   end
   return x * self.layer_scalar
end

-- --- the model -----------------------------------------------------------------------------------

local Gemma4TextRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("Gemma4TextRotaryEmbedding")
M.Gemma4TextRotaryEmbedding = Gemma4TextRotaryEmbedding

-- 1 / theta^(2i / dim) for the pairs that turn (a partial_rotary_factor share of dim / 2, all
-- for the default type) and 0 for the rest ("proportional": the table keeps the head's width),
-- over factor; float32 steps as transformers.
local function inv_freq_of(rope, dim)
   local pairs_ = dim / 2
   local turning = rope.rope_type == "proportional" and math.floor((rope.partial_rotary_factor or 1) * dim / 2) or pairs_
   local exps = T.arange(0, 2 * turning, 2, { dtype = "float32" }) / dim
   local inv = T.full({ turning }, rope.rope_theta, { dtype = "float32" }):pow(exps):reciprocal()
   if turning < pairs_ then inv = T.cat({ inv, T.zeros({ pairs_ - turning }, { dtype = "float32" }) }, 1) end
   if rope.factor then inv = inv / rope.factor end
   return inv
end

--- The full layers' frequencies (inv_freq, over their head size) and the sliding layers'
-- (local_inv_freq), each from its kind's rope_parameters.
function Gemma4TextRotaryEmbedding:__init(cfg)
   nn.Module.__init(self)
   local full_dim, local_dim
   for i, kind in ipairs(cfg.layer_types) do
      if kind == "full_attention" then full_dim = cfg.layer_head_dims[i] else local_dim = cfg.layer_head_dims[i] end
   end
   self:register_buffer("inv_freq", inv_freq_of(cfg.rope_full, full_dim), false)
   self:register_buffer("local_inv_freq", inv_freq_of(cfg.rope_sliding, local_dim or cfg.head_dim), false)
   rawset(self, "local_scaling", 1)
end

local Gemma4TextModel = llama.LlamaModel:extend("Gemma4TextModel")
M.Gemma4TextModel = Gemma4TextModel
Gemma4TextModel.family, Gemma4TextModel.Layer, Gemma4TextModel.Rotary = "gemma4_text", Gemma4TextDecoderLayer,
   Gemma4TextRotaryEmbedding
Gemma4TextModel.layer_rotary = llama.layer_rotary_by_window
Gemma4TextModel.blocks_need_cache = true       -- (the shared keys and values are kept per block)

function Gemma4TextModel:__init(cfg)
   llama.LlamaModel.__init(self, cfg)
   local shared = {}                           -- (one forward's: see Gemma4TextAttention:forward)
   for i = 1, cfg.num_hidden_layers do rawset(self.layers[i].self_attn, "shared_kv", shared) end
   rawset(self, "shared_kv", shared)
   local P, n = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
   if P > 0 then
      self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, n * P)
      self.per_layer_model_projection = nn.Linear(cfg.hidden_size, n * P, { bias = false })
      self.per_layer_projection_norm = nn.RMSNorm(P, { eps = cfg.rms_norm_eps })
   end
end

local in_dtype = gemma.in_dtype
Gemma4TextModel.embed_scale = gemma.Gemma2Model.embed_scale     -- sqrt(hidden) in the embedding's dtype

--- Every layer's per-layer input (B, T, layers, P): (norm(projection of x / sqrt(hidden)) +
-- the ids' second embedding * sqrt(P)) / sqrt(2).
function Gemma4TextModel:per_layer_inputs(input_ids, x)
   local cfg = self.config
   local B, L, n, P = x:size(1), x:size(2), cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
   local table_ = self.embed_tokens_per_layer
   local ids = input_ids
   if ids.device ~= table_.weight.device and table_.weight.device ~= "meta" then ids = ids:to(table_.weight.device) end
   local by_id = table_(ids) * in_dtype(math.sqrt(P), table_.weight.dtype)
   local projected = self.per_layer_model_projection(x) * cfg.hidden_size ^ -0.5
   projected = self.per_layer_projection_norm(projected:view(B, L, n, P))
   if by_id.device ~= projected.device then by_id = by_id:to(projected.device) end
   return (projected + by_id:view(B, L, n, P)) * 2 ^ -0.5
end

-- The last n positions of each rotary table (T, D) or (B, 1, T, D) in rope (a list per layer of
-- {cos, sin}, shared between layers of a kind).
local function last_positions(rope, n)
   local out, done = {}, {}
   for i, r in ipairs(rope) do
      if not done[r] then
         local d = r[1]:dim() - 1
         local T_ = r[1]:size(d)
         done[r] = { r[1]:narrow(d, T_ - n + 1, n), r[2]:narrow(d, T_ - n + 1, n) }
      end
      out[i] = done[r]
   end
   return out
end

--- As LlamaModel's forward, with keep (the positions whose outputs are wanted: generate asks
-- for the last): from the first layer that reuses others' keys and values on, no layer adds to
-- the cache, so those layers run on the last keep positions only, as transformers does; in a
-- block schedule they run on every block.
function Gemma4TextModel:forward(input_ids, cache, pad, pos, blocks, keep)
   local cfg = self.config
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   local x = self.embed_tokens(input_ids) * self:embed_scale()
   local per_layer = self.embed_tokens_per_layer and self:per_layer_inputs(input_ids, x)
   local rope = self:layer_rotary(pos or T.arange(past, past + L, { device = input_ids.device }), x)
   local n = cfg.num_hidden_layers
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, WHO, self.blocks_need_cache)
   local shared = rawget(self, "shared_kv")
   for k in pairs(shared) do shared[k] = nil end          -- (what a forward that raised left)
   local first_reusing = n - cfg.num_kv_shared_layers + 1
   for i = 1, n do
      if i == first_reusing and not schedule and keep and keep > 0 and keep < x:size(2) then
         local all = x:size(2)
         x = x:narrow(2, all - keep + 1, keep)
         if per_layer then per_layer = per_layer:narrow(2, all - keep + 1, keep) end
         rope = last_positions(rope, keep)
      end
      local r = rope[i]
      x = block_schedule.call(schedule, i, self.layers[i], x, cache, pad, r[1], r[2], per_layer and per_layer:select(3, i))
   end
   for k in pairs(shared) do shared[k] = nil end
   if cache then cache:advance(L) end
   return self.norm(x)
end

local Gemma4ForCausalLM = gemma.Gemma2ForCausalLM:extend("Gemma4ForCausalLM")
M.Gemma4ForCausalLM = Gemma4ForCausalLM
Gemma4ForCausalLM.family, Gemma4ForCausalLM.Model = "gemma4_text", Gemma4TextModel
Gemma4ForCausalLM.no_split_modules = { "Gemma4TextDecoderLayer" }
-- A multimodal checkpoint's language model (model.language_model.*), its vision and audio towers
-- and their projections left out; the keys and values of layers that reuse others' (some files
-- keep them; transformers ignores them too).
Gemma4ForCausalLM.checkpoint_renames = config.LANGUAGE_MODEL_RENAMES
Gemma4ForCausalLM.ignore_unexpected = { "rotary_emb%.", "^model%.vision_tower%.", "^model%.audio_tower%.",
   "^model%.embed_vision%.", "^model%.embed_audio%.", "%.self_attn%.[kv]_proj%.weight$", "%.self_attn%.[kv]_proj%.bias$",
   "%.self_attn%.[kv]_norm%.weight$" }

--- A gemma4_text config, or a multimodal gemma4 one's text_config.
function Gemma4ForCausalLM:read_config(source)
   return config.read_text_config(source, WHO, { gemma4 = true }, M.config)
end

local lm_forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")

--- As LlamaForCausalLM's forward, the logits soft-capped when the config says
-- (final_logit_softcapping).
function Gemma4ForCausalLM:forward(input_ids, opts)
   return gemma.soft_cap(lm_forward(self, input_ids, opts), self.config.final_logit_softcapping)
end

return M
