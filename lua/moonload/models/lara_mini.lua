--- Lara Mini (LaraMiniForCausalLM, model_type "lara_mini": translated/Lara-4-Mini-Base) with Hugging
-- Face parameter names, as transformers builds it. A hybrid whose layer_types (by default the released
-- period of five: linear, sliding, linear, full, sliding) pick each layer's mixer:
--
--   linear_attention: Qwen3.5's gated delta net (models/qwen3_5.lua, models/qwen3_next.lua: in_proj_qkv,
--     in_proj_z, in_proj_b, in_proj_a apart, a causal conv, the delta rule's state, an RMSNorm gated by
--     silu(z)); the cache keeps its conv inputs and state.
--   sliding_attention: Qwen3's attention (an RMSNorm over each query and key head before the rotary
--     embedding, which turns whole heads) over the last sliding_window tokens.
--   full_attention: the same attention over every token, without any position embedding.
--
-- Every layer's MLP is sparse: a float32 softmax router over num_experts, each token's top
-- num_experts_per_tok (renormalized with norm_topk_prob) weighing experts stacked per projection (or
-- one module each, as a checkpoint holds them), plus an ungated shared expert added in full (Flint's
-- block). RMSNorms have plain weights; the head is tied to the embeddings unless tie_word_embeddings
-- says otherwise.
--
-- The hub's files (and transformers' saves) hold each delta net's projections fused in one in_proj
-- (rows q, k, v, z, b, a) and its gated norm as out_norm: they load split and renamed, as transformers'
-- conversion mapping does.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local qwen3_next = require("moonload.models.qwen3_next")
local qwen3_5 = require("moonload.models.qwen3_5")

local M = {}
local WHO = "models.lara_mini"

-- LaraMiniConfig's defaults (Lara-4-Mini's) where Llama's, Qwen3-MoE's and Qwen3-Next's readers
-- would take others.
local DEFAULTS = { vocab_size = 151936, hidden_size = 1024, num_hidden_layers = 34, num_attention_heads = 16,
   num_key_value_heads = 4, head_dim = 128, max_position_embeddings = 131072, tie_word_embeddings = true,
   sliding_window = 512, linear_num_key_heads = 8, linear_num_value_heads = 16, num_experts = 128,
   num_experts_per_tok = 4, moe_intermediate_size = 512, shared_expert_intermediate_size = 512, norm_topk_prob = true }

-- The released pattern of layer types, repeated.
local PATTERN = { "linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention" }

