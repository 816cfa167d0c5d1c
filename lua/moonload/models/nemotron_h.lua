--- Nemotron-H (NemotronHForCausalLM, model_type "nemotron_h": Nemotron-H-8B, NVIDIA-Nemotron-Nano-9B-v2,
-- and Nemotron 3 Nano with its experts) with Hugging Face parameter names:
-- backbone.{embeddings, layers.N.{norm, mixer.*}, norm_f}, lm_head (the hub's names; transformers
-- renames backbone. to model. on load and writes backbone. back on save).
--
-- Each layer is one RMSNorm (norm) and one mixer with a residual around both; hybrid_override_pattern
-- (or layers_block_type) says which mixer, a letter a layer:
--   "M" a Mamba-2 mixer (models/mamba2.lua; dt floored at time_step_min, unbounded above),
--   "*" grouped-query attention without any position embedding and without biases,
--   "-" an MLP without a gate: down_proj(relu2(up_proj x)) (mlp_hidden_act),
--   "E" a MoE block: DeepSeek-V3's sigmoid router (gate.weight float32, e_score_correction_bias for
--       the choice within the best topk_group of n_group groups, weights renormalized and times
--       routed_scaling_factor: models/deepseek.lua) over experts shaped as the MLP (experts.E.*, one
--       module each, as the hub holds them), optionally behind a latent projection (moe_latent_size:
--       fc1_latent_proj, fc2_latent_proj), plus a shared expert on every token (shared_experts).
-- norm_f ends the model. The head is never tied to the embedding (transformers ties none, whatever
-- tie_word_embeddings says).
--
-- A generation's cache holds the mixers' conv inputs and states beside the attention layers' keys and
-- values; it cannot be cropped back, so assisted generation is refused.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")
local mamba2 = require("moonload.models.mamba2")

local M = {}

-- The pattern's letters, and the layer types transformers names them by.
local PATTERN = { M = "linear_attention", ["*"] = "full_attention", ["-"] = "mlp", E = "moe" }
local KINDS = { "linear_attention", "full_attention", "mlp", "moe" }
-- transformers 4.x's names for the first two (remap_legacy_layer_types)
local LEGACY_KINDS = { mamba = "linear_attention", attention = "full_attention" }

-- Older configs' names for the mixer's keys, which win over the new ones when present, as
-- NemotronHConfig.__post_init__ reads them.
local LEGACY_KEYS = { { "mamba_n_groups", "n_groups" }, { "mamba_d_conv", "conv_kernel" }, { "mamba_expand", "expand" },
   { "mamba_dt_min", "time_step_min" }, { "mamba_conv_bias", "use_conv_bias" }, { "mamba_chunk_size", "chunk_size" } }

-- NemotronHConfig's defaults for the keys a Llama config requires or defaults otherwise.
local DEFAULTS = { vocab_size = 131072, hidden_size = 4096, intermediate_size = 21504, num_attention_heads = 32,
   num_key_value_heads = 8, head_dim = 128, max_position_embeddings = 4096 }

