--- The Mamba-2 mixer (transformers' Mamba2Mixer, and its copies BambaMixer,
-- GraniteMoeHybridMambaLayer and NemotronHMamba2Mixer) with Hugging Face parameter names: the
-- sequence-mixing layer of Mamba-2 and of the hybrids that put it beside attention (Bamba,
-- Granite 4.0's "-h" models, Nemotron-H).
--
-- in_proj gives, per token, a gate z (the mixer's width I = heads x head_dim), the convolution's
-- input (x, then B and C: groups x state_size each) and a step dt per head. x, B and C go through a
-- depthwise causal convolution (conv1d, conv_kernel taps) and SiLU. Then each head h keeps a float32
-- state S (head_dim x state_size): per token S = exp(dt A_h) S + (dt x) B^T and y = S C + D_h x, with
-- dt = softplus(dt + dt_bias) clamped to time_step_limit and A = -exp(A_log) (F.ssm_scan, a C
-- kernel). y goes through an RMSNorm gated by silu(z), in groups of I / n_groups, then out_proj.
--
-- A generation's cache holds the last conv inputs and S instead of keys and values
-- (models/kv_cache.lua's layer_state): a fixed size per layer and sequence whatever the length.
-- Such a state cannot be cropped back, so a model with these layers is `stateful` (no assisted
-- generation, as transformers refuses it for these models).
--
-- Below the mixer: what it shares with Mamba-1's (models/mamba.lua: the padding mask, the cache
-- state, the scan over it), and the Mamba-2 language model (Mamba2ForCausalLM), whose blocks and
-- model Mamba-1's reuse.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local F = require("moonload.nn.functional")
local config = require("moonload.models.config")
local causal_conv = require("moonload.models.causal_conv")
local llama = require("moonload.models.llama")
local common = require("moonload.models.common")

local M = {}

-- A number a config holds, JSON having none for infinity: transformers writes {"__float__":
-- "Infinity"}, Python's json module a bare Infinity (which cjson reads as a number).
local SPECIAL_FLOATS = { Infinity = math.huge, ["-Infinity"] = -math.huge }
local function config_number(v)
   if type(v) == "table" and SPECIAL_FLOATS[v.__float__] then return SPECIAL_FLOATS[v.__float__] end
   return v
end

--- read_config(cfg, WHO, names) -> cfg with cfg.mamba = {heads, head_dim, groups, state_size,
-- taps, conv_bias, proj_bias, time_step_limit = {lo, hi}, eps}: the mixer's geometry from the
-- config keys names gives (each family names them its own way): names.heads, head_dim, groups,
-- state_size, conv_kernel, conv_bias, proj_bias, expand (optional: head_dim defaults to expand x
-- hidden_size / heads), time_step_limit (optional) or time_step_min (Nemotron-H: {min, inf}),
-- eps (defaults to rms_norm_eps); defaults gives each one's default.
function M.read_config(cfg, WHO, names, defaults)
   local function raw(key) local v = cfg[names[key]]; if v == nil then v = defaults[key] end; return v end
   local function int(key, min)
      local v = raw(key)
      return config.integer(cfg, WHO, names[key], v, min)
   end
   local m = {}
   m.heads = int("heads", 1)
   local head_dim = raw("head_dim")
   if head_dim == nil or head_dim == "auto" then
      local expand_key = names.expand or "expand"
      local expand = config.integer(cfg, WHO, expand_key, raw("expand"), 1)
      if (expand * cfg.hidden_size) % m.heads ~= 0 then
         config.fail(cfg, WHO, "the mixer's width %d (%s x hidden_size) is not a multiple of %s %d", expand * cfg.hidden_size,
            expand_key, names.heads, m.heads)
      end
      head_dim = expand * cfg.hidden_size / m.heads
   end
   m.head_dim = config.integer(cfg, WHO, names.head_dim, head_dim, 1)
   m.groups = int("groups", 1)
   if m.heads % m.groups ~= 0 then
      config.fail(cfg, WHO, "%s %d is not a multiple of %s %d", names.heads, m.heads, names.groups, m.groups)
   end
   m.state_size = int("state_size", 1)
   m.taps = int("conv_kernel", 1)
   for _, key in ipairs({ "conv_bias", "proj_bias" }) do
      local v = raw(key)
      if type(v) ~= "boolean" then
         config.fail(cfg, WHO, 'config key "%s" must be a boolean, got %s', names[key], tostring(v))
      end
      m[key] = v
   end
   local limit
   if names.time_step_min then
      local lo = raw("time_step_min")
      if type(lo) ~= "number" or lo < 0 then
         config.fail(cfg, WHO, 'config key "%s" must be a number >= 0, got %s', names.time_step_min, tostring(lo))
      end
      limit = { lo, math.huge }
   else
      limit = raw("time_step_limit") or { 0, math.huge }
      if type(limit) == "table" then limit = { config_number(limit[1]), config_number(limit[2]) } end
      if type(limit) ~= "table" or type(limit[1]) ~= "number" or type(limit[2] or math.huge) ~= "number"
         or limit[1] > (limit[2] or math.huge) then
         config.fail(cfg, WHO, 'config key "time_step_limit" must be [min, max] with min <= max, got %s',
            type(limit) == "table" and string.format("[%s, %s]", tostring(limit[1]), tostring(limit[2])) or tostring(limit))
      end
      limit = { limit[1], limit[2] or math.huge }   -- (JSON has no infinity: a null max is none)
   end
   m.time_step_limit = limit
   m.eps = names.eps and raw("eps") or cfg.rms_norm_eps
   if type(m.eps) ~= "number" or m.eps <= 0 then
      config.fail(cfg, WHO, 'config key "%s" must be a positive number, got %s', names.eps or "rms_norm_eps", tostring(m.eps))
   end
   cfg.mamba = m
   return cfg
end

-- --- the gated norm ---------------------------------------------------------------------------------

local Mamba2RMSNormGated = nn.Module:extend("MambaRMSNormGated")
M.Mamba2RMSNormGated = Mamba2RMSNormGated

--- Mamba2RMSNormGated(width, groups, eps): x * silu(gate), RMS-normalized in groups of width /
-- groups, times weight; in float32.
function Mamba2RMSNormGated:__init(width, groups, eps)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ width })
   if not self.weight:is_meta() then self.weight:fill_(1) end
   rawset(self, "width", width)
   rawset(self, "group_size", width / groups)
   rawset(self, "eps", eps)
