--- JetMoE (JetMoeForCausalLM, model_type "jetmoe": jetmoe/jetmoe-8b, jetmoe-8b-chat) with
-- transformers' parameter names, as transformers builds it.
--
-- Attention is a mixture of attention heads (MoA, self_attention.experts): a router picks each
-- token's num_experts_per_tok of num_local_experts experts; each chosen expert projects the token's
-- queries (input_linear: num_key_value_heads heads of kv_channels) and, after attention, projects
-- those heads' output back (output_linear); the outputs are weighted by the router, summed, and a
-- bias added. The keys and values (kv_proj: keys, then values) are shared by all experts: query
-- head h of every chosen expert attends with key head h, so the cache holds num_key_value_heads
-- heads, and num_attention_heads is num_key_value_heads x num_experts_per_tok whatever the file says.
--
-- The MLP is a mixture of SwiGLU experts (mlp.input_linear: gate rows, then up rows; output_linear)
-- behind the same kind of router, with a bias after the weighted sum. A router's weights: a softmax
-- over the token's top-k logits (float32). Each expert group is stored stacked (num_experts, out,
-- in); only the chosen experts run, and from views of their slices, so experts on disk are read for
-- the tokens that chose them. ml.quantize splits a stacked group into one linear layer per expert
-- (input_linear.E), which ml.save_model writes so and from_pretrained builds back.
--
-- The layers' RMSNorms use transformers' default eps (1e-6) whatever rms_norm_eps says; the final
-- norm uses rms_norm_eps. The head is tied unless tie_word_embeddings is false.
local nn = require("moonload.nn")
local F = require("moonload.nn.functional")
local common = require("moonload.models.common")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.jetmoe"

-- JetMoeConfig's defaults for the keys Llama's config requires or defaults otherwise.
local DEFAULTS = { vocab_size = 32000, hidden_size = 2048, num_hidden_layers = 12, num_key_value_heads = 16,
   kv_channels = 128, intermediate_size = 5632, max_position_embeddings = 4096, activation_function = "silu",
   num_local_experts = 8, num_experts_per_tok = 2, tie_word_embeddings = true, rms_norm_eps = 1e-6 }

-- The layers' norms: JetMoeRMSNorm's default, not rms_norm_eps.
local LAYER_NORM_EPS = 1e-6

--- Reads and checks a JetMoE config (path, folder or table) with JetMoeConfig's defaults: Llama's
-- keys, with head_dim = kv_channels, hidden_act = activation_function and num_attention_heads =
-- num_key_value_heads x num_experts_per_tok (as transformers derives them); num_experts =
-- num_local_experts.
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   if raw.kv_channels == nil and raw.head_dim ~= nil then fixed.kv_channels = raw.head_dim end   -- (its attribute_map)
   local function int(name, min)
      fixed[name] = config.integer(fixed, WHO, name, fixed[name], min)
      return fixed[name]
   end
   local kv_heads, k, experts = int("num_key_value_heads", 1), int("num_experts_per_tok", 1), int("num_local_experts", 1)
   if k > experts then
      config.fail(fixed, WHO, "num_experts_per_tok %d is more than num_local_experts %d", k, experts)
   end
   if type(fixed.activation_function) ~= "string" then
      config.fail(fixed, WHO, 'config key "activation_function" must be a string, got %s', tostring(fixed.activation_function))
   end
   fixed.head_dim, fixed.hidden_act, fixed.num_attention_heads = int("kv_channels", 1), fixed.activation_function, kv_heads * k
   local cfg = llama.config(fixed, "jetmoe")
   cfg._source, cfg._raw = src, raw
   cfg.num_experts = experts
   return cfg
end

-- --- experts and routers --------------------------------------------------------------------------

-- num_experts linear maps stacked in one weight (num_experts, output_size, input_size), as the
-- hub stores them.
local JetMoeParallelExperts = nn.Module:extend("JetMoeParallelExperts")
M.JetMoeParallelExperts = JetMoeParallelExperts
JetMoeParallelExperts.stacked = true

function JetMoeParallelExperts:__init(num_experts, input_size, output_size)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ num_experts, output_size, input_size })
   if not self.weight:is_meta() then self.weight:fill_(0) end
   rawset(self, "num_experts", num_experts)
   rawset(self, "input_size", input_size)
   rawset(self, "output_size", output_size)
end

--- x (n, input_size) through expert e's (0-based) map: (n, output_size). Called as a module, so
-- that offload hooks put the stacked weight in place first.
function JetMoeParallelExperts:forward(x, e)
   local w = self.weight:select(1, e + 1)
   if w.dtype ~= x.dtype then w = w:to(x.dtype) end
   return F.linear(x, w)
end

