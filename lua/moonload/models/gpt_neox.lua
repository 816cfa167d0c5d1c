--- GPT-NeoX (transformers' GPTNeoXForCausalLM: Pythia, GPT-NeoX-20B) with Hugging Face parameter
-- names: gpt_neox.{embed_in, layers.N.{input_layernorm, post_attention_layernorm,
-- attention.{query_key_value, dense}, mlp.{dense_h_to_4h, dense_4h_to_h}}, final_layer_norm},
-- embed_out. Each head's q, k and v sit side by side in query_key_value; rotary embeddings turn
-- the first partial_rotary_factor (rotary_pct) of each head; LayerNorms have biases; with
-- use_parallel_residual (the default) attention and MLP both read the layer's input:
-- x + attn(ln1(x)) + mlp(ln2(x)).
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")

local M = {}
local WHO = "models.gpt_neox"

M.schema = {
   { "vocab_size", "int" },
   { "hidden_size", "int" },
   { "num_hidden_layers", "int" },
   { "num_attention_heads", "int" },
   { "intermediate_size", "int", function(c) return 4 * c.hidden_size end },
   { "max_position_embeddings", "int", 2048 },
   { "layer_norm_eps", "posnum", 1e-5 },
   { "hidden_act", "string", "gelu" },
   { "use_parallel_residual", "bool", true },
   { "attention_bias", "bool", true },
   { "tie_word_embeddings", "bool", false },
   { "rope_parameters", "table", function() return {} end },
   { "rope_scaling", "table", function() return {} end },
}

--- Reads and checks a GPT-NeoX config (path, folder or table). The rotary fraction and base come
-- from rope_parameters (transformers 5) or rotary_pct and rotary_emb_base (older files). family: a
-- family on these layers with its own {schema, who, rotary_pct (the default)} (models/gpt_neox_japanese.lua).
function M.config(source, family)
   family = family or { schema = M.schema, who = WHO, rotary_pct = 0.25 }
   local who = family.who
   local cfg = config.load(source, family.schema, who)
   if cfg.hidden_size % cfg.num_attention_heads ~= 0 then
      config.fail(cfg, who, "hidden_size %d is not a multiple of num_attention_heads %d", cfg.hidden_size,
         cfg.num_attention_heads)
   end
   cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads
   cfg.num_key_value_heads = cfg.num_attention_heads
   local rp = cfg.rope_parameters
   cfg.rope = llama.rope_from(cfg, who, { { cfg.rope_scaling, "rope_scaling." },
      { { rope_theta = cfg.rotary_emb_base }, "" }, { rp, "rope_parameters." } }, 10000)
   cfg.rope_theta = cfg.rope.rope_theta
   llama.set_rotary_dim(cfg, who, rp.partial_rotary_factor or cfg.rotary_pct or family.rotary_pct)
   common.activation(cfg.hidden_act, who, cfg._source)
   return cfg
end

local GPTNeoXAttention = nn.Module:extend("GPTNeoXAttention")

--- Key/value heads and head size per cached token, and no score tensor (see LlamaAttention).
function GPTNeoXAttention:kv_cache_heads() return self.n_head, self.head_dim, self.n_head, false end
M.GPTNeoXAttention = GPTNeoXAttention

function GPTNeoXAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, { bias = cfg.attention_bias })
   self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, { bias = cfg.attention_bias })
   rawset(self, "n_head", cfg.num_attention_heads)
   rawset(self, "head_dim", cfg.head_dim)
   rawset(self, "scale", 1 / math.sqrt(cfg.head_dim))
   rawset(self, "layer_idx", layer_idx)
end

function GPTNeoXAttention:forward(x, cos, sin, cache, pad)
   local B, L = x:size(1), x:size(2)
   local H, D = self.n_head, self.head_dim
   local qkv = self.query_key_value(x):view(B, L, H, 3 * D):transpose(2, 3)      -- (B, H, T, 3D)
   local q, k, v = qkv:narrow(4, 1, D), qkv:narrow(4, D + 1, D), qkv:narrow(4, 2 * D + 1, D)
   q, k = llama.apply_rotary(q, cos, sin), llama.apply_rotary(k, cos, sin)
   local past = 0
   if cache then
      past = cache.length
      k, v = cache:update(self.layer_idx, k, v:contiguous())
   end
   local qa, pa, back = common.queries_to_keys(q, k, pad)
   local y = common.causal_attention(qa, k, v, past, self.scale, pa)             -- (B, H, T, D)
   if back then y = y:to(back) end
   return self.dense(y:transpose(2, 3):reshape(B, L, H * D))
end

local GPTNeoXMLP = nn.Module:extend("GPTNeoXMLP")
M.GPTNeoXMLP = GPTNeoXMLP

function GPTNeoXMLP:__init(cfg)
   nn.Module.__init(self)
   self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
   self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
   self.act = common.activation_module(cfg.hidden_act, WHO, cfg._source)
end

function GPTNeoXMLP:forward(x) return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x))) end

local GPTNeoXLayer = nn.Module:extend("GPTNeoXLayer")
M.GPTNeoXLayer = GPTNeoXLayer

function GPTNeoXLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.input_layernorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
   self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
   self.attention = GPTNeoXAttention(cfg, layer_idx)
   self.mlp = GPTNeoXMLP(cfg)
   rawset(self, "parallel", cfg.use_parallel_residual)
end

function GPTNeoXLayer:forward(x, cos, sin, cache, pad)
   local a = self.attention(self.input_layernorm(x), cos, sin, cache, pad)
   if self.parallel then return x + a + self.mlp(self.post_attention_layernorm(x)) end
   local h = x + a
   return h + self.mlp(self.post_attention_layernorm(h))
end

local GPTNeoXRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("GPTNeoXRotaryEmbedding")
M.GPTNeoXRotaryEmbedding = GPTNeoXRotaryEmbedding

local GPTNeoXModel = llama.LlamaModel:extend("GPTNeoXModel")
M.GPTNeoXModel = GPTNeoXModel

-- Llama's forward (positions, rotary tables, cache, block schedule) over these layers
GPTNeoXModel.embed_name, GPTNeoXModel.layers_name, GPTNeoXModel.norm_name = "embed_in", "layers", "final_layer_norm"

function GPTNeoXModel:__init(cfg)
   self:build_parts(cfg, cfg.hidden_size, GPTNeoXLayer, cfg.num_hidden_layers,
      nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps }), GPTNeoXRotaryEmbedding)
end

local GPTNeoXForCausalLM = nn.Module:extend("GPTNeoXForCausalLM")
M.GPTNeoXForCausalLM = GPTNeoXForCausalLM
GPTNeoXForCausalLM.base_model_prefix = "gpt_neox"
GPTNeoXForCausalLM.tied_weights = { ["embed_out.weight"] = "gpt_neox.embed_in.weight" }
GPTNeoXForCausalLM.ignore_unexpected = { "rotary_emb%.inv_freq$", "attention%.bias$", "attention%.masked_bias$" }
GPTNeoXForCausalLM.no_split_modules = { "GPTNeoXLayer" }

function GPTNeoXForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.gpt_neox = GPTNeoXModel(cfg)
   self.embed_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.embed_out.weight = self.gpt_neox.embed_in.weight end
end

common.causal_lm_methods(GPTNeoXForCausalLM, WHO, "gpt_neox", "embed_in", "embed_out", "num_hidden_layers")

return M
