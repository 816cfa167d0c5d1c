--- GraniteSWA (GraniteSWAForCausalLM, model_type "granite_swa": granite-swash-2b) and GraniteMoeSWA
-- (GraniteMoeSWAForCausalLM, model_type "granitemoe_swa": granite-swash-3b-a600m) with Hugging Face
-- parameter names: Granite's layers and multipliers (models/llama.lua; GraniteMoeShared's sparse
-- block and shared MLP for the MoE one: models/moe.lua), plus
--
-- - sliding windows: layer_types' "sliding_attention" layers attend over the last sliding_window
--   keys (128 by default; without layer_types the first of every four attends to all);
-- - attention sinks: one learned logit per query head (self_attn.sinks) joins each softmax without
--   a value, as gpt-oss's (transformers scales the output by sigmoid(logsumexp(scores) - sink),
--   the same thing);
-- - a rope base per layer: layer_rope_theta (default: rope_theta everywhere), 0 for a layer
--   without any position embedding. One rotary table per distinct base (model.rotary_embs, as in
--   transformers).
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local gpt_oss = require("moonload.models.gpt_oss")

local M = {}

--- Reads and checks a GraniteSWA config (path, folder or table), or with family "granitemoe_swa" a
-- GraniteMoeSWA one: Granite's keys and windows (models/llama.lua; GraniteMoeShared's experts:
-- models/moe.lua) and layer_rope_theta, into cfg.rope_thetas (the distinct bases, ascending),
-- cfg.layer_rope_index (each layer's, nil without one) and cfg.nope_layers.
function M.config(source, family)
   family = family or "granite_swa"
   local WHO = "models." .. family
   local cfg = family == "granite_swa" and llama.config(source, family) or moe.config(source, family)
   local n = cfg.num_hidden_layers
   local thetas = cfg.layer_rope_theta
   if thetas == nil then
      thetas = {}
      for i = 1, n do thetas[i] = cfg.rope.rope_theta end
   end
   if type(thetas) ~= "table" or #thetas ~= n then
      config.fail(cfg, WHO, 'config key "layer_rope_theta" must list %d rope bases (0: no position embedding)', n)
   end
   local index, bases = {}, {}
   for i, theta in ipairs(thetas) do
      if type(theta) ~= "number" or theta < 0 then
         config.fail(cfg, WHO, "layer_rope_theta[%d] must be a number >= 0, got %s", i, tostring(theta))
      end
      if theta > 0 and not index[theta] then
         index[theta] = true
         bases[#bases + 1] = theta
      end
   end
   table.sort(bases)
   for j, theta in ipairs(bases) do index[theta] = j end
   cfg.layer_rope_theta, cfg.rope_thetas, cfg.layer_rope_index, cfg.nope_layers = thetas, bases, {}, {}
   for i, theta in ipairs(thetas) do
      cfg.layer_rope_index[i] = theta > 0 and index[theta] or nil
      cfg.nope_layers[i] = theta == 0
   end
   return cfg
end

-- --- attention with sinks ---------------------------------------------------------------------

local GraniteSWAAttention = llama.GraniteAttention:extend("GraniteSWAAttention")
M.GraniteSWAAttention = GraniteSWAAttention

function GraniteSWAAttention:__init(cfg, layer_idx)
   llama.GraniteAttention.__init(self, cfg, layer_idx)
   self.sinks = nn.Module.new_parameter({ cfg.num_attention_heads })
   if not self.sinks:is_meta() then self.sinks:fill_(0) end
end

GraniteSWAAttention.attend = gpt_oss.SinkAttention.attend

-- --- a rotary table per rope base -------------------------------------------------------------

-- The model's rotary_embs (one per distinct base of layer_rope_theta), after its own __init.
local function add_rotary_per_base(self, cfg)
   local embs = {}
   for j, theta in ipairs(cfg.rope_thetas) do
      local rope = {}
      for k, v in pairs(cfg.rope) do rope[k] = v end
      rope.rope_theta = theta
      embs[j] = self.Rotary(setmetatable({ rope = rope, rope_theta = theta }, { __index = cfg }))
   end
   self.rotary_embs = nn.ModuleList(embs)
end

--- Each layer's cos and sin: its base's table; a layer without position embedding gets the
-- model's own (unused: its attention does not rotate).
local function layer_rotary_per_base(self, positions, x)
   local cfg, tables = self.config, {}
   for j, emb in ipairs(self.rotary_embs) do
      local cos, sin = emb(positions)
      tables[j] = { llama.rotary_for(cos, sin, x) }
   end
   local per_layer, plain = {}, nil
   for i = 1, cfg.num_hidden_layers do
      local j = cfg.layer_rope_index[i]
      if not j and not plain then plain = llama.LlamaModel.layer_rotary(self, positions, x)[1] end
      per_layer[i] = j and tables[j] or plain
   end
   return per_layer
end

-- The Model class's __init and layer_rotary for rope bases per layer.
local function rotary_per_base(Model)
   function Model:__init(cfg)
      if type(cfg) ~= "table" or cfg._source == nil then cfg = M.config(cfg, self.family) end
      llama.LlamaModel.__init(self, cfg)
      add_rotary_per_base(self, cfg)
   end
   Model.layer_rotary = layer_rotary_per_base
end

-- --- GraniteSWA -------------------------------------------------------------------------------

local GraniteSWAMLP = llama.LlamaMLP:extend("GraniteSWAMLP")
M.GraniteSWAMLP = GraniteSWAMLP

local GraniteSWADecoderLayer = llama.GraniteDecoderLayer:extend("GraniteSWADecoderLayer")
M.GraniteSWADecoderLayer = GraniteSWADecoderLayer
GraniteSWADecoderLayer.Attention, GraniteSWADecoderLayer.MLP = GraniteSWAAttention, GraniteSWAMLP

local GraniteSWARotaryEmbedding = llama.LlamaRotaryEmbedding:extend("GraniteSWARotaryEmbedding")
M.GraniteSWARotaryEmbedding = GraniteSWARotaryEmbedding

local GraniteSWAModel = llama.GraniteModel:extend("GraniteSWAModel")
M.GraniteSWAModel = GraniteSWAModel
GraniteSWAModel.family, GraniteSWAModel.Layer, GraniteSWAModel.Rotary = "granite_swa", GraniteSWADecoderLayer,
   GraniteSWARotaryEmbedding
rotary_per_base(GraniteSWAModel)

local GraniteSWAForCausalLM = llama.GraniteForCausalLM:extend("GraniteSWAForCausalLM")
M.GraniteSWAForCausalLM = GraniteSWAForCausalLM
GraniteSWAForCausalLM.family, GraniteSWAForCausalLM.Model = "granite_swa", GraniteSWAModel
GraniteSWAForCausalLM.no_split_modules = { "GraniteSWADecoderLayer" }
GraniteSWAForCausalLM.forward = llama.scaled_logits_forward("models.granite_swa", llama.granite_logits)

function GraniteSWAForCausalLM:read_config(source) return M.config(source, self.family) end

-- --- GraniteMoeSWA ----------------------------------------------------------------------------

local GraniteMoeSWAMoE = moe.GraniteMoeMoE:extend("GraniteMoeSWAMoE")
M.GraniteMoeSWAMoE = GraniteMoeSWAMoE

local GraniteMoeSWALM = moe.decoder_family("granitemoe_swa", "GraniteMoeSWA", GraniteSWAAttention, GraniteMoeSWAMoE,
   "block_sparse_moe", M.config, M)
M.GraniteMoeSWADecoderLayer.__init = moe.GraniteMoeSharedDecoderLayer.__init
M.GraniteMoeSWADecoderLayer.forward = moe.GraniteMoeSharedDecoderLayer.forward
M.GraniteMoeSWAModel.embed_scale = llama.GraniteModel.embed_scale
rotary_per_base(M.GraniteMoeSWAModel)
GraniteMoeSWALM.forward = llama.scaled_logits_forward("models.granitemoe_swa", llama.granite_logits)
GraniteMoeSWALM.checkpoint_renames = moe.GraniteMoeForCausalLM.checkpoint_renames

return M
