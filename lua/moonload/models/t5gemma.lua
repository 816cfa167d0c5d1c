--- T5Gemma (transformers' T5GemmaForConditionalGeneration: google/t5gemma-2b-2b-ul2, -prefixlm,
-- -ul2-it, -prefixlm-it, google/t5gemma-9b-2b-*, -9b-9b-*, -s-s-*, -b-b-*, ...) with Hugging Face
-- parameter names: model.{encoder.{embed_tokens, layers.N.{self_attn.{q,k,v,o}_proj,
-- pre_self_attn_layernorm, post_self_attn_layernorm, mlp.{gate,up,down}_proj,
-- pre_feedforward_layernorm, post_feedforward_layernorm}, norm}, decoder.{the same, plus
-- layers.N.{cross_attn.{q,k,v,o}_proj, pre_cross_attn_layernorm, post_cross_attn_layernorm}}},
-- lm_head.out_proj (tied to the decoder's embedding).
--
-- An encoder-decoder of Gemma 2 layers (models/gemma.lua), each stack read from its own
-- sub-config (encoder, decoder: sizes, heads, windows, caps may differ; the 9B-2B models pair a
-- wide encoder with a narrow decoder). The encoder attends both ways, its sliding layers to the
-- keys at most sliding_window positions away on either side; the decoder is causal and windowed,
-- and each of its layers also attends to the encoder's states (grouped heads, its own pre and
-- post norms, soft-capped scores, no rotary embedding). Embeddings scaled by sqrt(hidden_size),
-- (1 + w) RMSNorms, scores scaled by query_pre_attn_scalar^-0.5 and soft-capped, and the logits
-- soft-capped with the decoder's final_logit_softcapping. The decoder starts from bos_token_id.
--
--    local model = ml.models.from_pretrained(dir)         -- a T5GemmaForConditionalGeneration
--    local out = model:generate(ids, {attention_mask = mask, max_new_tokens = 64})
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local gemma = require("moonload.models.gemma")
local seq2seq = require("moonload.models.seq2seq")

local M = {}
local WHO = "models.t5gemma"

M.schema = {
   { "encoder", "table" },
   { "decoder", "table" },
   { "vocab_size", "int", 256000 },
   { "tie_word_embeddings", "bool", true },
}

