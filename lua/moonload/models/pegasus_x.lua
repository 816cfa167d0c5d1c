--- PEGASUS-X (transformers' PegasusXForConditionalGeneration: google/pegasus-x-base, -large and
-- their fine-tunes, for inputs of up to 16K tokens) with Hugging Face parameter names:
-- model.{shared, encoder.{embed_tokens, embed_global, layers.N.{self_attn.{q,k,v,out}_proj,
-- self_attn_layer_norm, global_self_attn_layer_norm, fc1, fc2, final_layer_norm}, layer_norm},
-- decoder.{embed_tokens, layers.N.{self_attn.*, self_attn_layer_norm, encoder_attn.*,
-- encoder_attn_layer_norm, fc1, fc2, final_layer_norm}, layer_norm}}, lm_head (tied to shared).
--
-- Pegasus' pre-norm encoder-decoder (models/bart.lua's layers) without biases in its attention,
-- with sinusoidal positions computed for any length (sin over the first half of the dims, cos over
-- the second, frequencies exp(-k log(10000) / (d/2 - 1))) and no bias on the logits. The encoder
-- attends in blocks: each token to the tokens of its block of block_size and to num_global_tokens
-- learned global tokens, which attend to all tokens and each other and pass through every layer
-- beside the tokens (their own norm before attention; the tokens' MLP). Every other layer (the
-- second, the fourth, ...) staggers its blocks by half a block (stagger_local_blocks). The input
-- is padded to a multiple of block_size.
--
--    local model = ml.models.from_pretrained(dir)    -- a PegasusXForConditionalGeneration
--    local summary = model:generate(ids, {attention_mask = mask})
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local bart = require("moonload.models.bart")
local seq2seq = require("moonload.models.seq2seq")

local M = {}
local WHO = "models.pegasus_x"

local function check(cfg)
   if cfg.stagger_local_blocks and cfg.block_size % 2 ~= 0 then
      config.fail(cfg, WHO, 'config key "block_size" must be even with stagger_local_blocks, got %d', cfg.block_size)
   end
end

-- Pegasus' keys with PegasusXConfig's defaults, plus the encoder's blocks.
local function default(key, kind, value) return { key, kind, value } end
bart.FAMILIES.pegasus_x = { who = WHO, pre_norm = true, positions = "computed", check = check,
   schema = config.schema_from(bart.schema, {
      vocab_size = default("vocab_size", "int", 96103), d_model = default("d_model", "int", 1024),
      encoder_layers = default("encoder_layers", "int", 16), decoder_layers = default("decoder_layers", "int", 16),
      encoder_attention_heads = default("encoder_attention_heads", "int", 16),
      decoder_attention_heads = default("decoder_attention_heads", "int", 16),
      encoder_ffn_dim = default("encoder_ffn_dim", "int", 4096),
      decoder_ffn_dim = default("decoder_ffn_dim", "int", 4096),
      max_position_embeddings = default("max_position_embeddings", "int", 16384),
      scale_embedding = default("scale_embedding", "bool", true),
      decoder_start_token_id = default("decoder_start_token_id", "int0", 0),
   }, {
      { "num_global_tokens", "int", 32 },
      { "block_size", "int", 512 },
      { "stagger_local_blocks", "bool", true },
      { "tie_word_embeddings", "bool", true },
   }) }

--- Reads and checks a PEGASUS-X config (path, folder or table).
function M.config(source) return bart.config(source, "pegasus_x") end

--- The positions past .. past + L - 1 as transformers' PegasusXSinusoidalPositionalEmbedding
-- computes them: (L, d) in dtype on device.
function M.positions(past, L, d, dtype, device)
   local half = math.floor(d / 2)
   local freq = (T.arange(0, half, { dtype = "float32" }) * -(math.log(10000) / (half - 1))):exp()
   local angles = T.arange(past, past + L, { dtype = "float32" }):view(L, 1) * freq:view(1, half)
   return T.cat({ angles:sin(), angles:cos() }, 2):to(dtype):to(device)
end

-- --- attention ------------------------------------------------------------------------------

--- BART's attention (self, cross, cached) without biases: the decoder's.
local PegasusXAttention = bart.BartAttention:extend("PegasusXAttention")
M.PegasusXAttention = PegasusXAttention

