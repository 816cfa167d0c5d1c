--- LFM3 (Lfm3ForCausalLM, model_type "lfm3": LiquidAI's LFM3-1.7B) with the hub's parameter names.
-- LFM2's layers (models/lfm2.lua) with these changes:
--  * Three layer kinds (layer_types): short convolutions as LFM2's (conv.*), and attention layers
--    that attend to everything ("full_attention") or over the last sliding_window tokens
--    ("sliding_attention"). By default layer i (0-based) is full when i % 4 == 2, sliding when
--    i % 4 == 0 past the first, a convolution otherwise.
--  * The attention is Qwen3's (q/k/v/o_proj, an RMSNorm over each query and key head before the
--    rotary embedding) with a sigmoid gate per head (use_attention_gate): the hub's
--    self_attn.gate_proj (transformers renames it g_proj) maps the layer's input to one value per
--    head, whose sigmoid scales that head's output before o_proj.
--  * Each kind of attention rotates by its own rope_parameters entry: by default the sliding
--    layers plainly (theta 10000), the full ones "proportional" (theta 1e6): of each head's
--    head_dim / 2 rotary pairs (i, i + head_dim / 2), the first partial_rotary_factor share turns
--    at 1 / theta^(2i / head_dim) and the others stay at angle 0 (models/gemma4.lua's table).
--  * Sandwich norms (use_sandwich_norm): an RMSNorm on the operator's and on the feed-forward's
--    output before each joins the residual (post_operator_norm, post_ffn_norm).
--  * The feed-forward (w1, w3, w2) is intermediate_size wide as the file says (no LFM2 rounding).
--
-- A generation's cache keeps the convolutions' last conv_L_cache - 1 inputs beside the attention
-- layers' keys and values (the sliding ones' last sliding_window); it cannot be cropped back, so
-- assisted generation is refused.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local lfm2 = require("moonload.models.lfm2")
local gemma4 = require("moonload.models.gemma4")

local M = {}
local WHO = "models.lfm3"

-- Each attention kind's rotary parameters when the file gives none (transformers' defaults)
local DEFAULT_ROPE = {
   sliding_attention = { rope_type = "default", rope_theta = 10000 },
   full_attention = { rope_type = "proportional", rope_theta = 1000000, partial_rotary_factor = 0.5 },
}

