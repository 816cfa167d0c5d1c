--- MiniMax-Text-01 (MiniMaxForCausalLM, model_type "minimax": MiniMax-Text-01, 456B) with Hugging
-- Face parameter names. A hybrid: layer_types says which layers have lightning attention (a linear
-- attention; by default every second layer, the first full) and which full attention (Mixtral's:
-- grouped-query attention with rotary embeddings over whole heads, a sliding window when the
-- config has one); every layer ends in Mixtral's sparse block (block_sparse_moe: experts w1/w2/w3,
-- the top num_experts_per_tok of a softmax router, renormalized).
--
-- The residual of each sublayer is taken after its norm, and mixed with the sublayer's output as
-- alpha x residual + beta x output (full_attn_, linear_attn_ and mlp_alpha_factor / beta_factor):
--    h = input_layernorm(x);            x = alpha_attn h + beta_attn attn(h)
--    h = post_attention_layernorm(x);   x = alpha_mlp h + beta_mlp moe(h)
--
-- Lightning attention (self_attn.*): qkv_proj through hidden_act gives per head q, k, v side by
-- side; each head keeps a (head_dim x head_dim) state S, decayed by exp(-slope) each token and
-- added k^T v; the token reads q S (no softmax, no scale). slope = 2^(-8 h / H) for head h =
-- 1..H, times 1 - layer / (layers - 1) (0-based layer: the last layer hardly decays). A prompt runs
-- by blocks of block_size tokens: inside a block (q k^T, decayed by distance) v, plus the state
-- carried from earlier blocks read by q decayed by its place in the block; a decoding step runs
-- the recurrence itself. The heads' outputs go through one RMSNorm over all of them (eps 1e-6,
-- whatever rms_norm_eps says), times sigmoid(output_gate(h)), then out_proj. Left padding enters
-- as zero q, k, v (transformers masks them after the activation), so it leaves the state empty.
-- A left-padded row decodes as it would alone; transformers 5.24 does so only when the first layer
-- is a full one (else it sizes its decoding masks by that layer's empty keys, and a padded row's
-- full layers see no key with sdpa, every key with eager).
--
-- transformers saves the decays with the weights (persistent buffers slope_rate, query_decay,
-- key_decay, diagonal_decay): they are held and used as the checkpoint has them, or computed as
-- transformers computes them for a checkpoint without them.
--
-- A generation's cache holds, for the linear layers, S in float32 (models/kv_cache.lua's
-- layer_state: heads x head_dim^2 x 4 bytes, 4 MB per layer and sequence on the hub's model)
-- whatever the length; it cannot be cropped back, so assisted generation is refused (as
-- transformers' MiniMaxCache refuses crop).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.minimax"
local KINDS = { "linear_attention", "full_attention" }

--- Reads and checks a MiniMax config (path, folder or table): Mixtral's keys (num_local_experts,
-- num_experts_per_tok; transformers' defaults 8 and 2), layer_types, block_size and the six
-- residual factors.
function M.config(source)
   local raw, _, fixed = config.read_with_defaults(source, WHO, { num_experts_per_tok = 2 })
   if raw.num_local_experts == nil and raw.num_experts == nil then fixed.num_local_experts = 8 end
   local cfg = moe.config(fixed, "minimax")
   config.integer(cfg, WHO, "num_local_experts", cfg.num_experts, 1)
   cfg.moe_intermediate_size = cfg.intermediate_size     -- (MiniMaxExperts: intermediate_size wide)
   cfg.norm_topk_prob = true                             -- (its router always renormalizes)
   cfg.rotary_dim = cfg.head_dim      -- (transformers' MiniMax rotates whole heads, whatever partial_rotary_factor says)
   config.layer_types(cfg, WHO, KINDS, function(i) return i % 2 == 1 and "full_attention" or "linear_attention" end)
   cfg.block_size = config.integer(cfg, WHO, "block_size", cfg.block_size == nil and 256 or cfg.block_size, 1)
   for _, part in ipairs({ "full_attn", "linear_attn", "mlp" }) do
      for _, side in ipairs({ "alpha", "beta" }) do
         local key = part .. "_" .. side .. "_factor"
         local v = cfg[key] == nil and 1 or cfg[key]
         if type(v) ~= "number" then config.fail(cfg, WHO, 'config key "%s" must be a number, got %s', key, tostring(v)) end
         cfg[key] = v
      end
   end
   return cfg
end

-- --- lightning attention -------------------------------------------------------------------------

--- The decays of layer layer_idx (1-based) of n_layers with H heads and blocks of `block` tokens,
-- float32, as transformers' get_slope_rate and decay_factors make them: slope (H, 1, 1); query
-- (H, block, 1) = exp(-slope (i + 1)); key (H, block, 1) = exp(-slope (block - i - 1)); diagonal
-- (1, H, block, block) = exp(-slope (i - j)) for i >= j, else 0 (i, j 0-based places in a block).
function M.decays(H, layer_idx, n_layers, block)
   local base = 1 / 2 ^ (8 / H)
   local rates = {}
   for h = 1, H do rates[h] = base ^ h end
   local factor = 1 - (layer_idx - 1) / (n_layers - 1 + 1e-5) + 1e-5
   local slope = (T.tensor(rates, { dtype = "float32" }) * factor):view(H, 1, 1)
   local pos = T.arange(1, block + 1, { dtype = "float32" }):view(block, 1)          -- (block, 1)
   local diff = (pos - pos:view(1, block)) * slope                                   -- (H, block, block)
   return { slope_rate = slope, query_decay = (-slope * pos):exp(), key_decay = (-slope * (block - pos)):exp(),
      diagonal_decay = (-diff):masked_fill(diff:lt(0), -math.huge):exp():unsqueeze(1) }
end

local DECAYS = { "slope_rate", "query_decay", "key_decay", "diagonal_decay" }

local MiniMaxLightningAttention = nn.Module:extend("MiniMaxLightningAttention")
M.MiniMaxLightningAttention = MiniMaxLightningAttention
-- (bfloat16 decays would lose the small slopes of the late layers)
MiniMaxLightningAttention.keep_float32_buffers = { slope_rate = true, query_decay = true, key_decay = true,
   diagonal_decay = true }

--- MiniMaxLightningAttention(cfg, layer_idx): cfg.decays_stored false makes the decays
-- non-persistent buffers (a checkpoint without them).
function MiniMaxLightningAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, D = cfg.num_attention_heads, cfg.head_dim
   self.act_fn = common.activation_module(cfg.hidden_act, WHO, cfg._source)
   self.norm = nn.RMSNorm(H * D)                       -- (transformers' default eps, 1e-6)
   self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * H * D, { bias = false })
   self.out_proj = nn.Linear(H * D, cfg.hidden_size, { bias = false })
   self.output_gate = nn.Linear(cfg.hidden_size, H * D, { bias = false })
   local stored = cfg.decays_stored ~= false
   local d
   if stored and self.qkv_proj.weight:is_meta() then    -- (built to be loaded: the checkpoint brings them)
      local B = cfg.block_size
      d = { slope_rate = T.empty({ H, 1, 1 }), query_decay = T.empty({ H, B, 1 }), key_decay = T.empty({ H, B, 1 }),
         diagonal_decay = T.empty({ 1, H, B, B }) }
   else
      d = M.decays(H, layer_idx, cfg.num_hidden_layers, cfg.block_size)
   end
   for _, name in ipairs(DECAYS) do self:register_buffer(name, d[name], stored) end
   rawset(self, "n_head", H)
   rawset(self, "head_dim", D)
   rawset(self, "block_size", cfg.block_size)
   rawset(self, "layer_idx", layer_idx)
end

--- Bytes a cache keeps for this layer per batch of B sequences (utils/runtime_memory.lua): the
-- float32 state, whatever the length.
function MiniMaxLightningAttention:state_bytes(B)
   return B * self.n_head * self.head_dim * self.head_dim * 4
end

--- Values a forward forms per token at once, beside the layer's input and MLP (for memory
-- planning): q/k/v as projected, activated, masked and in float32, the block's scores and their
-- decayed copy, the outputs within and across blocks, their sum and concatenation, and the
-- normed, gated output.
function MiniMaxLightningAttention:token_values()
   return 20 * self.n_head * self.head_dim + 2 * self.n_head * self.block_size
end

--- A decay buffer as float32 on device (where the state is computed).
function MiniMaxLightningAttention:decay(name, device)
   local t = self[name]
   if t.dtype ~= "float32" then t = t:float() end
   if t.device ~= device then t = t:to(device) end
   return t
end

--- q, k, v (B, H, L, D) float32 read against S (B, H, D, D) float32 or nil (none yet) by blocks,
-- as transformers' prompt path: -> outputs (B, H, L, D), the state after them.
function MiniMaxLightningAttention:blocks(q, k, v, S)
   local L, bs, dev = q:size(3), self.block_size, q.device
   local slope = self:decay("slope_rate", dev)
   local query, key, diagonal = self:decay("query_decay", dev), self:decay("key_decay", dev), self:decay("diagonal_decay", dev)
   local out = {}
   for start = 1, L, bs do
      local c = math.min(bs, L - start + 1)
      local qb, kb, vb = q:narrow(3, start, c), k:narrow(3, start, c), v:narrow(3, start, c)
      local kt = kb:transpose(3, 4)
      -- within the block: (q k^T, decayed by distance) v
      local y = (qb:matmul(kt) * diagonal:narrow(3, 1, c):narrow(4, 1, c)):matmul(vb)
      -- across blocks: q, decayed by its place in the block, reads the state so far
      if S then y = y + (qb * query:narrow(2, 1, c)):matmul(S) end
      out[#out + 1] = y
      local add = (kb * key:narrow(2, bs - c + 1, c)):transpose(3, 4):matmul(vb)
      S = S and S * (-slope * c):exp() + add or add
   end
   return #out == 1 and out[1] or T.cat(out, 3), S
end

--- One token (L = 1) after the state S (B, H, D, D): S <- exp(-slope) S + k^T v, read by q, as
-- transformers' decoding path. -> output (B, H, 1, D), the new state.
function MiniMaxLightningAttention:step(q, k, v, S)
   S = self:decay("slope_rate", q.device):neg():exp() * S + k:transpose(3, 4):matmul(v)
   return q:matmul(S), S
end

--- x (B, L, hidden); cache optional (the state carries over); pad (B, past + L) bool or nil:
-- padding tokens enter as zero q, k, v.
function MiniMaxLightningAttention:forward(x, cache, pad)
   local B, L = x:size(1), x:size(2)
   local H, D = self.n_head, self.head_dim
   local qkv = self.act_fn(self.qkv_proj(x))                                      -- (B, L, 3 H D)
   if pad and L > 1 then qkv = qkv * pad:narrow(2, pad:size(2) - L + 1, L):to(qkv.dtype):unsqueeze(3) end
   qkv = qkv:view(B, L, H, 3 * D):transpose(2, 3):float()                           -- (B, H, L, 3 D)
   local q, k, v = qkv:narrow(4, 1, D), qkv:narrow(4, D + 1, D), qkv:narrow(4, 2 * D + 1, D)
   local state, S
   if cache then
      state = cache:layer_state(self.layer_idx, B, function(rows)
         -- the decayed sum of k^T v (transformers' linear_cache); zero: as no state at all
         return { kv = T.zeros({ rows, H, D, D }, { dtype = "float32", device = x.device }) }
      end)
      S = state.kv
      if S.device ~= x.device then S = S:to(x.device) end
   end
   local y
   if L == 1 and S then y, S = self:step(q, k, v, S) else y, S = self:blocks(q, k, v, S) end
   if state then state.kv:copy_(S) end
   y = y:to(x.dtype):transpose(2, 3):reshape(B, L, H * D)
   return self.out_proj(self.output_gate(x):sigmoid() * self.norm(y))
end

-- --- layers and model ----------------------------------------------------------------------------

local MiniMaxSparseMoeBlock = moe.MixtralSparseMoeBlock:extend("MiniMaxSparseMoeBlock")
M.MiniMaxSparseMoeBlock = MiniMaxSparseMoeBlock

local LM = moe.decoder_family("minimax", "MiniMax", llama.LlamaAttention, MiniMaxSparseMoeBlock, "block_sparse_moe",
   M.config, M)
LM.stateful = true            -- its cache cannot be cropped: no assisted generation
local Layer = M.MiniMaxDecoderLayer
Layer.LinearAttention = MiniMaxLightningAttention

function Layer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local linear = cfg.layer_types[layer_idx] == "linear_attention"
   self.self_attn = (linear and self.LinearAttention or self.Attention)(cfg, layer_idx)
   self.input_layernorm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.post_attention_layernorm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.block_sparse_moe = self.MLP(cfg, layer_idx)
   local attn = linear and "linear_attn" or "full_attn"
   rawset(self, "linear", linear)
   rawset(self, "factors", { attn_alpha = cfg[attn .. "_alpha_factor"], attn_beta = cfg[attn .. "_beta_factor"],
      mlp_alpha = cfg.mlp_alpha_factor, mlp_beta = cfg.mlp_beta_factor })
end

-- x * a, leaving x as it is when a is 1 (transformers' product by 1.0 is exact too).
local function times(x, a) return a == 1 and x or x * a end

function Layer:forward(x, cos, sin, cache, pad)
   local f = self.factors
   local h = self.input_layernorm(x)
   local y
   if self.linear then y = self.self_attn(h, cache, pad) else y = self.self_attn(h, cos, sin, cache, pad) end
   h = self.post_attention_layernorm(times(h, f.attn_alpha) + times(y, f.attn_beta))
   return times(h, f.mlp_alpha) + times(self.block_sparse_moe(h), f.mlp_beta)
end

function Layer:extra_repr()
   local f = self.factors
   return string.format("attn_alpha=%s, attn_beta=%s, mlp_alpha=%s, mlp_beta=%s", nn.Module.py_float(f.attn_alpha),
      nn.Module.py_float(f.attn_beta), nn.Module.py_float(f.mlp_alpha), nn.Module.py_float(f.mlp_beta))
end

--- A checkpoint without the decay buffers (not saved by transformers' save_pretrained) builds
-- them as non-persistent buffers, computed.
function LM.build_opts_for(names)
   for _, name in ipairs(names) do
      if name:find("%.self_attn%.slope_rate$") then return nil end
   end
   return { decays_stored = false }
end

function LM:__init(cfg, opts)
   rawset(self, "_decays_stored", not (opts and opts.decays_stored == false))
   llama.LlamaForCausalLM.__init(self, cfg)
end

function LM:read_config(source)
   local cfg = M.config(source)
   cfg.decays_stored = rawget(self, "_decays_stored")
   return cfg
end

return M
