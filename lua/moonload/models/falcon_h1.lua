--- Falcon-H1 (FalconH1ForCausalLM, model_type "falcon_h1": Falcon-H1-0.5B to 34B, Falcon-H1R) with
-- Hugging Face parameter names: model.{embed_tokens, layers.N.{input_layernorm, mamba.*, self_attn.*,
-- pre_ff_layernorm, feed_forward.{gate,up,down}_proj}, final_layernorm}, lm_head.
--
-- Every layer is hybrid: on the one input_layernorm output, grouped-query attention with rotary
-- embeddings over whole heads (self_attn) and a Mamba-2 mixer (mamba: models/mamba2.lua's) run side
-- by side and their outputs are added into the residual; then a SwiGLU feed-forward after
-- pre_ff_layernorm. Its muP multipliers, each where transformers applies it:
--    embedding_multiplier        the token embeddings
--    attention_in_multiplier     the attention's input;   attention_out_multiplier its output
--    key_multiplier              the keys, before the rotary embedding
--    ssm_in_multiplier           the mixer's input;       ssm_out_multiplier its output
--    ssm_multipliers             in_proj's output, one per segment (z, x, B, C, dt): the mixer's
--                                mup_vector, a non-persistent buffer built from the config
--    mlp_multipliers             the gate projection's output, and the down projection's
--    lm_head_multiplier          the logits
-- The mixer's width is mamba_d_ssm (mamba_expand x hidden_size without one); its in_proj is biased
-- per mamba_proj_bias, its out_proj per projectors_bias; its gated RMSNorm is there only with
-- mamba_rms_norm (else y * silu(z)), normalizing before the gate unless mamba_norm_before_gate is
-- false.
--
-- A generation's cache holds, for every layer, the attention's keys and values and the mixer's last
-- conv inputs and state; the state cannot be cropped back, so assisted generation is refused.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local F = require("moonload.nn.functional")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local mamba2 = require("moonload.models.mamba2")

local M = {}

-- FalconH1Config's defaults for the keys Llama's config requires or defaults otherwise.
local DEFAULTS = { vocab_size = 128000, hidden_size = 4096, intermediate_size = 14336, num_hidden_layers = 32,
   num_attention_heads = 32, num_key_value_heads = 8, max_position_embeddings = 8192, rms_norm_eps = 1e-5 }

-- Falcon-H1's names for the mixer's keys (models/mamba2.lua's read_config), and transformers' defaults.
local MAMBA_KEYS = { heads = "mamba_n_heads", head_dim = "mamba_d_head", groups = "mamba_n_groups",
   state_size = "mamba_d_state", conv_kernel = "mamba_d_conv", conv_bias = "mamba_conv_bias",
   proj_bias = "mamba_proj_bias", expand = "mamba_expand", time_step_limit = "time_step_limit" }
local MAMBA_DEFAULTS = { heads = 128, groups = 1, state_size = 256, conv_kernel = 4, conv_bias = true, proj_bias = false,
   expand = 2 }

local SCALARS = { "embedding_multiplier", "lm_head_multiplier", "key_multiplier", "attention_in_multiplier",
   "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier" }
local LISTS = { mlp_multipliers = 2, ssm_multipliers = 5 }     -- (gate, down); (z, x, B, C, dt)

local function finite(v) return type(v) == "number" and v == v and v > -math.huge and v < math.huge end

--- Reads and checks a Falcon-H1 config (path, folder or table): Llama's keys (FalconH1Config's
-- defaults), the mixer's (cfg.mamba; its width from mamba_d_ssm), the mixer's switches
-- (mamba_rms_norm, mamba_norm_before_gate, projectors_bias) and the multipliers, defaults applied.
function M.config(source, family)
   family = family or "falcon_h1"
   local WHO = "models." .. family
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local cfg = llama.config(fixed, family)
   cfg._source, cfg._raw = src, raw
   if cfg.hidden_act ~= "silu" then             -- (transformers' mixer activates its conv by hidden_act too)
      config.fail(cfg, WHO, 'config key "hidden_act" is "%s" (supported: silu, the mixer\'s activation)', cfg.hidden_act)
   end
   -- the mixer's width: mamba_d_ssm, else mamba_expand x hidden_size; head_dim "auto" divides it
   local expand = config.integer(cfg, WHO, "mamba_expand", cfg.mamba_expand == nil and MAMBA_DEFAULTS.expand or cfg.mamba_expand, 1)
   local width = config.integer(cfg, WHO, "mamba_d_ssm", cfg.mamba_d_ssm or expand * cfg.hidden_size, 1)
   local heads = config.integer(cfg, WHO, "mamba_n_heads", cfg.mamba_n_heads == nil and MAMBA_DEFAULTS.heads or cfg.mamba_n_heads, 1)
   if cfg.mamba_d_head == nil or cfg.mamba_d_head == "auto" then
      if width % heads ~= 0 then
         config.fail(cfg, WHO, "the mixer's width %d (mamba_d_ssm) is not a multiple of mamba_n_heads %d", width, heads)
      end
      cfg.mamba_d_head = width / heads
   end
   mamba2.read_config(cfg, WHO, MAMBA_KEYS, MAMBA_DEFAULTS)
   local m = cfg.mamba
   if m.heads * m.head_dim ~= width then
      config.fail(cfg, WHO, "mamba_n_heads %d x mamba_d_head %d must be the mixer's width %d (mamba_d_ssm)", m.heads,
         m.head_dim, width)
   end
   for key, default in pairs({ mamba_rms_norm = false, mamba_norm_before_gate = true, projectors_bias = false }) do
      local v = cfg[key]
      if v == nil then v = default end
      if type(v) ~= "boolean" then config.fail(cfg, WHO, 'config key "%s" must be a boolean, got %s', key, tostring(v)) end
      cfg[key] = v
   end
   for _, key in ipairs(SCALARS) do
      local v = cfg[key]
      if v == nil then v = 1 end
      if not finite(v) then config.fail(cfg, WHO, 'config key "%s" must be a number, got %s', key, tostring(v)) end
      cfg[key] = v
   end
   for key, n in pairs(LISTS) do
      local v = cfg[key]
      if v == nil then
         v = {}
         for i = 1, n do v[i] = 1 end
      end
      local ok = type(v) == "table" and #v == n
      for i = 1, n do ok = ok and finite(v[i]) end
      if not ok then
         config.fail(cfg, WHO, 'config key "%s" must list %d numbers, got %s', key, n,
            type(v) == "table" and "[" .. table.concat((function()
               local s = {}
               for i, x in ipairs(v) do s[i] = tostring(x) end
               return s
            end)(), ", ") .. "]" or tostring(v))
      end
      cfg[key] = v
   end
   return cfg
end

-- --- the mixer --------------------------------------------------------------------------------------

local FalconH1RMSNormGated = mamba2.Mamba2RMSNormGated:extend("FalconH1RMSNormGated")
M.FalconH1RMSNormGated = FalconH1RMSNormGated

--- FalconH1RMSNormGated(width, groups, eps, norm_before_gate): Mamba-2's gated norm, or with
-- norm_before_gate the group RMS norm times weight first, then times silu(gate).
function FalconH1RMSNormGated:__init(width, groups, eps, norm_before_gate)
   mamba2.Mamba2RMSNormGated.__init(self, width, groups, eps)
   rawset(self, "norm_before_gate", norm_before_gate)
end

--- x (..., width) float32, gate (..., width) -> (..., width) float32.
function FalconH1RMSNormGated:forward(x, gate)
   if not self.norm_before_gate then return mamba2.Mamba2RMSNormGated.forward(self, x, gate) end
   local shape, g = x.shape, self.group_size
   local y = F.rms_norm(x:float():reshape(-1, g), { g }, nil, self.eps):view(shape) * self.weight:float()
   return y * gate:float():silu()
end

--- The muP vector (float32) in_proj's output is multiplied by: ssm_multipliers[1..5] over the z,
-- x, B, C and dt segments (transformers' compute_mup_vector).
function M.mup_vector(cfg)
   local m = cfg.mamba
   local width, GN = m.heads * m.head_dim, m.groups * m.state_size
   local parts = {}
   for i, n in ipairs({ width, width, GN, GN, m.heads }) do
      parts[i] = T.full({ n }, cfg.ssm_multipliers[i], { dtype = "float32" })
   end
   return T.cat(parts, 1)
end

local FalconH1Mixer = mamba2.Mamba2Mixer:extend("FalconH1Mixer")
M.FalconH1Mixer = FalconH1Mixer

-- Mamba-2's mixer with its own norm (or none), out_proj's own bias, and the muP vector.
function FalconH1Mixer:__init(cfg, layer_idx)
   mamba2.Mamba2Mixer.__init(self, cfg, layer_idx)
   local m, g = cfg.mamba, self.geometry
   -- (in place of Mamba-2's, keeping transformers' module order)
   self.norm = cfg.mamba_rms_norm and FalconH1RMSNormGated(g.width, m.groups, m.eps, cfg.mamba_norm_before_gate) or nil
   if cfg.projectors_bias ~= m.proj_bias then
      self.out_proj = nn.Linear(g.width, cfg.hidden_size, { bias = cfg.projectors_bias })
   end
   self:register_buffer("mup_vector", M.mup_vector(cfg), false)
   rawset(self, "ssm_in_multiplier", cfg.ssm_in_multiplier)
end

--- in_proj(x * ssm_in_multiplier) * mup_vector, split into z, the conv's input and dt.
function FalconH1Mixer:project(x)
   local g = self.geometry
   local proj = self.in_proj(x * self.ssm_in_multiplier)
   local mup = self.mup_vector
   if mup.dtype ~= proj.dtype or mup.device ~= proj.device then mup = mup:to(proj.device, proj.dtype) end
   proj = proj * mup
   return proj:narrow(3, 1, g.width), proj:narrow(3, g.width + 1, g.conv_dim), proj:narrow(3, g.width + g.conv_dim + 1, g.H)
end

--- Without mamba_rms_norm: y * silu(z) (silu in z's dtype, the product in float32, as transformers).
function FalconH1Mixer:gate_output(y, z, dtype)
   if self.norm then return mamba2.Mamba2Mixer.gate_output(self, y, z, dtype) end
   y = y * z:silu():float()
   return y.dtype == dtype and y or y:to(dtype)
end

-- --- attention, feed-forward, layer -----------------------------------------------------------------

local FalconH1Attention = llama.LlamaAttention:extend("FalconH1Attention")
M.FalconH1Attention = FalconH1Attention

function FalconH1Attention:__init(cfg, layer_idx)
   llama.LlamaAttention.__init(self, cfg, layer_idx)
   rawset(self, "key_multiplier", cfg.key_multiplier)
end

--- Llama's q, k, v with the keys times key_multiplier (before the rotary embedding, which is linear).
function FalconH1Attention:project(x, B, L)
   local q, k, v = llama.LlamaAttention.project(self, x, B, L)
   return q, k * self.key_multiplier, v
end

local FalconH1MLP = llama.LlamaMLP:extend("FalconH1MLP")
M.FalconH1MLP = FalconH1MLP

function FalconH1MLP:__init(cfg)
   llama.LlamaMLP.__init(self, cfg)
   rawset(self, "gate_multiplier", cfg.mlp_multipliers[1])
   rawset(self, "down_multiplier", cfg.mlp_multipliers[2])
end

--- down(up(x) * act(gate(x) * gate_multiplier)) * down_multiplier.
function FalconH1MLP:forward(x)
   local h = self.up_proj(x) * self.act_fn(self.gate_proj(x) * self.gate_multiplier)
   return self.down_proj(h) * self.down_multiplier
end

local FalconH1DecoderLayer = nn.Module:extend("FalconH1DecoderLayer")
M.FalconH1DecoderLayer = FalconH1DecoderLayer

-- transformers' order: the feed-forward, the mixer, the attention, both norms
function FalconH1DecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.feed_forward = FalconH1MLP(cfg)
   self.mamba = FalconH1Mixer(cfg, layer_idx)
   self.self_attn = FalconH1Attention(cfg, layer_idx)
   self.input_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.pre_ff_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   rawset(self, "multipliers", { attn_in = cfg.attention_in_multiplier, attn_out = cfg.attention_out_multiplier,
      ssm_out = cfg.ssm_out_multiplier })
end

--- x (B, T, hidden); cos, sin for the attention; cache optional (keys and values, and the mixer's
-- state, under the same layer); pad (B, past + T) or nil.
function FalconH1DecoderLayer:forward(x, cos, sin, cache, pad)
   local k = self.multipliers
   local h = self.input_layernorm(x)
   local mixed = self.mamba(h, cache, pad) * k.ssm_out
   local attended = self.self_attn(h * k.attn_in, cos, sin, cache, pad) * k.attn_out
   x = x + (mixed + attended)
   return x + self.feed_forward(self.pre_ff_layernorm(x))
end

local FalconH1RotaryEmbedding = llama.LlamaRotaryEmbedding:extend("FalconH1RotaryEmbedding")
M.FalconH1RotaryEmbedding = FalconH1RotaryEmbedding

local FalconH1Model = llama.LlamaModel:extend("FalconH1Model")
M.FalconH1Model = FalconH1Model
FalconH1Model.family, FalconH1Model.Layer, FalconH1Model.Rotary = "falcon_h1", FalconH1DecoderLayer, FalconH1RotaryEmbedding
FalconH1Model.norm_name = "final_layernorm"

function FalconH1Model:__init(cfg)
   self:build_parts(cfg, cfg.hidden_size, FalconH1DecoderLayer, cfg.num_hidden_layers,
      nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps }), FalconH1RotaryEmbedding)
end

function FalconH1Model:embed_scale() return self.config.embedding_multiplier end

local FalconH1ForCausalLM = llama.LlamaForCausalLM:extend("FalconH1ForCausalLM")
M.FalconH1ForCausalLM = FalconH1ForCausalLM
FalconH1ForCausalLM.family, FalconH1ForCausalLM.Model = "falcon_h1", FalconH1Model
FalconH1ForCausalLM.no_split_modules = { "FalconH1DecoderLayer" }
FalconH1ForCausalLM.stateful = true          -- its cache cannot be cropped: no assisted generation
-- (a file's mup_vector, were one to hold it, is left as transformers leaves it: rebuilt from the config)
FalconH1ForCausalLM.ignore_unexpected = { "rotary_emb%.inv_freq$", "mamba%.mup_vector$" }
FalconH1ForCausalLM.forward = llama.scaled_logits_forward("models.falcon_h1",
   function(logits, cfg) return logits * cfg.lm_head_multiplier end)

function FalconH1ForCausalLM:read_config(source) return M.config(source, self.family) end

return M
