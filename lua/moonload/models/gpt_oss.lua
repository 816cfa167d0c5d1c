--- gpt-oss (GptOssForCausalLM, model_type "gpt_oss": gpt-oss-20b and gpt-oss-120b) with Hugging
-- Face parameter names. Llama's grouped-query attention with biased projections, plus:
--
-- Attention sinks: one learned logit per query head (self_attn.sinks) joins each row's softmax
-- without a value, so a query may attend to "nothing" (the probabilities of its keys sum to less
-- than one). The kernel takes them (ml_sdpa's sinks); layers alternate a sliding window (128 on
-- the hub) and full attention (layer_types).
--
-- Experts stacked in one tensor per projection (mlp.experts.gate_up_proj (E, hidden, 2 x inter),
-- down_proj (E, inter, hidden), with biases), the x @ W layout. The router (mlp.router, a linear
-- with a bias) keeps each token's top num_experts_per_tok logits and softmaxes those. An expert
-- computes gate_up = x W + b, whose even columns are the gate and odd ones the up projection,
-- then (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max = limit)
-- (alpha 1.702, limit 7), then the down projection.
--
-- The hub's checkpoints store the experts as MXFP4 (config.json's quantization_config
-- quant_method "mxfp4"): gate_up_proj_blocks (E, 2 x inter, hidden / 32, 16) uint8 and
-- gate_up_proj_scales (E, 2 x inter, hidden / 32) uint8, down_proj likewise, in the (out, in)
-- layout of a linear layer. Such a model keeps them so, half a byte a weight wherever they lie
-- (gpt-oss-20b's 12 GB of experts would be 24 GB as bfloat16): a decoding step multiplies straight
-- from the packed bytes (F.mxfp4_linear), a prompt expands one expert at a time.
--
-- Only the experts some token chose run; under offload hooks the stacked tensors are views of
-- the mapped checkpoint, so only the chosen experts' pages are read.
local nn = require("moonload.nn")
local F = require("moonload.nn.functional")
local common = require("moonload.models.common")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.gpt_oss"

--- Reads and checks a gpt-oss config (path, folder or table): Llama's keys (rope_parameters or
-- rope_theta + rope_scaling, YaRN on the hub), layer_types and sliding_window, and the experts'
-- num_local_experts, num_experts_per_tok (or experts_per_token), swiglu_alpha and swiglu_limit.
function M.config(source)
   local cfg = llama.config(source, "gpt_oss")
   local function int(name, v, min) return config.integer(cfg, WHO, name, v, min) end
   cfg.num_local_experts = int("num_local_experts", cfg.num_local_experts or cfg.num_experts or 128, 1)
   cfg.num_experts_per_tok = int("num_experts_per_tok", cfg.num_experts_per_tok or cfg.experts_per_token or 4, 1)
   if cfg.num_experts_per_tok > cfg.num_local_experts then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_local_experts %d", cfg.num_experts_per_tok,
         cfg.num_local_experts)
   end
   for name, default in pairs({ swiglu_alpha = 1.702, swiglu_limit = 7.0 }) do
      local v = cfg[name]
      if v == nil then v = default end
      if type(v) ~= "number" or v <= 0 then
         config.fail(cfg, WHO, 'config key "%s" must be a positive number, got %s', name, tostring(v))
      end
      cfg[name] = v
   end
   local qc = cfg.quantization_config
   cfg.mxfp4 = type(qc) == "table" and qc.quant_method == "mxfp4"
   if cfg.mxfp4 and (cfg.hidden_size % 32 ~= 0 or cfg.intermediate_size % 32 ~= 0) then
      config.fail(cfg, WHO, "MXFP4 experts need hidden_size and intermediate_size in multiples of 32, got %d and %d",
         cfg.hidden_size, cfg.intermediate_size)
   end
   return cfg
end

-- --- attention with sinks ---------------------------------------------------------------------

local SinkAttention = llama.LlamaAttention:extend("SinkAttention")
M.SinkAttention = SinkAttention

function SinkAttention:__init(cfg, layer_idx)
   llama.LlamaAttention.__init(self, cfg, layer_idx)
   self.sinks = nn.Module.new_parameter({ cfg.num_attention_heads })
   if not self.sinks:is_meta() then self.sinks:fill_(0) end
end

function SinkAttention:attend(q, k, v, past, pad)
   -- (the cache may live elsewhere than the module: running on the CPU in place of a GPU, the
   -- queries go to the cache's device, and the sinks, a few floats, with them)
   local sinks = self.sinks
   if sinks.device ~= q.device then sinks = sinks:to(q.device) end
   return common.gqa_attention(q, k, v, past, self.scale, pad, self.window or nil, sinks)
end

-- --- router and experts -----------------------------------------------------------------------

local GptOssTopKRouter = nn.Module:extend("GptOssTopKRouter")
M.GptOssTopKRouter = GptOssTopKRouter

function GptOssTopKRouter:__init(cfg)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ cfg.num_local_experts, cfg.hidden_size })
   self.bias = nn.Module.new_parameter({ cfg.num_local_experts })
   if not self.weight:is_meta() then
      self.weight:fill_(0)
      self.bias:fill_(0)
   end
end

--- The router's logits (N, experts) for flat (N, hidden).
function GptOssTopKRouter:forward(flat)
   return F.linear(flat, self.weight, self.bias)
end

local GptOssExperts = nn.Module:extend("GptOssExperts")
M.GptOssExperts = GptOssExperts

