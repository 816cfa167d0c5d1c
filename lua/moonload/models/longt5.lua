--- LongT5 (transformers' LongT5ForConditionalGeneration: google/long-t5-local-base, -large,
-- google/long-t5-tglobal-base, -large, -xl, and fine-tunes such as
-- pszemraj/long-t5-tglobal-base-16384-book-summary) with Hugging Face parameter names: T5's
-- (models/t5.lua), the encoder's self-attention under encoder.block.N.layer.0.LocalSelfAttention.{q,
-- k,v,o,relative_attention_bias} or .TransientGlobalSelfAttention.{the same,
-- global_relative_attention_bias, global_input_layer_norm}.
--
-- T5 whose encoder attends locally, for inputs of thousands of tokens: a token sees the keys at
-- most local_radius positions away (computed as transformers does, in blocks of local_radius + 1
-- queries over the block before, their own and the one after). With encoder_attention_type
-- "transient-global" each token also sees one key per global_block_size tokens: the sum of that
-- block's states, RMS-normed, with a relative bias of its own for the distance in blocks. The
-- decoder and the head are T5's (v1.1 as the hub's folders have them: gated GELU, a head of its
-- own, tie_word_embeddings false).
--
--    local model = ml.models.from_pretrained(dir)          -- a LongT5ForConditionalGeneration
--    local summary = model:generate(ids, {attention_mask = mask, max_new_tokens = 200})
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local t5 = require("moonload.models.t5")

local M = {}
local WHO = "models.longt5"