end

--- x (..., width) float32, gate (..., width) -> (..., width) float32.
function Mamba2RMSNormGated:forward(x, gate)
   local shape = x.shape
   local g = self.group_size
   local y = x:float() * gate:float():silu()
   y = F.rms_norm(y:reshape(-1, g), { g }, nil, self.eps):view(shape)
   return y * self.weight:float()
end

-- --- the mixer --------------------------------------------------------------------------------------

local Mamba2Mixer = nn.Module:extend("Mamba2Mixer")
M.Mamba2Mixer = Mamba2Mixer

--- Mamba2Mixer(cfg, layer_idx): cfg.mamba as read_config leaves it, cfg.hidden_size.
function Mamba2Mixer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local m = cfg.mamba
   local width = m.heads * m.head_dim
   local conv_dim = width + 2 * m.groups * m.state_size
   self.conv1d = causal_conv.Conv1d(conv_dim, m.taps, { bias = m.conv_bias })
   self.in_proj = nn.Linear(cfg.hidden_size, width + conv_dim + m.heads, { bias = m.proj_bias })
   self.dt_bias = nn.Module.new_parameter({ m.heads })
   self.A_log = nn.Module.new_parameter({ m.heads })
   self.norm = Mamba2RMSNormGated(width, m.groups, m.eps)
   self.D = nn.Module.new_parameter({ m.heads })
   if not self.D:is_meta() then           -- transformers' initial values (A = -(1 .. heads))
      self.dt_bias:fill_(1)
      self.D:fill_(1)
      self.A_log:copy_(T.arange(1, m.heads + 1):float():log())
   end
   self.out_proj = nn.Linear(width, cfg.hidden_size, { bias = m.proj_bias })
   rawset(self, "geometry", { H = m.heads, P = m.head_dim, G = m.groups, N = m.state_size, width = width,
      conv_dim = conv_dim, taps = m.taps, limit = m.time_step_limit })
   rawset(self, "layer_idx", layer_idx)
