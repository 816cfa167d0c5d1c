--- MiMo-V2-Flash (MiMoV2FlashForCausalLM, model_type "mimo_v2_flash": XiaomiMiMo/MiMo-V2-Flash, 309B
-- parameters, 15B active) with Hugging Face parameter names, as transformers builds it.
--
-- Attention: Llama's grouped-query attention without biases on the output (q/k/v biased when
-- attention_bias), where the queries and keys have head_dim (192) dims a head but the values
-- v_head_dim (128), multiplied by attention_value_scale (0.707; null: 1) before they are cached.
-- layer_types (else the first layer and every 6th full) says which layers attend over a
-- sliding_window of keys (a query and the window - 1 before it; the original code's
-- sliding_window_size counts the keys before the query, so it reads as that + 1). The sliding
-- layers have twice num_key_value_heads and a learned logit per query head that joins each
-- softmax without a value (self_attn.attention_sink_bias, transformers' sinks: models/gpt_oss.lua).
-- Each layer type rotates by its own rope_parameters entry (full_attention, sliding_attention:
-- the hub's bases 5,000,000 and 10,000), over int(head_dim x partial_rotary_factor) dims of each
-- head (0.334 unless the entry says otherwise: 64 of 192), the rest passing through.
--
-- MLP: mlp_layer_types (else the first layer dense, the rest sparse) picks a dense SwiGLU MLP or
-- DeepSeek-V3's routing (models/deepseek.lua: sigmoid scores, e_score_correction_bias for the
-- choice only, the topk_group best of n_group groups, norm_topk_prob, routed_scaling_factor) over
-- n_routed_experts, without shared experts. The hub holds one module per expert
-- (mlp.experts.E.{gate,up,down}_proj); transformers' stacked layout loads too. Only the chosen
-- experts run, so experts on disk are read for the tokens that chose them. The hub's
-- multi-token-prediction layers (model.mtp.*) are left out, as transformers leaves them.
local cjson = require("cjson")
local nn = require("moonload.nn")
local common = require("moonload.models.common")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")

local M = {}
local WHO = "models.mimo_v2_flash"

-- transformers' rope_parameters when the config has none (the hub's thetas), a fresh table each time
local function default_rope()
   return { full_attention = { rope_type = "default", rope_theta = 5000000, partial_rotary_factor = 0.334 },
      sliding_attention = { rope_type = "default", rope_theta = 10000, partial_rotary_factor = 0.334 } }
end

-- Whether the config (the table given, or the file src) says key: null, which transformers reads
-- otherwise than a missing key (attention_value_scale: null scales nothing, missing is 0.707).
local function says_null(source, src, key)
   if type(source) == "table" then return source[key] == cjson.null end
   local f = io.open(src, "rb")
   if not f then return false end
   local text = f:read("*a")
   f:close()
   return text:find('"' .. key .. '"%s*:%s*null') ~= nil
end

-- The rope_parameters entry of each layer type in use, checked: an object, rope type "default",
-- a positive rope_theta, a partial_rotary_factor in (0, 1] when it has one.
local function check_rope(fixed, where)
   local used = {}
   for _, kind in ipairs(type(fixed.layer_types) == "table" and fixed.layer_types or {}) do used[kind] = true end
   local rp = fixed.rope_parameters
   for _, kind in ipairs({ "full_attention", "sliding_attention" }) do
      local p = type(rp) == "table" and rp[kind] or nil
      local key = "rope_parameters." .. kind
      if used[kind] and type(p) ~= "table" then
         config.fail(where, WHO, 'config key "%s" must be an object (each layer type rotates by its own), got %s', key,
            tostring(p))
      end
      if used[kind] then
         local rope_type = p.rope_type or p.type or "default"
         if rope_type ~= "default" then
            config.fail(where, WHO, 'rope type "%s" of %s is not supported (supported: default)', tostring(rope_type), key)
         end
         if type(p.rope_theta) ~= "number" or p.rope_theta <= 0 then
            config.fail(where, WHO, 'config key "%s.rope_theta" must be a positive number, got %s', key,
               tostring(p.rope_theta))
         end
         local f = p.partial_rotary_factor
         if f ~= nil and (type(f) ~= "number" or f <= 0 or f > 1) then
            config.fail(where, WHO, 'config key "%s.partial_rotary_factor" must be a number in (0, 1], got %s', key,
               tostring(f))
         end
      end
   end