-- (the score offset of a masked key, transformers' -1e10: a padding query, which sees no key,
-- averages over its three blocks as transformers' does)
local MASKED = -1e10

M.schema = config.schema_from(t5.schema, { scale_decoder_outputs = false }, {
   { "local_radius", "int0", 127 },
   { "global_block_size", "int", 16 },
   { "encoder_attention_type", "string", "local" },
})

local ATTENTION_TYPES = { ["local"] = true, ["transient-global"] = true }

--- Reads and checks a LongT5 config (path, folder or table): T5's (models/t5.lua) plus the
-- encoder's attention; the decoder's output is scaled by d_model^-0.5 exactly when the head is
-- tied (LongT5Config reads no scale_decoder_outputs).
function M.config(source)
   local cfg = t5.config(source, M.schema, WHO)
   if not ATTENTION_TYPES[cfg.encoder_attention_type] then
      config.fail(cfg, WHO, 'config key "encoder_attention_type" is "%s" (supported: local, transient-global)',
         cfg.encoder_attention_type)
   end
   cfg.scale_decoder_outputs = cfg.tie_head
   return cfg
end

-- --- blocks of tokens -----------------------------------------------------------------------

--- x (B, S, ...) zero-padded to nb * bl tokens and split: (B, nb, bl, ...).
local function blocks(x, bl, nb)
   local shape = x.shape
   if shape[2] < nb * bl then
      shape[2] = nb * bl - shape[2]
      x = T.cat({ x, T.zeros(shape, { dtype = x.dtype, device = x.device }) }, 2)
      shape[2] = nb * bl
   end
   table.remove(shape, 2)
   table.insert(shape, 2, bl)
   table.insert(shape, 2, nb)
   return x:reshape(shape)
end

--- x (B, nb, bl, ...) -> (B, nb, 3 bl, ...): each block after the one before it and before the one
-- after it (zeros past the ends).
local function three_blocks(x)
   local shape = x.shape
   local nb = shape[2]
   shape[2] = 1
   local zero = T.zeros(shape, { dtype = x.dtype, device = x.device })
   local padded = T.cat({ zero, x, zero }, 2)
   return T.cat({ padded:narrow(2, 1, nb), padded:narrow(2, 2, nb), padded:narrow(2, 3, nb) }, 3)
end

--- The global blocks of each row of pad (B, S) bool, as transformers' _make_global_fixed_block_ids
-- makes them: token i is in block floor(i / size), the tokens after a row's last full block in
-- that one, padding in none (-1); a row has the blocks up to its last. Returns the ids (B, S) and
-- has (B, G) int64 (1: the row has block g, 0: not), G = floor(S / size).
local function global_blocks(pad, size)
   local rows = pad:tolist()
   local S = pad:size(2)
   local G = math.floor(S / size)
   local ids, has = {}, {}
   for b, row in ipairs(rows) do
      local full = 0
      for i = size, S, size do if row[i] then full = full + 1 end end
      local r, last = {}, -1
      for i = 1, S do
         r[i] = row[i] and math.min(math.floor((i - 1) / size), full - 1) or -1
         last = math.max(last, r[i])
      end
      local h = {}
      for g = 1, G do h[g] = g - 1 <= last and 1 or 0 end
      ids[b], has[b] = r, h
   end
   local dev = pad.device
   return T.tensor(ids, { dtype = "int64" }):to(dev), T.tensor(has, { dtype = "int64" }):to(dev)
end

-- --- the encoder's attention ----------------------------------------------------------------

-- (T5's projections, relative bias and kv_cache_heads, attending in blocks)
local LongT5LocalAttention = t5.T5Attention:extend("LongT5LocalAttention")
M.LongT5LocalAttention = LongT5LocalAttention

function LongT5LocalAttention:__init(cfg, has_relative_bias)
   t5.T5Attention.__init(self, cfg, has_relative_bias, true, "none")   -- (an encoder's: utils/runtime_memory)
   rawset(self, "block_len", cfg.local_radius + 1)
end

--- The bucket of each distance in `rels` (a list), as a tensor of `shape` on device.
function LongT5LocalAttention:buckets(rels, shape, device)
   local out = {}
   for n, rel in ipairs(rels) do
      out[n] = t5.relative_position_bucket(rel, true, self.num_buckets, self.max_distance)
   end
   return T.tensor(out, { dtype = "int64" }):view(shape):to(device)
end

--- The local scores' bias (B, nb, H, bl, 3 bl) in float32 for pad (B, S) bool: each block's
-- relative position bias, and MASKED where the key is padding, past the ends or farther than
-- local_radius, or the query is padding.
function LongT5LocalAttention:local_bias(pad)
   local bl, H = self.block_len, self.n_head
   local weight = self.relative_attention_bias.weight
   local dev = weight.device
   pad = pad:to(dev)
   local B, nb = pad:size(1), math.ceil(pad:size(2) / bl)
   local rels = {}
   for i = 0, bl - 1 do for j = 0, 3 * bl - 1 do rels[#rels + 1] = j - (bl + i) end end
   local position = self.relative_attention_bias(self:buckets(rels, { bl, 3 * bl }, dev))   -- (bl, 3 bl, H)
      :permute(3, 1, 2):to("float32")
   local near = T.ones({ bl, 3 * bl }, { dtype = "bool", device = dev }):triu(1):tril(2 * bl - 1)
   local q = blocks(pad, bl, nb)                                                             -- (B, nb, bl)
   local seen = q:unsqueeze(4):logical_and(three_blocks(q):unsqueeze(3)):logical_and(near)  -- (B, nb, bl, 3 bl)
   local masked = T.zeros({ B, nb, bl, 3 * bl }, { device = dev }):masked_fill(seen:logical_not(), MASKED)
   return masked:unsqueeze(3) + position:view(1, 1, H, bl, 3 * bl)
end

--- What every layer of the stack reads, made by the first from pad (B, S) bool: the scores' bias
-- (B * nb, H, bl, keys) in dtype.
function LongT5LocalAttention:layout(pad, dtype)
   local bias, bl = self:local_bias(pad), self.block_len
   return { bias = bias:reshape(bias:size(1) * bias:size(2), self.n_head, bl, 3 * bl):to(dtype) }
end

--- No keys beyond the local ones.
function LongT5LocalAttention:global_keys() return nil end

--- x (B, S, d_model) -> (B, S, d_model): each block of queries over its three blocks' keys (and
-- the global keys), with layout's bias.
function LongT5LocalAttention:forward(x, layout)
   local B, S = x:size(1), x:size(2)
   local H, D, bl = self.n_head, self.head_dim, self.block_len
   local nb = math.ceil(S / bl)
   local function split(t) return blocks(t:view(B, S, H, D), bl, nb) end                 -- (B, nb, bl, H, D)
   local q = split(self.q(x)):permute(1, 2, 4, 3, 5):reshape(B * nb, H, bl, D)
   local k, v = three_blocks(split(self.k(x))), three_blocks(split(self.v(x)))           -- (B, nb, 3 bl, H, D)
   local gk, gv = self:global_keys(x, layout)                                            -- (B, G, H, D)
   if gk then
      local G = gk:size(2)
      k = T.cat({ k, gk:unsqueeze(2):expand(B, nb, G, H, D) }, 3)
      v = T.cat({ v, gv:unsqueeze(2):expand(B, nb, G, H, D) }, 3)
   end
   local K = k:size(3)
   k = k:permute(1, 2, 4, 3, 5):reshape(B * nb, H, K, D)
   v = v:permute(1, 2, 4, 3, 5):reshape(B * nb, H, K, D)
   local y = common.attention(q, k, v, layout.bias, false, 1.0)                           -- (B * nb, H, bl, D)
   y = y:view(B, nb, H, bl, D):permute(1, 2, 4, 3, 5):reshape(B, nb * bl, H * D)
   return self.o(y:narrow(2, 1, S):contiguous())
end

local LongT5TransientGlobalAttention = LongT5LocalAttention:extend("LongT5TransientGlobalAttention")
M.LongT5TransientGlobalAttention = LongT5TransientGlobalAttention

function LongT5TransientGlobalAttention:__init(cfg, has_relative_bias)
   LongT5LocalAttention.__init(self, cfg, has_relative_bias)
   if has_relative_bias then
      self.global_relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
   end
   self.global_input_layer_norm = nn.RMSNorm(cfg.d_model, { eps = cfg.layer_norm_epsilon })
   rawset(self, "global_block_size", cfg.global_block_size)
end

--- The local bias, then the global keys' (B, nb, H, bl, G): the bias of the distance in blocks,
-- and MASKED where a token's row lacks the block (a padding token sees only the blocks its row
-- lacks, as transformers has it); and members (B, G, S): which tokens make each global block.
function LongT5TransientGlobalAttention:layout(pad, dtype)
   local bias = self:local_bias(pad)
   local B, nb, H, bl = bias:size(1), bias:size(2), bias:size(3), bias:size(4)
   local dev = bias.device
   local S = pad:size(2)
   local ids, has = global_blocks(pad:to(dev), self.global_block_size)
   local G = has:size(2)
   local members
   if G > 0 then
      local g = T.arange(G, { device = dev })
      members = ids:view(B, 1, S):eq(g:view(1, G, 1))
      -- each distance g - id (in -(G - 1) .. G) through its bucket's bias: (B, S, G, H)
      local rels = {}
      for rel = -(G - 1), G do rels[#rels + 1] = rel end
      local by_rel = self.global_relative_attention_bias(self:buckets(rels, { 2 * G }, dev)):to("float32")
      local index = (g:view(1, 1, G) - ids:view(B, S, 1)) + (G - 1)
      local side = by_rel:index_select(1, index:reshape(B * S * G)):view(B, S, G, H)
      local own = pad:to(dev):to("int64"):view(B, S, 1):eq(has:view(B, 1, G))
      side = side + T.zeros({ B, S, G, 1 }, { device = dev }):masked_fill(own:logical_not():unsqueeze(4), MASKED)
      side = blocks(side:permute(1, 2, 4, 3), bl, nb):permute(1, 2, 4, 3, 5)             -- (B, nb, H, bl, G)
      bias = T.cat({ bias, side }, 5)
   end
   return { bias = bias:reshape(B * nb, H, bl, bias:size(5)):to(dtype), members = members }
end

--- The global blocks' keys and values (B, G, H, D): each block's states x summed, then normed.
function LongT5TransientGlobalAttention:global_keys(x, layout)
   if not layout.members then return nil end
   local B, G = x:size(1), layout.members:size(2)
   local g = self.global_input_layer_norm(layout.members:to(x.dtype):matmul(x))
   return self.k(g):view(B, G, self.n_head, self.head_dim), self.v(g):view(B, G, self.n_head, self.head_dim)
end

-- --- blocks ---------------------------------------------------------------------------------

local function layer_class(name, attention_name, Attention)
   local cls = nn.Module:extend(name)
   M[name] = cls
   function cls:__init(cfg, has_relative_bias)
      nn.Module.__init(self)
      self[attention_name] = Attention(cfg, has_relative_bias)
      self.layer_norm = nn.RMSNorm(cfg.d_model, { eps = cfg.layer_norm_epsilon })
      self.dropout = nn.Dropout(0)
   end
   cls.attention_name = attention_name
   return cls
end

local LAYERS = {
   ["local"] = layer_class("LongT5LayerLocalSelfAttention", "LocalSelfAttention", LongT5LocalAttention),
   ["transient-global"] = layer_class("LongT5LayerTransientGlobalSelfAttention", "TransientGlobalSelfAttention",
      LongT5TransientGlobalAttention),
}

--- A block of either stack: the decoder's are T5's; the encoder's attend locally.
local LongT5Block = t5.T5Block:extend("LongT5Block")
M.LongT5Block = LongT5Block

function LongT5Block:__init(cfg, is_decoder, has_relative_bias)
   if is_decoder then return t5.T5Block.__init(self, cfg, true, has_relative_bias) end
   nn.Module.__init(self)
   self.layer = nn.ModuleList({ LAYERS[cfg.encoder_attention_type](cfg, has_relative_bias), t5.T5LayerFF(cfg) })
   rawset(self, "is_local", true)
end

--- As T5Block's; in the encoder, layout (what the first block makes from pad, (B, S) bool or nil)
-- takes the place of the mask.
function LongT5Block:forward(x, layout, pad, ...)
   if not rawget(self, "is_local") then return t5.T5Block.forward(self, x, layout, pad, ...) end
   local sa = self.layer[1]
   local attn = sa[sa.attention_name]
   if attn.relative_attention_bias then
      pad = pad or T.ones({ x:size(1), x:size(2) }, { dtype = "bool" })
      layout = attn:layout(pad, x.dtype)
   end
   local h = x + attn(sa.layer_norm(x), layout)
   return self.layer[2](h), layout
end

-- --- the model ------------------------------------------------------------------------------

--- T5ForConditionalGeneration's model (encode, forward, generate) over LongT5's blocks.
local LongT5ForConditionalGeneration = t5.T5ForConditionalGeneration:extend("LongT5ForConditionalGeneration")
M.LongT5ForConditionalGeneration = LongT5ForConditionalGeneration
LongT5ForConditionalGeneration.no_split_modules = { "LongT5Block" }
LongT5ForConditionalGeneration.read_config, LongT5ForConditionalGeneration.Block = M.config, LongT5Block

function M.from_config(cfg) return LongT5ForConditionalGeneration(cfg) end

return M