-- Lfm3Config's keys and defaults (LFM3-1.7B's sizes): Llama's, the norms' eps under LFM's name
M.schema = config.schema_from(llama.schema, {
   vocab_size = { "vocab_size", "int", 128000 },
   hidden_size = { "hidden_size", "int", 2048 },
   intermediate_size = { "intermediate_size", "int", 7680 },
   num_hidden_layers = { "num_hidden_layers", "int", 24 },
   num_attention_heads = { "num_attention_heads", "int", 16 },
   num_key_value_heads = { "num_key_value_heads", "int", 4 },
   head_dim = { "head_dim", "int", 128 },
   max_position_embeddings = { "max_position_embeddings", "int", 128000 },
   rms_norm_eps = { "norm_eps", "posnum", 1e-5 },
   tie_word_embeddings = { "tie_word_embeddings", "bool", true },
   rope_parameters = { "rope_parameters", "table", function() return DEFAULT_ROPE end },
   hidden_act = false, mlp_bias = false, rope_scaling = false,   -- (SiLU, no biases, per-kind rope only)
}, {
   { "conv_L_cache", "int", 7 },
   { "conv_bias", "bool", false },
   -- (a null sliding_window, which transformers' mask refuses, reads as absent: the default)
   { "sliding_window", "int", 256 },
   { "use_sandwich_norm", "bool", true },
   { "use_attention_gate", "bool", true },
})

local ROPE_TYPES = { default = true, linear = true, proportional = true }

-- The rotary parameters of one attention kind, checked: {rope_type, rope_theta, factor,
-- partial_rotary_factor} as transformers reads them (the default type ignores factor and
-- partial_rotary_factor; a missing theta is the config class's 1e6, or a top-level rope_theta).
local function rope_of(cfg, kind)
   local entry, where = cfg.rope_parameters[kind], "rope_parameters." .. kind
   if entry == nil then
      for _, t in ipairs(cfg.layer_types) do
         if t == kind then
            config.fail(cfg, WHO, 'config key "%s" is missing (rope_parameters holds one entry per attention layer type)',
               where)
         end
      end
      return DEFAULT_ROPE[kind]                       -- (no layer of this kind reads it)
   end
   if type(entry) ~= "table" then config.fail(cfg, WHO, 'config key "%s" must be an object', where) end
   local kind_of = entry.rope_type or entry.type or "default"
   if not ROPE_TYPES[kind_of] then
      config.fail(cfg, WHO, '%s: rope type "%s" is not supported (supported: default, linear, proportional)', where,
         tostring(kind_of))
   end
   local rope = { rope_type = kind_of, rope_theta = entry.rope_theta or cfg.rope_theta or 1000000 }
   if kind_of ~= "default" then
      rope.factor, rope.partial_rotary_factor = entry.factor, entry.partial_rotary_factor
   end
   for _, k in ipairs({ "rope_theta", "factor", "partial_rotary_factor" }) do
      local v = rope[k]
      if v ~= nil and (type(v) ~= "number" or v <= 0) then
         config.fail(cfg, WHO, 'config key "%s.%s" must be a positive number, got %s', where, k, tostring(v))
      end
   end
   if kind_of == "linear" and rope.factor == nil then
      config.fail(cfg, WHO, 'config key "%s.factor" is missing (needed by rope type "linear")', where)
   end
   local part = rope.partial_rotary_factor or 1
   if part > 1 or (kind_of == "linear" and part ~= 1) then
      config.fail(cfg, WHO, 'config key "%s.partial_rotary_factor" must be %s, got %s', where,
         kind_of == "linear" and "1 with rope type \"linear\"" or "at most 1", tostring(part))
   end
   return rope
end

--- Reads and checks an LFM3 config (path, folder or table) with Lfm3Config's defaults into what
-- LFM2's and Llama's classes read: rms_norm_eps (norm_eps), layer_types, layer_windows (per layer:
-- the window of a sliding layer, else false), rope_full and rope_sliding (each attention kind's
-- rotary parameters), qkv_bias, o_bias, qk_norm, use_attention_gate and use_sandwich_norm.
function M.config(source)
   local raw, src = config.read(source, WHO)
   local fixed = {}
   for k, v in pairs(raw) do fixed[k] = v end
   if fixed.norm_eps == nil then fixed.norm_eps = raw.rms_norm_eps end   -- (transformers' attribute_map)
   local cfg = config.validate(fixed, M.schema, src, WHO, 2)
   cfg._raw = raw
   cfg.rms_norm_eps = cfg.norm_eps
   if cfg.num_attention_heads % cfg.num_key_value_heads ~= 0 then
      config.fail(cfg, WHO, "num_attention_heads %d is not a multiple of num_key_value_heads %d",
         cfg.num_attention_heads, cfg.num_key_value_heads)
   end
   local types = config.layer_types(cfg, WHO, { "conv", "sliding_attention", "full_attention" }, function(i)
      local j = i - 1
      return j % 4 == 2 and "full_attention" or (j % 4 == 0 and j > 0) and "sliding_attention" or "conv"
   end)
   cfg.layer_windows = {}
   for i, kind in ipairs(types) do cfg.layer_windows[i] = kind == "sliding_attention" and cfg.sliding_window or false end
   cfg.rope_full, cfg.rope_sliding = rope_of(cfg, "full_attention"), rope_of(cfg, "sliding_attention")
   cfg.qkv_bias, cfg.o_bias, cfg.qk_norm = cfg.attention_bias, cfg.attention_bias, true
   cfg.family = "lfm3"
   return cfg
end

-- --- layers --------------------------------------------------------------------------------------

local Lfm3ShortConv = lfm2.Lfm2ShortConv:extend("Lfm3ShortConv")
M.Lfm3ShortConv = Lfm3ShortConv

local Lfm3MLP = lfm2.Lfm2MLP:extend("Lfm3MLP")
M.Lfm3MLP = Lfm3MLP

local Lfm3Attention = llama.Qwen3Attention:extend("Lfm3Attention")
M.Lfm3Attention = Lfm3Attention

function Lfm3Attention:__init(cfg, layer_idx)
   llama.Qwen3Attention.__init(self, cfg, layer_idx)
   if cfg.use_attention_gate then      -- (the hub's name; transformers' g_proj)
      self.gate_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads, { bias = false })
   end
end

--- q, k, v, and the gate (B, T, H * D) LlamaAttention:forward puts through a sigmoid onto the
-- heads' output: each head's one value repeated over its dims.
function Lfm3Attention:project(x, B, L)
   local q, k, v = llama.Qwen3Attention.project(self, x, B, L)
   if not self.gate_proj then return q, k, v end
   local H, D = self.n_head, self.head_dim
   return q, k, v, self.gate_proj(x):unsqueeze(4):expand(B, L, H, D):reshape(B, L, H * D)
end

local Lfm3DecoderLayer = lfm2.Lfm2DecoderLayer:extend("Lfm3DecoderLayer")
M.Lfm3DecoderLayer = Lfm3DecoderLayer
Lfm3DecoderLayer.Attention, Lfm3DecoderLayer.Conv, Lfm3DecoderLayer.MLP = Lfm3Attention, Lfm3ShortConv, Lfm3MLP

function Lfm3DecoderLayer:__init(cfg, layer_idx)
   lfm2.Lfm2DecoderLayer.__init(self, cfg, layer_idx)
   if cfg.use_sandwich_norm then
      self.post_operator_norm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
      self.post_ffn_norm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   end
end

--- x (B, T, hidden); cos, sin this layer's kind's tables (a convolution ignores them); cache, pad
-- as LFM2's layer.
function Lfm3DecoderLayer:forward(x, cos, sin, cache, pad)
   local h = self.operator_norm(x)
   if self.self_attn then h = self.self_attn(h, cos, sin, cache, pad) else h = self.conv(h, cache, pad) end
   if self.post_operator_norm then h = self.post_operator_norm(h) end
   x = x + h
   h = self.feed_forward(self.ffn_norm(x))
   if self.post_ffn_norm then h = self.post_ffn_norm(h) end
   return x + h
end

-- --- model ----------------------------------------------------------------------------------------

-- The full layers' frequencies (inv_freq) and the sliding layers' (local_inv_freq), both over the
-- whole head, each from its kind's rope_parameters (Gemma 4's table, "proportional" included).
local Lfm3RotaryEmbedding = gemma4.Gemma4TextRotaryEmbedding:extend("Lfm3RotaryEmbedding")
M.Lfm3RotaryEmbedding = Lfm3RotaryEmbedding

function Lfm3RotaryEmbedding:__init(cfg)
   local D = cfg.head_dim
   gemma4.Gemma4TextRotaryEmbedding.__init(self, setmetatable({ layer_types = { "full_attention", "sliding_attention" },
      layer_head_dims = { D, D } }, { __index = cfg }))
end

local Lfm3Model = lfm2.Lfm2Model:extend("Lfm3Model")
M.Lfm3Model = Lfm3Model
Lfm3Model.family, Lfm3Model.Layer, Lfm3Model.Rotary = "lfm3", Lfm3DecoderLayer, Lfm3RotaryEmbedding
Lfm3Model.layer_rotary = llama.layer_rotary_by_window      -- (the sliding layers get local_inv_freq's tables)

local Lfm3ForCausalLM = lfm2.Lfm2ForCausalLM:extend("Lfm3ForCausalLM")
M.Lfm3ForCausalLM = Lfm3ForCausalLM
Lfm3ForCausalLM.family, Lfm3ForCausalLM.Model = "lfm3", Lfm3Model
Lfm3ForCausalLM.no_split_modules = { "Lfm3DecoderLayer" }
Lfm3ForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")

function Lfm3ForCausalLM:read_config(source) return M.config(source) end

return M