end

--- Reads and checks a MiMo-V2-Flash config (path, folder or table): Llama's keys with
-- MiMoV2FlashConfig's defaults, layer_types (cfg.layer_windows), the per-layer-type rotary tables
-- (cfg.rope and cfg.rotary_dim for the full layers, cfg.rope_local and cfg.local_rotary_dim for the
-- sliding ones), v_head_dim, attention_value_scale, and the experts' routing (models/deepseek.lua's
-- moe_config; cfg.sparse_layers from mlp_layer_types).
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, { sliding_window = 129 })
   local where = { _source = src }
   if raw.sliding_window_size ~= nil then
      fixed.sliding_window = config.integer(where, WHO, "sliding_window_size", raw.sliding_window_size, 0) + 1
   end
   local n = raw.num_hidden_layers
   if type(n) == "number" and n == math.floor(n) and n >= 1 then
      if fixed.layer_types == nil then           -- the first layer and every 6th full, the others sliding
         fixed.layer_types = {}
         for i = 1, n do fixed.layer_types[i] = (i == 1 or i % 6 == 0) and "full_attention" or "sliding_attention" end
      end
      if fixed.mlp_layer_types == nil then       -- the first layer dense, the others sparse
         fixed.mlp_layer_types = {}
         for i = 1, n do fixed.mlp_layer_types[i] = i == 1 and "dense" or "sparse" end
      end
   end
   if fixed.rope_parameters == nil then fixed.rope_parameters = default_rope() end
   check_rope(fixed, where)
   -- transformers reads the rotary parameters from rope_parameters' per-type entries alone
   fixed.rope_theta, fixed.rope_scaling, fixed.partial_rotary_factor = nil, nil, nil
   -- no shared experts; mlp_layer_types alone says which layers are sparse
   if fixed.n_routed_experts == nil and fixed.num_local_experts == nil then fixed.n_routed_experts = 256 end
   if fixed.moe_intermediate_size == nil then fixed.moe_intermediate_size = 2048 end
   fixed.n_shared_experts, fixed.first_k_dense_replace, fixed.moe_layer_freq = nil, nil, nil
   local cfg = llama.config(fixed, "mimo_v2_flash")
   cfg._source, cfg._raw = src, raw
   local rp = cfg.rope_parameters
   local full, sliding = rp.full_attention or {}, rp.sliding_attention or {}
   llama.set_rotary_dim(cfg, WHO, full.partial_rotary_factor or 0.334)
   local lcfg = setmetatable({}, { __index = cfg })
   llama.set_rotary_dim(lcfg, WHO, sliding.partial_rotary_factor or 0.334)
   cfg.local_rotary_dim = lcfg.rotary_dim
   cfg.rope_local = llama.rope_from(cfg, WHO, { { sliding, "rope_parameters.sliding_attention." } }, 10000)
   cfg.v_head_dim = config.integer(cfg, WHO, "v_head_dim", cfg.v_head_dim == nil and 128 or cfg.v_head_dim, 1)
   local scale = cfg.attention_value_scale
   if says_null(source, src, "attention_value_scale") then scale = 1 elseif scale == nil then scale = 0.707 end
   if type(scale) ~= "number" or scale <= 0 then
      config.fail(cfg, WHO, 'config key "attention_value_scale" must be a positive number or null, got %s', tostring(scale))
   end
   cfg.attention_value_scale = scale
   for _, w in ipairs(cfg.layer_windows) do
      if w and cfg.num_attention_heads % (2 * cfg.num_key_value_heads) ~= 0 then
         config.fail(cfg, WHO, "num_attention_heads %d is not a multiple of %d, the sliding layers' key/value heads "
            .. "(twice num_key_value_heads)", cfg.num_attention_heads, 2 * cfg.num_key_value_heads)
      end
   end
   return deepseek.moe_config(cfg, WHO, "noaux_tc", { norm_topk_prob = true, n_group = 1, topk_group = 1,
      num_experts_per_tok = 8 })