--- The same maps as one linear layer each, viewing the stacked weight (what ml.quantize makes of
-- them, so that they quantize as linear layers); nil while the weight is offloaded (meta).
function JetMoeParallelExperts:unstacked()
   if self.weight:is_meta() then return nil end
   local big = require("moonload.big_modeling")
   local list = {}
   for e = 1, self.num_experts do
      list[e] = big.init_empty_weights(function() return nn.Linear(self.input_size, self.output_size, { bias = false }) end)
      list[e].weight = self.weight:select(1, e)
   end
   return nn.ModuleList(list)
end

--- For the planner: the weight quantizes once split when its rows are whole blocks.
function JetMoeParallelExperts:quantized_projections()
   return self.input_size % require("moonload.nn.quantized_linear").BLOCK == 0 and { "weight" } or {}
end

function JetMoeParallelExperts:extra_repr()
   return string.format("num_experts=%d, input_size=%d, output_size=%d", self.num_experts, self.input_size, self.output_size)
end

-- An expert group as the checkpoint holds it: stacked, or one linear layer each (input_linear.E,
-- as ml.save_model writes quantized experts).
local function expert_group(cfg, input_size, output_size)
   if cfg.experts_layout ~= "apart" then return JetMoeParallelExperts(cfg.num_experts, input_size, output_size) end
   local list = {}
   for e = 1, cfg.num_experts do list[e] = nn.Linear(input_size, output_size, { bias = false }) end
   return nn.ModuleList(list)
end

-- x (n, in) through expert e (0-based) of a group, stacked or one layer each.
local function project(group, e, x)
   if group.stacked then return group(x, e) end
   return group[e + 1](x)
end

-- The router: its logits (layer); route() picks from them.
local JetMoeTopKGating = nn.Module:extend("JetMoeTopKGating")
M.JetMoeTopKGating = JetMoeTopKGating

function JetMoeTopKGating:__init(input_size, num_experts)
   nn.Module.__init(self)
   self.layer = nn.Linear(input_size, num_experts, { bias = false })
end

function JetMoeTopKGating:forward(x) return self.layer(x) end

--- Each row's top k experts by logit, weighted by a softmax over those k logits (float32):
-- top_w (N, k), top_i a list per row of k 0-based experts.
function M.route(logits, k)
   local top, idx = logits:float():topk(k, 2)
   return top:softmax(-1), idx:tolist()
end

local function bias_parameter(size)
   local b = nn.Module.new_parameter({ size })
   if not b:is_meta() then b:fill_(0) end
   return b
end

-- --- the mixture of experts (MLP) -------------------------------------------------------------------

local JetMoeMoE = moe.SparseMoeBlock:extend("JetMoeMoE")
M.JetMoeMoE = JetMoeMoE
JetMoeMoE.gate_name = "router"

