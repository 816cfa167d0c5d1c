--- BART and mBART (transformers' BartForConditionalGeneration: bart-base, bart-large,
-- bart-large-cnn, distilbart; MBartForConditionalGeneration: mbart-large-50 and its
-- translation fine-tunes) with Hugging Face parameter names: model.{shared,
-- encoder.{embed_tokens, embed_positions, layernorm_embedding, layers.N.{self_attn.{q,k,v,
-- out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm}, [layer_norm]}, decoder.{... the
-- same, plus layers.N.{encoder_attn.*, encoder_attn_layer_norm}}}, lm_head (tied to shared),
-- final_logits_bias.
--
-- The same classes, under transformers' names, run the families that differ from BART by a few
-- switches (FAMILIES below): MarianMTModel (Helsinki-NLP/opus-mt-*: post-norm, sinusoidal
-- positions, no norm on the embeddings, encoder and decoder embeddings shared or not),
-- PegasusForConditionalGeneration (google/pegasus-xsum, -cnn_dailymail, -large: pre-norm,
-- sinusoidal positions) and M2M100ForConditionalGeneration (facebook/m2m100_418M, _1.2B and the
-- dense NLLB-200 models: pre-norm, fairseq's sinusoidal positions, no bias on the logits).
-- Also BlenderbotForConditionalGeneration (facebook/blenderbot-400M-distill, -1B-distill, -3B:
-- pre-norm, learned positions from row 0, no norm on the embeddings; its generation config's
-- encoder_no_repeat_ngram_size applies), BlenderbotSmallForConditionalGeneration
-- (facebook/blenderbot_small-90M: post-norm, learned positions from row 0, the decoder's norm over
-- its tokens before the positions), PLBartForConditionalGeneration (uclanlp/plbart-*: BART with
-- scaled embeddings, started from bos_token_id) and MvpForConditionalGeneration (RUCAIBox/mvp and
-- its task models: BART, and with use_prompt each stack's MvpPrompt, keys and values set before
-- the tokens' in every attention).
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
local POSITION_OFFSET = 2                        -- (rows before position 0: BART's table, M2M100's)

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

-- What sets each family apart: pre_norm (the norm before each block, and a final norm on each
-- stack), its positions ("learned": a table 2 rows down, "sinusoidal": a table from 0 that
-- transformers computes and may store, "fairseq": computed, counted from pad_token_id + 1 over the
-- tokens that are not padding), the norm on its embeddings, the bias on its logits, and its
-- config's defaults where they are not BART's.
local FAMILIES = {
   bart = { who = WHO, positions = "learned", layernorm_embedding = true, logits_bias = true },
   mbart = { who = WHO, pre_norm = true, positions = "learned", layernorm_embedding = true, logits_bias = true },
   marian = { who = "models.marian", positions = "sinusoidal", logits_bias = true,
      defaults = { decoder_start_token_id = { "decoder_start_token_id", "int0", 58100 } },
      extra = { { "share_encoder_decoder_embeddings", "bool", true },
         { "decoder_vocab_size", "int", function(c) return c.vocab_size end } } },
   pegasus = { who = "models.pegasus", pre_norm = true, positions = "sinusoidal", logits_bias = true,
      defaults = { decoder_start_token_id = { "decoder_start_token_id", "int0", 0 } } },
   m2m_100 = { who = "models.m2m_100", pre_norm = true, positions = "fairseq",
      defaults = { activation_function = { "activation_function", "string", "relu" },
         scale_embedding = { "scale_embedding", "bool", true } },
      extra = { { "pad_token_id", "int0", 1 } } },
   -- (learned positions from row 0, position_offset 0; BlenderbotSmall's decoder normalizes its
   -- tokens alone, before the positions, so scale_embedding's factor cancels there)
   blenderbot = { who = "models.blenderbot", pre_norm = true, positions = "learned", position_offset = 0,
      logits_bias = true, defaults = { max_position_embeddings = { "max_position_embeddings", "int", 128 },
         decoder_start_token_id = { "decoder_start_token_id", "int0", 1 } } },
   ["blenderbot-small"] = { who = "models.blenderbot_small", positions = "learned", position_offset = 0,
      layernorm_embedding = true, decoder_norms_tokens = true, logits_bias = true,
      defaults = { max_position_embeddings = { "max_position_embeddings", "int", 512 },
         decoder_start_token_id = { "decoder_start_token_id", "int0", 1 } } },
   -- (BART with scaled embeddings by default; no decoder_start_token_id of its own: generate
   -- starts from bos_token_id)
   plbart = { who = "models.plbart", positions = "learned", layernorm_embedding = true, logits_bias = true,
      defaults = { scale_embedding = { "scale_embedding", "bool", true },
         decoder_start_token_id = { "decoder_start_token_id", "int0", function(c) return c.bos_token_id or 0 end } } },
   -- (BART, with use_prompt its task prompts: MvpPrompt below)
   mvp = { who = "models.mvp", positions = "learned", layernorm_embedding = true, logits_bias = true,
      extra = { { "use_prompt", "bool", false }, { "prompt_length", "int", 100 }, { "prompt_mid_dim", "int", 800 } } },
}
for _, f in pairs(FAMILIES) do f.schema = config.schema_from(M.schema, f.defaults or {}, f.extra) end
M.FAMILIES = FAMILIES            -- (a variant's module adds its own entry: models/nllb_moe.lua)

--- Reads and checks a config of one of FAMILIES' model types (path, folder or table; model_type
-- when the config names none): its keys, and the family's switches (pre_norm, positions, ...).
function M.config(source, model_type)
   local raw, src = config.read(source, WHO)
   local family = FAMILIES[raw.model_type] or FAMILIES[model_type or "bart"]
   local who = family.who
   local cfg = config.validate(raw, family.schema, src, who, 2)
   for _, side in ipairs({ "encoder", "decoder" }) do
      if cfg.d_model % cfg[side .. "_attention_heads"] ~= 0 then
         config.fail(cfg, who, "d_model %d is not a multiple of %s_attention_heads %d", cfg.d_model, side,
            cfg[side .. "_attention_heads"])
      end
   end
   common.activation(cfg.activation_function, who, cfg._source)
   if family.check then family.check(cfg) end                  -- (the family's own keys)
   for _, k in ipairs({ "pre_norm", "positions", "layernorm_embedding", "logits_bias", "decoder_norms_tokens" }) do
      cfg[k] = family[k]
   end
   cfg.position_offset = family.position_offset or POSITION_OFFSET
   cfg._who = who
   -- Marian's embeddings may be the encoder's and the decoder's own, the decoder's over a vocabulary
   -- of its own (decoder_vocab_size; with shared embeddings transformers' decoder reads the shared
   -- table, vocab_size rows, whatever the key says)
   cfg.shared_embeddings = cfg.share_encoder_decoder_embeddings ~= false
   if cfg.shared_embeddings or not cfg.decoder_vocab_size then cfg.decoder_vocab_size = cfg.vocab_size end
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
-- decoder, causally after the cache's tokens (layer i). prefix: MVP's prompt {keys, values}
-- (1, H, P, D) each, before the keys and seen by every query, or nil.
function BartAttention:forward(x, mask, cache, i, prefix)
   local B, L = x:size(1), x:size(2)
   local H, D = self.n_head, self.head_dim
   local q = heads(self.q_proj(x), B, L, H, D)
   local k, v = heads(self.k_proj(x), B, L, H, D), heads(self.v_proj(x), B, L, H, D)
   local y
   if cache then
      local past = cache.length
      k, v = cache:update(i, k, v)
      local P
      k, v, P = seq2seq.with_prefix(k, v, prefix)                -- (prompts sit before position 0)
      local qa, _, back = common.queries_to_keys(q, k, nil)
      y = common.causal_attention(qa, k, v, past + P, 1 / math.sqrt(D))
      if back then y = y:to(back) end
   elseif mask == false then                                   -- a decoder without a cache
      local P
      k, v, P = seq2seq.with_prefix(k, v, prefix)
      y = common.causal_attention(q, k, v, P, 1 / math.sqrt(D))
   else
      local P
      k, v, P = seq2seq.with_prefix(k, v, prefix)
      if mask and P > 0 then mask = seq2seq.mask_with_prefix(mask, P) end
      y = common.attention(q, k, v, mask, false, 1 / math.sqrt(D))
   end
   return self.out_proj(y:transpose(2, 3):reshape(B, L, H * D))
end

--- x (B, L, d) attends to the encoder's states enc (B, S, d), their keys and values kept in memo
-- per layer; enc_mask (B, 1, 1, S) bool or nil; prefix as forward's.
function BartAttention:cross(x, enc, enc_mask, memo, i, prefix)
   return seq2seq.cross_attention(x, enc, enc_mask, memo, i, self.q_proj, self.k_proj, self.v_proj, self.out_proj,
      self.n_head, self.head_dim, 1 / math.sqrt(self.head_dim), prefix)
end

-- MVP's task prompt (transformers' MvpPrompt) of a stack: prompt_length learned vectors through an
-- MLP (d_model -> prompt_mid_dim -> GELU -> layers x 2 x d_model) give each layer's attention
-- prompt_length keys and values of its own, set before the tokens' keys and values.
local MvpPrompt = nn.Module:extend("MvpPrompt")
M.MvpPrompt = MvpPrompt

function MvpPrompt:__init(cfg, n_layers, heads)
   nn.Module.__init(self)
   local d = cfg.d_model
   self.prompt_embedding = nn.Embedding(cfg.prompt_length, d)
   self.prompt_trans = nn.Sequential(nn.Linear(d, cfg.prompt_mid_dim), nn.GELU(),
      nn.Linear(cfg.prompt_mid_dim, n_layers * 2 * d))
   rawset(self, "n_layers", n_layers)
   rawset(self, "n_head", heads)
   rawset(self, "head_dim", d / heads)
end

--- -> for each layer, {keys, values} (1, H, P, D) each.
function MvpPrompt:forward()
   local w = self.prompt_embedding.weight
   local P, H, D = w:size(1), self.n_head, self.head_dim
   local ids = common.to_weight_device(T.arange(0, P), w)
   local prompt = self.prompt_trans(self.prompt_embedding(ids)):view(P, self.n_layers * 2, H, D):permute(2, 3, 1, 4)
   local out = {}
   for l = 1, self.n_layers do
      out[l] = { prompt:select(1, 2 * l - 1):unsqueeze(1), prompt:select(1, 2 * l):unsqueeze(1) }
   end
   return out
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
      self.activation_fn = common.activation_module(cfg.activation_function, cfg._who, cfg._source)
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
-- the decoder's blocks take the encoder's states, mask and keys-values memo, and the cache;
-- prompts: MVP's {self = {keys, values}, cross = ...} for this layer, or nil.
function BartLayer:forward(x, mask, enc, enc_mask, memo, cache, i, prompts)
   prompts = prompts or {}
   local h = residual(self, x, self.self_attn_layer_norm,
      function(y) return self.self_attn(y, mask, cache, i, prompts.self) end)
   if enc then
      h = residual(self, h, self.encoder_attn_layer_norm,
         function(y) return self.encoder_attn:cross(y, enc, enc_mask, memo, i, prompts.cross) end)
   end
   return residual(self, h, self.final_layer_norm, function(y) return self.fc2(self.activation_fn(self.fc1(y))) end)
end

local BartEncoderLayer = layer_class("BartEncoderLayer", false)
local BartDecoderLayer = layer_class("BartDecoderLayer", true)
M.BartEncoderLayer, M.BartDecoderLayer = BartEncoderLayer, BartDecoderLayer

-- --- positions ------------------------------------------------------------------------------

local f32 = require("ffi").new("float[1]")
local function float32(x) f32[0] = x return f32[0] end

--- The sinusoidal table (n, d) of positions 0 .. n - 1 as transformers computes it. "sinusoidal"
-- (Marian's, Pegasus'): angles pos / 10000^(2k / d) in float64, sin in the first ceil(d / 2)
-- columns and cos in the rest. "fairseq" (M2M100's): angles pos * exp(-k log(10000) / (d / 2 - 1))
-- in float32, sin then cos over d / 2 columns each (a zero column for an odd d), and the row
-- padding_idx zero.
function M.sinusoid_table(kind, n, d, padding_idx)
   local rows = {}
   if kind == "sinusoidal" then
      local sines = math.ceil(d / 2)
      local inv = {}
      for k = 0, sines - 1 do inv[k] = 10000 ^ (2 * k / d) end
      for p = 0, n - 1 do
         local row = {}
         for k = 0, sines - 1 do row[k + 1] = math.sin(p / inv[k]) end
         for k = 0, d - sines - 1 do row[sines + k + 1] = math.cos(p / inv[k]) end
         rows[p + 1] = row
      end
   else
      local half = math.floor(d / 2)
      local step = float32(math.log(10000) / (half - 1))
      local freq = {}
      for k = 0, half - 1 do freq[k] = float32(math.exp(float32(k * -step))) end
      for p = 0, n - 1 do
         local row = {}
         for k = 0, half - 1 do
            local a = float32(p * freq[k])
            row[k + 1], row[half + k + 1] = math.sin(a), math.cos(a)
         end
         if d % 2 == 1 then row[d] = 0 end
         if p == padding_idx then for k = 1, d do row[k] = 0 end end
         rows[p + 1] = row
      end
   end
   return T.tensor(rows)
end

-- Marian's and Pegasus' table: the checkpoint's when it stores one (Pegasus', older Marian
-- conversions'), which transformers loads; else computed, a non-persistent buffer.
local SinusoidalPositionalEmbedding = nn.Embedding:extend("SinusoidalPositionalEmbedding")
M.SinusoidalPositionalEmbedding = SinusoidalPositionalEmbedding

function SinusoidalPositionalEmbedding:__init(n, d, stored)
   nn.Module.__init(self)
   self.num_embeddings, self.embedding_dim = n, d
   if stored then
      self.weight = nn.Module.new_parameter({ n, d })
   else
      self:register_buffer("weight", M.sinusoid_table("sinusoidal", n, d), false)
   end
end

-- M2M100's positions (fairseq's): a token that is not padding sits at padding_idx + 1 + the count
-- of non-padding tokens up to it in its chunk + the tokens cached before; padding at padding_idx,
-- the zero row. The table grows past max_position_embeddings + 2 rows as a sequence needs.
local M2M100SinusoidalPositionalEmbedding = nn.Module:extend("M2M100SinusoidalPositionalEmbedding")
M.M2M100SinusoidalPositionalEmbedding = M2M100SinusoidalPositionalEmbedding

function M2M100SinusoidalPositionalEmbedding:__init(n, d, padding_idx)
   nn.Module.__init(self)
   rawset(self, "embedding_dim", d)
   rawset(self, "padding_idx", padding_idx)
   self:register_buffer("weights", M.sinusoid_table("fairseq", n + POSITION_OFFSET, d, padding_idx), false)
end

--- ids (B, L) after `past` cached tokens -> their position embeddings (B, L, d).
function M2M100SinusoidalPositionalEmbedding:forward(ids, past)
   local pad = self.padding_idx
   local rows, top = ids:tolist(), 0
   for _, row in ipairs(rows) do
      local count = 0
      for j, id in ipairs(row) do
         if id == pad then row[j] = pad else count = count + 1; row[j] = pad + past + count end
         if row[j] > top then top = row[j] end
      end
   end
   local w = rawget(self, "longer") or self.weights
   if top >= w:size(1) then         -- (kept beside the buffer: hooks may swap the buffer in and out)
      w = M.sinusoid_table("fairseq", top + 1 + POSITION_OFFSET, self.embedding_dim, pad)
         :to(self.weights.device, self.weights.dtype)
      rawset(self, "longer", w)
   end
   local B, L = ids:size(1), ids:size(2)
   local pos = T.tensor(rows, { dtype = "int64", device = w.device })
   return w:index_select(1, pos:view(B * L)):view(B, L, self.embedding_dim)
end

function M2M100SinusoidalPositionalEmbedding:extra_repr()
   return string.format("padding_idx=%d", self.padding_idx)
end

-- --- stacks ---------------------------------------------------------------------------------

local BartStack = nn.Module:extend("BartStack")     -- (named per stack below)

local function stack_class(name, Layer, is_decoder)
   local cls = BartStack:extend(name)
   function cls:__init(cfg)
      nn.Module.__init(self)
      local d, P = cfg.d_model, cfg.max_position_embeddings
      self.embed_tokens = nn.Embedding(is_decoder and cfg.decoder_vocab_size or cfg.vocab_size, d)
      if cfg.positions == "learned" then
         self.embed_positions = nn.Embedding(P + cfg.position_offset, d)
      elseif cfg.positions == "sinusoidal" then
         self.embed_positions = SinusoidalPositionalEmbedding(P, d, cfg.positions_stored)
      else
         self.embed_positions = M2M100SinusoidalPositionalEmbedding(P, d, cfg.pad_token_id)
      end
      local layers = {}
      for i = 1, cfg[(is_decoder and "decoder" or "encoder") .. "_layers"] do layers[i] = Layer(cfg, i) end
      self.layers = nn.ModuleList(layers)
      if cfg.layernorm_embedding then self.layernorm_embedding = nn.LayerNorm(d) end
      if cfg.pre_norm then self.layer_norm = nn.LayerNorm(d) end
      if cfg.use_prompt and (is_decoder or cfg.encoder_prompt) then
         local heads = cfg[(is_decoder and "decoder" or "encoder") .. "_attention_heads"]
         self.self_attn_prompt = MvpPrompt(cfg, #layers, heads)
         if is_decoder then self.cross_attn_prompt = MvpPrompt(cfg, #layers, heads) end
      end
      rawset(self, "n_layers", #layers)
      rawset(self, "embed_scale", cfg.scale_embedding and math.sqrt(d) or 1)
      rawset(self, "position_offset", cfg.position_offset)
      rawset(self, "norms_tokens", is_decoder and cfg.decoder_norms_tokens)
      rawset(self, "positions", cfg.positions)
      rawset(self, "max_positions", cfg.positions ~= "fairseq" and P or nil)     -- (fairseq's table grows)
      rawset(self, "who", cfg._who)
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
   if self.max_positions and past + L > self.max_positions then
      error(string.format("%s: %d tokens (%d cached + %d new) exceed max_position_embeddings %d", self.who, past + L,
         past, L, self.max_positions), 3)
   end
   local x = self.embed_tokens(common.to_weight_device(ids, self.embed_tokens.weight))
   if self.embed_scale ~= 1 then x = x * self.embed_scale end
   local positions
   if self.positions == "fairseq" then
      positions = self.embed_positions(ids, past)
   else
      local first = self.positions == "learned" and self.position_offset or 0
      positions = self.embed_positions(common.to_weight_device(T.arange(past + first, past + L + first),
         self.embed_positions.weight))
   end
   if self.norms_tokens then
      x = self.layernorm_embedding(x) + positions:to(x.device)
   else
      x = x + positions:to(x.device)
      if self.layernorm_embedding then x = self.layernorm_embedding(x) end
   end
   local mask, enc_mask
   if self.is_decoder then
      if cache == nil then mask = false end                      -- (causal without a cache too)
      enc_mask = enc_pad and enc_pad:view(enc_pad:size(1), 1, 1, enc_pad:size(2)) or nil
   else
      mask = pad and pad:view(pad:size(1), 1, 1, pad:size(2)) or nil
   end
   local own, cross = self.self_attn_prompt and self.self_attn_prompt(), self.cross_attn_prompt and self.cross_attn_prompt()
   for i = 1, self.n_layers do
      local prompts = own and { self = own[i], cross = cross and cross[i] } or nil
      x = self.layers[i](x, mask, enc, enc_mask, memo, cache, i, prompts)
   end
   if cache then cache:advance(L) end
   if self.layer_norm then x = self.layer_norm(x) end
   return x
end

local BartEncoder = stack_class("BartEncoder", BartEncoderLayer, false)
local BartDecoder = stack_class("BartDecoder", BartDecoderLayer, true)
M.BartEncoder, M.BartDecoder = BartEncoder, BartDecoder
M.stack_class = stack_class      -- (stacks of a variant's layers: models/nllb_moe.lua)

local BartModel = nn.Module:extend("BartModel")
M.BartModel = BartModel

BartModel.Encoder, BartModel.Decoder = BartEncoder, BartDecoder    -- (each family's own classes)

function BartModel:__init(cfg)
   nn.Module.__init(self)
   local cls = getmetatable(self)
   if cfg.shared_embeddings then self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model) end
   self.encoder = cls.Encoder(cfg)
   self.decoder = cls.Decoder(cfg)
   -- (transformers ties nothing when tie_word_embeddings is false)
   if cfg.shared_embeddings and cfg.tie_word_embeddings ~= false then
      self.encoder.embed_tokens.weight = self.shared.weight
      self.decoder.embed_tokens.weight = self.shared.weight
   end
end

-- --- the model ------------------------------------------------------------------------------

local BartForConditionalGeneration = nn.Module:extend("BartForConditionalGeneration")
M.BartForConditionalGeneration = BartForConditionalGeneration
BartForConditionalGeneration.base_model_prefix = "model"
BartForConditionalGeneration.tied_weights = { ["lm_head.weight"] = "model.shared.weight",
   ["model.encoder.embed_tokens.weight"] = "model.shared.weight",
   ["model.decoder.embed_tokens.weight"] = "model.shared.weight" }
BartForConditionalGeneration.no_split_modules = { "BartEncoderLayer", "BartDecoderLayer" }
BartForConditionalGeneration.Model = BartModel

--- What the checkpoint's names say about its tables: whether it stores the sinusoidal positions
-- (Pegasus' and older Marian folders do) and the logits bias (transformers zeroes a missing one).
function BartForConditionalGeneration.build_opts_for(names)
   local opts = { positions_stored = false, logits_bias_stored = false, encoder_prompt_stored = false }
   for _, name in ipairs(names) do
      if name:find("encoder%.embed_positions%.weight$") then opts.positions_stored = true end
      -- (MVP's encoder prompt: transformers 4's folders hold it; 5.24 builds and writes none)
      if name:find("^model%.encoder%.self_attn_prompt%.") then opts.encoder_prompt_stored = true end
      if name == "final_logits_bias" then opts.logits_bias_stored = true end
   end
   return opts
end

--- cfg: a config (path, folder or table); opts: build_opts_for's (default: positions computed,
-- the logits bias stored, with use_prompt an encoder prompt).
function BartForConditionalGeneration:__init(cfg, opts)
   nn.Module.__init(self)
   opts = opts or {}
   local cls = getmetatable(self)
   cfg = M.config(cfg, cls.model_type)
   cfg.positions_stored = opts.positions_stored
   cfg.encoder_prompt = opts.encoder_prompt_stored ~= false
   self.model = cls.Model(cfg)
   self.lm_head = nn.Linear(cfg.d_model, cfg.decoder_vocab_size, { bias = false })
   if not cfg.shared_embeddings then
      rawset(self, "tied_weights", { ["lm_head.weight"] = "model.decoder.embed_tokens.weight" })
   end
   if cfg.tie_word_embeddings ~= false then
      self.lm_head.weight = self:get_parameter(self.tied_weights["lm_head.weight"])
   end
   if cfg.logits_bias then
      self:register_buffer("final_logits_bias", T.zeros({ 1, cfg.decoder_vocab_size }), opts.logits_bias_stored ~= false)
   end
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
   if not self.final_logits_bias then return logits end
   return logits + self.final_logits_bias:to(logits.device):to(logits.dtype)
end

function BartForConditionalGeneration:_decoder_layers() return self.config.decoder_layers end
function BartForConditionalGeneration:_decoder_positions() return self.model.decoder.max_positions end

--- forward(input_ids[, {attention_mask, decoder_input_ids, encoder_outputs, logits_to_keep}]) ->
-- logits (B, T, vocab) of the decoder over decoder_input_ids (default: the start token alone).
function BartForConditionalGeneration:forward(input_ids, opts)
   return seq2seq.forward(self, input_ids, opts, WHO .. ".forward")
end

--- generate(input_ids[, opts]) -> the decoder's ids, in the input's form (models/seq2seq.lua).
function BartForConditionalGeneration:generate(input_ids, opts)
   return seq2seq.generate(self, input_ids, opts, self.family_name)
end
BartForConditionalGeneration.family_name = "BART"

-- mBART: the same class (pre-norm and final norms come from its config's model_type).
M.MBartForConditionalGeneration = BartForConditionalGeneration

-- A family's classes under transformers' names (prefix .. "EncoderLayer", ...), BART's otherwise;
-- its config's switches come from model_type.
local function family_class(prefix, name, model_type, family_name)
   local Model = BartModel:extend(prefix .. "Model")
   Model.Encoder = stack_class(prefix .. "Encoder", layer_class(prefix .. "EncoderLayer", false), false)
   Model.Decoder = stack_class(prefix .. "Decoder", layer_class(prefix .. "DecoderLayer", true), true)
   local cls = BartForConditionalGeneration:extend(name)
   cls.Model, cls.model_type, cls.family_name = Model, model_type, family_name
   cls.no_split_modules = { prefix .. "EncoderLayer", prefix .. "DecoderLayer" }
   return cls
end

M.MarianMTModel = family_class("Marian", "MarianMTModel", "marian", "Marian")
M.PegasusForConditionalGeneration = family_class("Pegasus", "PegasusForConditionalGeneration", "pegasus", "Pegasus")
M.M2M100ForConditionalGeneration = family_class("M2M100", "M2M100ForConditionalGeneration", "m2m_100", "M2M100")
-- (older conversions stored the computed tables, which transformers drops)
M.M2M100ForConditionalGeneration.ignore_unexpected = { "embed_positions%.weights$", "embed_positions%._float_tensor$" }
M.BlenderbotForConditionalGeneration = family_class("Blenderbot", "BlenderbotForConditionalGeneration", "blenderbot",
   "Blenderbot")
M.BlenderbotSmallForConditionalGeneration = family_class("BlenderbotSmall", "BlenderbotSmallForConditionalGeneration",
   "blenderbot-small", "BlenderbotSmall")
M.PLBartForConditionalGeneration = family_class("PLBart", "PLBartForConditionalGeneration", "plbart", "PLBart")
M.MvpForConditionalGeneration = family_class("Mvp", "MvpForConditionalGeneration", "mvp", "MVP")

function M.from_config(cfg) return BartForConditionalGeneration(cfg) end

return M
