--- BioGPT (transformers' BioGptForCausalLM: microsoft/biogpt, BioGPT-Large, BioGPT-Large-PubMedQA)
-- with Hugging Face parameter names: biogpt.{embed_tokens, embed_positions, layers.N.{self_attn.{q_proj,
-- k_proj, v_proj, out_proj}, self_attn_layer_norm, fc1, fc2, final_layer_norm}, layer_norm},
-- output_projection (tied to embed_tokens). XGLM's network (models/xglm.lua: OPT's pre-norm layers
-- after word embeddings scaled by sqrt(hidden_size)) with learned positions stored 2 rows down (row
-- p + 2 holds position p, counted from 0 as transformers' forward counts them). Its LayerNorms keep
-- PyTorch's eps 1e-5: transformers does not read layer_norm_eps.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local xglm = require("moonload.models.xglm")

local M = {}
local WHO = "models.biogpt"
local POSITION_OFFSET = 2

M.schema = {
   { "vocab_size", "int" },
   { "hidden_size", "int" },
   { "num_hidden_layers", "int" },
   { "num_attention_heads", "int" },
   { "intermediate_size", "int", function(c) return 4 * c.hidden_size end },
   { "max_position_embeddings", "int", 1024 },
   { "hidden_act", "string", "gelu" },
   { "scale_embedding", "bool", true },
   { "tie_word_embeddings", "bool", true },
}

--- Reads and checks a BioGPT config (path, folder or table); adds the names OPT's layers read
-- (ffn_dim, activation_function, head_dim, enable_bias, ...) and embed_scale.
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.hidden_size % cfg.num_attention_heads ~= 0 then
      config.fail(cfg, WHO, "hidden_size %d is not a multiple of num_attention_heads %d", cfg.hidden_size,
         cfg.num_attention_heads)
   end
   common.activation(cfg.hidden_act, WHO, cfg._source)
   cfg.ffn_dim, cfg.activation_function = cfg.intermediate_size, cfg.hidden_act
   cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads
   cfg.enable_bias, cfg.layer_norm_elementwise_affine, cfg.do_layer_norm_before = true, true, true
   cfg.embed_scale = cfg.scale_embedding and math.sqrt(cfg.hidden_size) or 1
   return cfg
end

--- BioGptLearnedPositionalEmbedding(n, dim): n + 2 rows, position p read from row p + 2.
local BioGptLearnedPositionalEmbedding = nn.Embedding:extend("BioGptLearnedPositionalEmbedding")
M.BioGptLearnedPositionalEmbedding = BioGptLearnedPositionalEmbedding

function BioGptLearnedPositionalEmbedding:__init(n, dim)
   nn.Embedding.__init(self, n + POSITION_OFFSET, dim)
end

function BioGptLearnedPositionalEmbedding:forward(pos)
   return nn.Embedding.forward(self, pos + POSITION_OFFSET)
end

local BioGptAttention = xglm.XGLMAttention:extend("BioGptAttention")
M.BioGptAttention = BioGptAttention

local BioGptDecoderLayer = xglm.XGLMDecoderLayer:extend("BioGptDecoderLayer")
M.BioGptDecoderLayer = BioGptDecoderLayer
BioGptDecoderLayer.Attention = BioGptAttention

local BioGptModel = xglm.XGLMModel:extend("BioGptModel")
M.BioGptModel = BioGptModel
BioGptModel.Layer, BioGptModel.who = BioGptDecoderLayer, WHO
function BioGptModel.read_config(source) return M.config(source) end
function BioGptModel.positions(cfg) return BioGptLearnedPositionalEmbedding(cfg.max_position_embeddings, cfg.hidden_size) end

--- input_ids (B, T), cache, pad, pos, blocks: XGLM's forward, within max_position_embeddings.
function BioGptModel:forward(input_ids, cache, pad, pos, blocks)
   common.check_positions(WHO, cache and cache.length or 0, input_ids:size(2), self.config.max_position_embeddings,
      "max_position_embeddings", 3)
   return xglm.XGLMModel.forward(self, input_ids, cache, pad, pos, blocks)
end

local BioGptForCausalLM = nn.Module:extend("BioGptForCausalLM")
M.BioGptForCausalLM = BioGptForCausalLM
BioGptForCausalLM.base_model_prefix = "biogpt"
BioGptForCausalLM.tied_weights = { ["output_projection.weight"] = "biogpt.embed_tokens.weight" }
BioGptForCausalLM.no_split_modules = { "BioGptDecoderLayer" }

--- BioGptForCausalLM(config): config is a config.json path, a folder holding one, or a table.
function BioGptForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.biogpt = BioGptModel(cfg)
   self.output_projection = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.output_projection.weight = self.biogpt.embed_tokens.weight end
end

common.causal_lm_methods(BioGptForCausalLM, WHO, "biogpt", "embed_tokens", "output_projection", "num_hidden_layers",
   "max_position_embeddings")

function M.from_config(cfg) return BioGptForCausalLM(cfg) end

return M
