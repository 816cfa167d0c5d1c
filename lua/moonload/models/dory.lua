--- Dory (DoryForCausalLM, model_type "dory": nvidia/NVIDIA-Nemotron-Labs-Dory1.0-4B-BF16) with
-- transformers' parameter names, as transformers builds it: a looped normalized transformer (nGPT).
--
-- Every hidden state lives on the unit sphere: the norms are weightless L2 norms (x over its length,
-- not its RMS). A layer (Gemma 2's four norms) interpolates towards each normed block output instead
-- of adding it: h = L2(x); h = h + |lambda_1 * a| * (L2(attn(h)) - h); h = L2(h);
-- h = h + |lambda_2 * a| * (L2(mlp(h)) - h), a = ngpt_alpha_init / initializer_range.
--
-- Attention: AFMoE's projections and output gate (self_attn.gate_proj); queries and keys L2-normed
-- per head before the rotary embedding, the queries then scaled per channel by (sqk * sqk_scale)^2
-- (sqk_scale = sqrt(head_dim) / initializer_range); the gate is sigmoid(gate_proj(x) * (s_gate *
-- hidden_size^0.25 / initializer_range)^2), and the gated heads are L2-normed (attn_sub_norm)
-- before o_proj. layer_types' sliding layers attend over sliding_window tokens; sliding and full
-- layers rotate with their own bases (rope_parameters per layer type).
-- MLP: SwiGLU with gate and up scaled by suv_gate, suv_up x sqrt(hidden_size), its product L2-normed
-- (ffn_sub_norm) before down_proj. The logits are scaled per token: logit_scale / initializer_range.
--
-- The layers run in three sections: n_input_layers once, n_recurrent_layers n_recurrent_loops
-- times (each loop from L2(h) + the input section's L2-normed output), n_output_layers once, then
-- the final L2 norm. With recurrent_kv_cache_mode "per_loop" (the only one supported) every loop
-- keeps its own keys and values: loop j > 1 of a recurrent layer caches them in a companion slot of
-- the layer's (KVCache:companion), so cropping, reordering, int8 and a cache device apply to them.
-- The hub's config.json lists an "mlp" block after each attention and counts both (num_hidden_layers
-- and the section sizes doubled): read as transformers reads it.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local block_schedule = require("moonload.models.block_schedule")

local M = {}
local WHO = "models.dory"

-- DoryConfig's defaults where Llama's reader (with models/llama.lua's FAMILIES entry) has none or others.
local DEFAULTS = { vocab_size = 131072, hidden_size = 2560, intermediate_size = 7168, num_hidden_layers = 36,
   num_attention_heads = 16, sliding_window = 1024, n_input_layers = 8, n_output_layers = 8, n_recurrent_loops = 2,
   initializer_range = 0.0177, ngpt_alpha_init = 0.05, recurrent_kv_cache_mode = "per_loop" }

-- The hub's layout (an "mlp" entry after each layer type, every count doubled) as transformers'
-- DoryConfig reads it: the layer types alone, the counts halved.
local function from_hub_layout(c)
   local types = c.layer_types
   if type(types) ~= "table" then return end
   local blocks = false
   for _, t in ipairs(types) do blocks = blocks or t == "mlp" end
   if not blocks then return end
   local halved = {}
   for i = 1, #types, 2 do halved[#halved + 1] = types[i] end
   c.layer_types = halved
   for _, key in ipairs({ "num_hidden_layers", "n_input_layers", "n_output_layers", "n_recurrent_layers" }) do
      if type(c[key]) == "number" then c[key] = math.floor(c[key] / 2) end
   end
end

--- Reads and checks a Dory config (path, folder or table) with DoryConfig's defaults: Llama's
-- keys and the layer plan (cfg.layer_windows; layer_types by default every fourth layer full), the
-- sliding layers' rotary configuration (cfg.rope_local), the sections (n_input_layers,
-- n_recurrent_layers, n_output_layers, n_recurrent_loops) and nGPT's scales (initializer_range,
-- ngpt_alpha_init).
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   from_hub_layout(fixed)
   local n = config.integer(fixed, WHO, "num_hidden_layers", fixed.num_hidden_layers, 1)
   if fixed.layer_types == nil then      -- (transformers' default: every fourth layer full)
      fixed.layer_types = {}
      for i = 1, n do fixed.layer_types[i] = i % 4 == 0 and "full_attention" or "sliding_attention" end
   end
   if fixed.rope_parameters == nil and fixed.rope_scaling == nil then
      fixed.rope_parameters = { sliding_attention = { rope_type = "default", rope_theta = 10000 },
         full_attention = { rope_type = "default", rope_theta = 10000000 } }
   end
   local cfg = llama.config(fixed, "dory")
   cfg._source, cfg._raw = src, raw
   local rp = cfg.rope_parameters
   cfg.rope_local = llama.rope_from(cfg, WHO, { { rp, "rope_parameters." },
      { type(rp.sliding_attention) == "table" and rp.sliding_attention or {}, "rope_parameters.sliding_attention." } }, 10000)
   local n_in = config.integer(cfg, WHO, "n_input_layers", cfg.n_input_layers, 0)
   local n_out = config.integer(cfg, WHO, "n_output_layers", cfg.n_output_layers, 0)
   local n_rec = cfg.n_recurrent_layers
   if n_rec == nil then n_rec = n - n_in - n_out end
   cfg.n_recurrent_layers = config.integer(cfg, WHO, "n_recurrent_layers", n_rec, 0)
   if n_in + cfg.n_recurrent_layers + n_out ~= n then
      config.fail(cfg, WHO, "n_input_layers %d + n_recurrent_layers %d + n_output_layers %d must equal num_hidden_layers %d",
         n_in, cfg.n_recurrent_layers, n_out, n)
   end
   cfg.n_recurrent_loops = config.integer(cfg, WHO, "n_recurrent_loops", cfg.n_recurrent_loops, 1)
   if cfg.recurrent_kv_cache_mode ~= "per_loop" then
      config.fail(cfg, WHO, 'config key "recurrent_kv_cache_mode" is %s (supported: "per_loop"; "last_loop", one cache '
         .. "the earlier loops read without writing, is not)", tostring(cfg.recurrent_kv_cache_mode))
   end
   for _, key in ipairs({ "initializer_range", "ngpt_alpha_init" }) do
      if type(cfg[key]) ~= "number" or cfg[key] <= 0 then
         config.fail(cfg, WHO, 'config key "%s" must be a positive number, got %s', key, tostring(cfg[key]))
      end
   end
   return cfg
end

-- --- the L2 norm --------------------------------------------------------------------------------

--- Onto the unit sphere: x * rsqrt(sum(x^2) + eps) over the last dim, in float32 (transformers'
-- DoryL2Norm), no weight.
local DoryL2Norm = nn.Module:extend("DoryL2Norm")
M.DoryL2Norm = DoryL2Norm

function DoryL2Norm:__init()
   nn.Module.__init(self)
   rawset(self, "eps", 1e-6)
end

function DoryL2Norm:forward(x)
   local xf = x:float()
   local y = xf * ((xf * xf):sum(-1, true) + self.eps):rsqrt()
   return y.dtype == x.dtype and y or y:to(x.dtype)
end

function DoryL2Norm:extra_repr() return "eps=" .. self.eps end

-- A learned per-channel vector of n, at one.
local function scale_vector(n)
   local p = nn.Module.new_parameter({ n })
   if not p:is_meta() then p:fill_(1) end
   return p
end

-- (s * factor)^2 as x's dtype and device (sqk's, s_gate's effective scale).
local function squared_scale(s, factor, x)
   local v = (s * factor):pow(2)
   if v.dtype ~= x.dtype then v = v:to(x.dtype) end
   if v.device ~= x.device then v = v:to(x.device) end
   return v
end

-- --- the classes --------------------------------------------------------------------------------

local LM = llama.LlamaForCausalLM:extend("DoryForCausalLM")
local Model = llama.LlamaModel:extend("DoryModel")
local Layer = llama.LlamaDecoderLayer:extend("DoryDecoderLayer")
local Attention = llama.LlamaAttention:extend("DoryAttention")
local MLP = llama.LlamaMLP:extend("DoryMLP")
local Rotary = llama.LlamaRotaryEmbedding:extend("DoryRotaryEmbedding")
M.DoryForCausalLM, M.DoryModel, M.DoryDecoderLayer, M.DoryAttention, M.DoryMLP, M.DoryRotaryEmbedding =
   LM, Model, Layer, Attention, MLP, Rotary

Attention.gated_norm_name = "attn_sub_norm"          -- (LlamaAttention:forward: after the gate, before o_proj)

function Attention:__init(cfg, layer_idx)
   llama.LlamaAttention.__init(self, cfg, layer_idx)
   local width = cfg.num_attention_heads * cfg.head_dim
   self.q_norm, self.k_norm = DoryL2Norm(), DoryL2Norm()
   self.gate_proj = nn.Linear(cfg.hidden_size, width, { bias = false })
   self.attn_sub_norm = DoryL2Norm()
   self.sqk = scale_vector(width)
   self.s_gate = scale_vector(width)
   rawset(self, "sqk_scale", math.sqrt(cfg.head_dim) / cfg.initializer_range)
   rawset(self, "s_gate_scale", cfg.hidden_size ^ 0.25 / cfg.initializer_range)
   rawset(self, "layer_slot", layer_idx)             -- (the cache slot of the layer's first loop)
   rawset(self, "kv_copies", 1)                      -- (a recurrent layer's: one cache a loop; the model sets it)
end

--- For memory planning: a recurrent layer keeps one cache a loop (n_recurrent_loops times the heads).
function Attention:kv_cache_heads()
   return self.n_kv_head * self.kv_copies, self.head_dim, self.n_head, false
end

--- q, k, v and the gate's input: gate_proj(x) times its learned scale, squared.
function Attention:project(x, B, L)
   local q, k, v = llama.LlamaAttention.project(self, x, B, L)
   local gate = self.gate_proj(x)
   return q, k, v, gate * squared_scale(self.s_gate, self.s_gate_scale, gate)
end

--- The rotated queries (B, H, T, D) times (sqk * sqk_scale)^2 per channel, then attention.
function Attention:attend_heads(q, k, v, past, pad)
   local s = squared_scale(self.sqk, self.sqk_scale, q):view(self.n_head, 1, self.head_dim)
   return llama.LlamaAttention.attend_heads(self, q * s, k, v, past, pad)
end

function MLP:__init(cfg)
   llama.LlamaMLP.__init(self, cfg)
   self.suv_gate = scale_vector(cfg.intermediate_size)
   self.suv_up = scale_vector(cfg.intermediate_size)
   self.ffn_sub_norm = DoryL2Norm()
   rawset(self, "suv_scale", math.sqrt(cfg.hidden_size))
end

function MLP:forward(x)
   local gate, up = self.gate_proj(x), self.up_proj(x)
   gate = gate * (self.suv_gate * self.suv_scale):to(gate.dtype)
   up = up * (self.suv_up * self.suv_scale):to(up.dtype)
   return self.down_proj(self.ffn_sub_norm(self.act_fn(gate) * up))
end

local NORMS = { "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm" }

-- (transformers' order: self_attn, mlp, the four norms, lambda_1, lambda_2)
function Layer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = Attention(cfg, layer_idx)
   self.mlp = MLP(cfg)
   for _, name in ipairs(NORMS) do self[name] = DoryL2Norm() end
   self.lambda_1 = scale_vector(cfg.hidden_size)
   self.lambda_2 = scale_vector(cfg.hidden_size)
   rawset(self, "lambda_scale", cfg.ngpt_alpha_init / cfg.initializer_range)
end

-- h moved towards the normed update at the rate |lambda * lambda_scale| per channel.
local function towards(h, update, lambda, scale)
   local rate = (lambda * scale):abs()
   if rate.dtype ~= h.dtype then rate = rate:to(h.dtype) end
   return h + rate * (update - h)
end

function Layer:forward(x, cos, sin, cache, pad)
   local h = self.input_layernorm(x)
   h = towards(h, self.post_attention_layernorm(self.self_attn(h, cos, sin, cache, pad)), self.lambda_1, self.lambda_scale)
   h = self.pre_feedforward_layernorm(h)
   return towards(h, self.post_feedforward_layernorm(self.mlp(h)), self.lambda_2, self.lambda_scale)
end

function Rotary:__init(cfg)
   llama.LlamaRotaryEmbedding.__init(self, cfg)
   llama.add_local_rotary(self, cfg)
end

Model.family, Model.Layer, Model.Rotary, Model.Norm = "dory", Layer, Rotary, DoryL2Norm
Model.layer_rotary = llama.layer_rotary_by_window

function Model:__init(cfg)
   llama.LlamaModel.__init(self, cfg)
   local first = cfg.n_input_layers
   for i = first + 1, first + cfg.n_recurrent_layers do rawset(self.layers[i].self_attn, "kv_copies", cfg.n_recurrent_loops) end
end

-- Layer i (1-based) for loop `loop` (1 for a layer run once) on x: its attention writes the layer's
-- cache slot in the first loop, a companion slot of it in the others.
local function run_layer(self, schedule, i, loop, x, cache, pad, rope)
   local layer = self.layers[i]
   local c = cache or (schedule and schedule.cache)
   local slot = i
   if loop > 1 and c then slot = c:companion(i, "loop" .. loop) end
   local attn = layer.self_attn
   rawset(attn, "layer_idx", slot)
   local r = rope[i]
   local ok, y = pcall(block_schedule.call, schedule, slot, layer, x, cache, pad, r[1], r[2])
   rawset(attn, "layer_idx", rawget(attn, "layer_slot"))
   if not ok then error(y, 0) end
   return y
end

--- As LlamaModel:forward (input_ids (B, T), cache, pad, pos, blocks -> the final hidden states),
-- through the three sections: the recurrent layers n_recurrent_loops times, each loop from the
-- normed state plus the input section's normed output.
function Model:forward(input_ids, cache, pad, pos, blocks)
   local cfg = self.config
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   local x = self.embed_tokens(input_ids)
   local rope = self:layer_rotary(pos or T.arange(past, past + L, { device = input_ids.device }), x)
   local schedule = blocks and block_schedule.plan(blocks, x, cache, cfg.num_hidden_layers, WHO)
   local first, last = cfg.n_input_layers, cfg.n_input_layers + cfg.n_recurrent_layers
   for i = 1, first do x = run_layer(self, schedule, i, 1, x, cache, pad, rope) end
   local input_state = self.norm(x)
   for loop = 1, cfg.n_recurrent_loops do
      x = self.norm(x) + input_state
      for i = first + 1, last do x = run_layer(self, schedule, i, loop, x, cache, pad, rope) end
   end
   for i = last + 1, cfg.num_hidden_layers do x = run_layer(self, schedule, i, 1, x, cache, pad, rope) end
   if cache then cache:advance(L) end
   return self.norm(x)
end

-- The head: lm_head with a learned per-token scale of the float32 logits.
local DoryLMHead = nn.Linear:extend("DoryLMHead")
M.DoryLMHead = DoryLMHead

function DoryLMHead:__init(cfg)
   nn.Linear.__init(self, cfg.hidden_size, cfg.vocab_size, { bias = false })
   self.logit_scale = scale_vector(cfg.vocab_size)
   rawset(self, "logit_scale_factor", 1 / cfg.initializer_range)
end

function DoryLMHead:forward(h)
   local logits = nn.Linear.forward(self, h):float()
   return logits * (self.logit_scale:float() * self.logit_scale_factor)
end

LM.family, LM.Model = "dory", Model
LM.no_split_modules = { "DoryDecoderLayer" }
LM.forward = require("moonload.models.common").causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")

function LM:__init(cfg)
   llama.LlamaForCausalLM.__init(self, cfg)
   self.lm_head = DoryLMHead(self.config)
   self:tie_weights()
end

function LM:read_config(source) return M.config(source) end

-- The hub's decoder layers as two blocks each, an attention layers.{2i}.mixer and an MLP
-- layers.{2i+1}.mixer, their rates attn_alpha and mlp_alpha (transformers' LayerPairCollapse).
local function collapsed(name)
   return function(index) return "layers." .. math.floor(tonumber(index) / 2) .. "." .. name end
end

local function mixer(index, rest)
   local i = tonumber(index)
   return "layers." .. math.floor(i / 2) .. "." .. (i % 2 == 0 and "self_attn" or "mlp") .. "." .. rest
end

-- the hub's names, as transformers' conversion mapping renames them
LM.checkpoint_renames = { { "^backbone%.", "model." }, { "%.embeddings%.", ".embed_tokens." },
   { "layers%.(%d+)%.mixer%.(.*)$", mixer }, { "layers%.(%d+)%.attn_alpha$", collapsed("lambda_1") },
   { "layers%.(%d+)%.mlp_alpha$", collapsed("lambda_2") }, { "%.self_attn%.g_proj%.", ".self_attn.gate_proj." } }

return M
