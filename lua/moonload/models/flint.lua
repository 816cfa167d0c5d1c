--- Flint (FlintForCausalLM, model_type "flint": RecursiveSI/flint) with transformers' parameter
-- names, as transformers builds it.
--
-- Attention: Qwen3's (an RMSNorm over each query and key head before the rotary embedding) with a
-- learned sink logit per head (self_attn.sinks, float32) that joins each row's softmax and attends
-- to nothing, as gpt-oss's (models/gpt_oss.lua). Of layer_types (by default the first two layers,
-- every fourth from the second and the last full) the sliding layers attend over sliding_window
-- tokens and rotate; the full ones attend to everything without any position embedding.
--
-- MLP: the layers in mlp_only_layers ([0, 1] by default) keep a dense SwiGLU MLP; the others are
-- sparse. A sparse layer's router (mlp.gate, a float32 weight) scores every expert with a float32
-- sigmoid and takes each token's num_experts_per_tok best, renormalized when norm_topk_prob (no
-- bias); beside them every token goes through an ungated shared expert (mlp.shared_expert), added
-- in full. Only the chosen experts run, so experts on disk are read for the tokens that chose them.
--
-- The hub holds the sinks as self_attn.softmax_offset, renamed as transformers' conversion mapping
-- renames them, and one module per expert; transformers' stacked layout loads too.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")
local gpt_oss = require("moonload.models.gpt_oss")

local M = {}
local WHO = "models.flint"

-- FlintConfig's defaults for the keys Llama's and Qwen3-MoE's readers require or default otherwise.
local DEFAULTS = { vocab_size = 150144, hidden_size = 2048, intermediate_size = 6144, num_hidden_layers = 49,
   num_attention_heads = 32, num_key_value_heads = 4, head_dim = 128, max_position_embeddings = 262144,
   sliding_window = 513, moe_intermediate_size = 512, shared_expert_intermediate_size = 1024, num_experts_per_tok = 6,
   num_experts = 256, norm_topk_prob = true, mlp_only_layers = { 0, 1 } }

--- Reads and checks a Flint config (path, folder or table) with FlintConfig's defaults: Llama's
-- keys and the layer plan (cfg.layer_windows, cfg.nope_layers), then Qwen3-MoE's experts
-- (cfg.sparse_layers from mlp_only_layers and decoder_sparse_step) and shared_expert_intermediate_size.
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   if fixed.layer_types == nil then     -- (transformers' default: the first two, every fourth from the second, the last full)
      local n = config.integer(fixed, WHO, "num_hidden_layers", fixed.num_hidden_layers, 1)
      fixed.layer_types = {}
      for i = 0, n - 1 do
         fixed.layer_types[i + 1] = (i < 2 or i % 4 == 1 or i == n - 1) and "full_attention" or "sliding_attention"
      end
   end
   local cfg = moe.config(fixed, "flint")
   cfg._source, cfg._raw = src, raw
   cfg.shared_expert_intermediate_size = config.integer(cfg, WHO, "shared_expert_intermediate_size",
      cfg.shared_expert_intermediate_size, 1)
   return cfg
end

-- --- the sparse block -------------------------------------------------------------------------------

-- An expert, the shared expert or a dense layer's MLP: a SwiGLU of the given width.
local FlintMLP = moe.Qwen3MoeMLP:extend("FlintMLP")
M.FlintMLP = FlintMLP

-- The router: DeepSeek's float32 weight (kept float32 whatever the model's dtype, as transformers
-- keeps it), its logits computed in float32; no correction bias.
local FlintTopKRouter = deepseek.DeepseekTopkRouter:extend("FlintTopKRouter")
M.FlintTopKRouter = FlintTopKRouter

function FlintTopKRouter:__init(cfg)
   deepseek.DeepseekTopkRouter.__init(self, { n_routed_experts = cfg.num_experts, hidden_size = cfg.hidden_size })
end

local FlintSparseMoeBlock = moe.SparseMoeBlock:extend("FlintSparseMoeBlock")
M.FlintSparseMoeBlock = FlintSparseMoeBlock

-- (transformers' order: experts, gate, shared_expert)
function FlintSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.experts = moe.experts_for(cfg, WHO, FlintMLP, "apart")
   self.gate = FlintTopKRouter(cfg)
   self.shared_expert = FlintMLP(cfg, cfg.shared_expert_intermediate_size)
   self:routing(cfg)
end

--- Each row's top_k experts by sigmoid score, weighted by those scores (over their sum with
-- norm_topk_prob): top_w (N, k) float32, top_i a list per row.
function FlintSparseMoeBlock:route(flat)
   return moe.biased_sigmoid_route(self.gate(flat), nil, self.top_k, self.norm_topk_prob, 0)
end

--- x (B, T, hidden): the routed experts' weighted sum plus the shared expert's, ungated.
function FlintSparseMoeBlock:forward(x)
   return moe.SparseMoeBlock.forward(self, x) + self.shared_expert(x)
end

-- --- layers and models ------------------------------------------------------------------------------

local function mlp(cfg, layer_idx)
   return cfg.sparse_layers[layer_idx] and FlintSparseMoeBlock(cfg) or FlintMLP(cfg)
end

-- (q_norm and k_norm come with cfg.qk_norm: LlamaAttention applies them before rotating; the full
-- layers' cfg.nope_layers skip the rotary embedding)
local LM = moe.decoder_family("flint", "Flint", gpt_oss.SinkAttention, mlp, "mlp", M.config, M)
moe.builds_experts_as_stored(LM)
M.FlintAttention.keep_float32_buffers = { sinks = true }     -- (as transformers keeps them)

-- the hub's name for the sinks, as transformers' conversion mapping renames it
LM.checkpoint_renames = { { "%.self_attn%.softmax_offset$", ".self_attn.sinks" } }

return M
