--- Phi-1.5 and Phi-2 (transformers' PhiForCausalLM) with Hugging Face parameter names:
-- model.{embed_tokens, layers.N.{input_layernorm, self_attn.{q_proj, k_proj, v_proj, dense,
-- q_layernorm, k_layernorm}, mlp.{fc1, fc2}}, final_layernorm}, lm_head (with a bias). One
-- LayerNorm feeds attention and MLP in parallel: x + attn(ln(x)) + mlp(ln(x)); rotary embeddings
-- turn the first partial_rotary_factor of each head; qk_layernorm adds per-head LayerNorms.
-- Phi-3 and Phi-4 are models/llama.lua's Phi3ForCausalLM.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local generation = require("moonload.models.generation")
local llama = require("moonload.models.llama")

local M = {}
local WHO = "models.phi"

M.schema = {
   { "vocab_size", "int" },
   { "hidden_size", "int" },
   { "intermediate_size", "int" },
   { "num_hidden_layers", "int" },
   { "num_attention_heads", "int" },
   { "num_key_value_heads", "int", function(c) return c.num_attention_heads end },
   { "max_position_embeddings", "int", 2048 },
   { "layer_norm_eps", "posnum", 1e-5 },
   { "hidden_act", "string", "gelu_new" },
   { "qk_layernorm", "bool", false },
   { "tie_word_embeddings", "bool", false },
   { "rope_parameters", "table", function() return {} end },
   { "rope_scaling", "table", function() return {} end },
}

--- Reads and checks a Phi config (path, folder or table).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.hidden_size % cfg.num_attention_heads ~= 0 or cfg.num_attention_heads % cfg.num_key_value_heads ~= 0 then
      config.fail(cfg, WHO, "hidden_size %d, num_attention_heads %d and num_key_value_heads %d do not divide",
         cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
   end
   cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads
   local rp = cfg.rope_parameters
   cfg.rope = llama.rope_from(cfg, WHO, { { cfg.rope_scaling, "rope_scaling." }, { { rope_theta = cfg.rope_theta }, "" },
      { rp, "rope_parameters." } }, 10000)
   cfg.rope_theta = cfg.rope.rope_theta
   llama.set_rotary_dim(cfg, WHO, rp.partial_rotary_factor or cfg.partial_rotary_factor or 0.5)
   common.activation(cfg.hidden_act, WHO, cfg._source)
   return cfg
end

local PhiAttention = llama.LlamaAttention:extend("PhiAttention")
M.PhiAttention = PhiAttention

function PhiAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
   self.q_proj = nn.Linear(cfg.hidden_size, H * D)
   self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D)
   self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D)
   self.dense = nn.Linear(H * D, cfg.hidden_size)
   if cfg.qk_layernorm then
      self.q_layernorm = nn.LayerNorm(D, { eps = cfg.layer_norm_eps })
      self.k_layernorm = nn.LayerNorm(D, { eps = cfg.layer_norm_eps })
   end
   llama.attention_geometry(self, cfg, layer_idx)
end

--- Llama's attention with per-head LayerNorms, and its output projection named dense.
function PhiAttention:project(x, B, L)
   local q, k, v = llama.LlamaAttention.project(self, x, B, L)
   if self.q_layernorm then q, k = self.q_layernorm(q), self.k_layernorm(k) end
   return q, k, v
end

PhiAttention.out_name = "dense"

local PhiMLP = nn.Module:extend("PhiMLP")
M.PhiMLP = PhiMLP

function PhiMLP:__init(cfg)
   nn.Module.__init(self)
   self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
   self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
   self.activation_fn = common.activation_module(cfg.hidden_act, WHO, cfg._source)
end

function PhiMLP:forward(x) return self.fc2(self.activation_fn(self.fc1(x))) end

local PhiDecoderLayer = nn.Module:extend("PhiDecoderLayer")
M.PhiDecoderLayer = PhiDecoderLayer

function PhiDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = PhiAttention(cfg, layer_idx)
   self.mlp = PhiMLP(cfg)
   self.input_layernorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
end

PhiDecoderLayer.forward = llama.parallel_layer_forward

local PhiRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("PhiRotaryEmbedding")
M.PhiRotaryEmbedding = PhiRotaryEmbedding

local PhiModel = llama.LlamaModel:extend("PhiModel")
M.PhiModel = PhiModel

function PhiModel:__init(cfg)
   nn.Module.__init(self)
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = PhiDecoderLayer(cfg, i) end
   self.layers = nn.ModuleList(layers)
   self.final_layernorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
   self.rotary_emb = PhiRotaryEmbedding(cfg)
   rawset(self, "config", cfg)
end
PhiModel.norm_name = "final_layernorm"

local PhiForCausalLM = nn.Module:extend("PhiForCausalLM")
M.PhiForCausalLM = PhiForCausalLM
PhiForCausalLM.base_model_prefix = "model"
PhiForCausalLM.tied_weights = { ["lm_head.weight"] = "model.embed_tokens.weight" }
PhiForCausalLM.ignore_unexpected = { "rotary_emb%.inv_freq$" }
PhiForCausalLM.no_split_modules = { "PhiDecoderLayer" }

function PhiForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.model = PhiModel(cfg)
   self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.lm_head.weight = self.model.embed_tokens.weight end
end

PhiForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")
function PhiForCausalLM:new_cache(capacity, device, dtype)
   return common.new_cache(self.config.num_hidden_layers, capacity, device, dtype)
end
function PhiForCausalLM:max_length() return nil end
PhiForCausalLM.generate = generation.generate

return M