end

--- Bytes a cache keeps for this layer per batch of B sequences (utils/runtime_memory.lua): the
-- last taps - 1 conv inputs (el bytes each) and the float32 state, whatever the length.
function Mamba2Mixer:state_bytes(B, el)
   local g = self.geometry
   return B * ((g.taps - 1) * g.conv_dim * el + g.H * g.P * g.N * 4)
end

--- Values a forward forms per token at once, beside the layer's input and MLP (for memory
-- planning): the projection, the conv's window, products and output, dt, the scan's float32
-- output and the gated norm's float32 copies.
function Mamba2Mixer:token_values()
   local g = self.geometry
   return 2 * (g.width + g.conv_dim + g.H) + 4 * g.conv_dim + 4 * g.H + 8 * g.width
end

-- --- what Mamba-1's and Mamba-2's mixers share (models/mamba.lua) ----------------------------------

--- The mask keeping x's L tokens (B, L, 1) of x's dtype, or nil (no padding, or one token): padding
-- tokens enter the mixer as zeros, so they leave its state as it was.
function M.keep_mask(x, pad)
   local L = x:size(2)
   if not (pad and L > 1) then return nil end
   return pad:narrow(2, pad:size(2) - L + 1, L):to(x.dtype):unsqueeze(3)
end

--- The mixer's cache state for B rows, {conv = the last taps - 1 conv inputs, recurrent = the
-- float32 scan state of recurrent_shape (without its rows)}, made on first use; nil without a cache.
function M.layer_state(mixer, cache, B, x, recurrent_shape)
   if not cache then return nil end
   return cache:layer_state(mixer.layer_idx, B, function(rows)
      return { conv = causal_conv.initial_state(mixer.conv1d, rows, x),
               recurrent = T.zeros({ rows, unpack(recurrent_shape) }, { dtype = "float32", device = x.device }) }
   end)
end

--- F.ssm_scan(xs, dt, -exp(A_log), Bm, Cm, D) from state's recurrent state and back into it (read
-- and written where it lives, as the conv's: a state made where the prompt ran may meet a step run
-- elsewhere), or from zeros without a state. The kernel takes the rates from A_log as it reads them.
function M.scan(state, xs, dt, A_log, Bm, Cm, D)
   local recurrent = state and state.recurrent
   if recurrent and recurrent.device ~= xs.device then recurrent = recurrent:to(xs.device) end
   if A_log.device ~= xs.device then A_log = A_log:to(xs.device) end
   local y = F.ssm_scan(xs, dt, A_log, Bm, Cm, D, recurrent, { A_log = true })
   if recurrent and recurrent ~= state.recurrent then state.recurrent:copy_(recurrent) end
   return y
end

--- A parameter as float32 on device.
function M.f32_on(p, device)
   local t = p:float()
   return t.device == device and t or t:to(device)
end
local f32_on = M.f32_on