--- Reads and checks a T5Gemma config (path, folder or table): each stack's sub-config as a
-- Gemma 2 config (models/gemma.lua; its errors name "(encoder)" or "(decoder)"), the decoder's
-- cross-attention over the encoder's hidden_size, and the decoder's start: decoder_start_token_id,
-- else bos_token_id (the decoder's), as transformers' generate picks it.
function M.config(source)
   local raw, src = config.read(source, WHO)
   local cfg = config.validate(raw, M.schema, src, WHO, 2)
   for _, side in ipairs({ "encoder", "decoder" }) do
      local sub = {}
      for k, v in pairs(raw[side]) do sub[k] = v end
      sub._source = src .. " (" .. side .. ")"
      cfg[side] = gemma.config(sub)
   end
   cfg.decoder.cross_attention_hidden_size = cfg.encoder.hidden_size
   local start = raw.decoder_start_token_id or raw.bos_token_id or cfg.decoder.bos_token_id or 2
   cfg.decoder_start_token_id = config.integer(cfg, WHO, "decoder_start_token_id", start, 0)
   cfg.vocab_size, cfg.decoder_vocab_size = cfg.encoder.vocab_size, cfg.decoder.vocab_size
   return cfg
end

-- --- layers ---------------------------------------------------------------------------------

local T5GemmaRMSNorm = gemma.Gemma2RMSNorm:extend("T5GemmaRMSNorm")
M.T5GemmaRMSNorm = T5GemmaRMSNorm
local T5GemmaMLP = llama.LlamaMLP:extend("T5GemmaMLP")
M.T5GemmaMLP = T5GemmaMLP
local T5GemmaRotaryEmbedding = gemma.Gemma2RotaryEmbedding:extend("T5GemmaRotaryEmbedding")
M.T5GemmaRotaryEmbedding = T5GemmaRotaryEmbedding

--- Gemma 2's attention; the encoder's (bidirectional) sees every key that is not padding, its
-- sliding layers only those at most `window` positions away on either side.
local T5GemmaSelfAttention = gemma.Gemma2Attention:extend("T5GemmaSelfAttention")
M.T5GemmaSelfAttention = T5GemmaSelfAttention

function T5GemmaSelfAttention:__init(cfg, layer_idx, bidirectional)
   gemma.Gemma2Attention.__init(self, cfg, layer_idx)
   rawset(self, "bidirectional", bidirectional)
   rawset(self, "cache_role", bidirectional and "none" or "self")   -- (what reserve_for budgets: utils/runtime_memory)
end

function T5GemmaSelfAttention:scores_mask(L, S, pad, device)
   if not self.bidirectional then return gemma.Gemma2Attention.scores_mask(self, L, S, pad, device) end
   local mask = pad and pad:to(device):view(pad:size(1), 1, 1, S):expand(pad:size(1), 1, L, S)
   if self.window then
      local band = T.ones({ L, S }, { dtype = "bool", device = device }):triu(-self.window):tril(self.window)
      mask = mask and mask:logical_and(band) or band
   end
   return mask
end

function T5GemmaSelfAttention:attend(q, k, v, past, pad)
   if self.softcap or not self.bidirectional then return gemma.Gemma2Attention.attend(self, q, k, v, past, pad) end
   return common.attention(q, k, v, self:scores_mask(q:size(3), k:size(3), pad, q.device), false, self.scale)
end

--- The decoder's attention to the encoder's states (B, S, cross_attention_hidden_size): keys and
-- values projected from them once per generate call (kept in the memo per layer), no rotary
-- embedding, no window, the encoder's padding masked.
local T5GemmaCrossAttention = T5GemmaSelfAttention:extend("T5GemmaCrossAttention")
M.T5GemmaCrossAttention = T5GemmaCrossAttention

function T5GemmaCrossAttention:__init(cfg, layer_idx)
   T5GemmaSelfAttention.__init(self, cfg, layer_idx, true)
   local kv = cfg.num_key_value_heads * cfg.head_dim
   self.k_proj = nn.Linear(cfg.cross_attention_hidden_size, kv, { bias = cfg.attention_bias })
   self.v_proj = nn.Linear(cfg.cross_attention_hidden_size, kv, { bias = cfg.attention_bias })
   rawset(self, "window", false)
   rawset(self, "cache_role", "cross")
end

--- x (B, L, hidden) over enc (B, S, cross hidden), enc_pad (B, S) bool or nil; memo, i: where
-- layer i keeps the encoder's keys and values (nil: computed each call).
function T5GemmaCrossAttention:forward(x, enc, enc_pad, memo, i)
   local B, L = x:size(1), x:size(2)
   local H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
   local q = self.q_proj(x):view(B, L, H, D):transpose(2, 3)
   local kv = memo and memo[i]
   if not kv or kv.k.device ~= q.device then
      local S = enc:size(2)
      local function heads(t) return t:view(B, S, Hkv, D):transpose(2, 3) end
      kv = { k = heads(self.k_proj(enc)), v = heads(self.v_proj(enc)) }
      if memo then memo[i] = kv end
   end
   return self.o_proj(self:attend_heads(q, kv.k, kv.v, 0, enc_pad))
end

local function norm(cfg) return T5GemmaRMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps }) end

local T5GemmaEncoderLayer = nn.Module:extend("T5GemmaEncoderLayer")
M.T5GemmaEncoderLayer = T5GemmaEncoderLayer

