--- Switch Transformers (transformers' SwitchTransformersForConditionalGeneration: google/switch-base-8
-- .. switch-base-256, switch-large-128, switch-xxl-128, switch-c-2048) with Hugging Face parameter
-- names: T5's (models/t5.lua), each block's feed-forward at layer.N.{mlp.{wi, wo} | mlp.{router.
-- classifier, experts.expert_E.{wi, wo}}, layer_norm}.
--
-- T5 whose feed-forward is, in every encoder_sparse_step-th block (decoder_sparse_step-th in the
-- decoder: blocks 1, 1 + step, ... counted from 0; every block with a step of 1), a mixture of
-- experts: a top-1 router (a linear layer, in float32 whatever the model's dtype) sends each
-- token to one expert (a T5 feed-forward), weighted by the softmax probability of that expert.
-- Each expert takes at most expert_capacity tokens of a row per call, in order: the tokens past
-- it skip the feed-forward (its residual alone). So at generation the decoder's tokens, one per
-- step, are never dropped, while a forward over many decoder tokens may drop some, as
-- transformers does. The router's jitter noise and its losses are training-time only. With
-- tie_word_embeddings (the default) the head reads the shared embedding and the decoder's output
-- is scaled by d_model^-0.5 first; without it nothing is tied and nothing scaled.
--
-- The experts are modules of their own, so offload hooks read only the ones a token chose, and
-- quantize turns their projections into int8 or int4 layers (the router stays float32).
--
--    local model = ml.models.from_pretrained(dir)     -- a SwitchTransformersForConditionalGeneration
--    local out = model:generate(ids, {attention_mask = mask, max_new_tokens = 40})
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local seq2seq = require("moonload.models.seq2seq")
local t5 = require("moonload.models.t5")

local M = {}
local WHO = "models.switch_transformers"

-- T5's keys but feed_forward_proj (the experts' activation is dense_act_fn, never gated) and
-- scale_decoder_outputs (the output is scaled when the head is tied), plus the router's.
M.schema = config.schema_from(t5.schema, { feed_forward_proj = false, scale_decoder_outputs = false }, {
   { "dense_act_fn", "string", "relu" },
   { "num_experts", "int", 8 },
   { "expert_capacity", "int", 64 },
   { "num_sparse_encoder_layers", "int0", 3 },
   { "num_sparse_decoder_layers", "int0", 3 },
   { "router_bias", "bool", false },
   { "router_dtype", "string", "float32" },
})

--- Every how many blocks one is sparse, as transformers' config computes it (0: none).
local function sparse_step(layers, sparse)
   if sparse > 0 then return math.floor(layers / sparse) end
   return layers
end

--- Reads and checks a Switch Transformers config (path, folder or table).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   common.activation(cfg.dense_act_fn, WHO, cfg._source)
   if cfg.router_dtype ~= "float32" then    -- (every released checkpoint routes in float32)
      config.fail(cfg, WHO, 'config key "router_dtype" "%s" is not supported (only "float32")', cfg.router_dtype)
   end
   cfg.is_gated_act = false
   cfg.encoder_sparse_step = sparse_step(cfg.num_layers, cfg.num_sparse_encoder_layers)
   cfg.decoder_sparse_step = sparse_step(cfg.num_decoder_layers, cfg.num_sparse_decoder_layers)
   cfg.tie_head, cfg.scale_decoder_outputs, cfg.tie_word_embeddings = cfg.tie_word_embeddings, cfg.tie_word_embeddings, true
   cfg.bias_in_every_layer = false
   return cfg
end

--- Whether block i (1-based) of a stack with the given sparse step has experts (transformers:
-- index % step == 1 counted from 0, or every block with step 1).
function M.is_sparse(i, step)
   return step > 0 and ((i - 1) % step == 1 or step == 1)
end

-- --- routing --------------------------------------------------------------------------------

