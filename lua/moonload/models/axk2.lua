--- A.X-K2 (AXK2ForCausalLM, model_type "axk2": skt/A.X-K2, A.X-K2-Light) with transformers'
-- parameter names, as transformers builds it.
--
-- DeepSeek-V3.2's layers (models/deepseek_sparse.lua: the latent attention, its lightning indexer
-- keeping each query's index_topk best keys, V3's experts) with three changes:
--   - the queries have no q_b_proj: one fused q_gate_proj reads the query latent normed and raw
--     side by side, [q_a_layernorm(q_a_proj(x)), q_a_proj(x)], and gives each head its query
--     (qk_head_dim) and a gate (v_head_dim); the heads' output times sigmoid(gate) goes into
--     o_proj. The indexer reads the normed latent, as V3.2's;
--   - input_layernorm, and post_attention_layernorm on the sparse layers, are gated RMSNorms:
--     y = RMSNorm(x), then y * sigmoid(fc2(silu(fc1(y)))) through a gated_norm_rank bottleneck;
--   - the router chooses among all experts unless n_group and topk_group are set (A.X-K2-Light
--     sets neither: read as one group), DeepSeek-V3's grouped choice otherwise.
--
-- The hub holds q_gate_proj as self_attn.q_b_proj and the gates' fc1, fc2 as W_down, W_up,
-- renamed as transformers' conversion mapping renames them, and one module per expert
-- (mlp.experts.E.{gate,up,down}_proj); transformers' stacked layout loads too. Only the chosen
-- experts run, so experts on disk are read for the tokens that chose them.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local deepseek_sparse = require("moonload.models.deepseek_sparse")

local M = {}
local WHO = "models.axk2"

-- AXK2Config's defaults where Llama's, DeepSeek's and V3.2's readers would take others.
local DEFAULTS = { vocab_size = 163840, hidden_size = 2048, intermediate_size = 5120, moe_intermediate_size = 512,
   num_hidden_layers = 48, num_attention_heads = 32, num_key_value_heads = 32, n_shared_experts = 1,
   n_routed_experts = 128, kv_lora_rank = 128, q_lora_rank = 384, qk_rope_head_dim = 32, v_head_dim = 64,
   qk_nope_head_dim = 64, max_position_embeddings = 131072, index_topk = 2048, index_head_dim = 128,
   index_n_heads = 16, gated_norm_rank = 16 }

--- Reads and checks an A.X-K2 config (path, folder or table) with AXK2Config's defaults:
-- DeepSeek-V3.2's keys (models/deepseek_sparse.lua), n_group and topk_group both set or both
-- absent (one group), and gated_norm_rank.
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   if (raw.n_group == nil) ~= (raw.topk_group == nil) then
      config.fail(fixed, WHO, 'config keys "n_group" (%s) and "topk_group" (%s) must be set together (both null: '
         .. "routing without groups)", tostring(raw.n_group), tostring(raw.topk_group))
   end
   local cfg = deepseek_sparse.config(fixed, "axk2")
   cfg._source, cfg._raw = src, raw
   cfg.gated_norm_rank = config.integer(cfg, WHO, "gated_norm_rank", cfg.gated_norm_rank, 1)
   return cfg
end

-- --- the gated norm ---------------------------------------------------------------------------

-- The gate's bottleneck: fc2(silu(fc1(y))) (transformers' CLIPMLP with SiLU, no biases).
local AXK2GateMLP = nn.Module:extend("AXK2GateMLP")
M.AXK2GateMLP = AXK2GateMLP

function AXK2GateMLP:__init(cfg)
   nn.Module.__init(self)
   self.activation_fn = nn.SiLU()
   self.fc1 = nn.Linear(cfg.hidden_size, cfg.gated_norm_rank, { bias = false })
   self.fc2 = nn.Linear(cfg.gated_norm_rank, cfg.hidden_size, { bias = false })
end

function AXK2GateMLP:forward(y) return self.fc2(self.activation_fn(self.fc1(y))) end

local AXK2GatedRMSNorm = nn.Module:extend("AXK2GatedRMSNorm")
M.AXK2GatedRMSNorm = AXK2GatedRMSNorm

function AXK2GatedRMSNorm:__init(cfg)
   nn.Module.__init(self)
   self.norm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.mlp = AXK2GateMLP(cfg)
end

--- x (B, T, hidden): RMSNorm(x) times the sigmoid of its gate, the gate in float32 (as transformers).
function AXK2GatedRMSNorm:forward(x)
   local y = self.norm(x)
   local gate = self.mlp(y):float():sigmoid()
   if y.dtype == "float32" then return y * gate end
   return (y:float() * gate):to(y.dtype)
end

-- --- attention, layer -------------------------------------------------------------------------

local LM = deepseek_sparse.sparse_family("axk2", "AXK2", nil, M, M.config)
local AXK2Attention = M.AXK2Attention

function AXK2Attention:__init(cfg, layer_idx)
   deepseek_sparse.DsaAttention.__init(self, cfg, layer_idx)
   self.q_b_proj = nil                 -- (the queries come with the gate from q_gate_proj)
   self.q_gate_proj = nn.Linear(2 * cfg.q_lora_rank, self.n_head * (cfg.qk_head_dim + cfg.v_head_dim), { bias = false })
end

--- The queries (B, T, H, qk_head_dim), the normed query latent the indexer reads and the gate
-- (B, T, H * v_head_dim), all from q_gate_proj over [normed latent, raw latent].
function AXK2Attention:queries(x)
   local B, L, H, qk = x:size(1), x:size(2), self.n_head, self.nope + self.rope
   local latent = self.q_a_proj(x)
   local normed = self.q_a_layernorm(latent)
   local both = self.q_gate_proj(T.cat({ normed, latent }, 3)):view(B, L, H, qk + self.v_dim)
   return both:narrow(4, 1, qk):contiguous(), normed, both:narrow(4, qk + 1, self.v_dim):reshape(B, L, H * self.v_dim)
end

function M.AXK2DecoderLayer:__init(cfg, layer_idx)
   llama.LlamaDecoderLayer.__init(self, cfg, layer_idx)
   self.input_layernorm = AXK2GatedRMSNorm(cfg)
   if cfg.sparse_layers[layer_idx] then self.post_attention_layernorm = AXK2GatedRMSNorm(cfg) end
end

-- the hub's names, as transformers' conversion mapping renames them
LM.checkpoint_renames = { { "%.self_attn%.q_b_proj%.", ".self_attn.q_gate_proj." }, { "%.W_down%.", ".mlp.fc1." },
   { "%.W_up%.", ".mlp.fc2." } }

return M