-- (the decoder's layer: causal, with a cross-attention)
local function build_layer(self, cfg, layer_idx, is_decoder)
   nn.Module.__init(self)
   self.self_attn = T5GemmaSelfAttention(cfg, layer_idx, not is_decoder)
   self.pre_self_attn_layernorm = norm(cfg)
   self.post_self_attn_layernorm = norm(cfg)
   self.mlp = T5GemmaMLP(cfg)
   self.pre_feedforward_layernorm = norm(cfg)
   self.post_feedforward_layernorm = norm(cfg)
   self.dropout = nn.Dropout(0)
   if is_decoder then
      self.cross_attn = T5GemmaCrossAttention(cfg, layer_idx)
      self.pre_cross_attn_layernorm = norm(cfg)
      self.post_cross_attn_layernorm = norm(cfg)
   end
end

function T5GemmaEncoderLayer:__init(cfg, layer_idx) build_layer(self, cfg, layer_idx, false) end

--- x (B, S, hidden); cos, sin the rotary tables; pad (B, S) bool or nil.
function T5GemmaEncoderLayer:forward(x, cos, sin, pad)
   x = x + self.post_self_attn_layernorm(self.self_attn(self.pre_self_attn_layernorm(x), cos, sin, nil, pad))
   return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
end

local T5GemmaDecoderLayer = nn.Module:extend("T5GemmaDecoderLayer")
M.T5GemmaDecoderLayer = T5GemmaDecoderLayer

function T5GemmaDecoderLayer:__init(cfg, layer_idx) build_layer(self, cfg, layer_idx, true) end

--- x (B, L, hidden) after cache.length tokens; enc, enc_pad, memo as T5GemmaCrossAttention's.
function T5GemmaDecoderLayer:forward(x, cos, sin, cache, enc, enc_pad, memo)
   local i = self.self_attn.layer_idx
   x = x + self.post_self_attn_layernorm(self.self_attn(self.pre_self_attn_layernorm(x), cos, sin, cache))
   x = x + self.post_cross_attn_layernorm(self.cross_attn(self.pre_cross_attn_layernorm(x), enc, enc_pad, memo, i))
   return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
end

-- --- stacks ---------------------------------------------------------------------------------

local function stack_class(name, Layer)
   local cls = nn.Module:extend(name)
   M[name] = cls
   function cls:__init(cfg)
      nn.Module.__init(self)
      self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
      self.norm = norm(cfg)
      local layers = {}
      for i = 1, cfg.num_hidden_layers do layers[i] = Layer(cfg, i) end
      self.layers = nn.ModuleList(layers)
      self.dropout = nn.Dropout(0)
      self.rotary_emb = T5GemmaRotaryEmbedding(cfg)
      rawset(self, "config", cfg)
   end
   --- The scaled embeddings of ids (B, L) at positions past .. past + L - 1, and their rotary tables.
   function cls:embed(ids, past)
      ids = common.to_weight_device(ids, self.embed_tokens.weight)
      local x = self.embed_tokens(ids)
      x = x * gemma.in_dtype(math.sqrt(self.config.hidden_size), self.embed_tokens.weight.dtype)
      local cos, sin = self.rotary_emb(T.arange(past, past + ids:size(2), { device = ids.device }))
      return x, llama.rotary_for(cos, sin, x)
   end
   return cls
end

local T5GemmaEncoder = stack_class("T5GemmaEncoder", T5GemmaEncoderLayer)

--- ids (B, S), pad (B, S) bool or nil -> states (B, S, hidden).
function T5GemmaEncoder:forward(ids, pad)
   local x, cos, sin = self:embed(ids, 0)
   for i = 1, #self.layers do x = self.layers[i](x, cos, sin, pad) end
   return self.norm(x)
end

local T5GemmaDecoder = stack_class("T5GemmaDecoder", T5GemmaDecoderLayer)

--- ids (B, L) after cache.length tokens over the encoder's states enc (B, S, d), enc_pad (B, S)
-- bool or nil, memo (their keys and values per layer, or nil) -> states (B, L, hidden).
function T5GemmaDecoder:forward(ids, enc, enc_pad, memo, cache)
   local x, cos, sin = self:embed(ids, cache and cache.length or 0)
   for i = 1, #self.layers do x = self.layers[i](x, cos, sin, cache, enc, enc_pad, memo) end
   if cache then cache:advance(ids:size(2)) end
   return self.norm(x)
end

local T5GemmaModel = nn.Module:extend("T5GemmaModel")
M.T5GemmaModel = T5GemmaModel

function T5GemmaModel:__init(cfg)
   nn.Module.__init(self)
   self.encoder = T5GemmaEncoder(cfg.encoder)
   self.decoder = T5GemmaDecoder(cfg.decoder)
end

local T5GemmaLMHead = nn.Module:extend("T5GemmaLMHead")
M.T5GemmaLMHead = T5GemmaLMHead

function T5GemmaLMHead:__init(hidden, vocab)
   nn.Module.__init(self)
   self.out_proj = nn.Linear(hidden, vocab, { bias = false })
end

function T5GemmaLMHead:forward(x) return self.out_proj(x) end

-- --- the model ------------------------------------------------------------------------------

local T5GemmaForConditionalGeneration = nn.Module:extend("T5GemmaForConditionalGeneration")
M.T5GemmaForConditionalGeneration = T5GemmaForConditionalGeneration
T5GemmaForConditionalGeneration.tied_weights = { ["lm_head.out_proj.weight"] = "model.decoder.embed_tokens.weight" }
T5GemmaForConditionalGeneration.no_split_modules = { "T5GemmaEncoderLayer", "T5GemmaDecoderLayer" }
T5GemmaForConditionalGeneration.ignore_unexpected = { "rotary_emb%.inv_freq$" }

function T5GemmaForConditionalGeneration:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.model = T5GemmaModel(cfg)
   self.lm_head = T5GemmaLMHead(cfg.decoder.hidden_size, cfg.decoder.vocab_size)
   if cfg.tie_word_embeddings then self.lm_head.out_proj.weight = self.model.decoder.embed_tokens.weight end
   rawset(self, "config", cfg)
end

--- encode(input_ids[, {attention_mask}]) -> the encoder's last hidden state (B, S, hidden); without
-- a mask the encoder masks the pad_token_id tokens, as transformers' does.
function T5GemmaForConditionalGeneration:encode(input_ids, opts)
   local ids, pad = seq2seq.encoder_inputs(self, input_ids, opts or {}, WHO .. ".encode")
   return self:_encode(ids, pad)
end

-- models/seq2seq.lua's hooks.
function T5GemmaForConditionalGeneration:_encode(ids, pad)
   local pad_id = self.config.encoder.pad_token_id
   if not pad and pad_id then pad = ids:ne(pad_id) end
   return self.model.encoder(ids, pad)
end

function T5GemmaForConditionalGeneration:_decode(ids, enc, enc_pad, memo, cache, keep)
   local h = self.model.decoder(ids, enc, enc_pad, memo, cache)
   if keep and keep > 0 and keep < h:size(2) then h = h:narrow(2, h:size(2) - keep + 1, keep) end
   return gemma.soft_cap(self.lm_head(h), self.config.decoder.final_logit_softcapping)
end

function T5GemmaForConditionalGeneration:_decoder_layers() return self.config.decoder.num_hidden_layers end

--- forward(input_ids[, {attention_mask, decoder_input_ids, encoder_outputs, logits_to_keep}]) ->
-- logits (B, T, vocab) of the decoder over decoder_input_ids (default: the start token alone).
function T5GemmaForConditionalGeneration:forward(input_ids, opts)
   return seq2seq.forward(self, input_ids, opts, WHO .. ".forward")
end

--- generate(input_ids[, opts]) -> the decoder's ids (its start token, then the new ones), in the
-- input's form (models/seq2seq.lua).
function T5GemmaForConditionalGeneration:generate(input_ids, opts)
   return seq2seq.generate(self, input_ids, opts, "T5Gemma")
end

function M.from_config(cfg) return T5GemmaForConditionalGeneration(cfg) end

return M
