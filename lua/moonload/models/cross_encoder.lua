--- Cross-encoders (rerankers) as sentence-transformers' CrossEncoder runs them: a query and a
-- passage read together by a sequence classifier (BertForSequenceClassification for
-- ms-marco-MiniLM, XLMRobertaForSequenceClassification for bge-reranker), one score per pair.
--
--    local ce = ml.models.cross_encoder.from_pretrained("path/to/ms-marco-MiniLM-L-6-v2")
--    local scores = ce:predict({{"How many people live in Berlin?", "Berlin has 3.5 million people."}, ...})
--    for _, hit in ipairs(ce:rank(query, passages, {top_k = 3})) do print(hit.corpus_id, hit.score) end
--
-- Any folder with the classifier's config.json, model.safetensors and tokenizer.json: the ones
-- sentence-transformers 6 saves (config_sentence_transformers.json), older ones (the activation
-- under config.json's "sentence_transformers" or "sbert_ce_default_activation_function") and plain
-- transformers folders. Pairs are cut to the tokenizer's model_max_length as the tokenizers
-- library's "longest_first" cuts them; the scores go through the folder's activation, else
-- sigmoid for one label (a relevance score in 0..1) and none for several.
local T = require("moonload.tensor")
local json = require("moonload.utils.json")

local M = {}
local WHO = "cross_encoder"

-- activation_fn paths sentence-transformers writes -> what predict applies
local ACTIVATIONS = {
   ["torch.nn.modules.activation.Sigmoid"] = "sigmoid", ["torch.nn.Sigmoid"] = "sigmoid",
   ["torch.nn.modules.linear.Identity"] = "identity", ["torch.nn.Identity"] = "identity",
   ["torch.nn.modules.activation.Softmax"] = "softmax", ["torch.nn.Softmax"] = "softmax",
   ["torch.nn.modules.activation.Tanh"] = "tanh", ["torch.nn.Tanh"] = "tanh",
}
local NAMES = { sigmoid = true, identity = true, softmax = true, tanh = true }

local function read_json(path) return json.read(path, WHO, true) end

-- The folder's activation: config_sentence_transformers.json (v6), config.json's
-- "sentence_transformers" (v4, v5) or "sbert_ce_default_activation_function" (older), else by
-- the number of labels.
local function folder_activation(dir, num_labels)
   local v6 = read_json(dir .. "/config_sentence_transformers.json") or {}
   local cfg = read_json(dir .. "/config.json") or {}
   local st = type(cfg.sentence_transformers) == "table" and cfg.sentence_transformers or {}
   local path = v6.activation_fn or st.activation_fn or cfg.sbert_ce_default_activation_function
   if type(path) == "string" then
      local act = ACTIVATIONS[path]
      if not act then
         error(string.format("%s.from_pretrained: %s's activation %s is not supported (supported: Sigmoid, Identity, "
            .. "Softmax, Tanh)", WHO, dir, path), 3)
      end
      return act
   end
   return num_labels == 1 and "sigmoid" or "identity"
end

local CE = {}
CE.__index = CE

--- from_pretrained(dir[, opts]) -> a CrossEncoder: the classifier loaded by
-- ml.models.from_pretrained (opts passed on: device_map, dtype, quantize, ...) and its tokenizer.
function M.from_pretrained(dir, opts)
   if type(dir) ~= "string" then error(WHO .. ".from_pretrained: expected a folder path, got " .. type(dir), 2) end
   dir = dir:gsub("/+$", "")
   local model = require("moonload.models").from_pretrained(dir, opts)
   if not model.num_labels then
      error(string.format("%s.from_pretrained: %s holds a %s, not a sequence classifier (its config.json's "
         .. "architectures should name one, e.g. BertForSequenceClassification)", WHO, dir, tostring(model.__name)), 2)
   end
   local self = setmetatable({ dir = dir, model = model, num_labels = model.num_labels }, CE)
   self.tokenizer = require("moonload.tokenizers").from_pretrained(dir)
   local tc = read_json(dir .. "/tokenizer_config.json") or {}
   local n = tonumber(tc.model_max_length)
   if n and n > 0 and n < 1e6 then self.max_length = n end
   self.activation = folder_activation(dir, model.num_labels)
   -- token types go to the models that have them (BERT's two; RoBERTa's one, all zeros)
   self.token_types = (model.config.type_vocab_size or 0) > 0
   return self
end

--- predict(pairs[, {batch_size = 32, activation}]) -> scores: (N) float32 for one label, else
-- (N, num_labels). pairs: a list of {query, passage}, run in batches of batch_size, longest
-- first. activation: "sigmoid", "identity", "softmax" or "tanh" (default: the folder's, see above).
function CE:predict(pairs, opts)
   opts = opts or {}
   if type(pairs) ~= "table" or #pairs == 0 then error(WHO .. ".predict: pairs must be a non-empty list of {a, b} pairs", 2) end
   for i, p in ipairs(pairs) do
      if type(p) ~= "table" or type(p[1]) ~= "string" or type(p[2]) ~= "string" then
         error(string.format("%s.predict: pairs[%d] must be a pair {a, b} of strings", WHO, i), 2)
      end
   end
   local act = opts.activation or self.activation
   if not NAMES[act] then
      error(string.format('%s.predict: activation must be "sigmoid", "identity", "softmax" or "tanh", got %s', WHO, tostring(act)), 2)
   end
   local rows, type_rows = {}, {}
   for i, p in ipairs(pairs) do
      rows[i], type_rows[i] = self.tokenizer:encode_pair(p[1], p[2], { truncation = self.max_length ~= nil,
         max_length = self.max_length })
   end
   -- in batches, longest first, as sentence-transformers runs them (less padding)
   local scores = require("moonload.models.sentence_transformer").length_sorted(rows, opts.batch_size or 32, function(batch)
      local picked, picked_types = {}, {}
      for k, i in ipairs(batch) do picked[k], picked_types[k] = rows[i], type_rows[i] end
      local ids, mask, types = self.tokenizer:pad(picked, nil, picked_types)
      local logits = self.model(T.tensor(ids, { dtype = "int64" }), { attention_mask = mask,
         token_type_ids = self.token_types and types or nil }).logits
      return logits:to("float32")
   end)
   if act == "sigmoid" then scores = scores:sigmoid()
   elseif act == "tanh" then scores = scores:tanh()
   elseif act == "softmax" then scores = scores:softmax(2) end
   if self.num_labels == 1 then scores = scores:view(scores:size(1)) end
   return scores
end

--- rank(query, documents[, {top_k, batch_size, activation, return_documents}]) -> a list of
-- {corpus_id (1-based), score[, text]}, best first (a one-label model's scores).
function CE:rank(query, documents, opts)
   opts = opts or {}
   if type(query) ~= "string" then error(WHO .. ".rank: query must be a string", 2) end
   if type(documents) ~= "table" or #documents == 0 then error(WHO .. ".rank: documents must be a non-empty list of strings", 2) end
   if self.num_labels ~= 1 then
      error(string.format("%s.rank: ranking needs a model with one label (this one has %d)", WHO, self.num_labels), 2)
   end
   local list = {}
   for i, d in ipairs(documents) do list[i] = { query, d } end
   local scores = self:predict(list, opts):tolist()
   local hits = {}
   for i, s in ipairs(scores) do
      hits[i] = { corpus_id = i, score = s, text = opts.return_documents and documents[i] or nil }
   end
   table.sort(hits, function(a, b)
      if a.score ~= b.score then return a.score > b.score end
      return a.corpus_id < b.corpus_id
   end)
   if opts.top_k then for i = #hits, opts.top_k + 1, -1 do hits[i] = nil end end
   return hits
end

return M
