--- BART and mBART (transformers' BartForConditionalGeneration: bart-base, bart-large,
-- bart-large-cnn, distilbart; MBartForConditionalGeneration: mbart-large-50 and its
-- translation fine-tunes) with Hugging Face parameter names: model.{shared,
-- encoder.{embed_tokens, embed_positions, layernorm_embedding, layers.N.{self_attn.{q,k,v,
-- out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm}, [layer_norm]}, decoder.{... the
-- same, plus layers.N.{encoder_attn.*, encoder_attn_layer_norm}}}, lm_head (tied to shared),
-- final_logits_bias.
--
-- Encoder-decoder transformers with learned positions (stored 2 rows down, counted from 0 in
-- each stack), a LayerNorm on the embeddings (scaled by sqrt(d_model) with scale_embedding),
-- biased projections, scaled attention, GELU MLPs, and a bias added to the logits. BART puts its
-- norms after each block (post-norm); mBART before them, with a final norm on each stack.
-- generate (models/seq2seq.lua) starts the decoder from decoder_start_token_id and follows the
-- folder's generation config: bart-large-cnn's forced BOS and EOS, 3-gram blocking, beams and
-- length penalty apply as transformers applies them.
--
--    local model = ml.models.from_pretrained(dir)              -- a BartForConditionalGeneration
--    local ids, mask = tok:encode_batch(articles)
--    local summaries = model:generate(ids, {attention_mask = mask})
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local seq2seq = require("moonload.models.seq2seq")

local M = {}
local WHO = "models.bart"
local POSITION_OFFSET = 2

M.schema = {
   { "vocab_size", "int" },
   { "d_model", "int" },
   { "encoder_layers", "int" },
   { "decoder_layers", "int" },
   { "encoder_attention_heads", "int" },
   { "decoder_attention_heads", "int" },
   { "encoder_ffn_dim", "int" },
   { "decoder_ffn_dim", "int" },
   { "activation_function", "string", "gelu" },
   { "max_position_embeddings", "int", 1024 },
   { "scale_embedding", "bool", false },
   { "decoder_start_token_id", "int0", 2 },
}

--- Reads and checks a BART or mBART config (path, folder or table); pre_norm for mBART.
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   for _, side in ipairs({ "encoder", "decoder" }) do
      if cfg.d_model % cfg[side .. "_attention_heads"] ~= 0 then
         config.fail(cfg, WHO, "d_model %d is not a multiple of %s_attention_heads %d", cfg.d_model, side,
            cfg[side .. "_attention_heads"])
      end
   end
   common.activation(cfg.activation_function, WHO, cfg._source)
   cfg.pre_norm = cfg._raw.model_type == "mbart"
   return cfg
end

-- --- attention ------------------------------------------------------------------------------

local BartAttention = nn.Module:extend("BartAttention")
M.BartAttention = BartAttention

function BartAttention:__init(d, heads, role)
   nn.Module.__init(self)
   rawset(self, "cache_role", role)                      -- (what reserve_for budgets: utils/runtime_memory)
   self.k_proj = nn.Linear(d, d)
   self.v_proj = nn.Linear(d, d)
   self.q_proj = nn.Linear(d, d)
   self.out_proj = nn.Linear(d, d)
   rawset(self, "n_head", heads)
   rawset(self, "head_dim", d / heads)
end

--- Key/value heads and head size per cached token, and no score tensor (see LlamaAttention).
function BartAttention:kv_cache_heads() return self.n_head, self.head_dim, self.n_head, false end

local function heads(x, B, L, H, D) return x:view(B, L, H, D):transpose(2, 3) end

--- x (B, L, d) attends to itself: with the encoder's padding mask (B, 1, 1, S) bool, or, in the
-- decoder, causally after the cache's tokens (layer i).
function BartAttention:forward(x, mask, cache, i)
   local B, L = x:size(1), x:size(2)
   local H, D = self.n_head, self.head_dim
   local q = heads(self.q_proj(x), B, L, H, D)
   local k, v = heads(self.k_proj(x), B, L, H, D), heads(self.v_proj(x), B, L, H, D)
   local y
   if cache then
      local past = cache.length
      k, v = cache:update(i, k, v)
      local qa, _, back = common.queries_to_keys(q, k, nil)
      y = common.causal_attention(qa, k, v, past, 1 / math.sqrt(D))
      if back then y = y:to(back) end
   elseif mask == false then                                   -- a decoder without a cache
      y = common.causal_attention(q, k, v, 0, 1 / math.sqrt(D))
   else
      y = common.attention(q, k, v, mask, false, 1 / math.sqrt(D))
   end
   return self.out_proj(y:transpose(2, 3):reshape(B, L, H * D))
end

--- x (B, L, d) attends to the encoder's states enc (B, S, d), their keys and values kept in memo
-- per layer; enc_mask (B, 1, 1, S) bool or nil.
function BartAttention:cross(x, enc, enc_mask, memo, i)
   return seq2seq.cross_attention(x, enc, enc_mask, memo, i, self.q_proj, self.k_proj, self.v_proj, self.out_proj,
      self.n_head, self.head_dim, 1 / math.sqrt(self.head_dim))
end

-- --- layers ---------------------------------------------------------------------------------

local BartLayer = nn.Module:extend("BartLayer")     -- (named per stack below)

local function layer_class(name, is_decoder)
   local cls = BartLayer:extend(name)
   function cls:__init(cfg)
      nn.Module.__init(self)
      local side = is_decoder and "decoder" or "encoder"
      local d = cfg.d_model
      self.self_attn = BartAttention(d, cfg[side .. "_attention_heads"], is_decoder and "self" or "none")
      self.self_attn_layer_norm = nn.LayerNorm(d)
      if is_decoder then
         self.encoder_attn = BartAttention(d, cfg.decoder_attention_heads, "cross")
         self.encoder_attn_layer_norm = nn.LayerNorm(d)
      end
      self.fc1 = nn.Linear(d, cfg[side .. "_ffn_dim"])
      self.fc2 = nn.Linear(cfg[side .. "_ffn_dim"], d)
      self.final_layer_norm = nn.LayerNorm(d)
      self.activation_fn = common.activation_module(cfg.activation_function, WHO, cfg._source)
      rawset(self, "pre_norm", cfg.pre_norm)
   end
   return cls
end

-- One sublayer with its residual: the norm before it (mBART) or after the sum (BART).
local function residual(self, x, norm, f)
   if self.pre_norm then return x + f(norm(x)) end
   return norm(x + f(x))
end

--- x (B, L, d); mask: the encoder's padding (B, 1, 1, S), or false in a decoder without a cache;
-- the decoder's blocks take the encoder's states, mask and keys-values memo, and the cache.
function BartLayer:forward(x, mask, enc, enc_mask, memo, cache, i)
   local h = residual(self, x, self.self_attn_layer_norm, function(y) return self.self_attn(y, mask, cache, i) end)
   if enc then
      h = residual(self, h, self.encoder_attn_layer_norm,
         function(y) return self.encoder_attn:cross(y, enc, enc_mask, memo, i) end)
   end
   return residual(self, h, self.final_layer_norm, function(y) return self.fc2(self.activation_fn(self.fc1(y))) end)
end

local BartEncoderLayer = layer_class("BartEncoderLayer", false)
local BartDecoderLayer = layer_class("BartDecoderLayer", true)
M.BartEncoderLayer, M.BartDecoderLayer = BartEncoderLayer, BartDecoderLayer

-- --- stacks ---------------------------------------------------------------------------------

local BartStack = nn.Module:extend("BartStack")     -- (named per stack below)

local function stack_class(name, Layer, is_decoder)
   local cls = BartStack:extend(name)
   function cls:__init(cfg)
      nn.Module.__init(self)
      local d = cfg.d_model
      self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
      self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, d)
      local layers = {}
      for i = 1, cfg[(is_decoder and "decoder" or "encoder") .. "_layers"] do layers[i] = Layer(cfg) end
      self.layers = nn.ModuleList(layers)
      self.layernorm_embedding = nn.LayerNorm(d)
      if cfg.pre_norm then self.layer_norm = nn.LayerNorm(d) end
      rawset(self, "n_layers", #layers)
      rawset(self, "embed_scale", cfg.scale_embedding and math.sqrt(d) or 1)
      rawset(self, "max_positions", cfg.max_position_embeddings)
      rawset(self, "is_decoder", is_decoder)
   end
   return cls
end

--- Encoder: ids (B, S), pad (B, S) bool or nil -> states (B, S, d). Decoder: ids (B, L) after
-- cache.length tokens, over the encoder's states enc and their padding enc_pad, memo the
-- cross-attention's keys and values (or nil) -> states (B, L, d).
function BartStack:forward(ids, pad, enc, enc_pad, memo, cache)
   local L = ids:size(2)
   local past = cache and cache.length or 0
   if past + L > self.max_positions then
      error(string.format("%s: %d tokens (%d cached + %d new) exceed max_position_embeddings %d", WHO, past + L, past,
         L, self.max_positions), 3)
   end
   ids = common.to_weight_device(ids, self.embed_tokens.weight)
   local x = self.embed_tokens(ids)
   if self.embed_scale ~= 1 then x = x * self.embed_scale end
   local pos = common.to_weight_device(T.arange(past + POSITION_OFFSET, past + L + POSITION_OFFSET),
      self.embed_positions.weight)
   x = self.layernorm_embedding(x + self.embed_positions(pos):to(x.device))
   local mask, enc_mask
   if self.is_decoder then
      if cache == nil then mask = false end                      -- (causal without a cache too)
      enc_mask = enc_pad and enc_pad:view(enc_pad:size(1), 1, 1, enc_pad:size(2)) or nil
   else
      mask = pad and pad:view(pad:size(1), 1, 1, pad:size(2)) or nil
   end
   for i = 1, self.n_layers do x = self.layers[i](x, mask, enc, enc_mask, memo, cache, i) end
   if cache then cache:advance(L) end
   if self.layer_norm then x = self.layer_norm(x) end
   return x
end

local BartEncoder = stack_class("BartEncoder", BartEncoderLayer, false)
local BartDecoder = stack_class("BartDecoder", BartDecoderLayer, true)
M.BartEncoder, M.BartDecoder = BartEncoder, BartDecoder

local BartModel = nn.Module:extend("BartModel")
M.BartModel = BartModel

function BartModel:__init(cfg)
   nn.Module.__init(self)
   self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
   self.encoder = BartEncoder(cfg)
   self.decoder = BartDecoder(cfg)
   self.encoder.embed_tokens.weight = self.shared.weight
   self.decoder.embed_tokens.weight = self.shared.weight
end

-- --- the model ------------------------------------------------------------------------------

local BartForConditionalGeneration = nn.Module:extend("BartForConditionalGeneration")
M.BartForConditionalGeneration = BartForConditionalGeneration
BartForConditionalGeneration.base_model_prefix = "model"
BartForConditionalGeneration.tied_weights = { ["lm_head.weight"] = "model.shared.weight",
   ["model.encoder.embed_tokens.weight"] = "model.shared.weight",
   ["model.decoder.embed_tokens.weight"] = "model.shared.weight" }
BartForConditionalGeneration.no_split_modules = { "BartEncoderLayer", "BartDecoderLayer" }

function BartForConditionalGeneration:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.model = BartModel(cfg)
   self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, { bias = false })
   self.lm_head.weight = self.model.shared.weight
   self:register_buffer("final_logits_bias", T.zeros({ 1, cfg.vocab_size }))
   rawset(self, "config", cfg)