-- The router's linear layer: float32 whatever the model's dtype (transformers casts it so), a
-- class of its own so that quantize leaves it in floats.
local RouterClassifier = nn.Linear:extend("RouterClassifier")
M.RouterClassifier = RouterClassifier
RouterClassifier.keep_float32_buffers = { weight = true, bias = true }

--- x (..., hidden) -> the router's logits (..., num_experts), float32.
function RouterClassifier:forward(x)
   if self.weight.dtype == "float32" then x = x:float() end
   return nn.Linear.forward(self, x)
end

-- Experts under transformers' names (expert_0, expert_1, ...), one module each.
local Experts = nn.Module:extend("SwitchTransformersExperts")
M.SwitchTransformersExperts = Experts

--- Experts(n, make): n experts, make(e) the e-th (0-based).
function Experts:__init(n, make)
   nn.Module.__init(self)
   local list = {}
   for e = 0, n - 1 do
      list[e + 1] = make(e)
      self["expert_" .. e] = list[e + 1]
   end
   rawset(self, "list", list)
   rawset(self, "num_experts", n)
end

function Experts:extra_repr() return string.format("num_experts=%d", self.num_experts) end

--- sum over each row's slots s of top_w[n][s] * experts[top_i[n][s]](flat[n]): flat (N, hidden),
-- top_w (N, k), top_i a list per row of k 0-based experts, -1 where the capacity dropped the slot
-- (it adds nothing). scale, when given, multiplies each expert's weighted output (NLLB-MoE's
-- token dropout at inference). Each chosen expert runs once, on all its rows.
function M.run_experts(experts, flat, top_w, top_i, scale)
   local N, H = flat:size(1), flat:size(2)
   local k = top_w:size(2)
   local w = top_w:to(flat.dtype):reshape(N * k)
   if w.device ~= flat.device then w = w:to(flat.device) end
   local rows, slots = {}, {}
   for n, row in ipairs(top_i) do
      for s, e in ipairs(row) do
         if e >= 0 then
            rows[e], slots[e] = rows[e] or {}, slots[e] or {}
            table.insert(rows[e], n - 1)
            table.insert(slots[e], (n - 1) * k + s - 1)
         end
      end
   end
   local outputs, where, at = {}, {}, 0
   local function ids(list) return T.tensor(list, { dtype = "int64", device = flat.device }) end
   for e = 0, #experts.list - 1 do
      if rows[e] then
         local y = experts.list[e + 1](flat:index_select(1, ids(rows[e]))) * w:index_select(1, ids(slots[e])):unsqueeze(2)
         if scale then y = y * scale end
         outputs[#outputs + 1] = y
         for j, slot in ipairs(slots[e]) do where[slot + 1] = at + j - 1 end
         at = at + #rows[e]
      end
   end
   outputs[#outputs + 1] = T.zeros({ 1, H }, { dtype = outputs[1] and outputs[1].dtype or flat.dtype, device = flat.device })
   for i = 1, N * k do where[i] = where[i] or at end              -- (dropped slots: the zero row)
   return T.cat(outputs, 1):index_select(1, ids(where)):view(N, k, H):sum(2)
end

local Top1Router = nn.Module:extend("SwitchTransformersTop1Router")
M.SwitchTransformersTop1Router = Top1Router

function Top1Router:__init(cfg)
   nn.Module.__init(self)
   self.classifier = RouterClassifier(cfg.d_model, cfg.num_experts, { bias = cfg.router_bias })
   rawset(self, "expert_capacity", cfg.expert_capacity)
end

--- x (B, L, hidden) -> top_w (B * L, 1), the chosen expert's probability (in x's dtype), and a
-- list per token of its 0-based expert, -1 past the expert's capacity in the token's row.
function Top1Router:forward(x)
   local B, L = x:size(1), x:size(2)
   local probs = self.classifier(x:reshape(B * L, x:size(3))):softmax(-1):to(x.dtype)
   local top_w, top_i = probs:max(2, true)
   top_i = top_i:tolist()
   local cap = self.expert_capacity
   for b = 0, B - 1 do
      local taken = {}
      for t = 1, L do
         local row = top_i[b * L + t]
         taken[row[1]] = (taken[row[1]] or 0) + 1
         if taken[row[1]] > cap then row[1] = -1 end
      end
   end
   return top_w, top_i
end

-- --- feed-forward ---------------------------------------------------------------------------

local DenseActDense = t5.T5DenseActDense:extend("SwitchTransformersDenseActDense")
M.SwitchTransformersDenseActDense = DenseActDense

local SparseMLP = nn.Module:extend("SwitchTransformersSparseMLP")
M.SwitchTransformersSparseMLP = SparseMLP

function SparseMLP:__init(cfg)
   nn.Module.__init(self)
   self.router = Top1Router(cfg)
   self.experts = Experts(cfg.num_experts, function() return DenseActDense(cfg) end)
end

--- x (B, L, d_model): each token through its expert, weighted; tokens past capacity give zeros.
function SparseMLP:forward(x)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local top_w, top_i = self.router(x)
   return M.run_experts(self.experts, x:reshape(B * L, H), top_w, top_i):view(B, L, H)
end

local LayerFF = nn.Module:extend("SwitchTransformersLayerFF")
M.SwitchTransformersLayerFF = LayerFF

function LayerFF:__init(cfg, is_sparse)
   nn.Module.__init(self)
   self.mlp = is_sparse and SparseMLP(cfg) or DenseActDense(cfg)
   self.layer_norm = nn.RMSNorm(cfg.d_model, { eps = cfg.layer_norm_epsilon })
   self.dropout = nn.Dropout(0)
   rawset(self, "is_sparse", is_sparse)
end

function LayerFF:forward(x) return x + self.mlp(self.layer_norm(x)) end

-- T5's block with Switch's feed-forward last.
local Block = t5.T5Block:extend("SwitchTransformersBlock")
M.SwitchTransformersBlock = Block

function Block:__init(cfg, is_decoder, has_relative_bias, i)
   t5.T5Block.__init(self, cfg, is_decoder, has_relative_bias)
   local step = is_decoder and cfg.decoder_sparse_step or cfg.encoder_sparse_step
   self.layer[#self.layer] = LayerFF(cfg, M.is_sparse(i, step))
end

-- --- the model ------------------------------------------------------------------------------

local LM = t5.T5ForConditionalGeneration:extend("SwitchTransformersForConditionalGeneration")
M.SwitchTransformersForConditionalGeneration = LM
LM.no_split_modules = { "SwitchTransformersBlock" }
LM.read_config, LM.Block = M.config, Block

--- Whether the checkpoint stores the stacks' embeddings apart from shared (what transformers 5
-- writes for tie_word_embeddings = false).
function LM.build_opts_for(names)
   for _, name in ipairs(names) do
      if name == "encoder.embed_tokens.weight" then return { own_embeddings = true } end
   end
   return { own_embeddings = false }
end

--- cfg: a config (path, folder or table); opts: build_opts_for's. With tie_word_embeddings false,
-- transformers 5 ties nothing: the stacks read their own embeddings when the checkpoint has them
-- (else shared's, as older conversions meant).
function LM:__init(cfg, opts)
   t5.T5ForConditionalGeneration.__init(self, cfg)
   if not self.config.tie_head and opts and opts.own_embeddings then
      self.encoder.embed_tokens = nn.Embedding(self.config.vocab_size, self.config.d_model)
      self.decoder.embed_tokens = nn.Embedding(self.config.vocab_size, self.config.d_model)
      rawset(self, "tied_weights", {})
   end
end

function LM:encode(input_ids, opts)
   local ids, pad = seq2seq.encoder_inputs(self, input_ids, opts or {}, WHO .. ".encode")
   return self.encoder(ids, pad)
end

function LM:forward(input_ids, opts) return seq2seq.forward(self, input_ids, opts, WHO .. ".forward") end

function LM:generate(input_ids, opts) return seq2seq.generate(self, input_ids, opts, "SwitchTransformers") end

function M.from_config(cfg) return LM(cfg) end

return M