--- Reads and checks a Lara Mini config (path, folder or table) with LaraMiniConfig's defaults: Llama's
-- and Qwen3-MoE's keys, the delta net's (qwen3_next.linear_attention_config), layer_types into
-- cfg.layer_windows (sliding_window on the sliding layers) and cfg.nope_layers (the full ones).
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local cfg = moe.config(fixed, "lara_mini")
   cfg._source, cfg._raw = src, raw
   qwen3_next.linear_attention_config(cfg, WHO)
   cfg.shared_expert_intermediate_size = config.integer(cfg, WHO, "shared_expert_intermediate_size",
      cfg.shared_expert_intermediate_size, 1)
   local window = config.integer(cfg, WHO, "sliding_window", cfg.sliding_window, 1)
   config.layer_types(cfg, WHO, { "linear_attention", "sliding_attention", "full_attention" },
      function(i) return PATTERN[(i - 1) % #PATTERN + 1] end)
   cfg.nope_layers = {}
   for i, kind in ipairs(cfg.layer_types) do
      cfg.layer_windows[i] = kind == "sliding_attention" and window
      cfg.nope_layers[i] = kind == "full_attention"
      cfg.sparse_layers[i] = true                       -- (no dense layers: mlp_only_layers is not Lara Mini's)
   end
   cfg.qk_norm = true
   cfg.rotary_dim = cfg.head_dim    -- (transformers turns whole heads, whatever partial_rotary_factor says)
   return cfg
end

-- --- the sparse block ------------------------------------------------------------------------------

local MLP = moe.Qwen3MoeMLP:extend("LaraMiniMLP")
M.LaraMiniMLP = MLP

local Experts = moe.StackedExperts:extend("LaraMiniExperts")
M.LaraMiniExperts = Experts

-- The router: its logits computed in float32 (the weight kept in the model's dtype, as transformers keeps it).
local Router = nn.Module:extend("LaraMiniTopKRouter")
M.LaraMiniTopKRouter = Router

function Router:__init(cfg)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ cfg.num_experts, cfg.hidden_size })
end

--- flat (N, hidden) -> the router's logits (N, E), float32.
function Router:forward(flat)
   return flat:float():matmul(self.weight:float():t())
end

local SparseMoeBlock = moe.SparseMoeBlock:extend("LaraMiniSparseMoeBlock")
M.LaraMiniSparseMoeBlock = SparseMoeBlock

-- (transformers' order: experts, gate, shared_expert)
function SparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.experts = moe.experts_for(cfg, WHO, MLP, "out_in", Experts)
   self.gate = Router(cfg)
   self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size)
   self:routing(cfg)
end

--- x (B, T, hidden): the routed experts' weighted sum (Qwen3-MoE's softmax routing) plus the shared
-- expert's, ungated.
function SparseMoeBlock:forward(x)
   return moe.SparseMoeBlock.forward(self, x) + self.shared_expert(x)
end

-- --- layers and models ------------------------------------------------------------------------------

local GatedDeltaNet = qwen3_5.Qwen3_5GatedDeltaNet:extend("LaraMiniGatedDeltaNet")
M.LaraMiniGatedDeltaNet = GatedDeltaNet

local Attention = llama.LlamaAttention:extend("LaraMiniAttention")
M.LaraMiniAttention = Attention

local Layer = qwen3_next.Qwen3NextDecoderLayer:extend("LaraMiniDecoderLayer")
M.LaraMiniDecoderLayer = Layer
Layer.LinearAttention, Layer.Attention, Layer.Norm = GatedDeltaNet, Attention, nn.RMSNorm
function Layer.MLP(cfg) return SparseMoeBlock(cfg) end

local Rotary = llama.LlamaRotaryEmbedding:extend("LaraMiniRotaryEmbedding")
M.LaraMiniRotaryEmbedding = Rotary

local Model = llama.LlamaModel:extend("LaraMiniModel")
M.LaraMiniModel = Model
Model.family, Model.Layer, Model.Rotary = "lara_mini", Layer, Rotary

local LM = llama.LlamaForCausalLM:extend("LaraMiniForCausalLM")
M.LaraMiniForCausalLM = LM
LM.family, LM.Model = "lara_mini", Model
LM.no_split_modules = { "LaraMiniDecoderLayer" }
LM.stateful = true            -- its cache cannot be cropped: no assisted generation
LM.forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")
LM.checkpoint_renames = { { "%.linear_attn%.out_norm%.", ".linear_attn.norm." } }
function LM:read_config(source) return M.config(source) end
moe.builds_experts_as_stored(LM)

--- For a checkpoint holding the delta nets' projections fused in in_proj (rows: the conv's q, k, v,
-- then z, b, a): in_proj_qkv, in_proj_z, in_proj_b and in_proj_a split from it as it loads (views, no
-- copy; checkpoint_rewrite.lua).
function M.split_in_proj(model)
   local cfg = model.config
   local Hv = cfg.linear_num_value_heads
   local parts = { { "qkv", 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + Hv * cfg.linear_value_head_dim },
      { "z", Hv * cfg.linear_value_head_dim }, { "b", Hv }, { "a", Hv } }
   local rows = 0
   for _, p in ipairs(parts) do rows = rows + p[2] end
   local schemes = {}
   for i, kind in ipairs(cfg.layer_types) do
      if kind == "linear_attention" then
         schemes["model.layers." .. (i - 1) .. ".linear_attn.in_proj"] = { out_features = rows, in_features = cfg.hidden_size }
      end
   end
   local function split(owner, _, need)
      local w, out, at = need("weight"), {}, 0
      for _, p in ipairs(parts) do
         out[owner .. "_" .. p[1] .. ".weight"] = w:narrow(1, at + 1, p[2])
         at = at + p[2]
      end
      return out
   end
   rawset(model, "rewrite_checkpoint", require("moonload.checkpoint_rewrite").new(schemes, { weight = true }, split,
      "the delta net's projections fused in in_proj"))
end

-- (the experts as the checkpoint holds them, and whether its delta nets' projections are fused)
local experts_as_stored, stored_init = LM.build_opts_for, LM.__init

function LM.build_opts_for(names, shape_of)
   local opts = experts_as_stored(names, shape_of) or {}
   for _, name in ipairs(names) do
      if name:find("%.linear_attn%.in_proj%.weight$") then opts.fused_in_proj = true break end
   end
   return next(opts) and opts or nil
end

function LM:__init(cfg, opts)
   stored_init(self, cfg, opts)
   if opts and opts.fused_in_proj then M.split_in_proj(self) end
end

return M
