--- GPT-NeoX Japanese (GPTNeoXJapaneseForCausalLM, model_type "gpt_neox_japanese":
-- abeja/gpt-neox-japanese-2.7b) with Hugging Face parameter names:
-- gpt_neox_japanese.{embed_in, layers.N.{input_layernorm, post_attention_layernorm,
-- attention.{query_key_value, dense[, dense_bias]}, mlp.{dense_h_to_4h, dense_4h_to_h}},
-- final_layer_norm}, embed_out. GPT-NeoX's layers (models/gpt_neox.lua: each head's q, k and v side by
-- side in query_key_value, rotary embeddings on the first partial_rotary_factor (rotary_pct, all by
-- default) of each head, LayerNorms with biases) with these differences: no projection has a bias, but
-- the last layer's attention adds dense_bias to its output; the residuals are sequential,
-- x + attn(ln1(x)), then + mlp(ln2(.)); the MLP is hidden_size x intermediate_multiple_size wide; the
-- head is tied to the embeddings unless tie_word_embeddings says otherwise.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local gpt_neox = require("moonload.models.gpt_neox")

local M = {}
local WHO = "models.gpt_neox_japanese"

-- GPTNeoXJapaneseConfig's keys and defaults (gpt-neox-japanese-2.7b's): GPT-NeoX's without
-- intermediate_size, use_parallel_residual and attention_bias (fixed here), with intermediate_multiple_size.
M.schema = config.schema_from(gpt_neox.schema, {
   vocab_size = { "vocab_size", "int", 32000 },
   hidden_size = { "hidden_size", "int", 2560 },
   num_hidden_layers = { "num_hidden_layers", "int", 32 },
   num_attention_heads = { "num_attention_heads", "int", 32 },
   intermediate_size = false, use_parallel_residual = false, attention_bias = false,
   tie_word_embeddings = { "tie_word_embeddings", "bool", true },
}, { { "intermediate_multiple_size", "int", 4 } })

--- Reads and checks a GPT-NeoX Japanese config (path, folder or table): GPT-NeoX's reading (the hub's
-- rotary_pct and rotary_emb_base, or rope_parameters) with the keys above.
function M.config(source)
   local cfg = gpt_neox.config(source, { schema = M.schema, who = WHO, rotary_pct = 1 })
   cfg.intermediate_size = cfg.hidden_size * cfg.intermediate_multiple_size
   cfg.use_parallel_residual, cfg.attention_bias = false, false
   return cfg
end

local Attention = gpt_neox.GPTNeoXAttention:extend("GPTNeoXJapaneseAttention")
M.GPTNeoXJapaneseAttention = Attention

function Attention:__init(cfg, layer_idx)
   gpt_neox.GPTNeoXAttention.__init(self, cfg, layer_idx)
   if layer_idx == cfg.num_hidden_layers then self.dense_bias = nn.Module.new_parameter({ cfg.hidden_size }) end
end

function Attention:forward(x, cos, sin, cache, pad)
   local y = gpt_neox.GPTNeoXAttention.forward(self, x, cos, sin, cache, pad)
   if self.dense_bias then y = y + self.dense_bias end
   return y
end

local MLP = gpt_neox.GPTNeoXMLP:extend("GPTNeoXJapaneseMLP")
M.GPTNeoXJapaneseMLP = MLP

function MLP:__init(cfg)
   nn.Module.__init(self)
   self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size, { bias = false })
   self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size, { bias = false })
   self.act = common.activation_module(cfg.hidden_act, WHO, cfg._source)
end

local Layer = gpt_neox.GPTNeoXLayer:extend("GPTNeoXJapaneseLayer")
M.GPTNeoXJapaneseLayer = Layer

function Layer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.input_layernorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
   self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
   self.attention = Attention(cfg, layer_idx)
   self.mlp = MLP(cfg)
   rawset(self, "parallel", false)
end

local Rotary = gpt_neox.GPTNeoXRotaryEmbedding:extend("GPTNeoXJapaneseRotaryEmbedding")
M.GPTNeoXJapaneseRotaryEmbedding = Rotary

local Model = gpt_neox.GPTNeoXModel:extend("GPTNeoXJapaneseModel")
M.GPTNeoXJapaneseModel = Model

function Model:__init(cfg)
   self:build_parts(cfg, cfg.hidden_size, Layer, cfg.num_hidden_layers,
      nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps }), Rotary)
end

local LM = nn.Module:extend("GPTNeoXJapaneseForCausalLM")
M.GPTNeoXJapaneseForCausalLM = LM
LM.base_model_prefix = "gpt_neox_japanese"
LM.tied_weights = { ["embed_out.weight"] = "gpt_neox_japanese.embed_in.weight" }
LM.ignore_unexpected = { "rotary_emb%.inv_freq$" }
LM.no_split_modules = { "GPTNeoXJapaneseLayer" }

function LM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.gpt_neox_japanese = Model(cfg)
   self.embed_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.embed_out.weight = self.gpt_neox_japanese.embed_in.weight end
end

common.causal_lm_methods(LM, WHO, "gpt_neox_japanese", "embed_in", "embed_out", "num_hidden_layers")

return M
