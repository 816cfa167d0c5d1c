--- Jamba (JambaForCausalLM, model_type "jamba": Jamba-v0.1, Jamba 1.5/1.6/1.7 Mini and Large) with
-- Hugging Face parameter names: model.{embed_tokens, layers.N.*, final_layernorm}, lm_head.
--
-- Layer i (0-based) attends when i % attn_layer_period == attn_layer_offset: grouped-query
-- attention without biases and without any position embedding (self_attn.*); the others mix by
-- Mamba-1 (mamba.*: models/mamba.lua's mixer, with RMSNorms with weights on the step, B and C,
-- eps rms_norm_eps). Each layer has an RMSNorm before its mixer or attention (input_layernorm) and
-- before its feed-forward (pre_ff_layernorm, feed_forward): a SwiGLU MLP, or where
-- i % expert_layer_period == expert_layer_offset (and num_experts > 1) a sparse block: a router
-- (feed_forward.router) whose float32 softmax picks each token's top num_experts_per_tok experts,
-- weighted by those probabilities as they are (not renormalized), and the experts, one SwiGLU MLP
-- each as the hub's files hold them (feed_forward.experts.E.{gate_proj, up_proj, down_proj}:
-- what save_pretrained writes; transformers' in-memory layout, stacked gate_up_proj and down_proj,
-- loads too). final_layernorm ends the model.
--
-- A generation's cache holds the mixers' last conv inputs and states (a fixed size, whatever the
-- length) beside the attention layers' keys and values; it cannot be cropped back, so assisted
-- generation is refused.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local mamba = require("moonload.models.mamba")

local M = {}

-- JambaConfig's defaults for the keys Llama's config requires or defaults otherwise.
local DEFAULTS = { vocab_size = 65536, hidden_size = 4096, intermediate_size = 14336, num_hidden_layers = 32,
   num_attention_heads = 32, num_key_value_heads = 8, max_position_embeddings = 262144 }

