--- Hybrids of Mamba-2 mixers and attention, with Hugging Face parameter names:
--
-- Bamba (BambaForCausalLM, model_type "bamba": Bamba-9B): of its layers, those attn_layer_indices
-- lists (0-based) are Llama's grouped-query attention rotating half of each head, the others a
-- Mamba-2 mixer (mamba.*, models/mamba2.lua); each layer has an RMSNorm before its mixer
-- (input_layernorm) and before its SwiGLU feed-forward (pre_ff_layernorm, feed_forward.*), and
-- final_layernorm ends the model.
--
-- Granite 4.0 (GraniteMoeHybridForCausalLM, model_type "granitemoehybrid": granite-4.0-h-micro,
-- -h-tiny, -h-small, and the attention-only granite-4.0-micro): layer_types says which layers are
-- a Mamba-2 mixer ("mamba") and which attention ("attention"), with Granite's multipliers
-- (embeddings, residuals, attention scores, logits: models/llama.lua); positions only through the
-- mixers unless position_embedding_type is "rope". Each layer's feed-forward is a shared SwiGLU
-- (shared_mlp: input_linear gives gate then up, output_linear) plus, with num_local_experts > 0,
-- GraniteMoE's sparse block (block_sparse_moe: top num_experts_per_tok experts, stacked).
--
-- A generation's cache holds the mixers' last conv inputs and states (a fixed size, whatever the
-- length) beside the attention layers' keys and values; it cannot be cropped back, so assisted
-- generation is refused.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local mamba2 = require("moonload.models.mamba2")

local M = {}

-- Bamba's and Granite 4.0's names for the mixer's keys (models/mamba2.lua's read_config), and
-- transformers' defaults.
local MAMBA_KEYS = { heads = "mamba_n_heads", head_dim = "mamba_d_head", groups = "mamba_n_groups",
   state_size = "mamba_d_state", conv_kernel = "mamba_d_conv", conv_bias = "mamba_conv_bias",
   proj_bias = "mamba_proj_bias", expand = "mamba_expand", time_step_limit = "time_step_limit" }
local MAMBA_DEFAULTS = { heads = 128, head_dim = "auto", groups = 1, state_size = 256, conv_kernel = 4,
   conv_bias = true, proj_bias = false, expand = 2 }

-- Granite 4.0's layer type names, and transformers' newer ones for the same.
local GRANITE_KINDS = { mamba = "mamba", linear_attention = "mamba", attention = "attention", full_attention = "attention" }

