--- Zamba (ZambaForCausalLM, model_type "zamba": Zamba-7B-v1) and Zamba2 (Zamba2ForCausalLM,
-- "zamba2": Zamba2-1.2B, -2.7B, -7B and their -Instruct versions) with Hugging Face parameter names:
-- model.{embed_tokens, layers.N.*, final_layernorm}, lm_head (tied to the embedding by default).
--
-- layers_block_type names each layer: a Mamba layer ("mamba", "linear_attention": an RMSNorm and a
-- mixer, a residual around both) or a hybrid layer ("hybrid"): a shared transformer block first, on
-- the layer's input concatenated with the token embeddings (attention_hidden_size = 2 x hidden_size
-- wide): an RMSNorm, attention (scores scaled by 1 / sqrt(head_dim / 2)), an RMSNorm and a gated
-- MLP, no residual inside; the layer's own linear maps its output, which is added to the input of
-- the layer's Mamba part (mamba_decoder) before its norm (the residual skips it).
--
-- Zamba: Mamba-1 mixers split into n_mamba_heads heads, each with its own x_proj and dt_proj
-- (x_proj_weight (heads, dt_rank + 2 x state, head_dim), dt_proj_weight (heads, head_dim, dt_rank),
-- dt_proj_bias), in_proj giving x and the gate interleaved channel by channel; attention without
-- position embeddings; the MLP gate_proj / up_proj / down_proj; one shared block (shared_transf),
-- hybrid layers where i % attn_layer_period == attn_layer_offset (after the first three layers,
-- the third a hybrid one) unless the file lists them.
--
-- Zamba2: Mamba-2 mixers (models/mamba2.lua; dt floored at time_step_min), rotary embeddings with
-- use_mem_rope, the MLP's gate and up projections in one (gate_up_proj), and num_mem_blocks shared
-- blocks (shared_transformer), the hybrid layers taking them in turn (the j-th, from 0, block
-- j % num_mem_blocks). Each use has its own LoRA-style adapters (per block, a list with one slot per
-- hybrid layer, an nn.Identity where another block's layer would be): on gate_up_proj always, on q,
-- k and v with use_shared_attention_adapter (which needs as many key-value heads as heads).
--
-- A block is stored once, under the first hybrid layer that uses it, and its other users' are tied
-- to it: here each hybrid layer has modules of its own (its own cache slot, its own place in a
-- device map) whose weights are the same tensors. transformers ties the blocks only with
-- tie_word_embeddings (with the head); without it, every hybrid layer's block is its own.
--
-- A generation's cache holds, per layer, the mixer's last conv inputs and float32 state (a fixed
-- size, whatever the length), and the hybrid layers' keys and values; the state cannot be cropped
-- back, so assisted generation is refused.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local causal_conv = require("moonload.models.causal_conv")
local llama = require("moonload.models.llama")
local mamba2 = require("moonload.models.mamba2")
local block_schedule = require("moonload.models.block_schedule")

local M = {}

-- --- configs ----------------------------------------------------------------------------------------

-- Layer type names: transformers' and the older ones it remaps.
local KINDS = { mamba = "mamba", linear_attention = "mamba", hybrid = "hybrid" }

--- cfg.hybrid_layers: the 1-based indices of the layers layers_block_type (or its alias
-- layer_types; default(cfg): transformers' list) calls "hybrid", and cfg.slot_of[i]: layer i's
-- place among them (from 1).
local function read_block_types(cfg, WHO, default)
   local key = cfg.layers_block_type ~= nil and "layers_block_type" or cfg.layer_types ~= nil and "layer_types" or nil
   local types = key and cfg[key] or default(cfg)
   key = key or "layers_block_type"
   if type(types) ~= "table" or #types ~= cfg.num_hidden_layers then
      config.fail(cfg, WHO, 'config key "%s" must list %d layer types (num_hidden_layers)', key, cfg.num_hidden_layers)
   end
   cfg.hybrid_layers, cfg.slot_of = {}, {}
   for i, kind in ipairs(types) do
      if not KINDS[kind] then
         config.fail(cfg, WHO, '%s[%d] is "%s" (supported: hybrid, linear_attention, mamba)', key, i, tostring(kind))
      end
      if KINDS[kind] == "hybrid" then
         cfg.hybrid_layers[#cfg.hybrid_layers + 1] = i
         cfg.slot_of[i] = #cfg.hybrid_layers
      end
   end
end

-- What both read alike: the attention's heads (checked), its layers without position embeddings
-- unless rotates, the hidden activation.
local function read_attention(cfg, WHO, rotates)
   if cfg.num_attention_heads % cfg.num_key_value_heads ~= 0 then
      config.fail(cfg, WHO, "num_attention_heads %d is not a multiple of num_key_value_heads %d", cfg.num_attention_heads,
         cfg.num_key_value_heads)
   end
   cfg.nope_layers = {}
   for i = 1, cfg.num_hidden_layers do cfg.nope_layers[i] = not rotates end
   common.activation(cfg.hidden_act, WHO, cfg._source)
end

-- ZambaConfig's keys and defaults (Zamba-7B-v1's geometry).
local SCHEMA = {
   { "vocab_size", "int", 32000 },
   { "hidden_size", "int", 3712 },
   { "attention_hidden_size", "int", function(c) return 2 * c.hidden_size end },
   { "intermediate_size", "int", 14848 },
   { "num_hidden_layers", "int", 76 },
   { "num_attention_heads", "int", 16 },
   { "attention_head_dim", "int", function(c) return math.floor(2 * c.hidden_size / c.num_attention_heads) end },
   { "num_key_value_heads", "int", 16 },
   { "n_mamba_heads", "int", 2 },
   { "hidden_act", "string", "gelu" },
   { "hidden_mamba_act", "string", "silu" },
   { "rms_norm_eps", "posnum", 1e-5 },
   { "max_position_embeddings", "int", 4096 },
   { "attn_layer_period", "int", 6 },
   { "attn_layer_offset", "int0", 4 },
   { "mamba_d_state", "int", 16 },
   { "mamba_d_conv", "int", 4 },
   { "mamba_expand", "int", 2 },
   { "mamba_conv_bias", "bool", true },
   { "mamba_proj_bias", "bool", false },
   { "tie_word_embeddings", "bool", true },
}

-- transformers' default layers_block_type: two Mamba layers, a hybrid one, then a hybrid one where
-- (i - 3) % attn_layer_period == attn_layer_offset (i from 0).
local function zamba_block_types(cfg)
   local t = { "mamba", "mamba", "hybrid" }
   for i = 0, cfg.num_hidden_layers - 4 do
      t[#t + 1] = i % cfg.attn_layer_period == cfg.attn_layer_offset and "hybrid" or "mamba"
   end
   return t
end

--- Reads and checks a Zamba config (path, folder or table): its keys (ZambaConfig's defaults), the
-- layer types (cfg.hybrid_layers, cfg.slot_of), the attention's (cfg.head_dim) and the mixer's
-- geometry (cfg.zamba_mixer = {heads, head_dim, width, state_size, dt_rank, taps, conv_bias, proj_bias}).
function M.zamba_config(source)
   local WHO = "models.zamba"
   local raw, src = config.read(source, WHO)
   local cfg = config.validate(raw, SCHEMA, src, WHO, 2)
   read_block_types(cfg, WHO, zamba_block_types)
   read_attention(cfg, WHO, false)
   if cfg.attention_hidden_size ~= 2 * cfg.hidden_size then
      -- (its input is the hidden states and the embeddings side by side)
      config.fail(cfg, WHO, "attention_hidden_size %d must be 2 x hidden_size = %d", cfg.attention_hidden_size,
         2 * cfg.hidden_size)
   end
   cfg.head_dim = cfg.attention_head_dim
   if cfg.hidden_mamba_act ~= "silu" then
      config.fail(cfg, WHO, 'config key "hidden_mamba_act" is "%s" (supported: silu)', cfg.hidden_mamba_act)
   end
   local width, heads = cfg.mamba_expand * cfg.hidden_size, cfg.n_mamba_heads
   if width % heads ~= 0 then
      config.fail(cfg, WHO, "the mixer's width %d (mamba_expand x hidden_size) is not a multiple of n_mamba_heads %d",
         width, heads)
   end
   local rank = cfg.mamba_dt_rank
   if rank == nil or rank == "auto" then rank = math.ceil(cfg.hidden_size / 16) end
   if type(rank) ~= "number" or rank ~= math.floor(rank) or rank < 1 then
      config.fail(cfg, WHO, 'config key "mamba_dt_rank" must be "auto" or an integer >= 1, got %s', tostring(rank))
   end
   cfg.zamba_mixer = { heads = heads, head_dim = width / heads, width = width, state_size = cfg.mamba_d_state,
      dt_rank = rank, taps = cfg.mamba_d_conv, conv_bias = cfg.mamba_conv_bias, proj_bias = cfg.mamba_proj_bias }
   cfg.num_mem_blocks, cfg.mlp_bias = 1, false
   cfg.family = "zamba"
   return cfg
end

-- Zamba2Config's keys and defaults (Zamba2-2.7B's geometry).
local SCHEMA2 = {
   { "vocab_size", "int", 32000 },
   { "hidden_size", "int", 2560 },
   { "num_hidden_layers", "int", 54 },
   { "num_attention_heads", "int", 32 },
   { "num_key_value_heads", "int", function(c) return c.num_attention_heads end },
   { "hidden_act", "string", "gelu" },
   { "rms_norm_eps", "posnum", 1e-5 },
   { "max_position_embeddings", "int", 4096 },
   { "num_mem_blocks", "int", 1 },
   { "use_shared_attention_adapter", "bool", false },
   { "adapter_rank", "int", 128 },
   { "use_mem_rope", "bool", false },
   { "add_bias_linear", "bool", false },
   { "tie_word_embeddings", "bool", true },
   { "rope_parameters", "table", function() return {} end },
   { "rope_scaling", "table", function() return {} end },
}

-- Zamba2's names for the mixer's keys (models/mamba2.lua's read_config), and its defaults.
local MAMBA2_KEYS = { heads = "n_mamba_heads", head_dim = "mamba_headdim", groups = "mamba_ngroups",
   state_size = "mamba_d_state", conv_kernel = "mamba_d_conv", conv_bias = "use_conv_bias", proj_bias = "add_bias_linear",
   expand = "mamba_expand", time_step_min = "time_step_min" }
local MAMBA2_DEFAULTS = { heads = 8, head_dim = "auto", groups = 1, state_size = 64, conv_kernel = 4, conv_bias = true,
   proj_bias = false, expand = 2, time_step_min = 0.001 }

-- transformers' default layers_block_type (Zamba2-2.7B's 54 layers, whatever num_hidden_layers says).
local function zamba2_block_types()
   local t = { "mamba" }
   for _ = 1, 7 do
      for _ = 1, 5 do t[#t + 1] = "mamba" end
      t[#t + 1] = "hybrid"
   end
   for _, n in ipairs({ 4, 3, 2 }) do
      for _ = 1, n do t[#t + 1] = "mamba" end
      if n > 2 then t[#t + 1] = "hybrid" end
   end
   return t
end

--- Reads and checks a Zamba2 config (path, folder or table): its keys (Zamba2Config's defaults), the
-- layer types (cfg.hybrid_layers, cfg.slot_of), the attention's geometry (the concatenated width
-- cfg.attention_hidden_size, cfg.head_dim; the rotary parameters with use_mem_rope) and the mixer's
-- (cfg.mamba).
function M.zamba2_config(source)
   local WHO = "models.zamba2"
   local raw, src = config.read(source, WHO)
   local cfg = config.validate(raw, SCHEMA2, src, WHO, 2)
   if cfg.intermediate_size == nil then cfg.intermediate_size = 4 * cfg.hidden_size end   -- (transformers' default)
   cfg.intermediate_size = config.integer(cfg, WHO, "intermediate_size", cfg.intermediate_size, 1)
   read_block_types(cfg, WHO, zamba2_block_types)
   read_attention(cfg, WHO, cfg.use_mem_rope)
   -- (transformers derives the attention's widths, whatever the file says)
   cfg.attention_hidden_size = 2 * cfg.hidden_size
   cfg.head_dim = math.floor(cfg.attention_hidden_size / cfg.num_attention_heads)
   if cfg.use_shared_attention_adapter and cfg.num_key_value_heads ~= cfg.num_attention_heads then
      -- (the adapters' outputs are 2 x hidden_size wide, as the queries: transformers fails on the keys)
      config.fail(cfg, WHO, "use_shared_attention_adapter needs num_key_value_heads %d = num_attention_heads %d",
         cfg.num_key_value_heads, cfg.num_attention_heads)
   end
   if cfg.use_mem_rope then
      cfg.rope = llama.rope_from(cfg, WHO, { { cfg.rope_scaling, "rope_scaling." }, { { rope_theta = cfg.rope_theta }, "" },
         { cfg.rope_parameters, "rope_parameters." } }, 10000)
      cfg.rope_theta, cfg.rotary_dim = cfg.rope.rope_theta, cfg.head_dim
   end
   -- the mixer: transformers reads mamba_headdim from expand x hidden_size / n_mamba_heads, whatever
   -- the file says, and gives the conv a bias and the gated norm eps 1e-5 whatever the keys say
   cfg.mamba_headdim = nil
   mamba2.read_config(cfg, WHO, MAMBA2_KEYS, MAMBA2_DEFAULTS)
   cfg.mamba.conv_bias, cfg.mamba.eps = true, 1e-5
   cfg.family = "zamba2"
   return cfg
end

-- --- the shared transformer blocks ------------------------------------------------------------------

-- The argument list block_schedule gives a layer: x, then cos and sin only when the model rotates,
-- then cache, pad and the layer's own extra input (models/block_schedule.lua).
local function layer_args(self, a, b, c, d, e)
   if self.rotates then return a, b, c, d, e end
   return nil, nil, a, b, c
end

local ZambaAttention = llama.LlamaAttention:extend("ZambaAttention")
M.ZambaAttention = ZambaAttention

--- ZambaAttention(cfg, layer_idx): attention over the concatenated input (attention_hidden_size
-- wide) back to hidden_size, unbiased, its scores scaled by 1 / sqrt(head_dim / 2).
function ZambaAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, Hkv, D, W = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.attention_hidden_size
   self.q_proj = nn.Linear(W, H * D, { bias = false })
   self.k_proj = nn.Linear(W, Hkv * D, { bias = false })
   self.v_proj = nn.Linear(W, Hkv * D, { bias = false })
   self.o_proj = nn.Linear(H * D, cfg.hidden_size, { bias = false })
   llama.attention_geometry(self, cfg, layer_idx)
   rawset(self, "scale", 1 / math.sqrt(D / 2))
end

-- Zamba's MLP: Llama's, unbiased.
local ZambaMLP = llama.LlamaMLP:extend("ZambaMLP")
M.ZambaMLP = ZambaMLP

local ZambaAttentionDecoderLayer = nn.Module:extend("ZambaAttentionDecoderLayer")
M.ZambaAttentionDecoderLayer = ZambaAttentionDecoderLayer
ZambaAttentionDecoderLayer.Attention, ZambaAttentionDecoderLayer.MLP = ZambaAttention, ZambaMLP

-- transformers' order: the attention, the MLP, both norms
function ZambaAttentionDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   self.feed_forward = self.MLP(cfg, layer_idx)
   self.input_layernorm = nn.RMSNorm(cfg.attention_hidden_size, { eps = cfg.rms_norm_eps })
   self.pre_ff_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

--- x (B, L, hidden), the embeddings emb (B, L, hidden); cos, sin or nil; cache; pad -> (B, L, hidden):
-- attention over [x, emb] normed, then the MLP over its output normed (no residuals).
function ZambaAttentionDecoderLayer:forward(x, emb, cos, sin, cache, pad)
   local h = self.input_layernorm(T.cat({ x, emb }, 3))
   h = self.self_attn(h, cos, sin, cache, pad)
   return self.feed_forward(self.pre_ff_layernorm(h))
end

--- A list of one adapter slot per hybrid layer: a low-rank pair (in -> rank -> out, unbiased) where
-- block `block` serves that layer, an nn.Identity elsewhere (never called).
local function adapter_list(cfg, block, n_in, n_out)
   local list = {}
   for j = 1, #cfg.hybrid_layers do
      if (j - 1) % cfg.num_mem_blocks == block then
         list[j] = nn.Sequential(nn.Linear(n_in, cfg.adapter_rank, { bias = false }),
            nn.Linear(cfg.adapter_rank, n_out, { bias = false }))
      else
         list[j] = nn.Identity()
      end
   end
   return nn.ModuleList(list)
end

local Zamba2Attention = ZambaAttention:extend("Zamba2Attention")
M.Zamba2Attention = Zamba2Attention

--- Zamba2Attention(cfg, layer_idx): ZambaAttention with, per use, adapters on q, k and v
-- (use_shared_attention_adapter); its slot is the hybrid layer's.
function Zamba2Attention:__init(cfg, layer_idx)
   ZambaAttention.__init(self, cfg, layer_idx)
   local slot = cfg.slot_of[layer_idx]
   if cfg.use_shared_attention_adapter then
      local block, W = (slot - 1) % cfg.num_mem_blocks, cfg.attention_hidden_size
      self.linear_q_adapter_list = adapter_list(cfg, block, W, W)
      self.linear_k_adapter_list = adapter_list(cfg, block, W, W)
      self.linear_v_adapter_list = adapter_list(cfg, block, W, W)
   end
   rawset(self, "slot", slot)
end

--- q, k, v (B, L, heads, D), each projection plus its adapter of this layer's slot.
function Zamba2Attention:project(x, B, L)
   local q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
   if self.linear_q_adapter_list then
      local s = self.slot
      q = q + self.linear_q_adapter_list[s](x)
      k = k + self.linear_k_adapter_list[s](x)
      v = v + self.linear_v_adapter_list[s](x)
   end
   local D = self.head_dim
   return q:view(B, L, self.n_head, D), k:view(B, L, self.n_kv_head, D), v:view(B, L, self.n_kv_head, D)
end

local Zamba2MLP = nn.Module:extend("Zamba2MLP")
M.Zamba2MLP = Zamba2MLP

--- Zamba2MLP(cfg, layer_idx): down(act(gate) * up), gate and up from gate_up_proj plus this use's adapter.
function Zamba2MLP:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local I, bias = cfg.intermediate_size, cfg.add_bias_linear
   self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * I, { bias = bias })
   self.down_proj = nn.Linear(I, cfg.hidden_size, { bias = bias })
   self.act_fn = common.activation_module(cfg.hidden_act, "models.zamba2", cfg._source)
   local slot = cfg.slot_of[layer_idx]
   self.gate_up_proj_adapter_list = adapter_list(cfg, (slot - 1) % cfg.num_mem_blocks, cfg.hidden_size, 2 * I)
   rawset(self, "slot", slot)
   rawset(self, "width", I)
end

function Zamba2MLP:forward(x)
   local gu = self.gate_up_proj(x) + self.gate_up_proj_adapter_list[self.slot](x)
   local I = self.width
   return self.down_proj(self.act_fn(gu:narrow(3, 1, I)) * gu:narrow(3, I + 1, I))
end

local Zamba2AttentionDecoderLayer = ZambaAttentionDecoderLayer:extend("Zamba2AttentionDecoderLayer")
M.Zamba2AttentionDecoderLayer = Zamba2AttentionDecoderLayer
Zamba2AttentionDecoderLayer.Attention, Zamba2AttentionDecoderLayer.MLP = Zamba2Attention, Zamba2MLP

-- --- Zamba's mixer ----------------------------------------------------------------------------------

local ZambaMambaMixer = nn.Module:extend("ZambaMambaMixer")
M.ZambaMambaMixer = ZambaMambaMixer

--- ZambaMambaMixer(cfg, layer_idx): Mamba-1's mixer in cfg.zamba_mixer.heads heads of head_dim
-- channels, each head with its own x_proj (x_proj_weight) and dt_proj (dt_proj_weight, dt_proj_bias).
function ZambaMambaMixer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local m = cfg.zamba_mixer
   local H, P, N, R, I = m.heads, m.head_dim, m.state_size, m.dt_rank, m.width
   self.conv1d = causal_conv.Conv1d(I, m.taps, { bias = m.conv_bias })
   self.in_proj = nn.Linear(cfg.hidden_size, 2 * I, { bias = m.proj_bias })
   self.x_proj_weight = nn.Module.new_parameter({ H, R + 2 * N, P })
   self.dt_proj_weight = nn.Module.new_parameter({ H, P, R })
   self.dt_proj_bias = nn.Module.new_parameter({ H, P })
   self.A_log = nn.Module.new_parameter({ H, P, N })
   self.D = nn.Module.new_parameter({ H, P })
   if not self.D:is_meta() then           -- transformers' initial values (A = -(1 .. N) per channel)
      self.A_log:copy_(T.arange(1, N + 1):float():log():view(1, 1, N):expand(H, P, N))
      self.D:fill_(1)
      self.x_proj_weight:fill_(0)
      self.dt_proj_weight:fill_(0)
      self.dt_proj_bias:fill_(0)
   end
   self.out_proj = nn.Linear(I, cfg.hidden_size, { bias = m.proj_bias })
   rawset(self, "geometry", { H = H, P = P, N = N, R = R, I = I, taps = m.taps })
   rawset(self, "layer_idx", layer_idx)
end

--- Bytes a cache keeps for this layer per batch of B sequences (utils/runtime_memory.lua): the
-- last taps - 1 conv inputs (el bytes each) and the float32 state, whatever the length.
function ZambaMambaMixer:state_bytes(B, el)
   local g = self.geometry
   return B * ((g.taps - 1) * g.I * el + g.I * g.N * 4)
end

--- Values a forward forms per token at once, beside the layer's input and MLP (for memory
-- planning): the projection and its split, the conv's window, products and output, x_proj's and
-- the steps per head, the scan's float32 output and the gate's.
function ZambaMambaMixer:token_values()
   local g = self.geometry
   return 4 * 2 * g.I + 4 * g.I + 4 * g.H * (g.R + 2 * g.N) + 4 * g.I + 8 * g.I
end

local f32_on = mamba2.f32_on

-- x (B, L, H, P) through a per-head weight w (H, out, P) -> (B, L, H, out).
local function per_head(x, w)
   local B, L, H, P = x:size(1), x:size(2), x:size(3), x:size(4)
   local y = x:reshape(B * L, H, P):transpose(1, 2):matmul(w:transpose(2, 3))      -- (H, B L, out)
   return y:transpose(1, 2):reshape(B, L, H, w:size(2))
end

--- x (B, L, hidden); cache optional (the conv inputs and the state carry over); pad (B, past +
-- L) bool or nil: padding tokens enter as zeros, so they leave the state as it was.
function ZambaMambaMixer:forward(x, cache, pad)
   local g = self.geometry
   local B, L = x:size(1), x:size(2)
   local keep = mamba2.keep_mask(x, pad)
   if keep then x = x * keep end
   local proj = self.in_proj(x):view(B, L, g.I, 2)          -- x and the gate, channel by channel
   local xs, z = proj:select(4, 1), proj:select(4, 2)
   local state = mamba2.layer_state(self, cache, B, x, { g.H, g.P, g.N })
   local conv = causal_conv.run(self.conv1d, xs:contiguous(), state and state.conv):silu()   -- (B, L, I)
   if keep then conv = conv * keep end
   local heads = conv:view(B, L, g.H, g.P)
   local w = self.x_proj_weight
   local sel = per_head(heads, w.dtype == x.dtype and w or w:to(x.dtype))      -- (B, L, H, R + 2N)
   local step = sel:narrow(4, 1, g.R):contiguous()
   local Bm, Cm = sel:narrow(4, g.R + 1, g.N):contiguous(), sel:narrow(4, g.R + g.N + 1, g.N):contiguous()
   local dt = per_head(step:float(), f32_on(self.dt_proj_weight, x.device))     -- (B, L, H, P)
   dt = (dt + f32_on(self.dt_proj_bias, x.device)):softplus()
   local y = mamba2.scan(state, heads, dt, self.A_log, Bm, Cm, f32_on(self.D, x.device))   -- (B, L, H, P) float32
   y = y:view(B, L, g.I) * z:float():silu()
   return self.out_proj(y.dtype == x.dtype and y or y:to(x.dtype))
end

local Zamba2MambaMixer = mamba2.Mamba2Mixer:extend("Zamba2MambaMixer")
M.Zamba2MambaMixer = Zamba2MambaMixer

-- --- layers -----------------------------------------------------------------------------------------

local ZambaMambaDecoderLayer = nn.Module:extend("ZambaMambaDecoderLayer")
M.ZambaMambaDecoderLayer = ZambaMambaDecoderLayer
ZambaMambaDecoderLayer.Mixer = ZambaMambaMixer

function ZambaMambaDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.mamba = self.Mixer(cfg, layer_idx)
   self.input_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   rawset(self, "rotates", cfg.use_mem_rope == true)
end

--- x (B, L, hidden), [cos, sin,] cache, pad, and added (B, L, hidden) or nil: what a hybrid layer's
-- shared block gives, added to the mixer's input before the norm (not to the residual).
function ZambaMambaDecoderLayer:forward(x, ...)
   local _, _, cache, pad, added = layer_args(self, ...)
   local h = added and x + added or x
   return x + self.mamba(self.input_layernorm(h), cache, pad)
end

local ZambaHybridLayer = nn.Module:extend("ZambaHybridLayer")
M.ZambaHybridLayer = ZambaHybridLayer
ZambaHybridLayer.MambaLayer, ZambaHybridLayer.SharedBlock = ZambaMambaDecoderLayer, ZambaAttentionDecoderLayer
ZambaHybridLayer.shared_name = "shared_transf"

-- transformers' order: the shared block, the linear, the Mamba layer
function ZambaHybridLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self[self.shared_name] = self.SharedBlock(cfg, layer_idx)
   self:build_own(cfg, layer_idx)
end

--- The layer's own parts: its linear and its Mamba layer.
function ZambaHybridLayer:build_own(cfg, layer_idx)
   self.linear = nn.Linear(cfg.hidden_size, cfg.hidden_size, { bias = false })
   self.mamba_decoder = self.MambaLayer(cfg, layer_idx)
   rawset(self, "rotates", cfg.use_mem_rope == true)
end

--- x (B, L, hidden), [cos, sin,] cache, pad, and the token embeddings emb (B, L, hidden).
function ZambaHybridLayer:forward(x, ...)
   local cos, sin, cache, pad, emb = layer_args(self, ...)
   local t = self[self.shared_name](x, emb, cos, sin, cache, pad)
   if t.device ~= x.device then t = t:to(x.device) end      -- (a tied block placed with its first user)
   t = self.linear(t)
   if self.rotates then return self.mamba_decoder(x, nil, nil, cache, pad, t) end
   return self.mamba_decoder(x, cache, pad, t)
end

local Zamba2MambaDecoderLayer = ZambaMambaDecoderLayer:extend("Zamba2MambaDecoderLayer")
M.Zamba2MambaDecoderLayer = Zamba2MambaDecoderLayer
Zamba2MambaDecoderLayer.Mixer = Zamba2MambaMixer

local Zamba2HybridLayer = ZambaHybridLayer:extend("Zamba2HybridLayer")
M.Zamba2HybridLayer = Zamba2HybridLayer
Zamba2HybridLayer.MambaLayer, Zamba2HybridLayer.SharedBlock = Zamba2MambaDecoderLayer, Zamba2AttentionDecoderLayer
Zamba2HybridLayer.shared_name = "shared_transformer"

-- transformers' order: the linear, the Mamba layer, the shared block
function Zamba2HybridLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self:build_own(cfg, layer_idx)
   self[self.shared_name] = self.SharedBlock(cfg, layer_idx)
end

-- --- models -----------------------------------------------------------------------------------------

local ZambaModel = llama.LlamaModel:extend("ZambaModel")
M.ZambaModel = ZambaModel
ZambaModel.family, ZambaModel.norm_name = "zamba", "final_layernorm"
ZambaModel.MambaLayer, ZambaModel.HybridLayer = ZambaMambaDecoderLayer, ZambaHybridLayer

-- transformers' order: the embedding, the layers, the final norm, the rotary table (Zamba2's
-- use_mem_rope)
function ZambaModel:__init(cfg)
   nn.Module.__init(self)
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do
      layers[i] = cfg.slot_of[i] and self.HybridLayer(cfg, i) or self.MambaLayer(cfg, i)
   end
   self.layers = nn.ModuleList(layers)
   self.final_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   if cfg.use_mem_rope then self.rotary_emb = llama.LlamaRotaryEmbedding(cfg) end
   rawset(self, "config", cfg)
end

--- input_ids (B, T) int64; cache optional; pad (B, past + T) bool or nil; pos (B, T) int64 or nil;
-- blocks {micro_batch_size, prefill_chunk_size} or nil. The hybrid layers get the token embeddings
-- (cut into the schedule's blocks as the hidden states are). Returns the final hidden states.
function ZambaModel:forward(input_ids, cache, pad, pos, blocks)
   local cfg = self.config
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   local emb = self.embed_tokens(input_ids)
   local rope = self:layer_rotary(pos or T.arange(past, past + L, { device = input_ids.device }), emb)[1]
   local n = cfg.num_hidden_layers
   local schedule = blocks and block_schedule.plan(blocks, emb, cache, n, "models." .. self.family)
   local x = emb
   for i = 1, n do
      x = block_schedule.call(schedule, i, self.layers[i], x, cache, pad, rope[1], rope[2], cfg.slot_of[i] and emb or nil)
   end
   if cache then cache:advance(L) end
   return self.final_layernorm(x)
end

local Zamba2Model = ZambaModel:extend("Zamba2Model")
M.Zamba2Model = Zamba2Model
Zamba2Model.family = "zamba2"
Zamba2Model.MambaLayer, Zamba2Model.HybridLayer = Zamba2MambaDecoderLayer, Zamba2HybridLayer

local ZambaForCausalLM = llama.LlamaForCausalLM:extend("ZambaForCausalLM")
M.ZambaForCausalLM = ZambaForCausalLM
ZambaForCausalLM.family, ZambaForCausalLM.Model = "zamba", ZambaModel
ZambaForCausalLM.no_split_modules = { "ZambaHybridLayer", "ZambaMambaDecoderLayer" }
ZambaForCausalLM.stateful = true          -- its cache cannot be cropped: no assisted generation
ZambaForCausalLM.forward = common.causal_lm_forward("models.zamba.forward", "model", "embed_tokens")

--- ZambaForCausalLM(config): config is a config.json path, a folder holding one, or a table.
function ZambaForCausalLM:__init(cfg)
   llama.LlamaForCausalLM.__init(self, cfg)
   -- the tied blocks' names, each to the one it is stored under (models/init.lua loads it under both)
   local ties = { ["lm_head.weight"] = "model.embed_tokens.weight" }
   local shared = self.model.HybridLayer.shared_name
   for dst, src in pairs(self:shared_block_users()) do
      local prefix = "model.layers." .. (dst - 1) .. "." .. shared .. "."
      local from = "model.layers." .. (src - 1) .. "." .. shared .. "."
      for name in self.model.layers[src][shared]:named_parameters("", true, false) do ties[prefix .. name] = from .. name end
   end
   rawset(self, "tied_weights", ties)
end

function ZambaForCausalLM:read_config(source) return M.zamba_config(source) end

--- {[layer] = the layer whose block it reuses} (1-based), for the hybrid layers past the first user
-- of each block; none without tie_word_embeddings (transformers then ties nothing).
function ZambaForCausalLM:shared_block_users()
   local cfg, users = self.config, {}
   if not cfg.tie_word_embeddings then return users end
   local blocks = cfg.num_mem_blocks
   for j, layer in ipairs(cfg.hybrid_layers) do
      if j > blocks then users[layer] = cfg.hybrid_layers[(j - 1) % blocks + 1] end
   end
   return users
end

--- The head to the embedding and each reused block's weights to its first user's (tie_word_embeddings).
function ZambaForCausalLM:tie_weights()
   llama.LlamaForCausalLM.tie_weights(self)
   local layers, shared = self.model.layers, self.model.HybridLayer.shared_name
   for dst, src in pairs(self:shared_block_users()) do
      local into = layers[dst][shared]
      for name, p in layers[src][shared]:named_parameters("", true, false) do
         local path, leaf = name:match("^(.*)%.([^.]+)$")
         local m = path and into:get_submodule(path) or into
         m[leaf or name] = p
      end
   end
end

local Zamba2ForCausalLM = ZambaForCausalLM:extend("Zamba2ForCausalLM")
M.Zamba2ForCausalLM = Zamba2ForCausalLM
Zamba2ForCausalLM.family, Zamba2ForCausalLM.Model = "zamba2", Zamba2Model
Zamba2ForCausalLM.no_split_modules = { "Zamba2HybridLayer", "Zamba2MambaDecoderLayer" }
Zamba2ForCausalLM.forward = common.causal_lm_forward("models.zamba2.forward", "model", "embed_tokens")

function Zamba2ForCausalLM:read_config(source) return M.zamba2_config(source) end

return M
