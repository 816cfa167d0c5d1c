--- Persimmon (transformers' PersimmonForCausalLM: adept/persimmon-8b-base and -chat, and the
-- language model of Fuyu-8B) with Hugging Face parameter names: model.{embed_tokens,
-- layers.N.{self_attn.{query_key_value, dense, q_layernorm, k_layernorm}, mlp.{dense_h_to_4h,
-- dense_4h_to_h}, input_layernorm, post_attention_layernorm}, final_layernorm}, lm_head.
-- Llama's sequential layer with LayerNorms (with biases) in place of RMSNorms; one fused,
-- biased query_key_value holding each head's q, k and v side by side (GPT-NeoX's layout); with
-- qk_layernorm (the default) one LayerNorm over each head's dims for all query heads and one for
-- all key heads, before the rotary embedding; rotary embeddings over the first
-- partial_rotary_factor of each head (0.5 by default; rotate-half); a ReLU² MLP without a gate.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local phi = require("moonload.models.phi")
local gpt_neox = require("moonload.models.gpt_neox")

local M = {}
local WHO = "models.persimmon"

-- Phi's keys with Persimmon's defaults (its heads all have their own keys and values).
M.schema = config.schema_from(phi.schema, {
   num_key_value_heads = false,
   max_position_embeddings = { "max_position_embeddings", "int", 16384 },
   hidden_act = { "hidden_act", "string", "relu2" },
   qk_layernorm = { "qk_layernorm", "bool", true },
})

--- Reads and checks a Persimmon config (path, folder or table) into what Llama's classes read:
-- head_dim, num_key_value_heads, rope (rope_theta, ...), rotary_dim, and rms_norm_eps (here the
-- LayerNorms' eps). The rotary base and fraction come from rope_parameters (transformers 5) or
-- the top level's rope_theta and partial_rotary_factor (the hub's files).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.hidden_size % cfg.num_attention_heads ~= 0 then
      config.fail(cfg, WHO, "hidden_size %d is not a multiple of num_attention_heads %d", cfg.hidden_size,
         cfg.num_attention_heads)
   end
   cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads
   cfg.num_key_value_heads = cfg.num_attention_heads
   local rp = cfg.rope_parameters
   cfg.rope = llama.rope_from(cfg, WHO, { { cfg.rope_scaling, "rope_scaling." }, { { rope_theta = cfg.rope_theta }, "" },
      { rp, "rope_parameters." } }, 10000)
   cfg.rope_theta = cfg.rope.rope_theta
   llama.set_rotary_dim(cfg, WHO, rp.partial_rotary_factor or cfg.partial_rotary_factor or 0.5)
   common.activation(cfg.hidden_act, WHO, cfg._source)
   cfg.rms_norm_eps = cfg.layer_norm_eps     -- (Llama's layers read their norms' eps there)
   return cfg
end

-- --- attention, MLP, layer ------------------------------------------------------------------

local PersimmonAttention = llama.LlamaAttention:extend("PersimmonAttention")
M.PersimmonAttention = PersimmonAttention
PersimmonAttention.out_name = "dense"

function PersimmonAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local C, D = cfg.hidden_size, cfg.head_dim
   self.query_key_value = nn.Linear(C, 3 * C)
   self.dense = nn.Linear(C, C)
   if cfg.qk_layernorm then
      self.q_layernorm = nn.LayerNorm(D, { eps = cfg.layer_norm_eps })
      self.k_layernorm = nn.LayerNorm(D, { eps = cfg.layer_norm_eps })
   end
   llama.attention_geometry(self, cfg, layer_idx)
end

--- q, k, v (B, T, H, D) from x (B, T, hidden): query_key_value's (B, T, H, 3D) split per head,
-- then the q/k LayerNorms.
function PersimmonAttention:project(x, B, L)
   local H, D = self.n_head, self.head_dim
   local qkv = self.query_key_value(x):view(B, L, H, 3 * D)
   local q, k, v = qkv:narrow(4, 1, D), qkv:narrow(4, D + 1, D), qkv:narrow(4, 2 * D + 1, D):contiguous()
   if self.q_layernorm then q, k = self.q_layernorm(q), self.k_layernorm(k) end
   return q, k, v
end

local PersimmonMLP = gpt_neox.GPTNeoXMLP:extend("PersimmonMLP")
M.PersimmonMLP = PersimmonMLP

local PersimmonDecoderLayer = llama.LlamaDecoderLayer:extend("PersimmonDecoderLayer")
M.PersimmonDecoderLayer = PersimmonDecoderLayer
PersimmonDecoderLayer.Attention, PersimmonDecoderLayer.MLP = PersimmonAttention, PersimmonMLP
PersimmonDecoderLayer.Norm = nn.LayerNorm

-- --- models ---------------------------------------------------------------------------------

local PersimmonRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("PersimmonRotaryEmbedding")
M.PersimmonRotaryEmbedding = PersimmonRotaryEmbedding

local PersimmonModel = llama.LlamaModel:extend("PersimmonModel")
M.PersimmonModel = PersimmonModel
PersimmonModel.norm_name = "final_layernorm"

--- PersimmonModel(config): a config path, folder or table, or one M.config has checked.
function PersimmonModel:__init(cfg)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = M.config(cfg) end
   self:build_parts(cfg, cfg.hidden_size, PersimmonDecoderLayer, cfg.num_hidden_layers,
      nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps }), PersimmonRotaryEmbedding)
end

local PersimmonForCausalLM = llama.LlamaForCausalLM:extend("PersimmonForCausalLM")
M.PersimmonForCausalLM = PersimmonForCausalLM
PersimmonForCausalLM.family, PersimmonForCausalLM.Model = "persimmon", PersimmonModel
PersimmonForCausalLM.no_split_modules = { "PersimmonDecoderLayer" }

function PersimmonForCausalLM:read_config(source) return M.config(source) end

PersimmonForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")

function M.from_config(cfg) return PersimmonForCausalLM(cfg) end

return M
