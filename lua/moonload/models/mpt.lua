--- MPT (transformers' MptForCausalLM: mosaicml/mpt-7b and its -instruct, -chat, -storywriter, -8k
-- siblings, mpt-30b) with Hugging Face parameter names: transformer.{wte, blocks.N.{norm_1,
-- attn.{Wqkv, out_proj}, norm_2, ffn.{up_proj, down_proj}}, norm_f}, lm_head (tied to wte).
-- BLOOM's ALiBi attention (models/bloom.lua: no position embeddings, slope_h * key position added to
-- the scores) with MPT's slopes (BLOOM's when alibi_bias_max is 8, as it is), one fused Wqkv of q, then k, then v (clipped to +-clip_qkv when
-- the config says), scores scaled by softmax_scale (1/sqrt(head_dim) by default); LayerNorms and
-- projections without biases, an exact-GELU MLP expansion_ratio times as wide.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local bloom = require("moonload.models.bloom")

local M = {}
local WHO = "models.mpt"

M.schema = {
   { "vocab_size", "int" },
   { "d_model", "int" },
   { "n_heads", "int" },
   { "n_layers", "int" },
   { "max_seq_len", "int", 2048 },
   { "expansion_ratio", "int", 4 },
   { "layer_norm_epsilon", "posnum", 1e-5 },
   { "tie_word_embeddings", "bool", true },
   { "attn_config", "table", function() return {} end },
}

-- attn_config's keys: what they must be for the network transformers runs (its other keys,
-- attn_impl, attn_pdrop, attn_type, are about training or kernels)
local function attn_key(cfg, key, ok, what, default)
   local v = cfg.attn_config[key]
   if v == nil then return default end
   if not ok(v) then
      config.fail(cfg, WHO, 'config key "attn_config.%s" must be %s, got %s', key, what, tostring(v))
   end
   return v
end

local function positive(v) return type(v) == "number" and v > 0 end
local function is_false(v) return v == false end
local function is_true(v) return v == true end

--- Reads and checks an MPT config (path, folder or table); adds the names BLOOM's classes read
-- (hidden_size, n_head, n_layer, head_dim) and the attention's softmax_scale, clip_qkv and
-- alibi_bias_max.
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.d_model % cfg.n_heads ~= 0 then
      config.fail(cfg, WHO, "d_model %d is not a multiple of n_heads %d", cfg.d_model, cfg.n_heads)
   end
   if cfg.logit_scale ~= nil then
      config.fail(cfg, WHO, 'config key "logit_scale" is not supported (transformers ignores it), got %s', tostring(cfg.logit_scale))
   end
   cfg.softmax_scale = attn_key(cfg, "softmax_scale", positive, "a positive number or null")
   cfg.clip_qkv = attn_key(cfg, "clip_qkv", positive, "a positive number or null")
   cfg.alibi_bias_max = attn_key(cfg, "alibi_bias_max", positive, "a positive number", 8)
   -- (MPT's own code has these; transformers' network has not: refused rather than run differently)
   attn_key(cfg, "alibi", is_true, "true (ALiBi is MPT's only position information here)")
   attn_key(cfg, "qk_ln", is_false, "false (LayerNorms on q and k are not supported)")
   attn_key(cfg, "prefix_lm", is_false, "false (prefix-LM masking is not supported)")
   attn_key(cfg, "attn_uses_sequence_id", is_false, "false (sequence-id masking is not supported)")
   cfg.hidden_size, cfg.n_head, cfg.n_layer = cfg.d_model, cfg.n_heads, cfg.n_layers
   cfg.head_dim = cfg.d_model / cfg.n_heads
   return cfg
end

--- MPT's ALiBi slopes for n heads: 2^(-i * max / n') for i = 1 .. n', n' the power of two at or
-- above n; when n' > n, the even-numbered ones first, then the odd, the first n of them.
function M.alibi_slopes(n, max)
   local n2 = 2 ^ math.ceil(math.log(n) / math.log(2) - 1e-9)
   local slopes = {}
   for i = 1, n2 do slopes[i] = 1 / 2 ^ (i * max / n2) end
   if n2 == n then return slopes end
   local picked = {}
   for i = 2, n2, 2 do picked[#picked + 1] = slopes[i] end
   for i = 1, n2, 2 do picked[#picked + 1] = slopes[i] end
   return { unpack(picked, 1, n) }
end

-- --- layers -----------------------------------------------------------------------------------

local MptAttention = bloom.BloomAttention:extend("MptAttention")
M.MptAttention = MptAttention
MptAttention.out_name = "out_proj"

function MptAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.Wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, { bias = false })
   self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, { bias = false })
   bloom.attention_fields(self, cfg, layer_idx, cfg.softmax_scale or 1 / math.sqrt(cfg.head_dim))
   rawset(self, "clip_qkv", cfg.clip_qkv)