-- (transformers' order: bias, input_linear, output_linear, router)
function JetMoeMoE:__init(cfg)
   nn.Module.__init(self)
   local H, I = cfg.hidden_size, cfg.intermediate_size
   self.bias = bias_parameter(H)
   self.input_linear = expert_group(cfg, H, 2 * I)
   self.output_linear = expert_group(cfg, I, H)
   self.router = JetMoeTopKGating(H, cfg.num_experts)
   self.act_fn = common.activation_module(cfg.hidden_act, WHO, cfg._source)
   self:routing(cfg)
   rawset(self, "num_experts", cfg.num_experts)
   rawset(self, "intermediate_size", I)
   rawset(self, "expert_width", 2 * I)   -- (planning: an expert's widest activation, utils/runtime_memory.lua)
end

function JetMoeMoE:route(flat)
   return M.route(self.router(flat), self.top_k)
end

--- Expert e (0-based) on x (n, hidden): output_linear(act(gate x) * up x).
function JetMoeMoE:expert(e, x)
   local I = self.intermediate_size
   local h = project(self.input_linear, e, x)
   return project(self.output_linear, e, self.act_fn(h:narrow(2, 1, I)) * h:narrow(2, I + 1, I))
end

function JetMoeMoE:routed(flat, top_w, top_i)
   return moe.run_expert_method(self, flat, top_w, top_i)
end

function JetMoeMoE:forward(x)
   return moe.SparseMoeBlock.forward(self, x) + self.bias
end

-- --- the mixture of attention heads ---------------------------------------------------------------

local JetMoeMoA = nn.Module:extend("JetMoeMoA")
M.JetMoeMoA = JetMoeMoA

-- (transformers' order: bias, input_linear, output_linear, router)
function JetMoeMoA:__init(cfg)
   nn.Module.__init(self)
   local H, W = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
   self.bias = bias_parameter(H)
   self.input_linear = expert_group(cfg, H, W)
   self.output_linear = expert_group(cfg, W, H)
   self.router = JetMoeTopKGating(H, cfg.num_experts)
   rawset(self, "top_k", cfg.num_experts_per_tok)
   rawset(self, "num_experts", cfg.num_experts)
end

--- flat (N, hidden) -> each row's queries from its k experts (N * k, heads x kv_channels) in (row,
-- slot) order, the router's weights top_w (N, k) and its experts top_i.
function JetMoeMoA:map(flat)
   local top_w, top_i = M.route(self.router(flat), self.top_k)
   local q = moe.by_expert(top_i, self.top_k, self.num_experts, flat.device, function(e, rows)
      return project(self.input_linear, e, flat:index_select(1, rows))
   end)
   return q, top_w, top_i
end

--- The reduce step, called as a module (for its hooks: the bias): y (N * k, heads x kv_channels)
-- in (row, slot) order, each slot through its expert's output projection, weighted by the router
-- (top_w (N, k), top_i), summed per row, plus the bias: (N, hidden).
function JetMoeMoA:forward(y, top_w, top_i)
   local k, N = self.top_k, #top_i
   local w = top_w:to(y.dtype):reshape(N * k)
   if w.device ~= y.device then w = w:to(y.device) end
   local out = moe.by_expert(top_i, k, self.num_experts, y.device, function(e, _, slots)
      return project(self.output_linear, e, y:index_select(1, slots)) * w:index_select(1, slots):unsqueeze(2)
   end)
   return out:view(N, k, out:size(2)):sum(2) + self.bias
end

-- --- layers and models ------------------------------------------------------------------------------

local LM = moe.decoder_family("jetmoe", "JetMoe", llama.LlamaAttention, JetMoeMoE, "mlp", M.config, M)
moe.builds_experts_as_stored(LM)

-- A stored layout with one linear layer per expert (input_linear.E: quantized experts as
-- ml.save_model writes them) builds its groups so.
function LM.build_opts_for(names)
   for _, name in ipairs(names) do
      if name:find("%.input_linear%.0%.weight$") then return { experts_layout = "apart" } end
   end
   return nil
end

local JetMoeAttention, JetMoeDecoderLayer = M.JetMoeAttention, M.JetMoeDecoderLayer

function JetMoeAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.experts = JetMoeMoA(cfg)
   self.kv_proj = nn.Linear(cfg.hidden_size, 2 * cfg.num_key_value_heads * cfg.head_dim, { bias = false })
   llama.attention_geometry(self, cfg, layer_idx)
   rawset(self, "hidden_size", cfg.hidden_size)
end

--- For memory planning (utils/runtime_memory.lua), per batch row: q, k, v and the output as a
-- Llama's are counted, and each slot's queries and outputs as the experts group and ungroup them.
function JetMoeAttention:activation_values(L, S)
   local W, k = self.n_kv_head * self.head_dim, self.n_head / self.n_kv_head
   return 2 * (self.n_head * self.head_dim + 2 * W) * L + L * k * (4 * W + 2 * self.hidden_size)
end

--- x (B, T, hidden); cos, sin (T, D) or (B, 1, T, D); cache optional; pad (B, past + T) or nil.
function JetMoeAttention:forward(x, cos, sin, cache, pad)
   local B, L = x:size(1), x:size(2)
   local Hkv, D = self.n_kv_head, self.head_dim
   local k = self.n_head / Hkv
   local q, top_w, top_i = self.experts:map(x:reshape(B * L, x:size(3)))
   -- the query heads ordered (key head, slot): grouped attention then pairs head h of every slot
   -- with key head h, as transformers' repeat of the keys over the slots does
   q = q:view(B, L, k, Hkv, D):transpose(3, 4):reshape(B, L, Hkv * k, D):transpose(2, 3)   -- (B, H, T, D)
   local kv = self.kv_proj(x)
   local key = kv:narrow(3, 1, Hkv * D):reshape(B, L, Hkv, D):transpose(2, 3)             -- (B, Hkv, T, D)
   local v = kv:narrow(3, Hkv * D + 1, Hkv * D):reshape(B, L, Hkv, D):transpose(2, 3)
   q, key = llama.apply_rotary(q, cos, sin), llama.apply_rotary(key, cos, sin)
   local past = 0
   if cache then
      past = cache.length
      key, v = cache:update(self.layer_idx, key, v)
   end
   local y = self:attend_heads(q, key, v, past, pad)                                       -- (B, T, H * D)
   y = y:reshape(B * L, Hkv, k, D):transpose(2, 3):reshape(B * L * k, Hkv * D)             -- (row, slot) order
   return self.experts(y, top_w, top_i):view(B, L, x:size(3))
end

-- (transformers' order: mlp, input_layernorm, post_attention_layernorm, self_attention, as its
-- layer replaces Llama's parts)
function JetMoeDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.mlp = self.MLP(cfg, layer_idx)
   self.input_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = LAYER_NORM_EPS })
   self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = LAYER_NORM_EPS })
   self.self_attention = self.Attention(cfg, layer_idx)
end

function JetMoeDecoderLayer:forward(x, cos, sin, cache, pad)
   x = x + self.self_attention(self.input_layernorm(x), cos, sin, cache, pad)
   return x + self.mlp(self.post_attention_layernorm(x))
end

return M
