--- GPT-1 (transformers' OpenAIGPTLMHeadModel, model_type "openai-gpt": openai-community/openai-gpt)
-- with Hugging Face parameter names: transformer.{tokens_embed, positions_embed, h.N.{attn.{c_attn,
-- c_proj}, ln_1, mlp.{c_fc, c_proj}, ln_2}}, lm_head (tied to tokens_embed). GPT-2's Conv1D
-- attention (scores scaled by 1/sqrt(head_dim)) and MLP (models/gpt2.lua) in post-norm blocks:
-- ln_1 after the attention's residual, ln_2 after the MLP's, and no final norm. Its activation
-- names are its own: afn "gelu" is the tanh approximation (gelu_new).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local block_schedule = require("moonload.models.block_schedule")
local gpt2 = require("moonload.models.gpt2")

local M = {}
local WHO = "models.openai"

M.schema = {
   { "vocab_size", "int" },
   { "n_positions", "int", 512 },
   { "n_embd", "int" },
   { "n_layer", "int" },
   { "n_head", "int" },
   { "afn", "string", "gelu" },
   { "layer_norm_epsilon", "posnum", 1e-5 },
   { "tie_word_embeddings", "bool", true },
}

-- transformers' ACT_FNS for GPT-1, as the activation names of models/common.lua
M.AFN = { gelu = "gelu_new", relu = "relu", silu = "silu", swish = "silu" }

--- Reads and checks a GPT-1 config (path, folder or table); adds what GPT-2's layers read
-- (n_inner, activation_function, scale_attn_weights, scale_attn_by_inverse_layer_idx).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.n_embd % cfg.n_head ~= 0 then
      config.fail(cfg, WHO, "n_embd %d is not divisible by n_head %d", cfg.n_embd, cfg.n_head)
   end
   cfg.activation_function = M.AFN[cfg.afn]
   if cfg.activation_function == nil then
      config.fail(cfg, WHO, 'config key "afn" must be one of gelu, relu, silu, swish, got "%s"', cfg.afn)
   end
   cfg.n_inner, cfg.scale_attn_weights, cfg.scale_attn_by_inverse_layer_idx = 4 * cfg.n_embd, true, false
   return cfg
end

-- --- blocks -----------------------------------------------------------------------------------

local Attention = gpt2.GPT2Attention:extend("Attention")
M.Attention = Attention

local MLP = gpt2.GPT2MLP:extend("MLP")
M.MLP = MLP

local Block = nn.Module:extend("Block")
M.Block = Block

function Block:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.attn = Attention(cfg, layer_idx)
   self.ln_1 = nn.LayerNorm(cfg.n_embd, { eps = cfg.layer_norm_epsilon })
   self.mlp = MLP(cfg)
   self.ln_2 = nn.LayerNorm(cfg.n_embd, { eps = cfg.layer_norm_epsilon })
end

function Block:forward(x, cache, pad)
   local n = self.ln_1(x + self.attn(x, cache, pad))
   return self.ln_2(n + self.mlp(n))
end

-- --- models ---------------------------------------------------------------------------------

local OpenAIGPTModel = nn.Module:extend("OpenAIGPTModel")
M.OpenAIGPTModel = OpenAIGPTModel

--- OpenAIGPTModel(config): a config path, folder or table, or one M.config has checked.
function OpenAIGPTModel:__init(cfg)
   nn.Module.__init(self)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = M.config(cfg) end
   self.tokens_embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
   self.positions_embed = nn.Embedding(cfg.n_positions, cfg.n_embd)
   self.drop = nn.Dropout(0)
   local blocks = {}
   for i = 1, cfg.n_layer do blocks[i] = Block(cfg, i) end
   self.h = nn.ModuleList(blocks)
   rawset(self, "config", cfg)
end

--- input_ids (B, T); cache optional; pad (B, past + T) bool or nil; pos (B, T) or nil (positions
-- past .. past+T-1); blocks: see models/block_schedule.lua. Returns the last block's output (B, T, C).
function OpenAIGPTModel:forward(input_ids, cache, pad, pos, blocks)
   local cfg = self.config
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   common.check_positions(WHO, past, L, cfg.n_positions, "n_positions", 3)
   pos = pos or T.arange(past, past + L, { device = input_ids.device })
   local x = self.tokens_embed(input_ids) + self.positions_embed(pos)
   local n = cfg.n_layer
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, WHO)
   for i = 1, n do x = block_schedule.call(schedule, i, self.h[i], x, cache, pad) end
   if cache then cache:advance(L) end
   return x
end

local OpenAIGPTLMHeadModel = nn.Module:extend("OpenAIGPTLMHeadModel")
M.OpenAIGPTLMHeadModel = OpenAIGPTLMHeadModel
OpenAIGPTLMHeadModel.base_model_prefix = "transformer"
OpenAIGPTLMHeadModel.tied_weights = { ["lm_head.weight"] = "transformer.tokens_embed.weight" }
-- (buffers that checkpoints written by older transformers hold: the causal mask, the positions)
OpenAIGPTLMHeadModel.ignore_unexpected = { "%.attn%.bias$", "position_ids$" }
OpenAIGPTLMHeadModel.no_split_modules = { "Block" }

--- OpenAIGPTLMHeadModel(config): config is a config.json path, a folder holding one, or a table.
function OpenAIGPTLMHeadModel:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.transformer = OpenAIGPTModel(cfg)
   self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.lm_head.weight = self.transformer.tokens_embed.weight end
end

common.causal_lm_methods(OpenAIGPTLMHeadModel, WHO, "transformer", "tokens_embed", nil, "n_layer", "n_positions")

function M.from_config(cfg) return OpenAIGPTLMHeadModel(cfg) end

return M
