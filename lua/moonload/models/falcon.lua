--- Falcon (transformers' FalconForCausalLM: tiiuae/falcon-7b, -40b, -180b, Falcon 2 and 3's
-- layouts) with Hugging Face parameter names: transformer.{word_embeddings, h.N.{input_layernorm
-- or ln_attn and ln_mlp, post_attention_layernorm, self_attention.{query_key_value, dense},
-- mlp.{dense_h_to_4h, dense_4h_to_h}}, ln_f}, lm_head (tied to word_embeddings). Rotary
-- embeddings (rotate-half, as Llama's). The fused query_key_value holds, per layout:
--   new_decoder_architecture (40b, 180b): for each of num_kv_heads groups, its query heads then
--     one key and one value head (grouped-query attention);
--   multi_query (7b): every query head, then one key and one value head shared by all;
--   neither: q, k and v side by side for each head.
-- Attention and MLP read the same normed input and add to the residual together
-- (parallel_attn), with one LayerNorm or, in the new layout, one each (num_ln_in_parallel_attn);
-- without parallel_attn they run one after the other. ALiBi checkpoints (falcon-rw) are refused.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")

local M = {}
local WHO = "models.falcon"

M.schema = {
   { "vocab_size", "int" },
   { "hidden_size", "int" },
   { "num_hidden_layers", "int" },
   { "num_attention_heads", "int" },
   { "num_kv_heads", "int", function(c) return c.num_attention_heads end },
   { "new_decoder_architecture", "bool", false },
   { "multi_query", "bool", true },
   { "parallel_attn", "bool", true },
   { "bias", "bool", false },
   { "alibi", "bool", false },
   { "layer_norm_epsilon", "posnum", 1e-5 },
   { "max_position_embeddings", "int", 2048 },
   { "ffn_hidden_size", "int", function(c) return 4 * c.hidden_size end },
   { "activation", "string", "gelu" },
   { "tie_word_embeddings", "bool", true },
   { "rope_parameters", "table", function() return {} end },
   { "rope_scaling", "table", function() return {} end },
}

--- Reads and checks a Falcon config (path, folder or table).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.alibi then
      config.fail(cfg, WHO, "alibi = true (falcon-rw's ALiBi attention) is not supported")
   end
   local H = cfg.num_attention_heads
   if cfg.hidden_size % H ~= 0 then
      config.fail(cfg, WHO, "hidden_size %d is not a multiple of num_attention_heads %d", cfg.hidden_size, H)
   end
   cfg.head_dim = cfg.hidden_size / H
   -- key/value heads: the groups of the new layout, one shared (multi-query), else one per head
   if cfg.new_decoder_architecture then
      if H % cfg.num_kv_heads ~= 0 then
         config.fail(cfg, WHO, "num_attention_heads %d is not a multiple of num_kv_heads %d", H, cfg.num_kv_heads)
      end
      cfg.kv_heads = cfg.num_kv_heads
   else
      cfg.kv_heads = cfg.multi_query and 1 or H
   end
   local n_ln = cfg.num_ln_in_parallel_attn
   if n_ln == nil then n_ln = cfg.new_decoder_architecture and 2 or 1 end
   cfg.two_norms = cfg.parallel_attn and cfg.new_decoder_architecture and n_ln == 2
   cfg.rope = llama.rope_from(cfg, WHO, { { cfg.rope_scaling, "rope_scaling." },
      { { rope_theta = cfg.rope_theta }, "" }, { cfg.rope_parameters, "rope_parameters." } }, 10000)
   cfg.rope_theta = cfg.rope.rope_theta
   llama.set_rotary_dim(cfg, WHO, 1.0)
   common.activation(cfg.activation, WHO, cfg._source)
   return cfg
end

local FalconAttention = nn.Module:extend("FalconAttention")
M.FalconAttention = FalconAttention

--- Key/value heads and head size per cached token, and no score tensor (see LlamaAttention).
function FalconAttention:kv_cache_heads() return self.n_kv, self.head_dim, self.n_head, false end

function FalconAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, Hkv, D = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
   self.query_key_value = nn.Linear(cfg.hidden_size, (H + 2 * Hkv) * D, { bias = cfg.bias })
   self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, { bias = cfg.bias })
   rawset(self, "n_head", H)
   rawset(self, "n_kv", Hkv)
   rawset(self, "head_dim", D)
   rawset(self, "grouped", cfg.new_decoder_architecture)
   rawset(self, "layer_idx", layer_idx)
end

