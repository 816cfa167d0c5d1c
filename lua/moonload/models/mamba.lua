--- Mamba-1, with Hugging Face parameter names: the mixer (transformers' MambaMixer, and its variants
-- FalconMambaMixer and JambaMambaMixer) and the language models made of it alone,
-- MambaForCausalLM (model_type "mamba": state-spaces/mamba-130m-hf to 2.8b-hf) and
-- FalconMambaForCausalLM ("falcon_mamba": Falcon-Mamba-7B).
--
-- The mixer: in_proj gives, per token, x and a gate z (the mixer's width I each). x goes through a
-- depthwise causal convolution (conv1d) and SiLU; x_proj gives from it a low-rank step (time_step_rank
-- values), B and C (state_size each); dt_proj brings the step to one per channel, dt = softplus(it).
-- Each channel keeps a float32 state of state_size entries with a decay rate each (A = -exp(A_log),
-- (I, state_size)): per token S = exp(dt A) S + dt x B, y = S C + D x (F.ssm_scan's Mamba-1 form,
-- a C kernel), then y * silu(z) goes through out_proj. Falcon-Mamba RMS-normalizes the step, B and C
-- without weights (mixer_rms_eps); Jamba with weights (dt_layernorm, b_layernorm, c_layernorm).
--
-- The models: backbone.{embeddings, layers.N.{norm, mixer}, norm_f}, lm_head (tied by default), the
-- residual stream in float32 with residual_in_fp32 (models/mamba2.lua's blocks, with this mixer).
-- A generation's cache holds each mixer's last conv inputs and state, whatever the length; it
-- cannot be cropped back, so assisted generation is refused.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local causal_conv = require("moonload.models.causal_conv")
local mamba2 = require("moonload.models.mamba2")

local M = {}

-- --- the mixer --------------------------------------------------------------------------------------

-- The norms Falcon-Mamba puts on the step, B and C: nn.RMSNorm without a weight (in float32, back
-- to x's dtype).
local WeightlessRMSNorm = nn.RMSNorm:extend("FalconMambaWeightlessRMSNorm")
M.WeightlessRMSNorm = WeightlessRMSNorm

function WeightlessRMSNorm:__init(dim, eps)
   nn.RMSNorm.__init(self, dim, { eps = eps, elementwise_affine = false })
end

local MambaMixer = nn.Module:extend("MambaMixer")
M.MambaMixer = MambaMixer

--- MambaMixer(cfg, layer_idx): cfg.mamba1 = {width, state_size, dt_rank, taps, conv_bias, proj_bias,
-- inner_norms = nil | "weightless" | "weighted", inner_eps}, cfg.hidden_size.
function MambaMixer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local m = cfg.mamba1
   local I, N, R = m.width, m.state_size, m.dt_rank
   self.conv1d = causal_conv.Conv1d(I, m.taps, { bias = m.conv_bias })
   self.in_proj = nn.Linear(cfg.hidden_size, 2 * I, { bias = m.proj_bias })
   self.x_proj = nn.Linear(I, R + 2 * N, { bias = false })
   self.dt_proj = nn.Linear(R, I, { bias = true })
   self.A_log = nn.Module.new_parameter({ I, N })
   self.D = nn.Module.new_parameter({ I })
   if not self.D:is_meta() then           -- transformers' initial values (A = -(1 .. N) per channel)
      self.A_log:copy_(T.arange(1, N + 1):float():log():view(1, N):expand(I, N))
      self.D:fill_(1)
   end
   self.out_proj = nn.Linear(I, cfg.hidden_size, { bias = m.proj_bias })
   if m.inner_norms == "weighted" then            -- (Jamba's names and order)
      self.dt_layernorm = nn.RMSNorm(R, { eps = m.inner_eps })
      self.b_layernorm = nn.RMSNorm(N, { eps = m.inner_eps })
      self.c_layernorm = nn.RMSNorm(N, { eps = m.inner_eps })
   elseif m.inner_norms == "weightless" then
      self.dt_layernorm = WeightlessRMSNorm(R, m.inner_eps)
      self.b_layernorm = WeightlessRMSNorm(N, m.inner_eps)
      self.c_layernorm = WeightlessRMSNorm(N, m.inner_eps)
   end
   rawset(self, "geometry", { I = I, N = N, R = R, taps = m.taps })
   rawset(self, "layer_idx", layer_idx)
end

--- Bytes a cache keeps for this layer per batch of B sequences (utils/runtime_memory.lua): the
-- last taps - 1 conv inputs (el bytes each) and the float32 state, whatever the length.
function MambaMixer:state_bytes(B, el)
   local g = self.geometry
   return B * ((g.taps - 1) * g.I * el + g.I * g.N * 4)
end

--- Values a forward forms per token at once, beside the layer's input and MLP (for memory
-- planning): the projection, the conv's window, products and output, x_proj's, the steps, the
-- scan's float32 output and the gate's.
function MambaMixer:token_values()
   local g = self.geometry
   return 2 * 2 * g.I + 4 * g.I + 2 * (g.R + 2 * g.N) + 4 * g.I + 8 * g.I
end

local f32_on = mamba2.f32_on

--- x (B, L, hidden); cache optional (the conv inputs and the state carry over); pad (B, past +
-- L) bool or nil: padding tokens enter as zeros, so they leave the state as it was.
function MambaMixer:forward(x, cache, pad)
   local g = self.geometry
   local B, L = x:size(1), x:size(2)
   local keep = mamba2.keep_mask(x, pad)
   if keep then x = x * keep end
   local proj = self.in_proj(x)                                   -- (B, L, 2I): x, then the gate
   local xs, z = proj:narrow(3, 1, g.I), proj:narrow(3, g.I + 1, g.I)
   local state = mamba2.layer_state(self, cache, B, x, { 1, g.I, g.N })
   local conv = causal_conv.run(self.conv1d, xs, state and state.conv):silu()      -- (B, L, I)
   if keep then conv = conv * keep end
   local sel = self.x_proj(conv)                                  -- (B, L, R + 2N)
   local step, Bm, Cm = sel:narrow(3, 1, g.R), sel:narrow(3, g.R + 1, g.N), sel:narrow(3, g.R + g.N + 1, g.N)
   if self.dt_layernorm then
      step, Bm, Cm = self.dt_layernorm(step), self.b_layernorm(Bm), self.c_layernorm(Cm)
   end
   local dt = self.dt_proj(step):float():softplus()               -- (B, L, I)
   local y = mamba2.scan(state, conv:view(B, L, 1, g.I), dt:view(B, L, 1, g.I), self.A_log:view(1, g.I, g.N),
      Bm:contiguous():view(B, L, 1, g.N), Cm:contiguous():view(B, L, 1, g.N),
      f32_on(self.D, x.device):view(1, g.I))                      -- (B, L, 1, I) float32
   y = y:view(B, L, g.I) * z:float():silu()
   return self.out_proj(y.dtype == x.dtype and y or y:to(x.dtype))
end

-- --- the language models ----------------------------------------------------------------------------

-- MambaConfig's keys (FalconMambaConfig's too, beside mixer_rms_eps).
local SCHEMA = {
   { "vocab_size", "int", 50280 },
   { "hidden_size", "int", 768 },
   { "state_size", "int", 16 },
   { "num_hidden_layers", "int", 32 },
   { "layer_norm_epsilon", "posnum", 1e-5 },
   { "expand", "int", 2 },
   { "conv_kernel", "int", 4 },
   { "use_bias", "bool", false },
   { "use_conv_bias", "bool", true },
   { "hidden_act", "string", "silu" },
   { "residual_in_fp32", "bool", true },
   { "tie_word_embeddings", "bool", true },
   { "mixer_rms_eps", "posnum", 1e-6 },
}

--- Reads and checks a Mamba config (path, folder or table), or with family "falcon_mamba" a
-- Falcon-Mamba one: its keys (SCHEMA), time_step_rank ("auto": ceil(hidden_size / 16)), and the
-- mixer's geometry in cfg.mamba1.
function M.config(source, family)
   family = family or "mamba"
   local WHO = "models." .. family
   local raw, src = config.read(source, WHO)
   local cfg = config.validate(raw, SCHEMA, src, WHO, 2)
   if cfg.hidden_act ~= "silu" then
      config.fail(cfg, WHO, 'config key "hidden_act" is "%s" (supported: silu, the mixer\'s activation)', cfg.hidden_act)
   end
   local rank = cfg.time_step_rank
   if rank == nil or rank == "auto" then rank = math.ceil(cfg.hidden_size / 16) end
   rank = config.integer(cfg, WHO, "time_step_rank", rank, 1)
   cfg.mamba1 = { width = cfg.expand * cfg.hidden_size, state_size = cfg.state_size, dt_rank = rank,
      taps = cfg.conv_kernel, conv_bias = cfg.use_conv_bias, proj_bias = cfg.use_bias,
      inner_norms = family == "falcon_mamba" and "weightless" or nil, inner_eps = cfg.mixer_rms_eps }
   cfg.rms_norm_eps = cfg.layer_norm_epsilon
   cfg.family = family
   return cfg
end

local function family_classes(family, prefix)
   local Mixer = prefix == "Mamba" and MambaMixer or MambaMixer:extend(prefix .. "Mixer")
   local Block = mamba2.Mamba2Block:extend(prefix .. "Block")
   Block.Mixer = Mixer
   local Model = mamba2.Mamba2Model:extend(prefix .. "Model")
   Model.family, Model.Layer = family, Block
   local LM = mamba2.Mamba2ForCausalLM:extend(prefix .. "ForCausalLM")
   LM.family, LM.Model = family, Model
   LM.tied_weights = { ["lm_head.weight"] = "backbone.embeddings.weight" }
   LM.no_split_modules = { prefix .. "Block" }
   LM.forward = require("moonload.models.common").causal_lm_forward("models." .. family .. ".forward", "backbone",
      "embeddings")
   function LM:read_config(source) return M.config(source, self.family) end
   M[Mixer.__name], M[Block.__name], M[Model.__name], M[LM.__name] = Mixer, Block, Model, LM
end

family_classes("mamba", "Mamba")
family_classes("falcon_mamba", "FalconMamba")

return M
