--- HunYuan MoE (HunYuanMoEV1ForCausalLM, model_type "hunyuan_v1_moe": Hunyuan-A13B) with Hugging
-- Face parameter names. The dense model's attention (models/llama.lua: HunYuanDenseV1Attention,
-- per-head q/k norms after the rotary embedding, the "dynamic" rope with an alpha as a fixed
-- NTK-alpha base); every layer sparse:
-- - the router mlp.gate.wg, in float32 (its weight is kept so, and the hidden states cast to it),
--   sends each token to the moe_topk experts of highest softmax probability, weighted by those
--   probabilities renormalized to sum to 1;
-- - the experts mlp.experts.E.{gate_proj, up_proj, down_proj} (transformers' stacked layout loads
--   too), of moe_intermediate_size;
-- - a shared MLP (mlp.shared_mlp, of intermediate_size x num_shared_expert) every token goes
--   through, added to the experts' sum.
-- moe_topk, moe_intermediate_size and num_shared_expert may be one number or a list per layer, as
-- the hub's files have them; num_experts is one number.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.hunyuan_v1_moe"

-- The config key name as one value per layer: a number for all, or a list of n; each an integer >= min.
local function per_layer(cfg, name, default, min)
   local v, n = cfg[name], cfg.num_hidden_layers
   if v == nil then v = default end
   local out = {}
   if type(v) == "table" then
      if #v ~= n then
         config.fail(cfg, WHO, 'config key "%s" must be an integer or a list of %d (one per layer), got a list of %d',
            name, n, #v)
      end
      for i = 1, n do out[i] = config.integer(cfg, WHO, string.format("%s[%d]", name, i), v[i], min) end
   else
      local x = config.integer(cfg, WHO, name, v, min)
      for i = 1, n do out[i] = x end
   end
   return out
end

--- Reads and checks a HunYuan MoE config (path, folder or table). Per layer i: cfg.layer_moe[i] =
-- {num_experts_per_tok, moe_intermediate_size, shared_intermediate_size (0: no shared MLP)}.
function M.config(source)
   local cfg = llama.config(source, "hunyuan_v1_moe")
   local experts = cfg.num_experts == nil and 1 or cfg.num_experts
   if type(experts) == "table" then
      config.fail(cfg, WHO, 'config key "num_experts" must be one integer (a count per layer is not supported)')
   end
   cfg.num_experts = config.integer(cfg, WHO, "num_experts", experts, 1)
   local skipped = cfg.moe_layer_num_skipped
   if skipped ~= nil and skipped ~= 0 then
      config.fail(cfg, WHO, 'config key "moe_layer_num_skipped" must be 0 (dense layers are not supported), got %s',
         tostring(skipped))
   end
   local top_k = per_layer(cfg, "moe_topk", 1, 1)
   local widths = per_layer(cfg, "moe_intermediate_size", cfg.intermediate_size, 1)
   local shared = per_layer(cfg, "num_shared_expert", 1, 0)
   local mixed = cfg.use_mixed_mlp_moe
   if mixed ~= nil and type(mixed) ~= "boolean" then
      config.fail(cfg, WHO, 'config key "use_mixed_mlp_moe" must be a boolean, got %s', tostring(mixed))
   end
   cfg.layer_moe = {}
   for i = 1, cfg.num_hidden_layers do
      if top_k[i] > cfg.num_experts then
         config.fail(cfg, WHO, "moe_topk %d (layer %d) is more than num_experts %d", top_k[i], i, cfg.num_experts)
      end
      cfg.layer_moe[i] = { num_experts_per_tok = top_k[i], moe_intermediate_size = widths[i],
         shared_intermediate_size = mixed == false and 0 or cfg.intermediate_size * shared[i] }
   end
   cfg.norm_topk_prob = true
   return cfg
end

-- --- the sparse block ---------------------------------------------------------------------------

--- An expert or the shared MLP: Llama's SwiGLU, unbiased, of the width given.
local MLP = moe.Qwen3MoeMLP:extend("HunYuanMoEV1MLP")
M.HunYuanMoEV1MLP = MLP

local Gate = nn.Module:extend("HunYuanMoEV1Gate")
M.HunYuanMoEV1Gate = Gate

function Gate:__init(cfg)
   nn.Module.__init(self)
   self.wg = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   rawset(self.wg, "keep_float32_buffers", { weight = true })   -- (transformers builds it in float32 whatever the dtype)
end

--- flat (N, hidden) -> the router's scores (N, E), in float32 when its weight is (as transformers).
function Gate:forward(flat)
   local w = self.wg.weight
   if w ~= nil and w.dtype == "float32" then flat = flat:float() end
   return self.wg(flat)
end

local Block = moe.SparseMoeBlock:extend("HunYuanMoEV1Moe")
M.HunYuanMoEV1Moe = Block

--- Block(cfg, layer_idx): the layer's router, experts (one module each, or stacked as the
-- checkpoint holds them) and shared MLP, in transformers' order.
function Block:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local layer = setmetatable({}, { __index = cfg })            -- cfg as this layer's sizes make it
   for k, v in pairs(cfg.layer_moe[layer_idx]) do layer[k] = v end
   self.gate = Gate(cfg)
   self.experts = moe.experts_for(layer, WHO, MLP, "apart")
   if layer.shared_intermediate_size > 0 then self.shared_mlp = MLP(cfg, layer.shared_intermediate_size) end
   self:routing(layer)
end

--- x (B, T, hidden): the routed experts' sum (SparseMoeBlock's: softmax top-k, renormalized) plus
-- the shared MLP.
function Block:forward(x)
   local out = moe.SparseMoeBlock.forward(self, x)
   if self.shared_mlp then out = self.shared_mlp(x) + out end
   return out
end

-- --- the model ----------------------------------------------------------------------------------

local LM = moe.decoder_family("hunyuan_v1_moe", "HunYuanMoEV1", llama.HunYuanDenseV1Attention, Block, "mlp",
   M.config, M)
moe.builds_experts_as_stored(LM)

return M