--- The fused projection (B, L, (H + 2 Hkv) D) as q (B, H, L, D), k and v (B, Hkv, L, D).
function FalconAttention:split(qkv, B, L)
   local H, Hkv, D = self.n_head, self.n_kv, self.head_dim
   local q, k, v
   if self.grouped or Hkv == 1 then
      -- per group: its H / Hkv query heads, then its key head and its value head
      local G = H / Hkv
      local g = qkv:view(B, L, Hkv, G + 2, D)
      q = g:narrow(4, 1, G):reshape(B, L, H, D)
      k, v = g:select(4, G + 1), g:select(4, G + 2)
   else
      local g = qkv:view(B, L, H, 3, D)
      q, k, v = g:select(4, 1), g:select(4, 2), g:select(4, 3)
   end
   return q:transpose(2, 3), k:transpose(2, 3), v:transpose(2, 3)
end

function FalconAttention:forward(x, cos, sin, cache, pad)
   local B, L = x:size(1), x:size(2)
   local q, k, v = self:split(self.query_key_value(x), B, L)
   q, k = llama.apply_rotary(q, cos, sin), llama.apply_rotary(k, cos, sin)
   local past = 0
   if cache then
      past = cache.length
      k, v = cache:update(self.layer_idx, k, v:contiguous())
   end
   local qa, pa, back = common.queries_to_keys(q, k, pad)
   local y = common.gqa_attention(qa, k, v, past, 1 / math.sqrt(self.head_dim), pa)   -- (B, H, T, D)
   if back then y = y:to(back) end
   return self.dense(y:transpose(2, 3):reshape(B, L, self.n_head * self.head_dim))
end

local FalconMLP = nn.Module:extend("FalconMLP")
M.FalconMLP = FalconMLP

function FalconMLP:__init(cfg)
   nn.Module.__init(self)
   self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, { bias = cfg.bias })
   self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, { bias = cfg.bias })
   self.act = common.activation_module(cfg.activation, WHO, cfg._source)
end

function FalconMLP:forward(x) return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x))) end

local FalconDecoderLayer = nn.Module:extend("FalconDecoderLayer")
M.FalconDecoderLayer = FalconDecoderLayer

function FalconDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local function ln() return nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_epsilon }) end
   self.self_attention = FalconAttention(cfg, layer_idx)
   self.mlp = FalconMLP(cfg)
   if cfg.two_norms then
      self.ln_attn, self.ln_mlp = ln(), ln()
   else
      self.input_layernorm = ln()
      if not cfg.parallel_attn then self.post_attention_layernorm = ln() end
   end
   rawset(self, "parallel", cfg.parallel_attn)
end

function FalconDecoderLayer:forward(x, cos, sin, cache, pad)
   if not self.parallel then
      local h = x + self.self_attention(self.input_layernorm(x), cos, sin, cache, pad)
      return h + self.mlp(self.post_attention_layernorm(h))
   end
   local normed = self.ln_attn and self.ln_attn(x) or self.input_layernorm(x)
   local a = self.self_attention(normed, cos, sin, cache, pad)
   return x + a + self.mlp(self.ln_mlp and self.ln_mlp(x) or normed)
end

local FalconRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("FalconRotaryEmbedding")
M.FalconRotaryEmbedding = FalconRotaryEmbedding

local FalconModel = llama.LlamaModel:extend("FalconModel")
M.FalconModel = FalconModel

-- Llama's forward (positions, rotary tables, cache, block schedule) over these layers
FalconModel.embed_name, FalconModel.layers_name, FalconModel.norm_name = "word_embeddings", "h", "ln_f"

function FalconModel:__init(cfg)
   self:build_parts(cfg, cfg.hidden_size, FalconDecoderLayer, cfg.num_hidden_layers,
      nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_epsilon }), FalconRotaryEmbedding)
end

local FalconForCausalLM = nn.Module:extend("FalconForCausalLM")
M.FalconForCausalLM = FalconForCausalLM
FalconForCausalLM.base_model_prefix = "transformer"
FalconForCausalLM.tied_weights = { ["lm_head.weight"] = "transformer.word_embeddings.weight" }
FalconForCausalLM.no_split_modules = { "FalconDecoderLayer" }

function FalconForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.transformer = FalconModel(cfg)
   self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.lm_head.weight = self.transformer.word_embeddings.weight end
end

common.causal_lm_methods(FalconForCausalLM, WHO, "transformer", "word_embeddings", nil, "num_hidden_layers") -- (rotary embeddings: no max_length)

function M.from_config(cfg) return FalconForCausalLM(cfg) end

return M
