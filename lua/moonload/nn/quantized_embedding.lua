--- nn.QuantizedEmbedding: an embedding table in int8 or int4, in nn.QuantizedLinear's layouts (a
-- float32 scale per 32 values of a row; int4 two values a byte). A lookup widens only the rows
-- of the ids asked for, so a large vocabulary costs its quantized bytes: Llama 3's 128256 x 2048
-- table is 1 GB in float32 and 160 MB in int4. from_gguf makes one for a quantized token_embd
-- (its tied head then reads the same tensors as a QuantizedLinear); from_float makes one from an
-- nn.Embedding. Rows come out in the dtype the model computes in (a zero-size buffer that
-- model:to converts keeps it).
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")
local T = require("moonload.tensor")

local QuantizedEmbedding = Module:extend("QuantizedEmbedding")
QuantizedEmbedding.keep_float32_buffers = { weight_scale = true }
QuantizedEmbedding.lookup_table = true     -- as nn.Embedding: looked up where its weights lie

local BLOCK = 32

--- QuantizedEmbedding(num_embeddings, embedding_dim[, {bits = 8}]): zero rows.
function QuantizedEmbedding:__init(num_embeddings, embedding_dim, opts)
   opts = opts or {}
   local bits = opts.bits or 8
   if bits ~= 8 and bits ~= 4 then
      error("QuantizedEmbedding: bits must be 8 or 4, got " .. tostring(bits), 3)
   end
   if type(embedding_dim) ~= "number" or embedding_dim <= 0 or embedding_dim % BLOCK ~= 0 then
      error(string.format("QuantizedEmbedding: embedding_dim must be a positive multiple of %d, got %s", BLOCK,
         tostring(embedding_dim)), 3)
   end
   self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
   self.weight = Module.new_parameter({ num_embeddings, bits == 8 and embedding_dim or embedding_dim / 2 },
      { dtype = bits == 8 and "int8" or "uint8" })
   self.weight_scale = Module.new_parameter({ num_embeddings, embedding_dim / BLOCK })
   if not self.weight:is_meta() then
      self.weight:fill_(bits == 8 and 0 or 0x88)
      self.weight_scale:fill_(1)
   end
   self:register_buffer("output_dtype", T.zeros({ 0 }), false)
end

--- from_float(m[, bits = 8]) -> the QuantizedEmbedding of nn.Embedding m (rows rounded as
-- QuantizedLinear's weights are), on m's device.
function QuantizedEmbedding.from_float(m, bits)
   local QuantizedLinear = require("moonload.nn.quantized_linear")
   local q, scales = QuantizedLinear.quantize_weight(m.weight, bits or 8)
   local e = QuantizedEmbedding(m.num_embeddings, m.embedding_dim, { bits = bits or 8 })
   e.weight, e.weight_scale = q, scales
   e.output_dtype = T.zeros({ 0 }, { dtype = m.weight.dtype, device = m.weight.device })
   return e
end

function QuantizedEmbedding:forward(ids)
   local flat = ids:reshape(-1)
   if flat.dtype ~= "int64" then flat = flat:to("int64") end
   local q, s = self.weight:index_select(1, flat), self.weight_scale:index_select(1, flat)
   local dtype = self.output_dtype.dtype
   local rows = self.bits == 8 and F.dequantize_q8(q, s, dtype) or F.dequantize_q4(q, s, dtype)
   local shape = {}
   for i, d in ipairs(ids.shape) do shape[i] = d end
   shape[#shape + 1] = self.embedding_dim
   return rows:view(shape)
end

function QuantizedEmbedding:extra_repr()
   return string.format("%d, %d, int%d in blocks of %d", self.num_embeddings, self.embedding_dim, self.bits, BLOCK)
end

return QuantizedEmbedding
