--- nn.Embedding(num_embeddings, embedding_dim[, {padding_idx, dtype, device}]): a lookup table
-- of rows indexed by 0-based integer ids. Initialisation: N(0, 1), the padding row zeroed.
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")
local init = require("moonload.nn.weight_init")

local Embedding = Module:extend("Embedding")
-- A lookup reads a few rows of its table: an offloading hook runs it where its weights lie rather
-- than streaming the table to the GPU (hooks.set_lookup_in_place).
Embedding.lookup_table = true

function Embedding:__init(num_embeddings, embedding_dim, opts)
   for _, a in ipairs({ { "num_embeddings", num_embeddings }, { "embedding_dim", embedding_dim } }) do
      if type(a[2]) ~= "number" or a[2] % 1 ~= 0 or a[2] < 0 then
         error(string.format("Embedding: %s must be a non-negative integer, got %s", a[1], tostring(a[2])), 3)
      end
   end
   opts = opts or {}
   local pad = opts.padding_idx
   if pad ~= nil then
      if type(pad) ~= "number" or pad % 1 ~= 0 or pad >= num_embeddings or pad < -num_embeddings then
         error(string.format("Embedding: padding_idx must be within num_embeddings (0-based, %d..%d), got %s",
            -num_embeddings, num_embeddings - 1, tostring(pad)), 3)
      end
      if pad < 0 then pad = pad + num_embeddings end
   end
   self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, pad
   self.weight = Module.new_parameter({ num_embeddings, embedding_dim }, opts)
   self:reset_parameters()
end

function Embedding:reset_parameters()
   init.normal_(self.weight, 0, 1)
   if self.padding_idx ~= nil and self.weight.device ~= "meta" then
      self.weight:select(1, self.padding_idx + 1):fill_(0)
   end
end

function Embedding:forward(ids)
   return F.embedding(ids, self.weight)
end

function Embedding:extra_repr()
   local s = string.format("%d, %d", self.num_embeddings, self.embedding_dim)
   if self.padding_idx ~= nil then s = s .. ", padding_idx=" .. self.padding_idx end
   return s
end

return Embedding