function PegasusXAttention:__init(d, heads, role)
   nn.Module.__init(self)
   rawset(self, "cache_role", role)
   self.k_proj = nn.Linear(d, d, { bias = false })
   self.v_proj = nn.Linear(d, d, { bias = false })
   self.q_proj = nn.Linear(d, d, { bias = false })
   self.out_proj = nn.Linear(d, d, { bias = false })
   rawset(self, "n_head", heads)
   rawset(self, "head_dim", d / heads)
end

--- The encoder's: tokens over their block and the global tokens, global tokens over everything.
local PegasusXGlobalLocalAttention = PegasusXAttention:extend("PegasusXGlobalLocalAttention")
M.PegasusXGlobalLocalAttention = PegasusXGlobalLocalAttention

function PegasusXGlobalLocalAttention:__init(d, heads, block_size)
   PegasusXAttention.__init(self, d, heads, "none")
   rawset(self, "block_size", block_size)
end

--- x (B, Sp, d) tokens (Sp a multiple of block_size), g (B, G, d) global tokens, seen (B, Sp)
-- bool (false: padding) -> the tokens' and the global tokens' outputs.
function PegasusXGlobalLocalAttention:forward(x, g, seen)
   local B, Sp, G = x:size(1), x:size(2), g:size(2)
   local H, D, bs = self.n_head, self.head_dim, self.block_size
   local nb = Sp / bs
   local scale = 1 / math.sqrt(D)
   local function split(t, n) return t:view(B, n, H, D) end
   local q, k, v = split(self.q_proj(x), Sp), split(self.k_proj(x), Sp), split(self.v_proj(x), Sp)
   local gq, gk, gv = split(self.q_proj(g), G), split(self.k_proj(g), G), split(self.v_proj(g), G)
   local every = T.ones({ B, G }, { dtype = "bool", device = seen.device })
   -- global tokens: over the global tokens, then all tokens
   local keys = T.cat({ gk, k }, 2):transpose(2, 3)
   local values = T.cat({ gv, v }, 2):transpose(2, 3)
   local mask = T.cat({ every, seen }, 2):view(B, 1, 1, G + Sp)
   local gy = common.attention(gq:transpose(2, 3), keys, values, mask, false, scale)            -- (B, H, G, D)
   -- tokens: each block over the global tokens, then its own tokens
   local function blocks(t) return t:view(B, nb, bs, H, D) end
   local function globals(t) return t:unsqueeze(2):expand(B, nb, G, H, D) end
   local function heads_first(t, n) return t:permute(1, 2, 4, 3, 5):reshape(B * nb, H, n, D) end
   keys = heads_first(T.cat({ globals(gk), blocks(k) }, 3), G + bs)
   values = heads_first(T.cat({ globals(gv), blocks(v) }, 3), G + bs)
   mask = T.cat({ every:view(B, 1, G):expand(B, nb, G), seen:view(B, nb, bs) }, 3):view(B * nb, 1, 1, G + bs)
   local y = common.attention(heads_first(blocks(q), bs), keys, values, mask, false, scale)     -- (B nb, H, bs, D)
   y = y:view(B, nb, H, bs, D):permute(1, 2, 4, 3, 5):reshape(B, Sp, H * D)
   return self.out_proj(y), self.out_proj(gy:transpose(2, 3):reshape(B, G, H * D))
end

-- --- layers ---------------------------------------------------------------------------------

local PegasusXEncoderLayer = nn.Module:extend("PegasusXEncoderLayer")
M.PegasusXEncoderLayer = PegasusXEncoderLayer

function PegasusXEncoderLayer:__init(cfg, i)
   nn.Module.__init(self)
   local d = cfg.d_model
   self.self_attn = PegasusXGlobalLocalAttention(d, cfg.encoder_attention_heads, cfg.block_size)
   self.self_attn_layer_norm = nn.LayerNorm(d)
   self.global_self_attn_layer_norm = nn.LayerNorm(d)
   self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
   self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
   self.final_layer_norm = nn.LayerNorm(d)
   self.activation_fn = common.activation_module(cfg.activation_function, WHO, cfg._source)
   rawset(self, "staggered", cfg.stagger_local_blocks and i % 2 == 0)     -- (the second, fourth, ... layer)
   rawset(self, "block_size", cfg.block_size)
end

