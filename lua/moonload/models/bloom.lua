--- BLOOM (transformers' BloomForCausalLM: bigscience/bloom-560m .. bloom 176B, the model of
-- Accelerate's big-model inference blog) with Hugging Face parameter names:
-- transformer.{word_embeddings, word_embeddings_layernorm, h.N.{input_layernorm,
-- self_attention.{query_key_value, dense}, post_attention_layernorm, mlp.{dense_h_to_4h,
-- dense_4h_to_h}}, ln_f}, lm_head (tied to word_embeddings). No position embeddings: ALiBi adds
-- slope_h * (key position) to head h's scores (the same softmax as slope_h * (key - query)),
-- positions counted from the attention mask; each head's q, k and v sit side by side in
-- query_key_value; the embeddings go through a LayerNorm; GELU (tanh form) MLP.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local block_schedule = require("moonload.models.block_schedule")

local M = {}
local WHO = "models.bloom"

M.schema = {
   { "vocab_size", "int" },
   { "hidden_size", "int" },
   { "layer_norm_epsilon", "posnum", 1e-5 },
   { "apply_residual_connection_post_layernorm", "bool", false },
   { "tie_word_embeddings", "bool", true },
}

--- Reads and checks a BLOOM config (path, folder or table); n_layer and n_head, or their
-- num_hidden_layers and num_attention_heads spellings.
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   for _, names in ipairs({ { "n_layer", "num_hidden_layers" }, { "n_head", "num_attention_heads" } }) do
      local v = cfg[names[1]] or cfg[names[2]]
      if type(v) ~= "number" or v ~= math.floor(v) or v < 1 then
         config.fail(cfg, WHO, 'config key "%s" (or "%s") must be a positive integer, got %s', names[1], names[2], tostring(v))
      end
      cfg[names[1]] = v
   end
   if cfg.hidden_size % cfg.n_head ~= 0 then
      config.fail(cfg, WHO, "hidden_size %d is not a multiple of n_head %d", cfg.hidden_size, cfg.n_head)
   end
   cfg.num_hidden_layers, cfg.head_dim = cfg.n_layer, cfg.hidden_size / cfg.n_head
   return cfg
end

--- ALiBi's slopes for n heads (Press et al.): a geometric sequence from 2^(-8/n') for the largest
-- power of two n' <= n, then every other one of the sequence for 2n' for the heads past n'.
function M.alibi_slopes(n)
   local closest = 2 ^ math.floor(math.log(n) / math.log(2))
   local base = 2 ^ (-(2 ^ -(math.log(closest) / math.log(2) - 3)))
   local slopes = {}
   for i = 1, closest do slopes[i] = base ^ i end
   if closest ~= n then
      local extra = 2 ^ (-(2 ^ -(math.log(2 * closest) / math.log(2) - 3)))
      for i = 1, math.min(closest, n - closest) do slopes[#slopes + 1] = extra ^ (2 * i - 1) end
   end
   return slopes
end

local BloomAttention = nn.Module:extend("BloomAttention")
M.BloomAttention = BloomAttention

--- Key/value heads and head size per cached token, and no score tensor (see LlamaAttention).
function BloomAttention:kv_cache_heads() return self.n_head, self.head_dim, self.n_head, false end

function BloomAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
   self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
   M.attention_fields(self, cfg, layer_idx, 1 / math.sqrt(cfg.head_dim))
end

--- The plain fields an ALiBi attention reads in forward (BLOOM's, MPT's).
function M.attention_fields(self, cfg, layer_idx, scale)
   rawset(self, "n_head", cfg.n_head)
   rawset(self, "head_dim", cfg.head_dim)
   rawset(self, "layer_idx", layer_idx)
   rawset(self, "scale", scale)
end

BloomAttention.out_name = "dense"             -- the output projection's attribute (MPT: out_proj)

--- q, k, v (B, H, T, D) from x (B, T, hidden): each head's q, k and v side by side.
function BloomAttention:project(x, B, L)
   local H, D = self.n_head, self.head_dim
   local qkv = self.query_key_value(x):view(B, L, H, 3 * D):transpose(2, 3)      -- (B, H, T, 3D)
   return qkv:narrow(4, 1, D), qkv:narrow(4, D + 1, D), qkv:narrow(4, 2 * D + 1, D)
end

--- bias: ALiBi plus -inf where a key is hidden, (B or 1, H, L or 1, S) (BloomModel:attention_bias).
function BloomAttention:forward(x, cache, bias)
   local B, L = x:size(1), x:size(2)
   local q, k, v = self:project(x, B, L)
   if cache then k, v = cache:update(self.layer_idx, k, v:contiguous()) end
   local qa, ba, back = common.queries_to_keys(q, k, bias)
   local causal = rawget(bias, "_causal") == true
   local y = common.attention(qa, k, v, ba, causal, self.scale)                   -- (B, H, T, D)
   if back then y = y:to(back) end
   return self[self.out_name](y:transpose(2, 3):reshape(B, L, self.n_head * self.head_dim))
end

local BloomMLP = nn.Module:extend("BloomMLP")
M.BloomMLP = BloomMLP

function BloomMLP:__init(cfg)
   nn.Module.__init(self)
   self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size)
   self.dense_4h_to_h = nn.Linear(4 * cfg.hidden_size, cfg.hidden_size)
   self.gelu_impl = nn.GELU({ approximate = "tanh" })