end

-- --- layers and model ---------------------------------------------------------------------------

local MLP, MoE, mlp = deepseek.moe_layer_classes("MiMoV2Flash", "MoE")
M.MiMoV2FlashMLP, M.MiMoV2FlashMoE = MLP, MoE
local LM = moe.decoder_family("mimo_v2_flash", "MiMoV2Flash", llama.LlamaAttention, mlp, "mlp", M.config, M)
moe.builds_experts_as_stored(LM)
LM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^model%.mtp%." }

local Attention = M.MiMoV2FlashAttention

function Attention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local sliding = cfg.layer_types[layer_idx] == "sliding_attention"
   local c = setmetatable({ num_key_value_heads = cfg.num_key_value_heads * (sliding and 2 or 1) }, { __index = cfg })
   local H, Hkv, D, Dv = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.v_head_dim
   self.q_proj = nn.Linear(c.hidden_size, H * D, { bias = c.qkv_bias })
   self.k_proj = nn.Linear(c.hidden_size, Hkv * D, { bias = c.qkv_bias })
   self.v_proj = nn.Linear(c.hidden_size, Hkv * Dv, { bias = c.qkv_bias })
   self.o_proj = nn.Linear(H * Dv, c.hidden_size, { bias = false })
   if sliding then
      self.attention_sink_bias = nn.Module.new_parameter({ H })
      if not self.attention_sink_bias:is_meta() then self.attention_sink_bias:fill_(0) end
   end
   llama.attention_geometry(self, c, layer_idx)
   rawset(self, "v_head_dim", Dv)
   rawset(self, "value_scale", cfg.attention_value_scale)
end

--- For memory planning (utils/runtime_memory.lua), which counts 2 x heads x head_dim values a
-- cached token: keys of head_dim and values of v_head_dim, as two halves of their mean.
function Attention:kv_cache_heads()
   return self.n_kv_head, (self.head_dim + self.v_head_dim) / 2, self.n_head, false
end

--- q (B, T, H, D), k (B, T, Hkv, D) and the scaled values v (B, T, Hkv, Dv) from x (B, T, hidden).
function Attention:project(x, B, L)
   local H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
   local v = self.v_proj(x):view(B, L, Hkv, self.v_head_dim)
   if self.value_scale ~= 1 then v = v * self.value_scale end
   return self.q_proj(x):view(B, L, H, D), self.k_proj(x):view(B, L, Hkv, D), v
end

--- The kernel takes values narrower than the keys, and the sliding layers' sinks.
function Attention:attend(q, k, v, past, pad)
   -- (the sinks, a few floats, go where the queries are: a cache kept on another device)
   local sinks = self.attention_sink_bias
   if sinks and sinks.device ~= q.device then sinks = sinks:to(q.device) end
   return common.gqa_attention(q, k, v, past, self.scale, pad, self.window or nil, sinks)
end

-- The sliding layers' rotary table: their own base and rotary dims.
function M.MiMoV2FlashRotaryEmbedding:__init(cfg)
   llama.LlamaRotaryEmbedding.__init(self, cfg)
   llama.add_local_rotary(self, setmetatable({ rotary_dim = cfg.local_rotary_dim }, { __index = cfg }))
end

M.MiMoV2FlashModel.layer_rotary = llama.layer_rotary_by_window

return M
