--- ERNIE 4.5 (Ernie4_5ForCausalLM, model_type "ernie4_5": ERNIE-4.5-0.3B) and ERNIE 4.5 MoE
-- (Ernie4_5_MoeForCausalLM, "ernie4_5_moe": ERNIE-4.5-21B-A3B, -300B-A47B) with Hugging Face
-- parameter names. Llama's layout, with biases on every projection when use_bias, and rotary
-- pairs of neighbouring dims (x0, x1), (x2, x3), ... (run as Llama's halves after reordering q's
-- and k's dims alike).
--
-- In the MoE model, every moe_layer_interval-th layer from moe_layer_start_index to
-- moe_layer_end_index is sparse:
-- - the router, in float32 (its weight and bias are kept so), sends each token to the moe_k experts
--   of highest softmax probability plus a correction bias (moe_statics.e_score_correction_bias);
-- - the token's weights are those probabilities alone, divided by their sum (at least moe_norm_min);
-- - moe_num_shared_experts shared experts, as one MLP, run beside them.
-- The hub's files hold one module per expert and the bias at mlp.moe_statics; transformers writes
-- the experts stacked per projection and the bias under the router. Both load. The hub's
-- multi-token-prediction tensors (mtp) are left out.
local nn = require("moonload.nn")
local F = require("moonload.nn.functional")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}

--- Reads and checks an ERNIE 4.5 config (path, folder or table); family "ernie4_5" for the dense
-- model, else the MoE one. The MoE layers end up in cfg.sparse_layers (1-based).
function M.config(source, family)
   family = family or "ernie4_5_moe"
   local WHO = "models." .. family
   local cfg = llama.config(source, family)
   if family == "ernie4_5" then return cfg end
   local n = cfg.num_hidden_layers
   local function int(v, name, min) return config.integer(cfg, WHO, name, v, min) end
   local function default(v, d) if v == nil then return d end return v end
   cfg.num_experts = int(default(cfg.moe_num_experts, 64), "moe_num_experts", 1)
   cfg.num_experts_per_tok = int(default(cfg.moe_k, 6), "moe_k", 1)
   if cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, WHO, "moe_k %d is more than moe_num_experts %d", cfg.num_experts_per_tok, cfg.num_experts)
   end
   cfg.moe_intermediate_size = int(default(cfg.moe_intermediate_size, 1536), "moe_intermediate_size", 1)
   cfg.moe_num_shared_experts = int(default(cfg.moe_num_shared_experts, 2), "moe_num_shared_experts", 0)
   local first = int(default(cfg.moe_layer_start_index, 1), "moe_layer_start_index", 0)
   local last = default(cfg.moe_layer_end_index, -1)
   if last == -1 then last = n - 1 end
   last = int(last, "moe_layer_end_index", 0)
   local every = int(default(cfg.moe_layer_interval, 1), "moe_layer_interval", 1)
   local norm_min = default(cfg.moe_norm_min, 1e-12)
   if type(norm_min) ~= "number" or norm_min < 0 then
      config.fail(cfg, WHO, 'config key "moe_norm_min" must be a number >= 0, got %s', tostring(norm_min))
   end
   cfg.moe_norm_min = norm_min
   cfg.sparse_layers = {}
   for i = 1, n do cfg.sparse_layers[i] = i % every == 0 and i - 1 >= first and i - 1 <= last end
   return cfg
end

-- --- the sparse block ---------------------------------------------------------------------------

--- An expert, the shared experts or a dense MLP: Llama's, of intermediate width (biased with use_bias).
local Ernie4_5_MoeMLP = llama.LlamaMLP:extend("Ernie4_5_MoeMLP")
M.Ernie4_5_MoeMLP = Ernie4_5_MoeMLP

function Ernie4_5_MoeMLP:__init(cfg, intermediate)
   llama.LlamaMLP.__init(self, setmetatable({ intermediate_size = intermediate or cfg.intermediate_size }, { __index = cfg }))
end

local Statics = nn.Module:extend("Ernie4_5_MoeStatics")
M.Ernie4_5_MoeStatics = Statics
Statics.keep_float32_buffers = { e_score_correction_bias = true }

function Statics:__init(cfg)
   nn.Module.__init(self)
   self.e_score_correction_bias = nn.Module.new_parameter({ 1, cfg.num_experts })
   if not self.e_score_correction_bias:is_meta() then self.e_score_correction_bias:fill_(0) end
end

--- probs (N, E) float32 + the bias: what the choice ranks. (Called as a module, as transformers
-- does, so that an offloading hook puts the bias in place.)
function Statics:forward(probs)
   local bias = self.e_score_correction_bias
   if bias.device ~= probs.device then bias = bias:to(probs.device) end
   return probs + bias:float():view(bias:numel())
end

local Router = nn.Module:extend("Ernie4_5_MoeTopKRouter")
M.Ernie4_5_MoeTopKRouter = Router
Router.keep_float32_buffers = { weight = true }

function Router:__init(cfg)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ cfg.num_experts, cfg.hidden_size })
   if not self.weight:is_meta() then self.weight:fill_(0) end
   self.moe_statics = Statics(cfg)
   rawset(self, "top_k", cfg.num_experts_per_tok)
   rawset(self, "norm_min", cfg.moe_norm_min)
end

--- flat (N, hidden) -> top_w (N, k) float32, top_i a list per row of k 0-based experts.
function Router:forward(flat)
   local w = self.weight
   if w.device ~= flat.device then w = w:to(flat.device) end
   local probs = F.linear(flat:float(), w:float()):softmax(-1)
   local _, top_i = self.moe_statics(probs):topk(self.top_k, 2)
   local top_w = probs:gather(2, top_i)
   return top_w / top_w:sum(2, true):clamp(self.norm_min), top_i:tolist()
end

local Block = moe.SparseMoeBlock:extend("Ernie4_5_MoeSparseMoeBlock")
M.Ernie4_5_MoeSparseMoeBlock = Block

function Block:__init(cfg)
   nn.Module.__init(self)
   self.gate = Router(cfg)
   self.experts = moe.experts_for(cfg, "models.ernie4_5_moe", Ernie4_5_MoeMLP, "out_in")
   if cfg.moe_num_shared_experts > 0 then
      self.shared_experts = Ernie4_5_MoeMLP(cfg, cfg.moe_intermediate_size * cfg.moe_num_shared_experts)
   end
end

function Block:route(flat) return self.gate(flat) end

function Block:forward(x)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local flat = x:reshape(B * L, H)
   local out = self:routed(flat, self:route(flat))
   if self.shared_experts then out = out + self.shared_experts(flat) end
   return out:view(B, L, H)
end

-- --- the models -----------------------------------------------------------------------------------

moe.decoder_family("ernie4_5", "Ernie4_5", llama.LlamaAttention, llama.LlamaMLP, "mlp", M.config, M)

local function mlp(cfg, layer_idx)
   if cfg.sparse_layers[layer_idx] then return Block(cfg) end
   return Ernie4_5_MoeMLP(cfg)
end
local LM = moe.decoder_family("ernie4_5_moe", "Ernie4_5_Moe", llama.LlamaAttention, mlp, "mlp", M.config, M)
moe.builds_experts_as_stored(LM)
LM.checkpoint_renames = { { "%.mlp%.moe_statics%.", ".mlp.gate.moe_statics." } }   -- (the hub's place)
LM.ignore_unexpected = { "rotary_emb%.inv_freq$", "mtp" }

return M