end

--- encode(input_ids[, {attention_mask}]) -> the encoder's last hidden state (B, S, d_model).
function BartForConditionalGeneration:encode(input_ids, opts)
   opts = opts or {}
   local ids, pad = seq2seq.encoder_inputs(self, input_ids, opts, WHO .. ".encode")
   return self.model.encoder(ids, pad)
end

-- models/seq2seq.lua's hooks
function BartForConditionalGeneration:_encode(ids, pad) return self.model.encoder(ids, pad) end

function BartForConditionalGeneration:_decode(ids, enc, enc_pad, memo, cache, keep)
   local h = self.model.decoder(ids, nil, enc, enc_pad, memo, cache)
   if keep and keep > 0 and keep < h:size(2) then h = h:narrow(2, h:size(2) - keep + 1, keep) end
   local logits = self.lm_head(h)
   return logits + self.final_logits_bias:to(logits.device):to(logits.dtype)
end

function BartForConditionalGeneration:_decoder_layers() return self.config.decoder_layers end
function BartForConditionalGeneration:_decoder_positions() return self.config.max_position_embeddings end

--- forward(input_ids[, {attention_mask, decoder_input_ids, encoder_outputs, logits_to_keep}]) ->
-- logits (B, T, vocab) of the decoder over decoder_input_ids (default: the start token alone).
function BartForConditionalGeneration:forward(input_ids, opts)
   return seq2seq.forward(self, input_ids, opts, WHO .. ".forward")
end

--- generate(input_ids[, opts]) -> the decoder's ids, in the input's form (models/seq2seq.lua).
function BartForConditionalGeneration:generate(input_ids, opts)
   return seq2seq.generate(self, input_ids, opts, "BART")
end

-- mBART: the same class (pre-norm and final norms come from its config's model_type).
M.MBartForConditionalGeneration = BartForConditionalGeneration

function M.from_config(cfg) return BartForConditionalGeneration(cfg) end

return M
