--- T5 (transformers' T5ForConditionalGeneration: t5-small .. t5-11b, T5 v1.1, FLAN-T5, T0) with
-- Hugging Face parameter names: shared, {encoder,decoder}.{embed_tokens (tied to shared),
-- block.N.layer.{0.{SelfAttention.{q,k,v,o,relative_attention_bias}, layer_norm},
-- [decoder: 1.{EncDecAttention.{q,k,v,o}, layer_norm}], last.{DenseReluDense.{wi | wi_0, wi_1,
-- wo}, layer_norm}}, final_layer_norm}, lm_head.
--
-- An encoder over the input, a decoder over the output so far that also attends to the
-- encoder's states. No position embeddings: the first block of each stack learns a bias per head
-- for each bucket of relative distance (exact up to half the buckets, then logarithmic up to
-- relative_attention_max_distance; the encoder's buckets tell before from after), which every
-- block adds to its scores. Scores are not scaled by 1/sqrt(d_kv); norms are RMS norms without
-- bias; the MLP is ReLU (T5) or a gated GELU (v1.1, FLAN-T5: feed_forward_proj "gated-gelu").
-- With the head tied to the shared embedding (T5), the decoder's output is scaled by
-- d_model^-0.5 first; T5 v1.1 and FLAN-T5 (tie_word_embeddings = false) have a head of their own
-- and no scaling.
--
--    local model = ml.models.from_pretrained(dir)                   -- a T5ForConditionalGeneration
--    local out = model:generate(ids, {attention_mask = mask, max_new_tokens = 40, num_beams = 4})
--    local logits = model(ids, {attention_mask = mask, decoder_input_ids = dec})   -- (B, T, vocab)
--    local states = model:encode(ids, {attention_mask = mask})       -- (B, S, d_model)
--
-- UMT5 (UMT5ForConditionalGeneration: google/umt5-small .. -xxl, model_type "umt5") is T5 v1.1 whose
-- every self-attention layer learns its own relative position bias, not only each stack's first.
--
-- generate runs the encoder once, then the shared generate loop over the decoder
-- (models/seq2seq.lua), which starts from decoder_start_token_id and keeps its self-attention
-- keys and values in a KVCache; the encoder's keys and values per layer are computed once per
-- generate call.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local seq2seq = require("moonload.models.seq2seq")

local M = {}
local WHO = "models.t5"

M.schema = {
   { "vocab_size", "int" },
   { "d_model", "int" },
   { "d_kv", "int" },
   { "d_ff", "int" },
   { "num_layers", "int" },
   { "num_decoder_layers", "int", function(c) return c.num_layers end },
   { "num_heads", "int" },
   { "relative_attention_num_buckets", "int", 32 },
   { "relative_attention_max_distance", "int", 128 },
   { "layer_norm_epsilon", "posnum", 1e-6 },
   { "feed_forward_proj", "string", function(c) return c.model_type == "umt5" and "gated-gelu" or "relu" end },
   { "tie_word_embeddings", "bool", true },
   { "scale_decoder_outputs", "bool", function(c) return c.tie_word_embeddings end },
   { "decoder_start_token_id", "int0", 0 },
}

--- Reads and checks a T5 config (path, folder or table): the MLP's activation and gating from
-- feed_forward_proj as transformers reads it ("relu", "gated-gelu" = gated gelu_new, "gated-silu").
-- (A variant passes its own schema and its name for the errors: models/longt5.lua.)
function M.config(source, schema, who)
   who = who or WHO
   local cfg = config.load(source, schema or M.schema, who)
   local gated, act = cfg.feed_forward_proj:match("^(gated)%-(.+)$")
   act = act or cfg.feed_forward_proj
   if act:find("-", 1, true) then
      config.fail(cfg, who, 'feed_forward_proj "%s" is not "{ACT}" or "gated-{ACT}"', cfg.feed_forward_proj)
   end
   if cfg.feed_forward_proj == "gated-gelu" then act = "gelu_new" end
   common.activation(act, who, cfg._source)
   cfg.dense_act_fn, cfg.is_gated_act = act, gated ~= nil
   -- As transformers 5 reads it: tie_word_embeddings = false (T5 v1.1, FLAN-T5) means an unscaled
   -- decoder output and a head of its own; the embeddings are tied to shared either way, and a
   -- checkpoint without lm_head.weight ties the head too.
   cfg.tie_head, cfg.tie_word_embeddings = cfg.tie_word_embeddings, true
   cfg.bias_in_every_layer = cfg._raw.model_type == "umt5"
   return cfg
end

--- The bucket of a key at relative distance rel = key position - query position (transformers'
-- T5Attention._relative_position_bucket): bidirectional (the encoder) gives half the buckets to
-- keys after the query; the decoder sees only earlier keys. Distances below half the buckets
-- (of a side) have their own; longer ones share logarithmically wider buckets up to max_distance.
function M.relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
   local bucket = 0
   if bidirectional then
      num_buckets = math.floor(num_buckets / 2)
      if rel > 0 then bucket = num_buckets end
      rel = math.abs(rel)
   else
      rel = -math.min(rel, 0)
   end
   local max_exact = math.floor(num_buckets / 2)
   if rel < max_exact then return bucket + rel end
   local large = max_exact + math.floor(math.log(rel / max_exact) / math.log(max_distance / max_exact)
      * (num_buckets - max_exact))
   return bucket + math.min(large, num_buckets - 1)
end

-- --- attention ------------------------------------------------------------------------------

local T5Attention = nn.Module:extend("T5Attention")
M.T5Attention = T5Attention

function T5Attention:__init(cfg, has_relative_bias, bidirectional, role)
   nn.Module.__init(self)
   local inner = cfg.num_heads * cfg.d_kv
   self.q = nn.Linear(cfg.d_model, inner, { bias = false })
   self.k = nn.Linear(cfg.d_model, inner, { bias = false })
   self.v = nn.Linear(cfg.d_model, inner, { bias = false })
   self.o = nn.Linear(inner, cfg.d_model, { bias = false })
   if has_relative_bias then
      self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
   end
   rawset(self, "n_head", cfg.num_heads)
   rawset(self, "head_dim", cfg.d_kv)
   rawset(self, "bidirectional", bidirectional)
   rawset(self, "cache_role", role)                      -- (what reserve_for budgets: utils/runtime_memory)
   rawset(self, "num_buckets", cfg.relative_attention_num_buckets)
   rawset(self, "max_distance", cfg.relative_attention_max_distance)
end

--- Key/value heads and head size per cached token, and no score tensor (see LlamaAttention).
function T5Attention:kv_cache_heads() return self.n_head, self.head_dim, self.n_head, false end

--- The additive score bias (1, H, L, S) that table (an nn.Embedding of buckets x heads) gives L
-- queries at positions past .. past + L - 1 over keys 0 .. S - 1, in dtype (also MPNet's).
function M.relative_bias(table, L, S, past, bidirectional, num_buckets, max_distance, dtype)
   -- one bucket per relative distance (L + S - 1 of them, from -(past + L - 1) up), then the
   -- (L, S) matrix indexes them by key - query + L - 1: Lua work in L + S, not L x S
   local offset = past + L - 1
   local buckets = {}
   for k = 1, L + S - 1 do
      buckets[k] = M.relative_position_bucket(k - 1 - offset, bidirectional, num_buckets, max_distance)
   end
   local at = T.arange(0, S, { dtype = "int64" }):view(1, S) - T.arange(0, L, { dtype = "int64" }):view(L, 1) + (L - 1)
   local matrix = T.tensor(buckets, { dtype = "int64" }):index_select(1, at:reshape(L * S)):view(L, S)
   matrix = common.to_weight_device(matrix, table.weight)
   return table(matrix):permute(3, 1, 2):unsqueeze(1):to(dtype)
end

--- The scores' additive bias (1, H, L, S) for L queries at positions past .. past + L - 1 over
-- keys 0 .. S - 1, in dtype.
function T5Attention:position_bias(L, S, past, dtype)
   return M.relative_bias(self.relative_attention_bias, L, S, past, self.bidirectional, self.num_buckets,
      self.max_distance, dtype)
end

local function heads(x, B, L, H, D) return x:view(B, L, H, D):transpose(2, 3) end

--- Self-attention over x (B, L, d_model) with the additive score mask (B or 1, H, L, S), the
-- decoder's keys and values appended to cache (layer i).
function T5Attention:forward(x, mask, cache, i)
   local B, L = x:size(1), x:size(2)
   local H, D = self.n_head, self.head_dim
   local q, k, v = heads(self.q(x), B, L, H, D), heads(self.k(x), B, L, H, D), heads(self.v(x), B, L, H, D)
   if cache then k, v = cache:update(i, k, v) end
   local qa, ma, back = common.queries_to_keys(q, k, mask)
   local y = common.attention(qa, k, v, ma, false, 1.0)
   if back then y = y:to(back) end
   return self.o(y:transpose(2, 3):reshape(B, L, H * D))
end

--- Attention of x (B, L, d_model) to the encoder's states (B, S, d_model), whose keys and values
-- the memo keeps per layer; enc_mask (B, 1, 1, S) bool or nil (unscaled scores, as T5's).
function T5Attention:cross(x, enc, enc_mask, memo, i)
   return seq2seq.cross_attention(x, enc, enc_mask, memo, i, self.q, self.k, self.v, self.o, self.n_head,
      self.head_dim, 1.0)
end

-- --- blocks ---------------------------------------------------------------------------------

local function rms_norm(cfg) return nn.RMSNorm(cfg.d_model, { eps = cfg.layer_norm_epsilon }) end

local T5LayerSelfAttention = nn.Module:extend("T5LayerSelfAttention")
M.T5LayerSelfAttention = T5LayerSelfAttention

function T5LayerSelfAttention:__init(cfg, has_relative_bias, bidirectional)
   nn.Module.__init(self)
   self.SelfAttention = T5Attention(cfg, has_relative_bias, bidirectional, bidirectional and "none" or "self")
   self.layer_norm = rms_norm(cfg)
   self.dropout = nn.Dropout(0)
end

local T5LayerCrossAttention = nn.Module:extend("T5LayerCrossAttention")
M.T5LayerCrossAttention = T5LayerCrossAttention

function T5LayerCrossAttention:__init(cfg)
   nn.Module.__init(self)
   self.EncDecAttention = T5Attention(cfg, false, true, "cross")
   self.layer_norm = rms_norm(cfg)
   self.dropout = nn.Dropout(0)
end

local T5DenseActDense = nn.Module:extend("T5DenseActDense")
M.T5DenseActDense = T5DenseActDense

function T5DenseActDense:__init(cfg)
   nn.Module.__init(self)
   if cfg.is_gated_act then
      self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, { bias = false })
      self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, { bias = false })
   else
      self.wi = nn.Linear(cfg.d_model, cfg.d_ff, { bias = false })
   end
   self.wo = nn.Linear(cfg.d_ff, cfg.d_model, { bias = false })
   self.dropout = nn.Dropout(0)
   self.act = common.activation_module(cfg.dense_act_fn, WHO, cfg._source)
end

function T5DenseActDense:forward(x)
   if self.wi_0 then return self.wo(self.act(self.wi_0(x)) * self.wi_1(x)) end
   return self.wo(self.act(self.wi(x)))
end

local T5LayerFF = nn.Module:extend("T5LayerFF")
M.T5LayerFF = T5LayerFF

function T5LayerFF:__init(cfg)
   nn.Module.__init(self)
   self.DenseReluDense = T5DenseActDense(cfg)
   self.layer_norm = rms_norm(cfg)
   self.dropout = nn.Dropout(0)
end

function T5LayerFF:forward(x) return x + self.DenseReluDense(self.layer_norm(x)) end

local T5Block = nn.Module:extend("T5Block")
M.T5Block = T5Block

function T5Block:__init(cfg, is_decoder, has_relative_bias)
   nn.Module.__init(self)
   local layers = { T5LayerSelfAttention(cfg, has_relative_bias, not is_decoder) }
   if is_decoder then layers[2] = T5LayerCrossAttention(cfg) end
   layers[#layers + 1] = T5LayerFF(cfg)
   self.layer = nn.ModuleList(layers)
end

--- x (B, L, d_model). A block with a relative position bias (T5: the first; UMT5: each) computes
-- the scores' additive mask (its position bias, plus padding for the encoder, plus the causal
-- triangle for the decoder) from pad (the encoder's (B, S) bool); the mask goes on to the blocks
-- without one, as transformers passes position_bias along.
-- The decoder's blocks take the encoder's states, mask and keys-values memo, and the cache.
function T5Block:forward(x, mask, pad, enc, enc_mask, memo, cache, i)
   local sa = self.layer[1]
   if sa.SelfAttention.relative_attention_bias then
      local L = x:size(2)
      local past = cache and cache.length or 0
      local S = past + L
      local attn = sa.SelfAttention
      mask = attn:position_bias(L, S, past, x.dtype)
      if pad then                                                   -- encoder: padded keys
         mask = mask + T.zeros({ x:size(1), 1, 1, S }, { dtype = x.dtype, device = mask.device })
            :masked_fill(pad:to(mask.device):logical_not():view(x:size(1), 1, 1, S), -math.huge)
      end
      if not attn.bidirectional and L > 1 then                     -- decoder: no later keys
         local later = T.ones({ L, S }, { dtype = "bool", device = mask.device }):triu(past + 1)
         mask = mask:masked_fill(later, -math.huge)
      end
   end
   local h = x + sa.SelfAttention(sa.layer_norm(x), mask, cache, i)
   if enc then
      local ca = self.layer[2]
      h = h + ca.EncDecAttention:cross(ca.layer_norm(h), enc, enc_mask, memo, i)
   end
   return self.layer[#self.layer](h), mask
end

local T5Stack = nn.Module:extend("T5Stack")
M.T5Stack = T5Stack

function T5Stack:__init(cfg, is_decoder, Block)
   nn.Module.__init(self)
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
   local blocks = {}
   for i = 1, is_decoder and cfg.num_decoder_layers or cfg.num_layers do
      blocks[i] = (Block or T5Block)(cfg, is_decoder, i == 1 or cfg.bias_in_every_layer, i)   -- (i: Switch's sparse blocks)
   end
   self.block = nn.ModuleList(blocks)
   rawset(self, "n_blocks", #blocks)
   self.final_layer_norm = rms_norm(cfg)
   self.dropout = nn.Dropout(0)
   rawset(self, "is_decoder", is_decoder)
end

--- Encoder: ids (B, S), pad (B, S) bool or nil -> states (B, S, d_model). Decoder: ids (B, L)
-- after cache.length tokens, enc (B, S, d_model), enc_pad (B, S) bool or nil, memo (the
-- encoder's keys and values per layer, or nil) -> states (B, L, d_model).
function T5Stack:forward(ids, pad, enc, enc_pad, memo, cache)
   ids = common.to_weight_device(ids, self.embed_tokens.weight)
   local x = self.embed_tokens(ids)
   local enc_mask = enc_pad and enc_pad:view(enc_pad:size(1), 1, 1, enc_pad:size(2)) or nil
   local mask
   for i = 1, self.n_blocks do
      x, mask = self.block[i](x, mask, pad, enc, enc_mask, memo, cache, i)
   end
   if cache then cache:advance(ids:size(2)) end
   return self.final_layer_norm(x)
end

-- --- the model ------------------------------------------------------------------------------

local T5ForConditionalGeneration = nn.Module:extend("T5ForConditionalGeneration")
M.T5ForConditionalGeneration = T5ForConditionalGeneration
T5ForConditionalGeneration.tied_weights = { ["encoder.embed_tokens.weight"] = "shared.weight",
   ["decoder.embed_tokens.weight"] = "shared.weight", ["lm_head.weight"] = "shared.weight" }
T5ForConditionalGeneration.no_split_modules = { "T5Block" }
-- (the original T5 checkpoints carry a cross-attention bias that no layer reads)
T5ForConditionalGeneration.ignore_unexpected = { "^decoder%.block%.0%.layer%.1%.EncDecAttention%.relative_attention_bias%.weight$" }

-- (a variant's class sets its own config reader and block class: models/longt5.lua)
T5ForConditionalGeneration.read_config, T5ForConditionalGeneration.Block = M.config, T5Block

function T5ForConditionalGeneration:__init(cfg)
   nn.Module.__init(self)
   cfg = self.read_config(cfg)
   self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
   self.encoder = T5Stack(cfg, false, self.Block)
   self.decoder = T5Stack(cfg, true, self.Block)
   self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, { bias = false })
   self.encoder.embed_tokens.weight = self.shared.weight
   self.decoder.embed_tokens.weight = self.shared.weight
   if cfg.tie_head then self.lm_head.weight = self.shared.weight end
   rawset(self, "config", cfg)
end

--- encode(input_ids[, {attention_mask}]) -> the encoder's last hidden state (B, S, d_model).
function T5ForConditionalGeneration:encode(input_ids, opts)
   opts = opts or {}
   local ids, pad = seq2seq.encoder_inputs(self, input_ids, opts, WHO .. ".encode")
   return self.encoder(ids, pad)
end

-- models/seq2seq.lua's hooks: the encoder's states; the decoder's logits for ids (B, L) after
-- cache.length tokens, over the encoder's states; the decoder's depth.
function T5ForConditionalGeneration:_encode(ids, pad) return self.encoder(ids, pad) end

function T5ForConditionalGeneration:_decode(ids, enc, enc_pad, memo, cache, keep)
   local h = self.decoder(ids, nil, enc, enc_pad, memo, cache)
   if keep and keep > 0 and keep < h:size(2) then h = h:narrow(2, h:size(2) - keep + 1, keep) end
   -- (T5's head reads the shared embedding, trained on states scaled down first)
   if self.config.scale_decoder_outputs then h = h * (self.config.d_model ^ -0.5) end
   return self.lm_head(h)
end

function T5ForConditionalGeneration:_decoder_layers() return self.config.num_decoder_layers end

--- forward(input_ids[, {attention_mask, decoder_input_ids, encoder_outputs, logits_to_keep}]) ->
-- logits (B, T, vocab) of the decoder over decoder_input_ids (default: the start token alone);
-- encoder_outputs (B, S, d_model) from encode skips the encoder.
function T5ForConditionalGeneration:forward(input_ids, opts)
   return seq2seq.forward(self, input_ids, opts, WHO .. ".forward")
end

--- generate(input_ids[, opts]) -> the decoder's ids (decoder_start_token_id, then the new ones),
-- in the input's form, and with num_beams their scores; opts as the causal models' generate
-- (attention_mask masks the input's padding), plus decoder_input_ids to start from.
function T5ForConditionalGeneration:generate(input_ids, opts)
   return seq2seq.generate(self, input_ids, opts, "T5")
end

--- T5EncoderModel: the encoder alone (shared, encoder.*), for embeddings and as the text encoder
-- of diffusion models (FLUX and SD3 read T5-v1.1-XXL's); a full checkpoint's decoder and head are
-- ignored, as transformers does. forward(input_ids[, {attention_mask}]) -> last hidden state
-- (B, S, d_model).
local T5EncoderModel = nn.Module:extend("T5EncoderModel")
M.T5EncoderModel = T5EncoderModel
T5EncoderModel.tied_weights = { ["encoder.embed_tokens.weight"] = "shared.weight" }
T5EncoderModel.no_split_modules = { "T5Block" }
T5EncoderModel.ignore_unexpected = { "^decoder%.", "^lm_head%." }

function T5EncoderModel:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
   self.encoder = T5Stack(cfg, false)
   self.encoder.embed_tokens.weight = self.shared.weight
   rawset(self, "config", cfg)
end

function T5EncoderModel:forward(input_ids, opts)
   opts = opts or {}
   local ids, pad = seq2seq.encoder_inputs(self, input_ids, opts, WHO .. ".T5EncoderModel")
   return self.encoder(ids, pad)
end

T5EncoderModel.encode = T5EncoderModel.forward

-- UMT5: the same classes (a bias in every layer comes from its config's model_type).
M.UMT5ForConditionalGeneration, M.UMT5EncoderModel = T5ForConditionalGeneration, T5EncoderModel

function M.from_config(cfg) return T5ForConditionalGeneration(cfg) end

return M