function PegasusXEncoderLayer:mlp(x) return x + self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(x)))) end

--- x (B, Sp, d), g (B, G, d), seen (B, Sp) bool -> x, g. A staggered layer puts half a block of
-- padding before and after the tokens, which shifts the blocks by half a block.
function PegasusXEncoderLayer:forward(x, g, seen)
   local h = self.self_attn_layer_norm(x)
   if self.staggered then
      local B, half = x:size(1), self.block_size / 2
      local zeros = T.zeros({ B, half, x:size(3) }, { dtype = h.dtype, device = h.device })
      local none = T.zeros({ B, half }, { dtype = "bool", device = seen.device })
      h, seen = T.cat({ zeros, h, zeros }, 2), T.cat({ none, seen, none }, 2)
   end
   local y, gy = self.self_attn(h, self.global_self_attn_layer_norm(g), seen)
   if self.staggered then y = y:narrow(2, self.block_size / 2 + 1, x:size(2)) end
   return self:mlp(x + y), self:mlp(g + gy)
end

--- Pegasus' pre-norm decoder layer (models/bart.lua's forward) without attention biases.
local PegasusXDecoderLayer = bart.BartDecoderLayer:extend("PegasusXDecoderLayer")
M.PegasusXDecoderLayer = PegasusXDecoderLayer

function PegasusXDecoderLayer:__init(cfg)
   nn.Module.__init(self)
   local d = cfg.d_model
   self.self_attn = PegasusXAttention(d, cfg.decoder_attention_heads, "self")
   self.self_attn_layer_norm = nn.LayerNorm(d)
   self.encoder_attn = PegasusXAttention(d, cfg.decoder_attention_heads, "cross")
   self.encoder_attn_layer_norm = nn.LayerNorm(d)
   self.fc1 = nn.Linear(d, cfg.decoder_ffn_dim)
   self.fc2 = nn.Linear(cfg.decoder_ffn_dim, d)
   self.final_layer_norm = nn.LayerNorm(d)
   self.activation_fn = common.activation_module(cfg.activation_function, WHO, cfg._source)
   rawset(self, "pre_norm", true)
end

-- --- stacks ---------------------------------------------------------------------------------

local function stack_init(self, cfg, Layer, n)
   nn.Module.__init(self)
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
   local layers = {}
   for i = 1, n do layers[i] = Layer(cfg, i) end
   self.layers = nn.ModuleList(layers)
   self.layer_norm = nn.LayerNorm(cfg.d_model)
   rawset(self, "embed_scale", cfg.scale_embedding and math.sqrt(cfg.d_model) or 1)
end

--- The scaled embeddings of ids (B, L) plus the positions past .. past + L - 1.
local function embed(self, ids, past)
   local x = self.embed_tokens(common.to_weight_device(ids, self.embed_tokens.weight))
   if self.embed_scale ~= 1 then x = x * self.embed_scale end
   return x + M.positions(past, ids:size(2), x:size(3), x.dtype, x.device)
end

local PegasusXEncoder = nn.Module:extend("PegasusXEncoder")
M.PegasusXEncoder = PegasusXEncoder

function PegasusXEncoder:__init(cfg)
   stack_init(self, cfg, PegasusXEncoderLayer, cfg.encoder_layers)
   self.embed_global = nn.Embedding(cfg.num_global_tokens, cfg.d_model)
   rawset(self, "block_size", cfg.block_size)
end

--- ids (B, S), pad (B, S) bool or nil -> states (B, S, d).
function PegasusXEncoder:forward(ids, pad)
   local x = embed(self, ids, 0)
   local B, S, d = x:size(1), x:size(2), x:size(3)
   local seen = pad and pad:to(x.device) or T.ones({ B, S }, { dtype = "bool", device = x.device })
   local extra = -S % self.block_size                         -- (padding up to a multiple of block_size)
   if extra > 0 then
      x = T.cat({ x, T.zeros({ B, extra, d }, { dtype = x.dtype, device = x.device }) }, 2)
      seen = T.cat({ seen, T.zeros({ B, extra }, { dtype = "bool", device = seen.device }) }, 2)
   end
   local w = self.embed_global.weight
   local g = self.embed_global(common.to_weight_device(T.arange(0, w:size(1)), w)):unsqueeze(1):expand(B, w:size(1), d)
   for i = 1, #self.layers do x, g = self.layers[i](x, g, seen) end
   return self.layer_norm(x:narrow(2, 1, S))
