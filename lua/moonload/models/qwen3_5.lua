--- Qwen3.5 (Qwen3_5ForCausalLM, model_type "qwen3_5_text": Qwen3.5-27B's and the smaller ones'
-- language model; Qwen3_5MoeForCausalLM, "qwen3_5_moe_text": Qwen3.5-35B-A3B, 122B-A10B and
-- 397B-A17B) with Hugging Face parameter names. Qwen3-Next's hybrid of linear and gated full
-- attention (models/qwen3_next.lua) with two changes:
--
-- The linear attention's projections stand apart: in_proj_qkv gives q of all key heads, then k,
-- then v of all value heads (the conv's own order), in_proj_z, in_proj_b and in_proj_a the gate,
-- the rates and the decay inputs.
--
-- Every layer has one kind of MLP: dense (Qwen3.5) or sparse (Qwen3.5-MoE: routed experts, their
-- weights always renormalized, plus a sigmoid-gated shared expert), the hub's experts stacked per
-- projection: mlp.experts.gate_up_proj (E, 2 x inter, hidden: gate rows, then up rows) and
-- down_proj (E, hidden, inter). Under offload hooks those are views of the mapped file, so a
-- token reads only its experts' pages. A folder transformers saved holds them one by one
-- (mlp.experts.E.gate_proj.weight, ...): from_pretrained builds that layout for it.
--
-- The hub's checkpoints are multimodal (model_type "qwen3_5" and "qwen3_5_moe": the language
-- model under model.language_model. beside a vision tower, model.visual.): this reads their
-- text_config and loads the language model alone (text in, text out). Their rotary embedding is
-- multimodal (mrope_section splits the frequencies among time, height and width positions); for
-- text the three positions are the token's, which makes it the plain rotary embedding.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local moe = require("moonload.models.moe")
local qwen3_next = require("moonload.models.qwen3_next")

local M = {}

-- --- linear attention ---------------------------------------------------------------------------

local Qwen3_5GatedDeltaNet = qwen3_next.Qwen3NextGatedDeltaNet:extend("Qwen3_5GatedDeltaNet")
M.Qwen3_5GatedDeltaNet = Qwen3_5GatedDeltaNet

Qwen3_5GatedDeltaNet.fused_in_proj = false   -- in_proj_qkv, in_proj_z, in_proj_b, in_proj_a

function Qwen3_5GatedDeltaNet:project(x)
   local h = self.heads
   local B, L = x:size(1), x:size(2)
   return self.in_proj_qkv(x), self.in_proj_z(x):reshape(B * L * h.Hv, h.Dv), self.in_proj_b(x), self.in_proj_a(x)
end

-- --- experts stacked per projection -------------------------------------------------------------

local Qwen3_5MoeExperts = moe.StackedExperts:extend("Qwen3_5MoeExperts")
M.Qwen3_5MoeExperts = Qwen3_5MoeExperts

local Qwen3_5MoeMLP = qwen3_next.Qwen3NextMLP:extend("Qwen3_5MoeMLP")
M.Qwen3_5MoeMLP = Qwen3_5MoeMLP

local Qwen3_5MoeSparseMoeBlock = moe.SparseMoeBlock:extend("Qwen3_5MoeSparseMoeBlock")
M.Qwen3_5MoeSparseMoeBlock = Qwen3_5MoeSparseMoeBlock

--- Qwen3_5MoeSparseMoeBlock(cfg): the experts stacked (the hub's files), or one module each when
-- the checkpoint holds them so (cfg.experts_layout "apart": transformers writes
-- mlp.experts.E.{gate,up,down}_proj).
function Qwen3_5MoeSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   self.experts = moe.experts_for(cfg, "models.qwen3_5_moe", Qwen3_5MoeMLP, "out_in", Qwen3_5MoeExperts)
   self.shared_expert = Qwen3_5MoeMLP(cfg, cfg.shared_expert_intermediate_size)
   self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, { bias = false })
   self:routing(cfg)
end

--- x (B, T, hidden): the routed experts' weighted sum plus the shared expert scaled per token by
-- sigmoid(shared_expert_gate).
function Qwen3_5MoeSparseMoeBlock:forward(x)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local flat = x:reshape(B * L, H)
   local top_w, top_i = self:route(flat)
   return self:routed(flat, top_w, top_i):view(B, L, H) + self.shared_expert_gate(x):sigmoid() * self.shared_expert(x)
end

-- --- models ---------------------------------------------------------------------------------------

local Qwen3_5MLP = qwen3_next.Qwen3NextMLP:extend("Qwen3_5MLP")
M.Qwen3_5MLP = Qwen3_5MLP

local Qwen3_5MoeGatedDeltaNet = Qwen3_5GatedDeltaNet:extend("Qwen3_5MoeGatedDeltaNet")
M.Qwen3_5MoeGatedDeltaNet = Qwen3_5MoeGatedDeltaNet

local dense = qwen3_next.hybrid_family("qwen3_5", "Qwen3_5", Qwen3_5GatedDeltaNet, Qwen3_5MLP, Qwen3_5MLP, M)
local sparse = qwen3_next.hybrid_family("qwen3_5_moe", "Qwen3_5Moe", Qwen3_5MoeGatedDeltaNet,
   Qwen3_5MoeSparseMoeBlock, Qwen3_5MoeSparseMoeBlock, M)

-- The multimodal checkpoints' language model: transformers' names, the vision tower left out.
for _, LM in ipairs({ dense, sparse }) do
   LM.checkpoint_renames = config.LANGUAGE_MODEL_RENAMES
   LM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^mtp%.", "^model%.visual%." }
   --- A text config, or a multimodal one's text_config (the language model alone).
   function LM:read_config(source)
      return config.read_text_config(source, "models." .. self.family, { [self.family] = true },
         function(src) return qwen3_next.config(src, self.family) end)
   end
end

-- Qwen3.5-MoE folders come with the experts stacked (the hub's) or apart (transformers' save of a
-- fine-tune): from_pretrained builds whichever the checkpoint holds.
moe.builds_experts_as_stored(sparse)

return M