--- The projection of x (B, L, hidden) into the gate z (B, L, width), the conv's input (B, L,
-- conv_dim: x, B, C) and the raw step (B, L, H). (Falcon-H1's mixer scales them.)
function Mamba2Mixer:project(x)
   local g = self.geometry
   local proj = self.in_proj(x)                                   -- (B, L, width + conv_dim + H)
   return proj:narrow(3, 1, g.width), proj:narrow(3, g.width + 1, g.conv_dim), proj:narrow(3, g.width + g.conv_dim + 1, g.H)
end

--- The scan's output y (B, L, width) float32 through the gated norm, as x's dtype for out_proj.
function Mamba2Mixer:gate_output(y, z, dtype)
   y = self.norm(y, z)
   return y.dtype == dtype and y or y:to(dtype)
end

--- x (B, L, hidden); cache optional (the conv inputs and the state carry over); pad (B, past +
-- L) bool or nil: padding tokens enter as zeros, so they leave the state as it was.
function Mamba2Mixer:forward(x, cache, pad)
   local g = self.geometry
   local B, L = x:size(1), x:size(2)
   local keep = M.keep_mask(x, pad)
   if keep then x = x * keep end
   local z, xbc, dt = self:project(x)
   local state = M.layer_state(self, cache, B, x, { g.H, g.P, g.N })
   local conv = causal_conv.run(self.conv1d, xbc, state and state.conv):silu()   -- (B, L, conv_dim)
   if keep then conv = conv * keep end
   local xs = conv:narrow(3, 1, g.width):view(B, L, g.H, g.P)
   local Bm = conv:narrow(3, g.width + 1, g.G * g.N):view(B, L, g.G, g.N)
   local Cm = conv:narrow(3, g.width + g.G * g.N + 1, g.G * g.N):view(B, L, g.G, g.N)
   local step = (dt:float() + f32_on(self.dt_bias, x.device)):softplus()
   if g.limit[1] > 0 or g.limit[2] < math.huge then
      step = step:clamp(g.limit[1], g.limit[2] < math.huge and g.limit[2] or nil)
   end
   local y = M.scan(state, xs, step, self.A_log, Bm, Cm, f32_on(self.D, x.device))   -- (B, L, H, P) float32
   return self.out_proj(self:gate_output(y:view(B, L, g.width), z, x.dtype))
end

-- --- Mamba-2 language model -------------------------------------------------------------------------
-- Mamba2ForCausalLM (model_type "mamba2": Mamba-Codestral-7B) with Hugging Face parameter names:
-- backbone.{embeddings, layers.N.{norm, mixer.*}, norm_f}, lm_head. Every layer is an RMSNorm and a
-- mixer with a residual around both; with residual_in_fp32 (transformers' default) the residual
-- stream stays float32 whatever the weights' dtype, each norm reading it in the weights' dtype. No
-- attention, no positions: the cache holds only the mixers' conv inputs and states.

local WHO = "models.mamba2"

-- Mamba2Config's keys (its defaults are Mamba-Codestral-7B's geometry).
local SCHEMA = {
   { "vocab_size", "int", 32768 },
   { "hidden_size", "int", 4096 },
   { "num_hidden_layers", "int", 64 },
   { "num_heads", "int", 128 },
   { "head_dim", "int", 64 },
   { "state_size", "int", 128 },
   { "expand", "int", 2 },
   { "conv_kernel", "int", 4 },
   { "n_groups", "int", 8 },
   { "use_bias", "bool", false },
   { "use_conv_bias", "bool", true },
   { "hidden_act", "string", "silu" },
   { "layer_norm_epsilon", "posnum", 1e-5 },
   { "residual_in_fp32", "bool", true },
   { "tie_word_embeddings", "bool", false },
}

-- Mamba2Config's names for the mixer's keys (read_config).
local MAMBA2_KEYS = { heads = "num_heads", head_dim = "head_dim", groups = "n_groups", state_size = "state_size",
   conv_kernel = "conv_kernel", conv_bias = "use_conv_bias", proj_bias = "use_bias", expand = "expand",
   time_step_limit = "time_step_limit", eps = "layer_norm_epsilon" }

--- Reads and checks a Mamba-2 config (path, folder or table): its keys (SCHEMA), the mixer's
-- geometry (cfg.mamba) and the norms' eps (cfg.rms_norm_eps, from layer_norm_epsilon).
function M.config(source)
   local raw, src = config.read(source, WHO)
   local cfg = config.validate(raw, SCHEMA, src, WHO, 2)
   if cfg.hidden_act ~= "silu" then
      config.fail(cfg, WHO, 'config key "hidden_act" is "%s" (supported: silu, the mixer\'s activation)', cfg.hidden_act)
   end
   M.read_config(cfg, WHO, MAMBA2_KEYS, {})
   local m = cfg.mamba
   if m.heads * m.head_dim ~= cfg.expand * cfg.hidden_size then
      config.fail(cfg, WHO, "num_heads %d x head_dim %d must equal expand %d x hidden_size %d", m.heads, m.head_dim,
         cfg.expand, cfg.hidden_size)
   end
   cfg.rms_norm_eps = cfg.layer_norm_epsilon
   cfg.family = "mamba2"
   return cfg
end

local Mamba2RMSNorm = nn.RMSNorm:extend("Mamba2RMSNorm")
M.Mamba2RMSNorm = Mamba2RMSNorm

--- An input of another dtype than the weight (norm_f after a float32 residual stream) is normalized
-- as it is, then brought to the weight's dtype (where transformers' head brings it).
function Mamba2RMSNorm:forward(x)
   local w = self.weight
   if x.dtype == w.dtype then return nn.RMSNorm.forward(self, x) end
   return F.rms_norm(x, self.normalized_shape, w:to(x.dtype), self.eps):to(w.dtype)
