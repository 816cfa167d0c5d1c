--- Mixture-of-experts models with Hugging Face parameter names: Qwen3-MoE (Qwen3MoeForCausalLM,
-- as Qwen3-30B-A3B: Qwen3's attention, mlp.experts.E.{gate_proj, up_proj, down_proj} behind a
-- router mlp.gate; layers in mlp_only_layers, or off the decoder_sparse_step, keep a dense MLP)
-- Qwen2-MoE (Qwen2MoeForCausalLM: Qwen2's attention, the same experts plus a shared expert every
-- token goes through, weighted by a sigmoid gate) and Mixtral (MixtralForCausalLM: Mistral's
-- attention, block_sparse_moe.experts.E.{w1, w2, w3} behind block_sparse_moe.gate). Each token goes to the num_experts_per_tok experts its softmax
-- router scores highest, weighted by those scores (renormalized to sum to 1: always for Mixtral,
-- with norm_topk_prob for Qwen3-MoE).
--
-- Only the experts some token chose run, so under offload hooks only their weights are read: a
-- model whose experts live on disk reads per token about num_experts_per_tok / num_experts of
-- them.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local F = require("moonload.nn.functional")
local common = require("moonload.models.common")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")

local M = {}

--- Reads and checks a Qwen3-MoE config (path, folder or table); family "mixtral" a Mixtral one.
function M.config(source, family)
   family = family or "qwen3_moe"
   local WHO = "models." .. family
   local cfg = llama.config(source, family)
   local experts = cfg.num_experts or cfg.num_local_experts            -- transformers 5 writes the latter
   local function int(v, name, min) return config.integer(cfg, WHO, name, v, min) end
   cfg.num_experts = int(experts, "num_experts", 0)
   cfg.num_experts_per_tok = int(cfg.num_experts_per_tok or 8, "num_experts_per_tok", 1)
   local always_renormalize = family == "mixtral" or family == "minimax_m2" or family == "granitemoe"
      or family == "granitemoehybrid" or family == "granitemoeshared" or family == "granitemoe_swa"
   local experts_are_mlp = always_renormalize or family == "olmoe" or family == "phimoe" or family == "flex_olmo"   -- (their experts' width: intermediate_size)
   cfg.moe_intermediate_size = int(cfg.moe_intermediate_size or (experts_are_mlp and cfg.intermediate_size) or 768,
      "moe_intermediate_size", 1)
   cfg.decoder_sparse_step = int(cfg.decoder_sparse_step or 1, "decoder_sparse_step", 1)
   if family == "qwen2_moe" or family == "qwen3_next" or family == "qwen3_5_moe" then
      cfg.shared_expert_intermediate_size = int(cfg.shared_expert_intermediate_size, "shared_expert_intermediate_size", 1)
   end
   if family == "granitemoeshared" or family == "granitemoe_swa" then   -- (0, transformers' default: no shared MLP)
      cfg.shared_intermediate_size = int(cfg.shared_intermediate_size or 0, "shared_intermediate_size", 0)
   end
   if cfg.num_experts > 0 and cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_experts %d", cfg.num_experts_per_tok, cfg.num_experts)
   end
   if cfg.norm_topk_prob ~= nil and type(cfg.norm_topk_prob) ~= "boolean" then
      config.fail(cfg, WHO, 'config key "norm_topk_prob" must be a boolean, got %s', tostring(cfg.norm_topk_prob))
   end
   if family == "phimoe" and cfg.num_experts_per_tok ~= 2 then    -- (sparsemixer picks two, whatever the config says)
      config.fail(cfg, WHO, "num_experts_per_tok %d is not supported: PhiMoE's sparsemixer routes to 2 experts",
         cfg.num_experts_per_tok)
   end
   cfg.norm_topk_prob = always_renormalize or cfg.norm_topk_prob == true
   local dense = {}
   for _, i in ipairs(type(cfg.mlp_only_layers) == "table" and cfg.mlp_only_layers or {}) do dense[i] = true end
   cfg.sparse_layers = {}
   for i = 1, cfg.num_hidden_layers do              -- transformers counts layers from 0
      cfg.sparse_layers[i] = not dense[i - 1] and cfg.num_experts > 0 and i % cfg.decoder_sparse_step == 0
   end
   return cfg
end

-- --- the sparse block ------------------------------------------------------------------------------

local Qwen3MoeMLP = llama.LlamaMLP:extend("Qwen3MoeMLP")
M.Qwen3MoeMLP = Qwen3MoeMLP

--- Qwen3MoeMLP(cfg[, intermediate_size]): an expert (moe_intermediate_size) or a dense MLP.
function Qwen3MoeMLP:__init(cfg, intermediate)
   local c = setmetatable({ intermediate_size = intermediate or cfg.intermediate_size, mlp_bias = false }, { __index = cfg })
   llama.LlamaMLP.__init(self, c)
end

-- The sparse block both families share; a family's block registers its gate and experts (in
-- transformers' order) and sets top_k and norm_topk_prob.
local SparseMoeBlock = nn.Module:extend("SparseMoeBlock")
M.SparseMoeBlock = SparseMoeBlock
SparseMoeBlock.gate_name = "gate"          -- the router's attribute (GraniteMoE: router)

local function experts_of(cfg, Expert)
   local experts = {}
   for e = 1, cfg.num_experts do experts[e] = Expert(cfg, cfg.moe_intermediate_size) end
   return nn.ModuleList(experts)
end

function SparseMoeBlock:routing(cfg)
   rawset(self, "top_k", cfg.num_experts_per_tok)
   rawset(self, "norm_topk_prob", cfg.norm_topk_prob)
end

--- The experts each of flat's N rows goes to: top_w (N, k) float32 weights and top_i, a Lua list
-- per row of k 0-based experts. Here: the top_k of a softmax over the router's scores
-- (renormalized with norm_topk_prob); DeepSeek's blocks route otherwise (models/deepseek.lua).
function SparseMoeBlock:route(flat)
   local probs = self[self.gate_name](flat):float():softmax(-1)             -- (N, E), float32
   local top_w, top_i = probs:topk(self.top_k, 2)                           -- (N, k), 0-based experts
   if self.norm_topk_prob then top_w = top_w / top_w:sum(2, true) end
   return top_w, top_i:tolist()
end

--- x (B, T, hidden). The router picks each token's experts on the host (one small copy); each
-- chosen expert runs once on the rows routed to it; the weighted outputs are gathered back per
-- token and summed over its experts.
function SparseMoeBlock:forward(x)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local flat = x:reshape(B * L, H)
   local top_w, top_i = self:route(flat)
   return self:routed(flat, top_w, top_i):view(B, L, H)
end

--- The routed experts' weighted sum for flat's rows: experts one module each (run here), or one
-- module that takes the routing itself (StackedExperts: called as a module, for its hooks).
function SparseMoeBlock:routed(flat, top_w, top_i)
   local experts = self.experts
   if experts.takes_routing then return experts(flat, top_w, top_i) end
   return M.run_experts(experts, flat, top_w, top_i)
end

--- sum over each row's experts e of weight * experts[e + 1](row): flat (N, hidden), top_w (N, k),
-- top_i a list per row of k 0-based experts. Each chosen expert runs once, on all its rows. With
-- weigh_inputs, experts[e + 1](weight * row) instead (Llama 4's experts take their router's
-- weight on the way in).
function M.run_experts(experts, flat, top_w, top_i, weigh_inputs)
   local N, H = flat:size(1), flat:size(2)
   local k = top_w:size(2)
   top_w = top_w:to(flat.dtype):reshape(N * k)
   if top_w.device ~= flat.device then top_w = top_w:to(flat.device) end
   return M.by_expert(top_i, k, #experts, flat.device, function(e, rows, slots)
      local x, w = flat:index_select(1, rows), top_w:index_select(1, slots):unsqueeze(2)
      if weigh_inputs then return experts[e + 1](x * w) end
      return experts[e + 1](x) * w
   end):view(N, k, H):sum(2)
end

--- fn(e, rows, slots) once for each of the E experts (e 0-based) some row chose, rows the 0-based
-- rows that chose it and slots their 0-based (row, slot) indices n * k + s (int64 on device), fn
-- returning its (#rows, out) outputs; top_i a list per row of k 0-based experts. -> all outputs
-- in (row, slot) order: (N * k, out). (JetMoE's attention experts take a different input per slot.)
function M.by_expert(top_i, k, E, device, fn)
   local rows, slots = {}, {}
   for n, row in ipairs(top_i) do
      for s, e in ipairs(row) do
         rows[e] = rows[e] or {}
         slots[e] = slots[e] or {}
         table.insert(rows[e], n - 1)
         table.insert(slots[e], (n - 1) * k + s - 1)
      end
   end
   local outputs, where = {}, {}
   local at = 0
   for e = 0, E - 1 do
      if rows[e] then
         outputs[#outputs + 1] = fn(e, T.tensor(rows[e], { dtype = "int64", device = device }),
            T.tensor(slots[e], { dtype = "int64", device = device }))
         for j, slot in ipairs(slots[e]) do where[slot + 1] = at + j - 1 end
         at = at + #rows[e]
      end
   end
   local all = #outputs == 1 and outputs[1] or T.cat(outputs, 1)              -- (N * k, out) by expert
   return all:index_select(1, T.tensor(where, { dtype = "int64", device = device }))   -- (row, slot) -> row of all
end

-- Experts stacked per projection, SwiGLU each: gate_up_proj holds every expert's gate rows then
-- up rows, down_proj its down projection, in a linear layer's (out, in) layout -- gate_up (E, 2 x
-- inter, hidden), down (E, hidden, inter): Qwen3.5-MoE's hub files, transformers' own -- or, with
-- layout "in_out", transposed as x @ W multiplies them -- (E, hidden, 2 x inter), (E, inter,
-- hidden): Qwen3-VL-MoE's hub files. Each expert runs from views of its slices, so under offload
-- hooks (the stacked tensors views of a mapped file) a token reads its experts' pages only.
local StackedExperts = nn.Module:extend("StackedExperts")
M.StackedExperts = StackedExperts
StackedExperts.takes_routing = true

--- StackedExperts(cfg, who[, layout]): cfg.num_experts experts of width cfg.moe_intermediate_size.
function StackedExperts:__init(cfg, who, layout)
   nn.Module.__init(self)
   local E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
   local in_out = layout == "in_out"
   self.gate_up_proj = nn.Module.new_parameter(in_out and { E, H, 2 * I } or { E, 2 * I, H })
   self.down_proj = nn.Module.new_parameter(in_out and { E, I, H } or { E, H, I })
   if not self.gate_up_proj:is_meta() then
      self.gate_up_proj:fill_(0)
      self.down_proj:fill_(0)
   end
   self.act_fn = common.activation_module(cfg.hidden_act, who, cfg._source)
   rawset(self, "hidden_act", cfg.hidden_act)
   rawset(self, "in_out", in_out)
   rawset(self, "num_experts", E)
   rawset(self, "intermediate_size", I)
   rawset(self, "expert_width", 2 * I)   -- (planning: an expert's widest activation, utils/runtime_memory.lua)
end

--- x (n, in) times expert e's (0-based) slice of the stacked weight w.
function StackedExperts:project(w, e, x)
   w = w:select(1, e + 1)
   if w.dtype ~= x.dtype then w = w:to(x.dtype) end
   if self.in_out then return x:matmul(w) end
   return F.linear(x, w)
end

--- Expert e (0-based) on x (n, hidden): down(act(gate x) * up x).
function StackedExperts:expert(e, x)
   local I = self.intermediate_size
   local gu = self:project(self.gate_up_proj, e, x)
   return self:project(self.down_proj, e, self.act_fn(gu:narrow(2, 1, I)) * gu:narrow(2, I + 1, I))
end

--- flat (N, hidden), top_w (N, k), top_i a list per row of k 0-based experts: the weighted sum of
-- each row's experts (run_experts). Called as a module, so offload hooks put the stacked weights
-- in place first.
function StackedExperts:forward(flat, top_w, top_i)
   return M.run_expert_method(self, flat, top_w, top_i)
end

--- run_experts over a module whose experts are its method expert(e, x) (e 0-based) rather than
-- modules of their own (the stacked experts, gpt-oss's): one callable per expert, made once.
function M.run_expert_method(module, flat, top_w, top_i, weigh_inputs)
   local experts = rawget(module, "_callables")
   if not experts then
      experts = {}
      for e = 1, module.num_experts do experts[e] = function(x) return module:expert(e - 1, x) end end
      rawset(module, "_callables", experts)
   end
   return M.run_experts(experts, flat, top_w, top_i, weigh_inputs)
end

--- The same experts as one module each (Qwen3-MoE's layout: experts.E.{gate_proj, up_proj,
-- down_proj}), their weights views of the stacked ones (copies, for the transposed layout): what
-- quantize makes of them, so that their projections quantize as linear layers. nil when the
-- stacked weights are not in memory (meta: offloaded by a hook).
function StackedExperts:unstacked()
   local gu, down = self.gate_up_proj, self.down_proj
   if gu:is_meta() or down:is_meta() then return nil end
   local I = self.intermediate_size
   local H = self.in_out and gu:size(2) or gu:size(3)
   local cfg = { hidden_size = H, intermediate_size = I, hidden_act = self.hidden_act, mlp_bias = false,
      _source = "stacked experts" }
   local experts = {}
   for e = 1, self.num_experts do
      local expert = require("moonload.big_modeling").init_empty_weights(function() return Qwen3MoeMLP(cfg, I) end)
      local w, d = gu:select(1, e), down:select(1, e)
      if self.in_out then            -- (E, hidden, 2 x inter): a linear layer's (out, in) is its transpose
         expert.gate_proj.weight = w:narrow(2, 1, I):t():contiguous()
         expert.up_proj.weight = w:narrow(2, I + 1, I):t():contiguous()
         expert.down_proj.weight = d:t():contiguous()
      else
         expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight = w:narrow(1, 1, I),
            w:narrow(1, I + 1, I), d
      end
      experts[e] = expert
   end
   return nn.ModuleList(experts)
end

--- The stacked projections quantize would turn into int8 or int4 once split (their in-features a
-- multiple of QuantizedLinear's block): for the planner's sizes.
function StackedExperts:quantized_projections()
   local block = require("moonload.nn.quantized_linear").BLOCK
   local H = self.in_out and self.gate_up_proj:size(2) or self.gate_up_proj:size(3)
   local out = {}
   if H % block == 0 then out[#out + 1] = "gate_up_proj" end
   if self.intermediate_size % block == 0 then out[#out + 1] = "down_proj" end
   return out
end

function StackedExperts:extra_repr()
   return string.format("num_experts=%d, intermediate_size=%d", self.num_experts, self.intermediate_size)
end

--- The layout a checkpoint holds its experts in: "apart" (experts.E.*, a module each), or stacked
-- "out_in" or "in_out" (the down projection's shape tells, shape_of(name) -> shape: (E, hidden,
-- inter) or (E, inter, hidden), with gate_up's 2 x inter beside it); nil when it has no experts.
function M.experts_layout(names, shape_of)
   local stacked = M.stacked_layout(names, shape_of)
   if stacked then return stacked end
   for _, name in ipairs(names) do
      if name:find("%.experts%.0%.") then return "apart" end
   end
   return nil
end

--- builds_experts_as_stored(LM): from_pretrained builds LM's experts in the layout its checkpoint
-- holds (cfg.experts_layout, from build_opts_for); without a checkpoint each block keeps its
-- family's own (experts_for's default).
function M.builds_experts_as_stored(LM)
   function LM.build_opts_for(names, shape_of)
      local layout = M.experts_layout(names, shape_of)
      return layout and { experts_layout = layout } or nil
   end
   function LM:__init(cfg, opts)
      rawset(self, "_experts_layout", opts and opts.experts_layout or nil)
      llama.LlamaForCausalLM.__init(self, cfg)
   end
   local read = LM.read_config
   function LM:read_config(source)
      local cfg = read(self, source)
      cfg.experts_layout = rawget(self, "_experts_layout")
      return cfg
   end
end

--- A sparse block's experts in cfg.experts_layout, else default: "apart", one Expert(cfg,
-- moe_intermediate_size) each, or stacked (Stacked, StackedExperts unless given, named `who` in errors).
function M.experts_for(cfg, who, Expert, default, Stacked)
   local layout = cfg.experts_layout or default
   if layout == "apart" then return experts_of(cfg, Expert) end
   return (Stacked or StackedExperts)(cfg, who, layout)
end

--- The stacked layout alone ("out_in", "in_out"), nil when the experts are not stacked.
function M.stacked_layout(names, shape_of)
   for _, name in ipairs(names) do
      local prefix = name:match("^(.*%.mlp%.experts)%.gate_up_proj$")
      if prefix and shape_of then
         local gu, down = shape_of(name), shape_of(prefix .. ".down_proj")
         if gu and down and #gu == 3 and #down == 3 then
            if 2 * down[3] == gu[2] then return "out_in" end
            if 2 * down[2] == gu[3] then return "in_out" end
         end
      end
   end
   return nil
end

--- Sigmoid routing with a bias on the choice alone (DeepSeek-V3's correction bias, without its
-- groups: LFM2-MoE's expert_bias, MiniMax-M2's e_score_correction_bias): each row's k experts of
-- highest sigmoid(logit) + bias, weighted by their sigmoid(logit) alone, renormalized when norm
-- (sum + eps) and times scale. logits (N, E); bias (E) or nil. -> top_w (N, k) float32, top_i.
function M.biased_sigmoid_route(logits, bias, k, norm, eps, scale)
   local scores = logits:float():sigmoid()
   local choice = scores
   if bias then
      if bias.device ~= scores.device then bias = bias:to(scores.device) end
      choice = scores + bias:float()
   end
   local _, top_i = choice:topk(k, 2)
   local top_w = scores:gather(2, top_i)
   if norm then top_w = top_w / (top_w:sum(2, true) + eps) end
   if scale and scale ~= 1 then top_w = top_w * scale end
   return top_w, top_i:tolist()
end

local Qwen3MoeSparseMoeBlock = SparseMoeBlock:extend("Qwen3MoeSparseMoeBlock")
M.Qwen3MoeSparseMoeBlock = Qwen3MoeSparseMoeBlock

--- Qwen3MoeSparseMoeBlock(cfg): experts one module each, or stacked per projection when the
-- checkpoint holds them so (cfg.experts_layout: Qwen3-VL-MoE's).
function Qwen3MoeSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.experts = M.experts_for(cfg, "models.qwen3_moe", Qwen3MoeMLP, "apart")
   self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   self:routing(cfg)
end

local Qwen2MoeMLP = Qwen3MoeMLP:extend("Qwen2MoeMLP")
M.Qwen2MoeMLP = Qwen2MoeMLP

local Qwen2MoeSparseMoeBlock = SparseMoeBlock:extend("Qwen2MoeSparseMoeBlock")
M.Qwen2MoeSparseMoeBlock = Qwen2MoeSparseMoeBlock

function Qwen2MoeSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   self.experts = experts_of(cfg, self.Expert)
   self.shared_expert = self.Expert(cfg, cfg.shared_expert_intermediate_size)
   self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, { bias = false })
   self:routing(cfg)
end

Qwen2MoeSparseMoeBlock.Expert = Qwen2MoeMLP      -- (Qwen3-Next's block: its own class name)

--- The routed experts' sum plus the shared expert, scaled per token by sigmoid(shared_expert_gate).
function Qwen2MoeSparseMoeBlock:forward(x)
   return SparseMoeBlock.forward(self, x) + self.shared_expert_gate(x):sigmoid() * self.shared_expert(x)
end

-- Mixtral's expert: w2(act(w1 x) * w3 x).
local MixtralBlockSparseTop2MLP = nn.Module:extend("MixtralBlockSparseTop2MLP")
M.MixtralBlockSparseTop2MLP = MixtralBlockSparseTop2MLP

function MixtralBlockSparseTop2MLP:__init(cfg, intermediate)
   nn.Module.__init(self)
   self.w1 = nn.Linear(cfg.hidden_size, intermediate, { bias = false })
   self.w2 = nn.Linear(intermediate, cfg.hidden_size, { bias = false })
   self.w3 = nn.Linear(cfg.hidden_size, intermediate, { bias = false })
   self.act_fn = common.activation_module(cfg.hidden_act, "models.mixtral", cfg._source)
end

function MixtralBlockSparseTop2MLP:forward(x)
   return self.w2(self.act_fn(self.w1(x)) * self.w3(x))
end

local MixtralSparseMoeBlock = SparseMoeBlock:extend("MixtralSparseMoeBlock")
M.MixtralSparseMoeBlock = MixtralSparseMoeBlock

function MixtralSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   self.experts = experts_of(cfg, MixtralBlockSparseTop2MLP)
   self:routing(cfg)
end

-- MiniMax-M2's block: Mixtral's (block_sparse_moe.experts.E.{w1, w2, w3}, gate) behind a sigmoid
-- router choosing by score + e_score_correction_bias (a float32 buffer), weighing by the
-- renormalized scores.
local MiniMaxM2SparseMoeBlock = MixtralSparseMoeBlock:extend("MiniMaxM2SparseMoeBlock")
M.MiniMaxM2SparseMoeBlock = MiniMaxM2SparseMoeBlock
MiniMaxM2SparseMoeBlock.keep_float32_buffers = { e_score_correction_bias = true }

function MiniMaxM2SparseMoeBlock:__init(cfg)
   MixtralSparseMoeBlock.__init(self, cfg)
   self:register_buffer("e_score_correction_bias", T.zeros({ cfg.num_experts }))
end

function MiniMaxM2SparseMoeBlock:route(flat)
   return M.biased_sigmoid_route(self.gate(flat), self.e_score_correction_bias, self.top_k, true, 1e-20)
end

-- --- layers and models ------------------------------------------------------------------------------

--- decoder_family(family, prefix, Attention, MLP, mlp_name, read_config, into): the classes of a
-- decoder on Llama's layout, named as transformers names them (no_split_module_classes and the
-- printed tree use them): prefix .. "Attention" extending Attention, a DecoderLayer whose
-- mlp_name attribute is MLP(cfg, layer index) (a MoE family picks sparse or dense by the index),
-- RotaryEmbedding, Model and ForCausalLM (or lm_name) reading its config with read_config(source,
-- family). Stored under those names in into; returns the ForCausalLM class.
function M.decoder_family(family, prefix, Attention, MLP, mlp_name, read_config, into, lm_name)
   local Attn = Attention:extend(prefix .. "Attention")
   local Layer = llama.LlamaDecoderLayer:extend(prefix .. "DecoderLayer")
   Layer.Attention, Layer.mlp_name, Layer.MLP = Attn, mlp_name or "mlp", MLP
   local Rotary = llama.LlamaRotaryEmbedding:extend(prefix .. "RotaryEmbedding")
   local Model = llama.LlamaModel:extend(prefix .. "Model")
   Model.family, Model.Layer, Model.Rotary = family, Layer, Rotary
   local LM = llama.LlamaForCausalLM:extend(lm_name or prefix .. "ForCausalLM")
   LM.family, LM.Model = family, Model
   LM.no_split_modules = { prefix .. "DecoderLayer" }
   LM.forward = common.causal_lm_forward("models." .. family .. ".forward", "model", "embed_tokens")
   function LM:read_config(source) return read_config(source, self.family) end
   into[prefix .. "Attention"], into[prefix .. "DecoderLayer"], into[prefix .. "RotaryEmbedding"] = Attn, Layer, Rotary
   into[prefix .. "Model"], into[lm_name or prefix .. "ForCausalLM"] = Model, LM
   return LM
end

-- A MoE family: Llama's attention, the family's sparse block where cfg.sparse_layers says so and
-- its dense MLP elsewhere.
local function moe_family(family, prefix, Sparse, Dense, mlp_name)
   local function mlp(cfg, layer_idx) return cfg.sparse_layers[layer_idx] and Sparse(cfg) or Dense(cfg) end
   M.decoder_family(family, prefix, llama.LlamaAttention, mlp, mlp_name, M.config, M)
end

moe_family("qwen3_moe", "Qwen3Moe", Qwen3MoeSparseMoeBlock, Qwen3MoeMLP)

-- Qwen3-VL-MoE checkpoints (model_type qwen3_vl_moe: Qwen3-VL-30B-A3B, 235B-A22B) load their
-- language model as Qwen3-MoE: its experts stacked per projection (transposed on the hub), each
-- token's top-k weights always renormalized, the vision tower left out.
local Qwen3MoeLM = M.Qwen3MoeForCausalLM
Qwen3MoeLM.checkpoint_renames = config.LANGUAGE_MODEL_RENAMES
Qwen3MoeLM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^model%.visual%." }

function Qwen3MoeLM:read_config(source)
   local cfg = config.read_text_config(source, "models.qwen3_moe", { qwen3_vl_moe = true },
      function(src) return M.config(src, self.family) end)
   if cfg.model_type == "qwen3_vl_moe_text" then cfg.norm_topk_prob = true end   -- (its router always does)
   return cfg
end
M.builds_experts_as_stored(Qwen3MoeLM)
moe_family("qwen2_moe", "Qwen2Moe", Qwen2MoeSparseMoeBlock, Qwen2MoeMLP)
moe_family("mixtral", "Mixtral", MixtralSparseMoeBlock, MixtralSparseMoeBlock, "block_sparse_moe")   -- all sparse

-- MiniMax-M2 (model_type minimax_m2: MiniMax-M2 230B-A10B): OLMo 2's attention (RMSNorms over the
-- whole query and key projections, here without biases) rotating rotary_dim of each head, every
-- layer sparse. The hub's FP8 files load as DeepSeek-V3's do (quantize.lua's "fp8").
M.decoder_family("minimax_m2", "MiniMaxM2", llama.Olmo2Attention, MiniMaxM2SparseMoeBlock, "block_sparse_moe",
   M.config, M)

-- GraniteMoE (model_type granitemoe: granite-3.0-1b-a400m, 3b-a800m): Granite's multipliers and
-- attention (models/llama.lua), every layer sparse: a softmax over each token's top
-- num_experts_per_tok router logits (the same weights as Mixtral's renormalized ones) weighs its
-- experts, stacked per projection. The hub's names (block_sparse_moe.input_linear: gate rows, then
-- up rows; output_linear; router.layer) load as transformers renames them.
local GraniteMoeMoE = SparseMoeBlock:extend("GraniteMoeMoE")
M.GraniteMoeMoE = GraniteMoeMoE
GraniteMoeMoE.gate_name = "router"

function GraniteMoeMoE:__init(cfg)
   nn.Module.__init(self)
   self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   self.experts = StackedExperts(cfg, "models.granitemoe")
   self:routing(cfg)
end

local GraniteMoeLM = M.decoder_family("granitemoe", "GraniteMoe", llama.GraniteAttention, GraniteMoeMoE,
   "block_sparse_moe", M.config, M)
M.GraniteMoeDecoderLayer.__init = llama.GraniteDecoderLayer.__init
M.GraniteMoeDecoderLayer.forward = llama.GraniteDecoderLayer.forward
M.GraniteMoeModel.embed_scale = llama.GraniteModel.embed_scale
GraniteMoeLM.forward = llama.scaled_logits_forward("models.granitemoe", llama.granite_logits)
GraniteMoeLM.checkpoint_renames = {
   { "%.block_sparse_moe%.input_linear%.weight$", ".block_sparse_moe.experts.gate_up_proj" },
   { "%.block_sparse_moe%.output_linear%.weight$", ".block_sparse_moe.experts.down_proj" },
   { "%.block_sparse_moe%.router%.layer%.weight$", ".block_sparse_moe.router.weight" } }

-- GraniteMoeShared (model_type granitemoeshared: Granite Speech 3.x's language model, granite-3.x
-- MoE checkpoints with a shared expert): GraniteMoE's layers plus a shared feed-forward every token
-- goes through (shared_mlp.input_linear: gate rows, then up rows; output_linear), added to the
-- experts' output before the residual multiplier; none when shared_intermediate_size is 0
-- (transformers' default). Granite 4.0's shared MLP is this one (models/bamba.lua).
local GraniteMoeSharedMLP = nn.Module:extend("GraniteMoeSharedMLP")
M.GraniteMoeSharedMLP = GraniteMoeSharedMLP

function GraniteMoeSharedMLP:__init(cfg)
   nn.Module.__init(self)
   local I = cfg.shared_intermediate_size
   self.input_linear = nn.Linear(cfg.hidden_size, 2 * I, { bias = false })
   self.output_linear = nn.Linear(I, cfg.hidden_size, { bias = false })
   self.act_fn = common.activation_module(cfg.hidden_act, "models." .. cfg.family, cfg._source)
   rawset(self, "width", I)
end

function GraniteMoeSharedMLP:forward(x)
   local h = self.input_linear(x)
   local I = self.width
   return self.output_linear(self.act_fn(h:narrow(-1, 1, I)) * h:narrow(-1, I + 1, I))
end

local GraniteMoeSharedLM = M.decoder_family("granitemoeshared", "GraniteMoeShared", llama.GraniteAttention, GraniteMoeMoE,
   "block_sparse_moe", M.config, M)
local GraniteMoeSharedDecoderLayer = M.GraniteMoeSharedDecoderLayer

function GraniteMoeSharedDecoderLayer:__init(cfg, layer_idx)
   llama.GraniteDecoderLayer.__init(self, cfg, layer_idx)
   if cfg.shared_intermediate_size > 0 then self.shared_mlp = GraniteMoeSharedMLP(cfg) end
end

function GraniteMoeSharedDecoderLayer:forward(x, cos, sin, cache, pad)
   local r = self.residual_multiplier
   x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pad) * r
   local h = self.post_attention_layernorm(x)
   local y = self.block_sparse_moe(h)
   if self.shared_mlp then y = y + self.shared_mlp(h) end
   return x + y * r
end

M.GraniteMoeSharedModel.embed_scale = llama.GraniteModel.embed_scale
GraniteMoeSharedLM.forward = llama.scaled_logits_forward("models.granitemoeshared", llama.granite_logits)
GraniteMoeSharedLM.checkpoint_renames = GraniteMoeLM.checkpoint_renames

-- OLMoE (model_type olmoe: OLMoE-1B-7B): OLMo 2's attention (RMSNorms over the whole query and key
-- projections) in Llama's pre-norm layers, q, k and v clipped to +-clip_qkv when the config says;
-- every layer sparse, its experts as wide as intermediate_size, the top-k softmax weights kept as
-- they are unless norm_topk_prob. The hub holds one module per expert; transformers' stacked
-- layout loads too.
local OlmoeSparseMoeBlock = SparseMoeBlock:extend("OlmoeSparseMoeBlock")
M.OlmoeSparseMoeBlock = OlmoeSparseMoeBlock

function OlmoeSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   self.experts = M.experts_for(cfg, "models.olmoe", Qwen3MoeMLP, "apart")
   self:routing(cfg)
end

local OlmoeLM = M.decoder_family("olmoe", "Olmoe", llama.Olmo2Attention, OlmoeSparseMoeBlock, "mlp", M.config, M)
M.builds_experts_as_stored(OlmoeLM)
local OlmoeAttention = M.OlmoeAttention

function OlmoeAttention:__init(cfg, layer_idx)
   llama.Olmo2Attention.__init(self, cfg, layer_idx)
   rawset(self, "clip_qkv", cfg.clip_qkv)
end

function OlmoeAttention:project(x, B, L)
   return llama.clip_projections(self, llama.Olmo2Attention.project(self, x, B, L))
end

-- FlexOlmo (model_type flex_olmo: FlexOlmo-7x7B-1T): OLMoE's sparse block in every layer (its
-- router; experts as wide as intermediate_size, the top-k weights kept as they are unless
-- norm_topk_prob) inside OLMo 2's layer: norms after attention and MLP, none before, RMSNorms over
-- the whole query and key projections; no clip_qkv.
local FlexOlmoLM = M.decoder_family("flex_olmo", "FlexOlmo", llama.Olmo2Attention,
   OlmoeSparseMoeBlock:extend("FlexOlmoSparseMoeBlock"), "mlp", M.config, M)
M.FlexOlmoDecoderLayer.__init, M.FlexOlmoDecoderLayer.forward = llama.Olmo2DecoderLayer.__init, llama.Olmo2DecoderLayer.forward
M.builds_experts_as_stored(FlexOlmoLM)

-- PhiMoE (model_type phimoe: Phi-3.5-MoE): Llama's attention, biased when attention_bias, a
-- sliding window; LayerNorms with biases; a biased head with lm_head_bias; every layer sparse
-- (block_sparse_moe: Mixtral's experts, the hub's names) behind "sparsemixer" routing; LongRoPE
-- as transformers computes it for PhiMoE (below).
local PhimoeSparseMoeBlock = MixtralSparseMoeBlock:extend("PhimoeSparseMoeBlock")
M.PhimoeSparseMoeBlock = PhimoeSparseMoeBlock

function PhimoeSparseMoeBlock:__init(cfg)
   MixtralSparseMoeBlock.__init(self, cfg)
   rawset(self, "jitter_eps", cfg.router_jitter_noise)
end

local NEG_INF = -math.huge

--- Sparsemixer at inference (transformers' sparsemixer, not training): the top expert, weighted
-- by its softmax among the experts whose logits lie within a relative 2 x jitter_eps of it
-- ((top - logit) / max(|logit|, top) <= 2 x jitter_eps; the others masked out), then the best
-- of the rest, weighted the same way among the rest. In float32.
function PhimoeSparseMoeBlock:route(flat)
   local scores = self.gate(flat):float()                                  -- (N, E)
   local E = scores:size(2)
   local experts = T.arange(0, E, { dtype = "int64", device = scores.device })
   local limit = 2 * self.jitter_eps
   local function pick(candidates)          -- candidates: scores with the experts already taken at -inf
      local top, idx = candidates:max(2, true)                              -- (N, 1)
      local factor = scores:abs():maximum(top)
      local far = ((top - scores) / factor):gt(limit)
      return candidates:masked_fill(far, NEG_INF):softmax(-1):gather(2, idx), idx
   end
   local w1, i1 = pick(scores)
   local w2, i2 = pick(scores:masked_fill(experts:eq(i1), NEG_INF))
   return T.cat({ w1, w2 }, 2), T.cat({ i1, i2 }, 2):tolist()
end

local PhimoeLM = M.decoder_family("phimoe", "Phimoe", llama.LlamaAttention, PhimoeSparseMoeBlock,
   "block_sparse_moe", M.config, M)
M.PhimoeDecoderLayer.Norm, M.PhimoeModel.Norm = nn.LayerNorm, nn.LayerNorm

function PhimoeLM:__init(cfg)
   llama.LlamaForCausalLM.__init(self, cfg)
   cfg = self.config
   if cfg.lm_head_bias then
      self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = true })
      self:tie_weights()
   end
end

-- transformers' PhiMoE rotary embedding: with LongRoPE, the short factors at every length (its
-- long factors never used), cos/sin times short_mscale while the highest position is within
-- original_max_position_embeddings and long_mscale past it (the cache then rebuilt, as
-- recompute_cache_at says).
local PhimoeRotaryEmbedding = M.PhimoeRotaryEmbedding

function PhimoeRotaryEmbedding:__init(cfg)
   llama.LlamaRotaryEmbedding.__init(self, cfg)
   local rope = cfg.rope
   if rope.rope_type == "longrope" then
      self:register_buffer("long_inv_freq", nil, false)
      rawset(self, "original_max", nil)
      rawset(self, "mscales", { original = rope.original_max_position_embeddings, short = rope.short_mscale,
         long = rope.long_mscale })
   end
end

function PhimoeRotaryEmbedding:forward(positions)
   local m = rawget(self, "mscales")
   if not m then return llama.LlamaRotaryEmbedding.forward(self, positions) end
   local long = positions:max():item() + 1 > m.original
   return llama.LlamaRotaryEmbedding.forward(self, positions, self.inv_freq, long and m.long or m.short)
end

return M