--- Reads and checks a Jamba config (path, folder or table): Llama's keys (JambaConfig's defaults),
-- which layers mix by Mamba-1 (cfg.mixer_layers[i] true) or attend, which feed-forwards are sparse
-- (cfg.sparse_layers[i]), the experts' keys and the mixer's geometry (cfg.mamba1).
function M.config(source, family)
   family = family or "jamba"
   local WHO = "models." .. family
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   if fixed.num_experts == nil then fixed.num_experts = raw.num_local_experts end   -- (JambaConfig's alias)
   local cfg = llama.config(fixed, family)
   cfg._source, cfg._raw = src, raw
   local function int(name, default, min)
      local v = cfg[name]
      if v == nil then v = default end
      cfg[name] = config.integer(cfg, WHO, name, v, min)
      return cfg[name]
   end
   local function bool(name, default)
      local v = cfg[name]
      if v == nil then v = default end
      if type(v) ~= "boolean" then config.fail(cfg, WHO, 'config key "%s" must be a boolean, got %s', name, tostring(v)) end
      cfg[name] = v
      return v
   end
   -- which layers attend and which feed-forwards are sparse (transformers counts layers from 0)
   local function schedule(what, default_period, default_offset)
      local period = int(what .. "_layer_period", default_period, 1)
      local offset = int(what .. "_layer_offset", default_offset, 0)
      if offset >= period then
         config.fail(cfg, WHO, "%s_layer_offset %d must be smaller than %s_layer_period %d", what, offset, what, period)
      end
      local on = {}
      for i = 1, cfg.num_hidden_layers do on[i] = (i - 1) % period == offset end
      return on
   end
   local attends = schedule("attn", 8, 4)
   local expert_layers = schedule("expert", 2, 1)
   local E = int("num_experts", 16, 0)
   local k = int("num_experts_per_tok", 2, 1)
   cfg.mixer_layers, cfg.sparse_layers = {}, {}
   local mixers, sparse = false, false
   for i = 1, cfg.num_hidden_layers do
      cfg.mixer_layers[i] = not attends[i]
      cfg.sparse_layers[i] = E > 1 and expert_layers[i]      -- (one expert: a dense MLP, as transformers builds it)
      mixers, sparse = mixers or cfg.mixer_layers[i], sparse or cfg.sparse_layers[i]
   end
   if sparse and k > E then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_experts %d", k, E)
   end
   cfg.norm_topk_prob = false                                 -- (the top-k probabilities weigh as they are)
   cfg.moe_intermediate_size = cfg.intermediate_size          -- (each expert is as wide as the MLP)
   -- the mixer's keys
   local state = int("mamba_d_state", 16, 1)
   local taps = int("mamba_d_conv", 4, 1)
   local expand = int("mamba_expand", 2, 1)
   local rank = cfg.mamba_dt_rank
   if rank == nil or rank == "auto" then rank = math.ceil(cfg.hidden_size / 16) end
   if type(rank) ~= "number" or rank ~= math.floor(rank) or rank < 1 then
      config.fail(cfg, WHO, 'config key "mamba_dt_rank" must be "auto" or an integer >= 1, got %s', tostring(rank))
   end
   cfg.mamba_dt_rank = rank
   local conv_bias, proj_bias = bool("mamba_conv_bias", true), bool("mamba_proj_bias", false)
   if mixers and cfg.hidden_act ~= "silu" then          -- (the mixers' conv activation is hidden_act; ours SiLU)
      config.fail(cfg, WHO, 'config key "hidden_act" is "%s" (supported with Mamba layers: silu, the mixers\' activation)',
         cfg.hidden_act)
   end
   cfg.mamba1 = { width = expand * cfg.hidden_size, state_size = state, dt_rank = rank, taps = taps,
      conv_bias = conv_bias, proj_bias = proj_bias, inner_norms = "weighted", inner_eps = cfg.rms_norm_eps }
   return cfg
end

-- --- layers ---------------------------------------------------------------------------------------

-- Mamba's mixer with the norms on the step, B and C (their weights after out_proj, as transformers
-- registers them: models/mamba.lua's order with inner_norms "weighted").
local JambaMambaMixer = mamba.MambaMixer:extend("JambaMambaMixer")
M.JambaMambaMixer = JambaMambaMixer

local JambaAttention = llama.LlamaAttention:extend("JambaAttention")
M.JambaAttention = JambaAttention

-- The dense feed-forward, and each expert of a sparse one (as wide: intermediate_size).
local JambaMLP = llama.LlamaMLP:extend("JambaMLP")
M.JambaMLP = JambaMLP

-- Mixtral's block with the router named router and the top-k probabilities not renormalized
-- (moe.SparseMoeBlock.route; their cast to the hidden dtype happens in moe.run_experts).
local JambaSparseMoeBlock = moe.SparseMoeBlock:extend("JambaSparseMoeBlock")
M.JambaSparseMoeBlock = JambaSparseMoeBlock
JambaSparseMoeBlock.gate_name = "router"

-- transformers' order: the router, then the experts
function JambaSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   self.experts = moe.experts_for(cfg, "models.jamba", JambaMLP, "apart")
   self:routing(cfg)
end

local function feed_forward(cfg, layer_idx)
   return cfg.sparse_layers[layer_idx] and JambaSparseMoeBlock(cfg) or JambaMLP(cfg)
end

-- transformers' order in both layer classes: the mixer or attention, the feed-forward, both norms
local function build_layer(self, cfg, layer_idx, mixer_name, Mixer)
   nn.Module.__init(self)
   self[mixer_name] = Mixer(cfg, layer_idx)
   self.feed_forward = feed_forward(cfg, layer_idx)
   self.input_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.pre_ff_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

local JambaAttentionDecoderLayer = nn.Module:extend("JambaAttentionDecoderLayer")
M.JambaAttentionDecoderLayer = JambaAttentionDecoderLayer

function JambaAttentionDecoderLayer:__init(cfg, layer_idx)
   build_layer(self, cfg, layer_idx, "self_attn", JambaAttention)
end

--- x (B, T, hidden); cache optional; pad (B, past + T) or nil (no rotary tables: models/llama.lua's
-- forward calls the layers without them).
function JambaAttentionDecoderLayer:forward(x, cache, pad)
   x = x + self.self_attn(self.input_layernorm(x), nil, nil, cache, pad)
   return x + self.feed_forward(self.pre_ff_layernorm(x))
end

local JambaMambaDecoderLayer = nn.Module:extend("JambaMambaDecoderLayer")
M.JambaMambaDecoderLayer = JambaMambaDecoderLayer

function JambaMambaDecoderLayer:__init(cfg, layer_idx)
   build_layer(self, cfg, layer_idx, "mamba", JambaMambaMixer)
end

function JambaMambaDecoderLayer:forward(x, cache, pad)
   x = x + self.mamba(self.input_layernorm(x), cache, pad)
   return x + self.feed_forward(self.pre_ff_layernorm(x))
end

-- --- model ----------------------------------------------------------------------------------------

local JambaModel = llama.LlamaModel:extend("JambaModel")
M.JambaModel = JambaModel
JambaModel.family, JambaModel.norm_name = "jamba", "final_layernorm"

-- transformers' order: the embedding, the layers, the final norm (no rotary table)
function JambaModel:__init(cfg)
   nn.Module.__init(self)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = M.config(cfg, self.family) end
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do
      layers[i] = cfg.mixer_layers[i] and JambaMambaDecoderLayer(cfg, i) or JambaAttentionDecoderLayer(cfg, i)
   end
   self.layers = nn.ModuleList(layers)
   self.final_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   rawset(self, "config", cfg)
end

local JambaForCausalLM = llama.LlamaForCausalLM:extend("JambaForCausalLM")
M.JambaForCausalLM = JambaForCausalLM
JambaForCausalLM.family, JambaForCausalLM.Model = "jamba", JambaModel
JambaForCausalLM.no_split_modules = { "JambaAttentionDecoderLayer", "JambaMambaDecoderLayer" }
JambaForCausalLM.stateful = true          -- its cache cannot be cropped: no assisted generation
JambaForCausalLM.forward = common.causal_lm_forward("models.jamba.forward", "model", "embed_tokens")

function JambaForCausalLM:read_config(source) return M.config(source, self.family) end

-- Experts as the checkpoint holds them: one module each (the hub's files), or stacked per
-- projection (transformers' in-memory JambaExperts: gate_up_proj (E, 2 x inter, hidden), gate rows
-- then up rows, and down_proj (E, hidden, inter)).
moe.builds_experts_as_stored(JambaForCausalLM)

function JambaForCausalLM.build_opts_for(names)
   for _, name in ipairs(names) do
      if name:find("%.feed_forward%.experts%.gate_up_proj$") then return { experts_layout = "out_in" } end
   end
   return nil
end

return M