--- Reads and checks a Bamba config (path, folder or table), or with family "granitemoehybrid" a
-- Granite 4.0 one: Llama's keys (Granite's multipliers; GraniteMoE's experts), the mixer's
-- (cfg.mamba) and which layers mix by Mamba-2 (cfg.mixer_layers[i] true) or attend.
function M.config(source, family)
   family = family or "bamba"
   local WHO = "models." .. family
   local cfg = family == "bamba" and llama.config(source, family) or moe.config(source, family)
   mamba2.read_config(cfg, WHO, MAMBA_KEYS, MAMBA_DEFAULTS)
   local m = cfg.mamba
   local expand = cfg.mamba_expand == nil and MAMBA_DEFAULTS.expand or cfg.mamba_expand
   if m.heads * m.head_dim ~= expand * cfg.hidden_size then
      config.fail(cfg, WHO, "mamba_n_heads %d x mamba_d_head %d must be mamba_expand x hidden_size = %d", m.heads,
         m.head_dim, expand * cfg.hidden_size)
   end
   cfg.mixer_layers = {}
   if family == "bamba" then
      llama.set_rotary_dim(cfg, WHO, 0.5)             -- (transformers fixes it at half of each head)
      local attends = {}
      local listed = cfg.attn_layer_indices
      if listed ~= nil and type(listed) ~= "table" then
         config.fail(cfg, WHO, 'config key "attn_layer_indices" must list layer indices, got %s', tostring(listed))
      end
      for _, i in ipairs(listed or {}) do
         if type(i) ~= "number" or i % 1 ~= 0 or i < 0 or i >= cfg.num_hidden_layers then
            config.fail(cfg, WHO, "attn_layer_indices lists %s, not a layer (0 to %d)", tostring(i), cfg.num_hidden_layers - 1)
         end
         attends[i + 1] = true
      end
      for i = 1, cfg.num_hidden_layers do cfg.mixer_layers[i] = not attends[i] end
      return cfg
   end
   -- Granite 4.0: layer_types ("mamba" or "attention"; transformers' default: all mixers)
   local types = cfg.layer_types
   if types == nil then
      types = {}
      for i = 1, cfg.num_hidden_layers do types[i] = "mamba" end
   end
   cfg.layer_types = types
   local names = {}
   for k in pairs(GRANITE_KINDS) do names[#names + 1] = k end
   table.sort(names)
   config.layer_types(cfg, WHO, names, nil)
   for i, kind in ipairs(cfg.layer_types) do cfg.mixer_layers[i] = GRANITE_KINDS[kind] == "mamba" end
   local pos = cfg.position_embedding_type
   if pos ~= nil and pos ~= "rope" and pos ~= "nope" then
      config.fail(cfg, WHO, 'position_embedding_type "%s" is not supported (supported: rope, nope)', tostring(pos))
   end
   cfg.nope_layers = {}
   for i = 1, cfg.num_hidden_layers do cfg.nope_layers[i] = pos ~= "rope" end
   cfg.shared_intermediate_size = config.integer(cfg, WHO, "shared_intermediate_size", cfg.shared_intermediate_size or 1024, 1)
   return cfg
end

-- --- Bamba ----------------------------------------------------------------------------------------

local BambaMixer = mamba2.Mamba2Mixer:extend("BambaMixer")
M.BambaMixer = BambaMixer

local BambaAttention = llama.LlamaAttention:extend("BambaAttention")
M.BambaAttention = BambaAttention

local BambaMLP = llama.LlamaMLP:extend("BambaMLP")
M.BambaMLP = BambaMLP

local BambaDecoderLayer = nn.Module:extend("BambaDecoderLayer")
M.BambaDecoderLayer = BambaDecoderLayer

-- transformers' order: the feed-forward and both norms, then the mixer or the attention
function BambaDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.feed_forward = BambaMLP(cfg)
   self.input_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.pre_ff_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   if cfg.mixer_layers[layer_idx] then
      self.mamba = BambaMixer(cfg, layer_idx)
   else
      self.self_attn = BambaAttention(cfg, layer_idx)
   end
end

--- The mixer or the attention on h = input_layernorm(x); cos and sin only reach the attention.
local function mix(layer, h, cos, sin, cache, pad)
   if layer.mamba then return layer.mamba(h, cache, pad) end
   return layer.self_attn(h, cos, sin, cache, pad)
end

function BambaDecoderLayer:forward(x, cos, sin, cache, pad)
   x = x + mix(self, self.input_layernorm(x), cos, sin, cache, pad)
   return x + self.feed_forward(self.pre_ff_layernorm(x))
end

local BambaRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("BambaRotaryEmbedding")
M.BambaRotaryEmbedding = BambaRotaryEmbedding

local BambaModel = llama.LlamaModel:extend("BambaModel")
M.BambaModel = BambaModel
BambaModel.family, BambaModel.Layer, BambaModel.Rotary = "bamba", BambaDecoderLayer, BambaRotaryEmbedding
BambaModel.norm_name = "final_layernorm"

function BambaModel:__init(cfg)
   self:build_parts(cfg, cfg.hidden_size, BambaDecoderLayer, cfg.num_hidden_layers,
      nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps }), BambaRotaryEmbedding)
end

local BambaForCausalLM = llama.LlamaForCausalLM:extend("BambaForCausalLM")
M.BambaForCausalLM = BambaForCausalLM
BambaForCausalLM.family, BambaForCausalLM.Model = "bamba", BambaModel
BambaForCausalLM.no_split_modules = { "BambaDecoderLayer" }
BambaForCausalLM.stateful = true          -- its cache cannot be cropped: no assisted generation
BambaForCausalLM.forward = common.causal_lm_forward("models.bamba.forward", "model", "embed_tokens")

