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
   cfg.moe_intermediate_size = int(cfg.moe_intermediate_size or (family == "mixtral" and cfg.intermediate_size) or 768,
      "moe_intermediate_size", 1)
   cfg.decoder_sparse_step = int(cfg.decoder_sparse_step or 1, "decoder_sparse_step", 1)
   if family == "qwen2_moe" or family == "qwen3_next" or family == "qwen3_5_moe" then
      cfg.shared_expert_intermediate_size = int(cfg.shared_expert_intermediate_size, "shared_expert_intermediate_size", 1)
   end
   if cfg.num_experts > 0 and cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_experts %d", cfg.num_experts_per_tok, cfg.num_experts)
   end
   cfg.norm_topk_prob = family == "mixtral" or cfg.norm_topk_prob == true
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
   local probs = self.gate(flat):float():softmax(-1)                        -- (N, E), float32
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
   return M.run_experts(self.experts, flat, top_w, top_i):view(B, L, H)
end

--- sum over each row's experts e of weight * experts[e + 1](row): flat (N, hidden), top_w (N, k),
-- top_i a list per row of k 0-based experts. Each chosen expert runs once, on all its rows.
function M.run_experts(experts, flat, top_w, top_i)
   local N, H = flat:size(1), flat:size(2)
   local k = top_w:size(2)
   top_w = top_w:to(flat.dtype):reshape(N * k)
   if top_w.device ~= flat.device then top_w = top_w:to(flat.device) end
   -- rows per expert, in (token, slot) order
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
   for e = 0, #experts - 1 do
      if rows[e] then
         local idx = T.tensor(rows[e], { dtype = "int64", device = flat.device })
         local w = top_w:index_select(1, T.tensor(slots[e], { dtype = "int64", device = flat.device }))
         outputs[#outputs + 1] = experts[e + 1](flat:index_select(1, idx)) * w:unsqueeze(2)
         for j, slot in ipairs(slots[e]) do where[slot + 1] = at + j - 1 end
         at = at + #rows[e]
      end
   end
   local all = #outputs == 1 and outputs[1] or T.cat(outputs, 1)              -- (N * k, H) by expert
   local order = T.tensor(where, { dtype = "int64", device = flat.device })  -- (token, slot) -> row of all
   return all:index_select(1, order):view(N, k, H):sum(2)
end

local Qwen3MoeSparseMoeBlock = SparseMoeBlock:extend("Qwen3MoeSparseMoeBlock")
M.Qwen3MoeSparseMoeBlock = Qwen3MoeSparseMoeBlock

function Qwen3MoeSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.experts = experts_of(cfg, Qwen3MoeMLP)
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

-- --- layers and models ------------------------------------------------------------------------------

--- decoder_family(family, prefix, Attention, MLP, mlp_name, read_config, into): the classes of a
-- decoder on Llama's layout, named as transformers names them (no_split_module_classes and the
-- printed tree use them): prefix .. "Attention" extending Attention, a DecoderLayer whose
-- mlp_name attribute is MLP(cfg, layer index) (a MoE family picks sparse or dense by the index),
-- RotaryEmbedding, Model and ForCausalLM reading its config with read_config(source, family).
-- Stored under those names in into; returns the ForCausalLM class.
function M.decoder_family(family, prefix, Attention, MLP, mlp_name, read_config, into)
   local Attn = Attention:extend(prefix .. "Attention")
   local Layer = llama.LlamaDecoderLayer:extend(prefix .. "DecoderLayer")
   Layer.Attention, Layer.mlp_name, Layer.MLP = Attn, mlp_name or "mlp", MLP
   local Rotary = llama.LlamaRotaryEmbedding:extend(prefix .. "RotaryEmbedding")
   local Model = llama.LlamaModel:extend(prefix .. "Model")
   Model.family, Model.Layer, Model.Rotary = family, Layer, Rotary
   local LM = llama.LlamaForCausalLM:extend(prefix .. "ForCausalLM")
   LM.family, LM.Model = family, Model
   LM.no_split_modules = { prefix .. "DecoderLayer" }
   LM.forward = common.causal_lm_forward("models." .. family .. ".forward", "model", "embed_tokens")
   function LM:read_config(source) return read_config(source, self.family) end
   into[prefix .. "Attention"], into[prefix .. "DecoderLayer"], into[prefix .. "RotaryEmbedding"] = Attn, Layer, Rotary
   into[prefix .. "Model"], into[prefix .. "ForCausalLM"] = Model, LM
   return LM
end

-- A MoE family: Llama's attention, the family's sparse block where cfg.sparse_layers says so and
-- its dense MLP elsewhere.
local function moe_family(family, prefix, Sparse, Dense, mlp_name)
   local function mlp(cfg, layer_idx) return cfg.sparse_layers[layer_idx] and Sparse(cfg) or Dense(cfg) end
   M.decoder_family(family, prefix, llama.LlamaAttention, mlp, mlp_name, M.config, M)
end

moe_family("qwen3_moe", "Qwen3Moe", Qwen3MoeSparseMoeBlock, Qwen3MoeMLP)
moe_family("qwen2_moe", "Qwen2Moe", Qwen2MoeSparseMoeBlock, Qwen2MoeMLP)
moe_family("mixtral", "Mixtral", MixtralSparseMoeBlock, MixtralSparseMoeBlock, "block_sparse_moe")   -- all sparse

return M
