--- Reranking passages for a query with a cross-encoder, as sentence-transformers' CrossEncoder
-- does it: each (query, passage) pair read together by a sequence classifier, one relevance score
-- per pair, best first.
--
--    luajit examples/rerank.lua [path/to/cross-encoder] ["query" "passage" ...]
--
-- Any cross-encoder folder with model.safetensors and tokenizer.json works: ms-marco-MiniLM-L-6-v2
-- (BERT), bge-reranker-base / -v2-m3 (XLM-R). Without an argument it takes the test folder
-- tests/fixtures/models/cross_encoder_bert_tiny (random weights: the order is noise, every step
-- is the real one, see tests/models_cross_encoder_spec.lua).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local dir = arg[1] or "tests/fixtures/models/cross_encoder_bert_tiny"
local query = arg[2] or "How many people live in Berlin?"
local passages = { select(3, ...) }
if #passages == 0 then
   passages = { "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
      "Berlin is well known for its museums.", "New York City is famous for the Metropolitan Museum of Art.",
      "Moonload runs big models from Lua with memory budgets." }
end

local ce = ml.models.cross_encoder.from_pretrained(dir)
print(string.format("%s: %s, %d label(s), %s, pairs cut at %s tokens", dir, ce.model.__name, ce.num_labels,
   ce.activation, tostring(ce.max_length)))
print("query: " .. query)
for rank, hit in ipairs(ce:rank(query, passages, { return_documents = true })) do
   print(string.format("%d. %.4f  %s", rank, hit.score, hit.text))
end