end

local Mamba2Block = nn.Module:extend("Mamba2Block")
M.Mamba2Block = Mamba2Block
Mamba2Block.Mixer = Mamba2Mixer             -- (Mamba-1's blocks: models/mamba.lua)

function Mamba2Block:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.norm = Mamba2RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.mixer = self.Mixer(cfg, layer_idx)
   rawset(self, "residual_in_fp32", cfg.residual_in_fp32)
end

--- x (B, T, hidden); cache optional; pad (B, past + T) or nil. With residual_in_fp32 the result is
-- float32.
function Mamba2Block:forward(x, cache, pad)
   local dtype = self.norm.weight.dtype            -- (the norm reads the residual in its own dtype)
   local h = self.mixer(self.norm(x.dtype == dtype and x or x:to(dtype)), cache, pad)
   if self.residual_in_fp32 and x.dtype ~= "float32" then x = x:float() end
   if h.dtype ~= x.dtype then h = h:to(x.dtype) end
   return x + h
end

local Mamba2Model = llama.LlamaModel:extend("Mamba2Model")
M.Mamba2Model = Mamba2Model
Mamba2Model.family, Mamba2Model.Layer = "mamba2", Mamba2Block
Mamba2Model.embed_name, Mamba2Model.norm_name = "embeddings", "norm_f"

-- transformers' order: the embeddings, the layers, the final norm
function Mamba2Model:__init(cfg)
   nn.Module.__init(self)
   self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = self.Layer(cfg, i) end
   self.layers = nn.ModuleList(layers)
   self.norm_f = Mamba2RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   rawset(self, "config", cfg)
end

local Mamba2ForCausalLM = llama.LlamaForCausalLM:extend("Mamba2ForCausalLM")
M.Mamba2ForCausalLM = Mamba2ForCausalLM
Mamba2ForCausalLM.family, Mamba2ForCausalLM.Model = "mamba2", Mamba2Model
Mamba2ForCausalLM.base_model_prefix = "backbone"
Mamba2ForCausalLM.tied_weights = { ["lm_head.weight"] = "backbone.embeddings.weight" }
Mamba2ForCausalLM.ignore_unexpected = {}
-- (older files' name for the embedding, which transformers' Mamba2Model renames on load)
Mamba2ForCausalLM.checkpoint_renames = { { "^backbone%.embedding%.", "backbone.embeddings." } }
Mamba2ForCausalLM.no_split_modules = { "Mamba2Block" }
Mamba2ForCausalLM.stateful = true          -- its cache cannot be cropped: no assisted generation
Mamba2ForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "backbone", "embeddings")

--- Mamba2ForCausalLM(config): config is a config.json path, a folder holding one, or a table.
function Mamba2ForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = self:read_config(cfg)
   self.backbone = self.Model(cfg)
   self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   self:tie_weights()
end

function Mamba2ForCausalLM:read_config(source) return M.config(source) end   -- (Mamba-1's: models/mamba.lua)

function Mamba2ForCausalLM:tie_weights()
   if self.config.tie_word_embeddings then self.lm_head.weight = self.backbone.embeddings.weight end
end

return M