end

--- q, k, v (B, H, T, D) from x (B, T, d_model): Wqkv's q, k and v one after the other.
function MptAttention:project(x, B, L)
   local H, D, C = self.n_head, self.head_dim, self.n_head * self.head_dim
   local qkv = self.Wqkv(x)
   local c = self.clip_qkv
   if c then qkv = qkv:clamp(-c, c) end
   local function heads(i) return qkv:narrow(3, i * C + 1, C):view(B, L, H, D):transpose(2, 3) end
   return heads(0), heads(1), heads(2)
end

local MptMLP = nn.Module:extend("MptMLP")
M.MptMLP = MptMLP

function MptMLP:__init(cfg)
   nn.Module.__init(self)
   local inner = cfg.expansion_ratio * cfg.d_model
   self.up_proj = nn.Linear(cfg.d_model, inner, { bias = false })
   self.act = nn.GELU()
   self.down_proj = nn.Linear(inner, cfg.d_model, { bias = false })
end

function MptMLP:forward(x) return self.down_proj(self.act(self.up_proj(x))) end

local MptBlock = nn.Module:extend("MptBlock")
M.MptBlock = MptBlock

function MptBlock:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.norm_1 = nn.LayerNorm(cfg.d_model, { eps = cfg.layer_norm_epsilon, bias = false })
   self.attn = MptAttention(cfg, layer_idx)
   self.norm_2 = nn.LayerNorm(cfg.d_model, { eps = cfg.layer_norm_epsilon, bias = false })
   self.ffn = MptMLP(cfg)
end

function MptBlock:forward(x, cache, bias)
   x = x + self.attn(self.norm_1(x), cache, bias)
   return x + self.ffn(self.norm_2(x))
end

-- --- models ---------------------------------------------------------------------------------

-- BLOOM's model (its ALiBi bias, counted from the padding mask: the same softmax as transformers'
-- MPT bias, which counts from the first slot) over these blocks, embeddings without a norm.
local MptModel = bloom.BloomModel:extend("MptModel")
M.MptModel = MptModel
MptModel.blocks_name, MptModel.norm_name = "blocks", "norm_f"

function MptModel:__init(cfg)
   nn.Module.__init(self)
   self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
   local blocks = {}
   for i = 1, cfg.n_layers do blocks[i] = MptBlock(cfg, i) end
   self.blocks = nn.ModuleList(blocks)
   self.norm_f = nn.LayerNorm(cfg.d_model, { eps = cfg.layer_norm_epsilon, bias = false })
   rawset(self, "config", cfg)
   rawset(self, "slopes", M.alibi_slopes(cfg.n_heads, cfg.alibi_bias_max))
end

function MptModel:embed(input_ids) return self.wte(input_ids) end

--- BLOOM's forward, within max_seq_len positions (transformers' ALiBi table has no more).
function MptModel:forward(input_ids, cache, pad, pos, blocks)
   common.check_positions(WHO, cache and cache.length or 0, input_ids:size(2), self.config.max_seq_len, "max_seq_len", 3)
   return bloom.BloomModel.forward(self, input_ids, cache, pad, pos, blocks)
end

local MptForCausalLM = nn.Module:extend("MptForCausalLM")
M.MptForCausalLM = MptForCausalLM
MptForCausalLM.base_model_prefix = "transformer"
MptForCausalLM.tied_weights = { ["lm_head.weight"] = "transformer.wte.weight" }
MptForCausalLM.no_split_modules = { "MptBlock" }

--- MptForCausalLM(config): config is a config.json path, a folder holding one, or a table.
function MptForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.transformer = MptModel(cfg)
   self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.lm_head.weight = self.transformer.wte.weight end
end

common.causal_lm_methods(MptForCausalLM, WHO, "transformer", "wte", nil, "n_layers", "max_seq_len")

function M.from_config(cfg) return MptForCausalLM(cfg) end

return M