end

local PegasusXDecoder = nn.Module:extend("PegasusXDecoder")
M.PegasusXDecoder = PegasusXDecoder

function PegasusXDecoder:__init(cfg) stack_init(self, cfg, PegasusXDecoderLayer, cfg.decoder_layers) end

--- ids (B, L) after cache.length tokens over the encoder's states enc (B, S, d), enc_pad (B, S)
-- bool or nil, memo (their keys and values per layer, or nil) -> states (B, L, d).
function PegasusXDecoder:forward(ids, enc, enc_pad, memo, cache)
   local x = embed(self, ids, cache and cache.length or 0)
   local enc_mask = enc_pad and enc_pad:view(enc_pad:size(1), 1, 1, enc_pad:size(2)) or nil
   local mask
   if cache == nil then mask = false end                       -- (causal without a cache too)
   for i = 1, #self.layers do x = self.layers[i](x, mask, enc, enc_mask, memo, cache, i) end
   if cache then cache:advance(ids:size(2)) end
   return self.layer_norm(x)
end

local PegasusXModel = nn.Module:extend("PegasusXModel")
M.PegasusXModel = PegasusXModel

function PegasusXModel:__init(cfg)
   nn.Module.__init(self)
   self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
   self.encoder = PegasusXEncoder(cfg)
   self.decoder = PegasusXDecoder(cfg)
   if cfg.tie_word_embeddings then
      self.encoder.embed_tokens.weight = self.shared.weight
      self.decoder.embed_tokens.weight = self.shared.weight
   end
end

-- --- the model ------------------------------------------------------------------------------

local PegasusXForConditionalGeneration = nn.Module:extend("PegasusXForConditionalGeneration")
M.PegasusXForConditionalGeneration = PegasusXForConditionalGeneration
PegasusXForConditionalGeneration.base_model_prefix = "model"
PegasusXForConditionalGeneration.tied_weights = { ["lm_head.weight"] = "model.shared.weight",
   ["model.encoder.embed_tokens.weight"] = "model.shared.weight",
   ["model.decoder.embed_tokens.weight"] = "model.shared.weight" }
PegasusXForConditionalGeneration.no_split_modules = { "PegasusXEncoderLayer", "PegasusXDecoderLayer" }

function PegasusXForConditionalGeneration:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.model = PegasusXModel(cfg)
   self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, { bias = false })
   if cfg.tie_word_embeddings then self.lm_head.weight = self.model.shared.weight end
   rawset(self, "config", cfg)
end

--- encode(input_ids[, {attention_mask}]) -> the encoder's last hidden state (B, S, d_model).
function PegasusXForConditionalGeneration:encode(input_ids, opts)
   local ids, pad = seq2seq.encoder_inputs(self, input_ids, opts or {}, WHO .. ".encode")
   return self.model.encoder(ids, pad)
end

-- models/seq2seq.lua's hooks
function PegasusXForConditionalGeneration:_encode(ids, pad) return self.model.encoder(ids, pad) end

function PegasusXForConditionalGeneration:_decode(ids, enc, enc_pad, memo, cache, keep)
   local h = self.model.decoder(ids, enc, enc_pad, memo, cache)
   if keep and keep > 0 and keep < h:size(2) then h = h:narrow(2, h:size(2) - keep + 1, keep) end
   return self.lm_head(h)
end

function PegasusXForConditionalGeneration:_decoder_layers() return self.config.decoder_layers end

--- forward(input_ids[, {attention_mask, decoder_input_ids, encoder_outputs, logits_to_keep}]) ->
-- logits (B, T, vocab) of the decoder over decoder_input_ids (default: the start token alone).
function PegasusXForConditionalGeneration:forward(input_ids, opts)
   return seq2seq.forward(self, input_ids, opts, WHO .. ".forward")
end

--- generate(input_ids[, opts]) -> the decoder's ids, in the input's form (models/seq2seq.lua).
function PegasusXForConditionalGeneration:generate(input_ids, opts)
   return seq2seq.generate(self, input_ids, opts, "PEGASUS-X")
end

function M.from_config(cfg) return PegasusXForConditionalGeneration(cfg) end

return M