function BambaForCausalLM:read_config(source) return M.config(source, self.family) end

-- --- Granite 4.0 ----------------------------------------------------------------------------------

local GraniteMoeHybridMambaLayer = mamba2.Mamba2Mixer:extend("GraniteMoeHybridMambaLayer")
M.GraniteMoeHybridMambaLayer = GraniteMoeHybridMambaLayer

local GraniteMoeHybridAttention = llama.GraniteAttention:extend("GraniteMoeHybridAttention")
M.GraniteMoeHybridAttention = GraniteMoeHybridAttention

local GraniteMoeHybridMoE = moe.GraniteMoeMoE:extend("GraniteMoeHybridMoE")
M.GraniteMoeHybridMoE = GraniteMoeHybridMoE

-- The shared feed-forward (GraniteMoeShared's): input_linear gives the gate's rows, then the up projection's.
local GraniteMoeHybridMLP = moe.GraniteMoeSharedMLP:extend("GraniteMoeHybridMLP")
M.GraniteMoeHybridMLP = GraniteMoeHybridMLP

local GraniteMoeHybridDecoderLayer = nn.Module:extend("GraniteMoeHybridDecoderLayer")
M.GraniteMoeHybridDecoderLayer = GraniteMoeHybridDecoderLayer

-- transformers' order: both norms, the sparse block, the shared MLP, then the mixer or attention
function GraniteMoeHybridDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.input_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   if cfg.num_experts > 0 then self.block_sparse_moe = GraniteMoeHybridMoE(cfg) end
   self.shared_mlp = GraniteMoeHybridMLP(cfg)
   if cfg.mixer_layers[layer_idx] then
      self.mamba = GraniteMoeHybridMambaLayer(cfg, layer_idx)
   else
      self.self_attn = GraniteMoeHybridAttention(cfg, layer_idx)
   end
   rawset(self, "residual_multiplier", cfg.residual_multiplier)
end

function GraniteMoeHybridDecoderLayer:forward(x, cos, sin, cache, pad)
   local r = self.residual_multiplier
   x = x + mix(self, self.input_layernorm(x), cos, sin, cache, pad) * r
   local h = self.post_attention_layernorm(x)
   local y = self.shared_mlp(h)
   if self.block_sparse_moe then y = self.block_sparse_moe(h) + y end
   return x + y * r
end

local GraniteMoeHybridRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("GraniteMoeHybridRotaryEmbedding")
M.GraniteMoeHybridRotaryEmbedding = GraniteMoeHybridRotaryEmbedding

local GraniteMoeHybridModel = llama.LlamaModel:extend("GraniteMoeHybridModel")
M.GraniteMoeHybridModel = GraniteMoeHybridModel
GraniteMoeHybridModel.family, GraniteMoeHybridModel.Layer = "granitemoehybrid", GraniteMoeHybridDecoderLayer
GraniteMoeHybridModel.Rotary = GraniteMoeHybridRotaryEmbedding
GraniteMoeHybridModel.embed_scale = llama.GraniteModel.embed_scale

local GraniteMoeHybridForCausalLM = llama.LlamaForCausalLM:extend("GraniteMoeHybridForCausalLM")
M.GraniteMoeHybridForCausalLM = GraniteMoeHybridForCausalLM
GraniteMoeHybridForCausalLM.family, GraniteMoeHybridForCausalLM.Model = "granitemoehybrid", GraniteMoeHybridModel
GraniteMoeHybridForCausalLM.no_split_modules = { "GraniteMoeHybridDecoderLayer" }
GraniteMoeHybridForCausalLM.stateful = true
GraniteMoeHybridForCausalLM.forward = llama.scaled_logits_forward("models.granitemoehybrid", llama.granite_logits)
GraniteMoeHybridForCausalLM.checkpoint_renames = moe.GraniteMoeForCausalLM.checkpoint_renames

function GraniteMoeHybridForCausalLM:read_config(source) return M.config(source, self.family) end

return M