end

function BloomMLP:forward(x) return self.dense_4h_to_h(self.gelu_impl(self.dense_h_to_4h(x))) end

local BloomBlock = nn.Module:extend("BloomBlock")
M.BloomBlock = BloomBlock

function BloomBlock:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.input_layernorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_epsilon })
   self.self_attention = BloomAttention(cfg, layer_idx)
   self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_epsilon })
   self.mlp = BloomMLP(cfg)
   rawset(self, "residual_after_norm", cfg.apply_residual_connection_post_layernorm)
end

function BloomBlock:forward(x, cache, bias)
   local normed = self.input_layernorm(x)
   local h = (self.residual_after_norm and normed or x) + self.self_attention(normed, cache, bias)
   normed = self.post_attention_layernorm(h)
   return (self.residual_after_norm and normed or h) + self.mlp(normed)
end

local BloomModel = nn.Module:extend("BloomModel")
M.BloomModel = BloomModel

function BloomModel:__init(cfg)
   nn.Module.__init(self)
   self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_epsilon })
   local blocks = {}
   for i = 1, cfg.n_layer do blocks[i] = BloomBlock(cfg, i) end
   self.h = nn.ModuleList(blocks)
   self.ln_f = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_epsilon })
   rawset(self, "config", cfg)
   rawset(self, "slopes", M.alibi_slopes(cfg.n_head))
end

--- The scores' bias for L queries after past cached tokens: slope_h * (key position) with
-- positions counted from the padding mask (pad (B, S) bool or nil), and -inf where a key is
-- padding. A prompt's forward (past 0) gets it as one row per head, (B or 1, H, 1, S), flagged
-- _causal: the kernel adds it under its causal triangle, and no (L, S) bias is made (512 MB for
-- 2048 tokens of BLOOM-7B1's 32 heads). Otherwise (the cache holds earlier tokens, or a block
-- schedule cuts the queries) the bias is (B or 1, H, L, S) with -inf on the later keys too.
function BloomModel:attention_bias(L, past, pad, device, whole)
   local S, H = past + L, self.config.n_head
   local positions
   if pad then
      local m = pad:to("int64")
      positions = ((m:cumsum(2) - 1) * m):to("float32"):view(pad:size(1), 1, 1, S)
   else
      positions = T.arange(0, S, { device = device }):to("float32"):view(1, 1, 1, S)
   end
   local slopes = T.tensor(self.slopes, { dtype = "float32" }):to(device):view(1, H, 1, 1)
   local bias = slopes * positions                                              -- (B or 1, H, 1, S)
   if past == 0 and L > 1 and not whole then
      if pad then
         bias = bias + T.zeros({ pad:size(1), 1, 1, S }, { dtype = "float32", device = device })
            :masked_fill(pad:logical_not():view(pad:size(1), 1, 1, S), -math.huge)
      end
      rawset(bias, "_causal", true)
      return bias
   end
   local keep = common.attention_mask(L, S, pad, nil, device)                   -- (B, 1, L, S), (L, S) or nil
   if keep == nil then return bias end
   local hidden = T.zeros(keep.shape, { dtype = "float32", device = device }):masked_fill(keep:logical_not(), -math.huge)
   if hidden:dim() == 2 then hidden = hidden:view(1, 1, L, S) end
   return bias + hidden
end

-- the block list and the final norm, by name (MPT: blocks, norm_f)
BloomModel.blocks_name, BloomModel.norm_name = "h", "ln_f"

--- The token embeddings: through a LayerNorm here (MPT's are not).
function BloomModel:embed(input_ids)
   return self.word_embeddings_layernorm(self.word_embeddings(input_ids))
end

function BloomModel:forward(input_ids, cache, pad, pos, blocks)
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   local x = self:embed(input_ids)
   local bias = self:attention_bias(L, past, pad, x.device, blocks ~= nil)
   if bias.dtype ~= x.dtype then                  -- (once here, not in every layer)
      local causal = rawget(bias, "_causal")
      bias = bias:to(x.dtype)
      rawset(bias, "_causal", causal)
   end
   if blocks and bias:size(3) == 1 and L > 1 then bias = bias:expand(bias:size(1), bias:size(2), L, bias:size(4)) end
   local n = self.config.n_layer
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, WHO)
   for i = 1, n do x = block_schedule.call(schedule, i, self[self.blocks_name][i], x, cache, bias) end
   if cache then cache:advance(L) end
   return self[self.norm_name](x)
end

local BloomForCausalLM = nn.Module:extend("BloomForCausalLM")
M.BloomForCausalLM = BloomForCausalLM
BloomForCausalLM.base_model_prefix = "transformer"
BloomForCausalLM.tied_weights = { ["lm_head.weight"] = "transformer.word_embeddings.weight" }
BloomForCausalLM.no_split_modules = { "BloomBlock" }

function BloomForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.transformer = BloomModel(cfg)
   self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.lm_head.weight = self.transformer.word_embeddings.weight end
end

common.causal_lm_methods(BloomForCausalLM, WHO, "transformer", "word_embeddings", nil, "n_layer") -- (ALiBi: no max_length)

function M.from_config(cfg) return BloomForCausalLM(cfg) end

return M