-- Nemotron-H's names for the mixer's keys (models/mamba2.lua's read_config), and their defaults.
local MAMBA_KEYS = { heads = "mamba_num_heads", head_dim = "mamba_head_dim", groups = "n_groups",
   state_size = "ssm_state_size", conv_kernel = "conv_kernel", conv_bias = "use_conv_bias", proj_bias = "use_bias",
   time_step_min = "time_step_min", eps = "layer_norm_epsilon" }
local MAMBA_DEFAULTS = { heads = 128, head_dim = 64, groups = 8, state_size = 128, conv_kernel = 4, conv_bias = true,
   proj_bias = false, time_step_min = 0.001, eps = 1e-5 }

-- Where the experts' routing differs from DeepSeek-V2's defaults (models/deepseek.lua's moe_config).
local MOE_DEFAULTS = { routed_scaling_factor = 1, norm_topk_prob = true, n_group = 1, topk_group = 1,
   num_experts_per_tok = 2, first_k_dense_replace = 0 }

-- The layer types of raw (layers_block_type, its alias layer_types, else the pattern, else
-- transformers' default), checked against num_hidden_layers when the file has it.
local function layer_types(raw, WHO, at)
   local key = raw.layers_block_type ~= nil and "layers_block_type" or raw.layer_types ~= nil and "layer_types" or nil
   local types = key and raw[key]
   local pattern = raw.hybrid_override_pattern
   local named = key and string.format('config key "%s"', key)      -- (what the length error names)
   if key == nil and pattern ~= nil then
      if type(pattern) ~= "string" or pattern == "" then
         config.fail(at, WHO, 'config key "hybrid_override_pattern" must be a string of M, *, - and E, got %s',
            tostring(pattern))
      end
      types = {}
      for i = 1, #pattern do
         local letter = pattern:sub(i, i)
         types[i] = PATTERN[letter]
         if not types[i] then
            config.fail(at, WHO, 'hybrid_override_pattern "%s" has "%s" at layer %d (supported: M mixer, * attention, '
               .. "- MLP, E experts)", pattern, letter, i - 1)
         end
      end
      named = string.format('hybrid_override_pattern "%s"', pattern)
   elseif key == nil then
      types, named = { "linear_attention", "moe", "full_attention", "mlp" }, "transformers' default layers_block_type"
   elseif type(types) ~= "table" or #types == 0 then
      config.fail(at, WHO, 'config key "%s" must list layer types, got %s', key, tostring(types))
   else
      local known = {}
      for _, k in ipairs(KINDS) do known[k] = true end
      local list = {}
      for i, kind in ipairs(types) do
         list[i] = LEGACY_KINDS[kind] or kind
         if not known[list[i]] then
            config.fail(at, WHO, '%s[%d] is "%s" (supported: %s)', key, i, tostring(kind), table.concat(KINDS, ", "))
         end
      end
      types = list
   end
   local n = raw.num_hidden_layers
   -- (transformers warns and builds the pattern's layers; a checkpoint holds one or the other)
   if n ~= nil and n ~= #types then
      config.fail(at, WHO, '%s has %d layers but config key "num_hidden_layers" is %s', named, #types, tostring(n))
   end
   return types
end

--- Reads and checks a Nemotron-H config (path, folder or table): Llama's keys under Nemotron-H's
-- names (layer_norm_epsilon, mlp_hidden_act), the layer types (cfg.layer_types[i]: "linear_attention",
-- "full_attention", "mlp" or "moe", from hybrid_override_pattern or layers_block_type), the mixer's
-- keys (cfg.mamba) and, with "moe" layers, the experts' (DeepSeek-V3's routing keys, moe_latent_size,
-- moe_shared_expert_intermediate_size).
function M.config(source, family)
   family = family or "nemotron_h"
   local WHO = "models." .. family
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local at = { _source = src }
   for _, pair in ipairs(LEGACY_KEYS) do
      if raw[pair[1]] ~= nil then fixed[pair[2]] = raw[pair[1]] end
   end
   local types = layer_types(raw, WHO, at)
   fixed.num_hidden_layers = #types
   fixed.layer_types = types
   -- (hub configs also carry rms_norm_eps, which transformers' Nemotron-H never reads)
   local eps = raw.layer_norm_epsilon == nil and 1e-5 or raw.layer_norm_epsilon
   if type(eps) ~= "number" or eps <= 0 then
      config.fail(at, WHO, 'config key "layer_norm_epsilon" must be a positive number, got %s', tostring(eps))
   end
   fixed.rms_norm_eps = eps
   fixed.hidden_act = raw.mlp_hidden_act == nil and "relu2" or raw.mlp_hidden_act
   local known, err = pcall(common.activation, fixed.hidden_act, WHO, src)
   if not known then
      config.fail(at, WHO, 'config key "mlp_hidden_act" is "%s" (supported: %s)', tostring(fixed.hidden_act),
         tostring(err):match("%(supported: (.-)%)") or "?")
   end
   fixed.tie_word_embeddings = false
   local cfg = llama.config(fixed, family)
   cfg._source, cfg._raw = src, raw
   local act = cfg.mamba_hidden_act
   if act ~= nil and act ~= "silu" then
      config.fail(cfg, WHO, 'config key "mamba_hidden_act" is "%s" (supported: silu)', tostring(act))
   end
   mamba2.read_config(cfg, WHO, MAMBA_KEYS, MAMBA_DEFAULTS)
   local experts = false
   for _, kind in ipairs(types) do experts = experts or kind == "moe" end
   if experts then M.moe_config(cfg, WHO) end
   return cfg
end

-- The experts' keys, for a config with "moe" layers.
function M.moe_config(cfg, WHO)
   if cfg.n_routed_experts == nil and cfg.num_local_experts == nil then cfg.n_routed_experts = 8 end
   if cfg.moe_intermediate_size == nil then cfg.moe_intermediate_size = 7688 end
   deepseek.moe_config(cfg, WHO, "noaux_tc", MOE_DEFAULTS)
   if cfg.n_routed_experts < 1 then
      config.fail(cfg, WHO, 'config key "n_routed_experts" must be an integer >= 1 with "E" layers, got %d',
         cfg.n_routed_experts)
   end
   local shared = cfg.moe_shared_expert_intermediate_size
   cfg.moe_shared_expert_intermediate_size = config.integer(cfg, WHO, "moe_shared_expert_intermediate_size",
      shared == nil and 7688 or shared, 1)
   if cfg.moe_latent_size ~= nil then config.integer(cfg, WHO, "moe_latent_size", cfg.moe_latent_size, 1) end
   cfg.sparse_layers = {}
   for i, kind in ipairs(cfg.layer_types) do cfg.sparse_layers[i] = kind == "moe" end
   return cfg
end

-- --- mixers ---------------------------------------------------------------------------------------

local NemotronHMamba2Mixer = mamba2.Mamba2Mixer:extend("NemotronHMamba2Mixer")
M.NemotronHMamba2Mixer = NemotronHMamba2Mixer

local NemotronHAttention = llama.LlamaAttention:extend("NemotronHAttention")
M.NemotronHAttention = NemotronHAttention

local NemotronHMLP = nn.Module:extend("NemotronHMLP")
M.NemotronHMLP = NemotronHMLP

--- NemotronHMLP(cfg[, width[, dim[, expert]]]): intermediate_size wide, or width (the shared expert,
-- an expert), over dim values (an expert behind the latent projection) or hidden_size; biased by
-- mlp_bias unless an expert (transformers stacks the experts' weights without biases).
function NemotronHMLP:__init(cfg, width, dim, expert)
   nn.Module.__init(self)
   width, dim = width or cfg.intermediate_size, dim or cfg.hidden_size
   local bias = cfg.mlp_bias and not expert
   self.up_proj = nn.Linear(dim, width, { bias = bias })
   self.down_proj = nn.Linear(width, dim, { bias = bias })
   self.act_fn = common.activation_module(cfg.hidden_act, "models.nemotron_h", cfg._source)
end

function NemotronHMLP:forward(x) return self.down_proj(self.act_fn(self.up_proj(x))) end

local NemotronHTopkRouter = deepseek.DeepseekTopkRouter:extend("NemotronHTopkRouter")
M.NemotronHTopkRouter = NemotronHTopkRouter

-- DeepSeek-V3's block with Nemotron-H's experts (routing: DeepseekMoE.route), transformers' order:
-- the experts, the router, the shared expert, the latent projections.
local NemotronHMoE = deepseek.DeepseekMoE:extend("NemotronHMoE")
M.NemotronHMoE = NemotronHMoE

function NemotronHMoE:__init(cfg)
   nn.Module.__init(self)
   local latent = cfg.moe_latent_size
   local experts = {}
   for e = 1, cfg.n_routed_experts do experts[e] = NemotronHMLP(cfg, cfg.moe_intermediate_size, latent, true) end
   self.experts = nn.ModuleList(experts)
   self.gate = NemotronHTopkRouter(cfg)
   self.shared_experts = NemotronHMLP(cfg, cfg.moe_shared_expert_intermediate_size)
   if latent then
      self.fc1_latent_proj = nn.Linear(cfg.hidden_size, latent, { bias = cfg.mlp_bias })
      self.fc2_latent_proj = nn.Linear(latent, cfg.hidden_size, { bias = cfg.mlp_bias })
   end
   self:set_routing(cfg)
end

--- DeepseekMoE.route; with every group allowed (topk_group = n_group: Nemotron 3 Nano's one group)
-- the same choice as plain biased sigmoid routing, taken on the tensors rather than per token in Lua.
function NemotronHMoE:route(flat)
   if self.topk_group < self.n_group then return deepseek.DeepseekMoE.route(self, flat) end
   return moe.biased_sigmoid_route(self.gate(flat), self.gate.e_score_correction_bias, self.top_k, self.norm_topk_prob,
      1e-20, self.routed_scaling_factor)
end

--- x (B, T, hidden): the routed experts' weighted sum (routed on x, run on its latent projection
-- when there is one) plus the shared expert's.
function NemotronHMoE:forward(x)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local flat = x:reshape(B * L, H)
   local top_w, top_i = self:route(flat)
   local inner = self.fc1_latent_proj and self.fc1_latent_proj(flat) or flat
   local y = moe.run_experts(self.experts, inner, top_w, top_i)
   if self.fc2_latent_proj then y = self.fc2_latent_proj(y) end
   return y:view(B, L, H) + self.shared_experts(x)
end

-- --- blocks and model -----------------------------------------------------------------------------

-- Each layer type's mixer (the MLPs take no layer index).
local MIXERS = {
   linear_attention = NemotronHMamba2Mixer,
   full_attention = NemotronHAttention,
   mlp = function(cfg) return NemotronHMLP(cfg) end,
   moe = function(cfg) return NemotronHMoE(cfg) end,
}

local NemotronHBlock = nn.Module:extend("NemotronHBlock")
M.NemotronHBlock = NemotronHBlock

function NemotronHBlock:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local kind = cfg.layer_types[layer_idx]
   self.norm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.mixer = MIXERS[kind](cfg, layer_idx)
   rawset(self, "block_type", kind)
end

--- x (B, T, hidden); cache optional; pad (B, past + T) or nil (no rotary tables: models/llama.lua's
-- forward calls the layer without them).
function NemotronHBlock:forward(x, cache, pad)
   local h = self.norm(x)
   local kind = self.block_type
   if kind == "linear_attention" then
      h = self.mixer(h, cache, pad)
   elseif kind == "full_attention" then
      h = self.mixer(h, nil, nil, cache, pad)
   else
      h = self.mixer(h)
   end
   return x + h
end

-- Mamba-2's model (models/mamba2.lua): the embeddings, the layers and norm_f, in transformers' order,
-- no rotary table
local NemotronHModel = mamba2.Mamba2Model:extend("NemotronHModel")
M.NemotronHModel = NemotronHModel
NemotronHModel.family, NemotronHModel.Layer = "nemotron_h", NemotronHBlock

local NemotronHForCausalLM = llama.LlamaForCausalLM:extend("NemotronHForCausalLM")
M.NemotronHForCausalLM = NemotronHForCausalLM
NemotronHForCausalLM.family, NemotronHForCausalLM.Model = "nemotron_h", NemotronHModel
NemotronHForCausalLM.base_model_prefix = "backbone"
NemotronHForCausalLM.tied_weights = {}
-- multi-token-prediction layers some checkpoints carry (transformers leaves them out too)
NemotronHForCausalLM.ignore_unexpected = { "^mtp%.", "^backbone%.mtp%." }
NemotronHForCausalLM.no_split_modules = { "NemotronHBlock" }
NemotronHForCausalLM.stateful = true          -- its cache cannot be cropped: no assisted generation
NemotronHForCausalLM.forward = common.causal_lm_forward("models.nemotron_h.forward", "backbone", "embeddings")

function NemotronHForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = self:read_config(cfg)
   self.backbone = self.Model(cfg)
   self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
end

function NemotronHForCausalLM:read_config(source) return M.config(source, self.family) end

function NemotronHForCausalLM:tie_weights() end   -- (never tied)

return M
