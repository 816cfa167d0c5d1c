--- OLMo Hybrid (OlmoHybridForCausalLM, model_type "olmo_hybrid": AllenAI's Olmo-Hybrid-7B) with
-- Hugging Face parameter names. A hybrid: of every four layers (layer_types says which) three have
-- linear attention and the fourth full attention, each with a SwiGLU MLP; plain RMSNorms (weight x).
--
-- Linear attention (Gated DeltaNet, linear_attn.*): Qwen3-Next's recurrence (models/qwen3_next.lua:
-- a (key dim x value dim) state per value head, decayed by exp(g), g = -exp(A_log) x softplus(a +
-- dt_bias), corrected by the delta rule, read by the L2-normalized query; value head h reads key
-- head h / (Hv / Hk)) with its inputs projected apart: q_proj, k_proj, v_proj, then a depthwise
-- causal conv through hidden_act; a_proj and b_proj per value head, the rates beta = 2 sigmoid(b)
-- when linear_allow_neg_eigval (the default: the state may flip sign), sigmoid(b) otherwise; the
-- output through an RMSNorm of eps 1e-5 (FLA's, whatever rms_norm_eps says) times silu(g_proj x),
-- then o_proj. Norms before the mixer and the MLP (input_layernorm, post_attention_layernorm).
--
-- Full attention: OLMo 3's without a window: RMSNorms over the whole q and k projections, norms
-- after attention and MLP (post_attention_layernorm, post_feedforward_layernorm); rotary
-- embeddings, or none when the config says rope_theta null (NoPE: the hub's model).
--
-- The hub's files name the linear layers' norms attention_layer_norm and feedforward_layer_norm
-- (as transformers' save_pretrained names every post_attention_layernorm), renamed as transformers'
-- conversion mapping renames them. They hold the conv in three, q_conv1d, k_conv1d and v_conv1d
-- (transformers concatenates them on loading; save_pretrained splits its conv1d in three equal
-- thirds instead): the model holds the convs as the checkpoint does, a depthwise conv being the
-- same split anywhere (a single linear_attn.conv1d loads too).
--
-- A generation's cache holds, for the linear layers, the last conv inputs and the float32 states
-- (models/kv_cache.lua's layer_state), whatever the length; they cannot be cropped back, so
-- assisted generation is refused (as transformers refuses it for stateful models).
local cjson = require("cjson")
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local json = require("moonload.utils.json")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local qwen3_next = require("moonload.models.qwen3_next")
local causal_conv = require("moonload.models.causal_conv")

local M = {}
local WHO = "models.olmo_hybrid"
local KINDS = { "linear_attention", "full_attention" }

-- Whether the config (the table given, or the file src) resolves rope_theta to null, as
-- transformers reads it (rope_parameters' own rope_theta first): no rotary embedding at all.
-- config.read drops nulls, so this looks at the source as written.
local function rope_theta_null(source, src)
   local raw = type(source) == "table" and source or json.read(src, WHO, true) or {}
   local rp = raw.rope_parameters
   if type(rp) == "table" and rp.rope_theta ~= nil then return rp.rope_theta == cjson.null end
   return raw.rope_theta == cjson.null
end

--- The conv layout of a checkpoint's linear layers from its tensor names and shapes: {{name,
-- channels}, ...} for linear_attn.{q,k,v}_conv1d (the hub's) or linear_attn.conv1d (one), nil when
-- it holds neither.
function M.conv_layout(names, shape_of)
   for _, name in ipairs(names) do
      local prefix = name:match("^(.*%.linear_attn%.)q_conv1d%.weight$")
      if prefix then
         local layout = {}
         for i, part in ipairs({ "q_conv1d", "k_conv1d", "v_conv1d" }) do
            local shape = shape_of(prefix .. part .. ".weight")
            layout[i] = { part, shape and shape[1] or 0 }
         end
         return layout
      end
      if name:match("%.linear_attn%.conv1d%.weight$") then
         local shape = shape_of(name)
         return { { "conv1d", shape and shape[1] or 0 } }
      end
   end
   return nil
end

--- Reads and checks an OLMo Hybrid config (path, folder or table; a table says null as cjson.null):
-- Llama's keys with OlmoHybridConfig's defaults, layer_types (by default every fourth layer full,
-- the last one when there is no fourth), the linear attention's heads (linear_num_key_heads and
-- linear_num_value_heads: num_attention_heads; linear_key_head_dim: 0.75 x hidden_size / key
-- heads; linear_value_head_dim: twice that), conv taps and linear_allow_neg_eigval; rope_theta
-- null makes cfg.nope_layers all true. layout: the convs as a checkpoint holds them
-- (M.conv_layout; default the hub's q, k, v split), kept in cfg.linear_convs.
function M.config(source, layout)
   local cfg = llama.config(source, "olmo_hybrid")
   cfg.rotary_dim = cfg.head_dim       -- (transformers' table turns whole heads, whatever partial_rotary_factor says)
   local function int(name, default)
      local v = cfg[name]
      if v == nil then v = default end
      cfg[name] = config.integer(cfg, WHO, name, v, 1)
      return cfg[name]
   end
   local Hk = int("linear_num_key_heads", cfg.num_attention_heads)
   local Hv = int("linear_num_value_heads", cfg.num_attention_heads)
   local Dk = int("linear_key_head_dim", math.floor(0.75 * cfg.hidden_size / Hk))
   local Dv = int("linear_value_head_dim", 2 * Dk)
   int("linear_conv_kernel_dim", 4)
   if Hv % Hk ~= 0 then
      config.fail(cfg, WHO, "linear_num_value_heads %d is not a multiple of linear_num_key_heads %d", Hv, Hk)
   end
   if cfg.linear_allow_neg_eigval == nil then cfg.linear_allow_neg_eigval = true end
   if type(cfg.linear_allow_neg_eigval) ~= "boolean" then
      config.fail(cfg, WHO, 'config key "linear_allow_neg_eigval" must be a boolean, got %s',
         tostring(cfg.linear_allow_neg_eigval))
   end
   local n, given = cfg.num_hidden_layers, cfg.layer_types ~= nil
   local types = config.layer_types(cfg, WHO, KINDS, function(i)
      return i % 4 == 0 and "full_attention" or "linear_attention"
   end)
   if not given and n < 4 then types[n] = "full_attention" end      -- (transformers: at least one full layer)
   local count = {}
   for _, kind in ipairs(types) do count[kind] = (count[kind] or 0) + 1 end
   for _, kind in ipairs(KINDS) do
      if not count[kind] then config.fail(cfg, WHO, 'layer_types must hold at least one "%s" layer', kind) end
   end
   if rope_theta_null(source, cfg._source) then
      cfg.nope_layers = {}
      for i = 1, n do cfg.nope_layers[i] = true end
      -- (what ml.save_model writes back says so too: a missing rope_theta would read as 10000)
      cfg._raw.rope_theta, cfg._raw.rope_parameters = nil, { rope_type = "default", rope_theta = cjson.null }
   end
   local conv_dim = 2 * Hk * Dk + Hv * Dv
   layout = layout or { { "q_conv1d", Hk * Dk }, { "k_conv1d", Hk * Dk }, { "v_conv1d", Hv * Dv } }
   local sum, parts = 0, {}
   for i, c in ipairs(layout) do sum, parts[i] = sum + c[2], tostring(c[2]) end
   if sum ~= conv_dim then
      config.fail(cfg, WHO, "the checkpoint's linear_attn convs hold %s channels, the config's heads need %d "
         .. "(2 x linear_num_key_heads x linear_key_head_dim + linear_num_value_heads x linear_value_head_dim)",
         table.concat(parts, " + "), conv_dim)
   end
   cfg.linear_convs = layout
   return cfg
end

-- --- linear attention ---------------------------------------------------------------------------

local OlmoHybridRMSNormGated = qwen3_next.Qwen3NextRMSNormGated:extend("OlmoHybridRMSNormGated")
M.OlmoHybridRMSNormGated = OlmoHybridRMSNormGated

local OlmoHybridGatedDeltaNet = qwen3_next.Qwen3NextGatedDeltaNet:extend("OlmoHybridGatedDeltaNet")
M.OlmoHybridGatedDeltaNet = OlmoHybridGatedDeltaNet
OlmoHybridGatedDeltaNet.norm_name, OlmoHybridGatedDeltaNet.out_name = "o_norm", "o_proj"

function OlmoHybridGatedDeltaNet:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local Hk, Hv, Dk, Dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
      cfg.linear_value_head_dim
   local H, taps = cfg.hidden_size, cfg.linear_conv_kernel_dim
   local function proj(n) return nn.Linear(H, n, { bias = false }) end
   -- (one a line: transformers' order, which a multiple assignment would reverse)
   self.q_proj = proj(Hk * Dk)
   self.k_proj = proj(Hk * Dk)
   self.v_proj = proj(Hv * Dv)
   self.a_proj = proj(Hv)
   self.b_proj = proj(Hv)
   self.g_proj = proj(Hv * Dv)
   self.o_proj = nn.Linear(Hv * Dv, H, { bias = false })
   local convs = {}
   for i, c in ipairs(cfg.linear_convs) do
      self[c[1]] = causal_conv.Conv1d(c[2], taps)
      convs[i] = c[1]
   end
   self.A_log = nn.Module.new_parameter({ Hv })
   self.dt_bias = nn.Module.new_parameter({ Hv })
   if not self.A_log:is_meta() then
      self.A_log:zero_()
      self.dt_bias:fill_(1)
   end
   self.o_norm = OlmoHybridRMSNormGated(Dv, 1e-5)       -- (FLA's eps, whatever rms_norm_eps says)
   rawset(self, "heads", { Hk = Hk, Hv = Hv, Dk = Dk, Dv = Dv, conv_dim = 2 * Hk * Dk + Hv * Dv, taps = taps })
   rawset(self, "layer_idx", layer_idx)
   rawset(self, "convs", convs)
   rawset(self, "neg_eigval", cfg.linear_allow_neg_eigval)
   rawset(self, "act", common.activation(cfg.hidden_act, WHO, cfg._source))
end

--- The projections of x (B, L, hidden): the conv's input (B, L, conv_dim: q, k, v side by side),
-- the gate g (B * L * Hv, Dv), and b, a (B, L, Hv).
function OlmoHybridGatedDeltaNet:project(x)
   local h = self.heads
   local B, L = x:size(1), x:size(2)
   return T.cat({ self.q_proj(x), self.k_proj(x), self.v_proj(x) }, 3), self.g_proj(x):reshape(B * L * h.Hv, h.Dv),
      self.b_proj(x), self.a_proj(x)
end

--- Each conv over its channels of mixed (B, L, conv_dim) and of the state (B, taps - 1, conv_dim),
-- side by side, through hidden_act.
function OlmoHybridGatedDeltaNet:convolve(mixed, state)
   local out, at = {}, 1
   for i, name in ipairs(self.convs) do
      local conv = self[name]
      local n = conv.channels
      out[i] = causal_conv.run(conv, mixed:narrow(3, at, n), state and state:narrow(3, at, n))
      at = at + n
   end
   return self.act(#out == 1 and out[1] or T.cat(out, 3))
end

-- --- layers and model ---------------------------------------------------------------------------

local OlmoHybridMLP = llama.LlamaMLP:extend("OlmoHybridMLP")
M.OlmoHybridMLP = OlmoHybridMLP

-- OLMo 3's attention (q/k norms over the whole projections) and post-norm layer, without a window
local OlmoHybridAttention = llama.Olmo3Attention:extend("OlmoHybridAttention")
M.OlmoHybridAttention = OlmoHybridAttention

local OlmoHybridAttentionDecoderLayer = llama.Olmo3DecoderLayer:extend("OlmoHybridAttentionDecoderLayer")
M.OlmoHybridAttentionDecoderLayer = OlmoHybridAttentionDecoderLayer
OlmoHybridAttentionDecoderLayer.Attention, OlmoHybridAttentionDecoderLayer.MLP = OlmoHybridAttention, OlmoHybridMLP

-- Qwen3-Next's pre-norm layer around the linear attention
local OlmoHybridLinearAttentionDecoderLayer =
   qwen3_next.Qwen3NextDecoderLayer:extend("OlmoHybridLinearAttentionDecoderLayer")
M.OlmoHybridLinearAttentionDecoderLayer = OlmoHybridLinearAttentionDecoderLayer
OlmoHybridLinearAttentionDecoderLayer.LinearAttention = OlmoHybridGatedDeltaNet
OlmoHybridLinearAttentionDecoderLayer.MLP, OlmoHybridLinearAttentionDecoderLayer.Norm = OlmoHybridMLP, nn.RMSNorm

local OlmoHybridRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("OlmoHybridRotaryEmbedding")
M.OlmoHybridRotaryEmbedding = OlmoHybridRotaryEmbedding

local OlmoHybridModel = llama.LlamaModel:extend("OlmoHybridModel")
M.OlmoHybridModel = OlmoHybridModel
OlmoHybridModel.family, OlmoHybridModel.Rotary = "olmo_hybrid", OlmoHybridRotaryEmbedding

function OlmoHybridModel.Layer(cfg, i)
   if cfg.layer_types[i] == "linear_attention" then return OlmoHybridLinearAttentionDecoderLayer(cfg, i) end
   return OlmoHybridAttentionDecoderLayer(cfg, i)
end

function OlmoHybridModel:__init(cfg)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = M.config(cfg) end
   llama.LlamaModel.__init(self, cfg)
end

local OlmoHybridForCausalLM = llama.LlamaForCausalLM:extend("OlmoHybridForCausalLM")
M.OlmoHybridForCausalLM = OlmoHybridForCausalLM
OlmoHybridForCausalLM.family, OlmoHybridForCausalLM.Model = "olmo_hybrid", OlmoHybridModel
OlmoHybridForCausalLM.no_split_modules = { "OlmoHybridAttentionDecoderLayer", "OlmoHybridLinearAttentionDecoderLayer" }
OlmoHybridForCausalLM.stateful = true          -- its cache cannot be cropped: no assisted generation
OlmoHybridForCausalLM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^mtp%." }
-- the hub's (and save_pretrained's) names of the norms, as transformers' conversion mapping renames them
OlmoHybridForCausalLM.checkpoint_renames = { { "%.attention_layer_norm%.", ".input_layernorm." },
   { "%.feedforward_layer_norm%.", ".post_attention_layernorm." } }
OlmoHybridForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")

--- from_pretrained's build options: the convs as the checkpoint holds them.
function OlmoHybridForCausalLM.build_opts_for(names, shape_of)
   local layout = M.conv_layout(names, shape_of)
   return layout and { linear_convs = layout } or nil
end

--- OlmoHybridForCausalLM(config[, {linear_convs}]): linear_convs as M.conv_layout gives it.
function OlmoHybridForCausalLM:__init(cfg, opts)
   rawset(self, "_linear_convs", opts and opts.linear_convs or nil)
   llama.LlamaForCausalLM.__init(self, cfg)
end

function OlmoHybridForCausalLM:read_config(source)
   if type(source) == "table" and source._source ~= nil and source.linear_convs then return source end
   return M.config(source, rawget(self, "_linear_convs"))
end

return M