--- GptOssExperts(cfg): the stacked experts, as MXFP4 blocks and scales when cfg.mxfp4 (a
-- quantization_config with quant_method "mxfp4"), else floating (zeros until loaded). With
-- cfg.experts_split (llama.cpp's GGUF files), gate and up are apart: gate_proj, up_proj and
-- down_proj (E, out, in) in a linear layer's layout, each as <name>_blocks and <name>_scales in
-- llama.cpp's nibble order when cfg.mxfp4.
function GptOssExperts:__init(cfg)
   nn.Module.__init(self)
   local E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
   local new = nn.Module.new_parameter
   if cfg.experts_split then
      for _, p in ipairs({ { "gate_proj", I, H }, { "up_proj", I, H }, { "down_proj", H, I } }) do
         local name, out, inp = p[1], p[2], p[3]
         if cfg.mxfp4 then
            self[name .. "_blocks"] = new({ E, out, inp / 32, 16 }, { dtype = "uint8" })
            self[name .. "_scales"] = new({ E, out, inp / 32 }, { dtype = "uint8" })
         else
            self[name] = new({ E, out, inp })
         end
         self[name .. "_bias"] = new({ E, out })
      end
   elseif cfg.mxfp4 then
      local u8 = { dtype = "uint8" }
      self.gate_up_proj_blocks = new({ E, 2 * I, H / 32, 16 }, u8)
      self.gate_up_proj_scales = new({ E, 2 * I, H / 32 }, u8)
      self.gate_up_proj_bias = new({ E, 2 * I })
      self.down_proj_blocks = new({ E, H, I / 32, 16 }, u8)
      self.down_proj_scales = new({ E, H, I / 32 }, u8)
      self.down_proj_bias = new({ E, H })
   else
      self.gate_up_proj = new({ E, H, 2 * I })
      self.gate_up_proj_bias = new({ E, 2 * I })
      self.down_proj = new({ E, I, H })
      self.down_proj_bias = new({ E, H })
   end
   for _, proj in ipairs({ "gate_up_proj", "gate_proj", "up_proj", "down_proj" }) do
      for _, name in ipairs({ proj, proj .. "_blocks", proj .. "_scales", proj .. "_bias" }) do
         local t = self[name]
         if t ~= nil and not t:is_meta() then t:fill_(name:find("_scales$") and 127 or 0) end   -- (scale 127: 2^0)
      end
   end
   rawset(self, "mxfp4", cfg.mxfp4 == true)
   rawset(self, "split", cfg.experts_split == true)
   rawset(self, "order", cfg.mxfp4_order)      -- "ggml": llama.cpp's nibble order
   rawset(self, "num_experts", E)
   rawset(self, "intermediate_size", I)
   rawset(self, "expert_width", 2 * I)   -- (planning: an expert's widest activation, utils/runtime_memory.lua)
   rawset(self, "alpha", cfg.swiglu_alpha)
   rawset(self, "limit", cfg.swiglu_limit)
end

-- x (n, in) times expert e's (0-based) projection name ("gate_up_proj", "gate_proj", "up_proj"
-- or "down_proj") plus its bias.
function GptOssExperts:project(name, e, x)
   local bias = self[name .. "_bias"]:select(1, e + 1)
   if self.mxfp4 then
      return F.mxfp4_linear(x, self[name .. "_blocks"]:select(1, e + 1), self[name .. "_scales"]:select(1, e + 1), bias,
         self.order)
   end
   local w = self[name]:select(1, e + 1)
   if w.dtype ~= x.dtype then w = w:to(x.dtype) end
   if bias.dtype ~= x.dtype then bias = bias:to(x.dtype) end
   if self.split then return F.linear(x, w, bias) end          -- (out, in)
   return x:matmul(w) + bias                                   -- transformers' (in, out)
end

--- Expert e (0-based) on x (n, hidden): the clamped SwiGLU over the gate and up projections
-- (transformers' one gate_up: interleaved columns).
function GptOssExperts:expert(e, x)
   local gate, up
   if self.split then
      gate, up = self:project("gate_proj", e, x), self:project("up_proj", e, x)
   else
      local gate_up = self:project("gate_up_proj", e, x)
      local pairs_ = gate_up:view(gate_up:size(1), self.intermediate_size, 2)
      gate, up = pairs_:select(3, 1), pairs_:select(3, 2)
   end
   gate, up = gate:clamp(nil, self.limit), up:clamp(-self.limit, self.limit)
   return self:project("down_proj", e, (up + 1) * (gate * (gate * self.alpha):sigmoid()))
end

--- flat (N, hidden), top_w (N, k) routing weights, top_i a list per row of k 0-based experts:
-- the weighted sum of each row's experts (models/moe.lua's run_experts). Called as a module, so
-- offload hooks put the stacked weights in place first.
function GptOssExperts:forward(flat, top_w, top_i)
   return moe.run_expert_method(self, flat, top_w, top_i)
end

function GptOssExperts:extra_repr()
   return string.format("num_experts=%d, intermediate_size=%d%s", self.num_experts, self.intermediate_size,
      self.mxfp4 and ", mxfp4" or "")
end

local GptOssMLP = nn.Module:extend("GptOssMLP")
M.GptOssMLP = GptOssMLP

function GptOssMLP:__init(cfg)
   nn.Module.__init(self)
   self.router = GptOssTopKRouter(cfg)
   self.experts = GptOssExperts(cfg)
   rawset(self, "top_k", cfg.num_experts_per_tok)
end

--- x (B, T, hidden): each token's top_k router logits, softmaxed among themselves, weigh its experts.
function GptOssMLP:forward(x)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local flat = x:reshape(B * L, H)
   local top_v, top_i = self.router(flat):float():topk(self.top_k, 2)
   return self.experts(flat, top_v:softmax(-1), top_i:tolist()):view(B, L, H)
end

-- --- layers and model ---------------------------------------------------------------------------

moe.decoder_family("gpt_oss", "GptOss", SinkAttention, GptOssMLP, "mlp", M.config, M)

return M
