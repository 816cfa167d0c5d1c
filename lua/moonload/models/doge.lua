--- Doge (DogeForCausalLM, model_type "doge": SmallDoge/Doge-320M and its smaller siblings) with
-- Hugging Face parameter names, as transformers builds it.
--
-- Attention: Llama's rotary grouped-query attention with Qwen3's per-head q/k RMSNorms, and dynamic
-- mask attention: each kv head's cached values through dt_proj give every key a score bias
-- exp(A * softplus(dt)) (A a learned rate per kv head), added to the scores of that head's queries;
-- past keep_window_size keys, a query attends only to the keep_window_size it may see of highest
-- bias (top-k over the keys left by the causal and padding masks). Keys whose bias is within a
-- relative TIE_TOLERANCE of the last one chosen are kept with it: the biases of a repeated token in the
-- first layer are equal but for rounding, which differs with the batch's shape (transformers keeps
-- exactly keep_window_size, the tied ones in the order of torch's topk).
--
-- Layers: pre-norm, their residuals scaled by learned vectors: x = input_residual * x + attention,
-- then x = post_attention_residual * x + MLP. The MLP is Llama's SwiGLU (mlp_bias), or with is_moe
-- the cross-domain MoE (DogeCDMoE): that MLP as a shared expert plus routed experts that are rows of
-- down_embed and up_embed (num_experts of them), chosen by product keys: router_gate gives two sets
-- of floor(sqrt(num_experts)) key scores, expert x * keys + y scores the sum of key x of the first
-- set and key y of the second, and the top num_experts_per_tok by softmax weigh
-- act(down_embed[e] . h) * up_embed[e]. transformers splits router_gate's (tokens, 2 x keys) output
-- as one buffer of two halves, so the first set of a token is the scores of another token as soon as
-- a forward holds more than one (rows of a batch, decoding, included); the checkpoints were trained
-- so and it is kept here, which a block schedule (it would mix other tokens) cannot be.
local nn = require("moonload.nn")
local common = require("moonload.models.common")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.doge"

-- DogeConfig's defaults (Doge-320M's) where Llama's reader would take others.
local DEFAULTS = { vocab_size = 32768, hidden_size = 1024, intermediate_size = 2048, num_hidden_layers = 32,
   num_attention_heads = 8 }

--- Reads and checks a Doge config (path, folder or table) with DogeConfig's defaults: Llama's keys,
-- keep_window_size, and with is_moe the routed experts (num_experts, num_experts_per_tok,
-- norm_topk_prob) as cfg.expert_keys and cfg.top_k. sliding_window is refused.
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local cfg = llama.config(fixed, "doge")
   cfg._source, cfg._raw = src, raw
   cfg.qk_norm = true
   if cfg.sliding_window ~= nil then
      config.fail(cfg, WHO, 'config key "sliding_window" is not supported (dynamic mask attention over a window), got %s',
         tostring(cfg.sliding_window))
   end
   cfg.keep_window_size = config.integer(cfg, WHO, "keep_window_size", cfg.keep_window_size or 2048, 1)
   for _, key in ipairs({ "is_moe", "norm_topk_prob" }) do
      if cfg[key] == nil then cfg[key] = false end
      if type(cfg[key]) ~= "boolean" then
         config.fail(cfg, WHO, 'config key "%s" must be a boolean, got %s', key, tostring(cfg[key]))
      end
   end
   if cfg.is_moe then
      cfg.num_experts = config.integer(cfg, WHO, "num_experts", cfg.num_experts or 16384, 1)
      cfg.expert_keys = math.floor(math.sqrt(cfg.num_experts))
      cfg.top_k = config.integer(cfg, WHO, "num_experts_per_tok", cfg.num_experts_per_tok or 64, 1)
      if cfg.top_k > cfg.expert_keys * cfg.expert_keys then
         config.fail(cfg, WHO, "num_experts_per_tok %d is more than the %d experts that %d x %d product keys reach",
            cfg.top_k, cfg.expert_keys * cfg.expert_keys, cfg.expert_keys, cfg.expert_keys)
      end
   end
   return cfg
end

-- --- dynamic mask attention -------------------------------------------------------------------

local Attention = llama.LlamaAttention:extend("DynamicMaskAttention")
M.DynamicMaskAttention = Attention

--- How close (relative) a key's bias must come to the last one a query keeps to be kept too.
M.TIE_TOLERANCE = 1e-5

function Attention:__init(cfg, layer_idx)
   llama.LlamaAttention.__init(self, cfg, layer_idx)
   local Hkv = cfg.num_key_value_heads
   self.A = nn.Module.new_parameter({ Hkv })
   self.dt_proj = nn.Linear(Hkv * cfg.head_dim, Hkv, { bias = cfg.attention_bias })
   rawset(self, "keep_window", cfg.keep_window_size)
end

--- For memory planning (utils/runtime_memory.lua): the cache is Llama's; the score bias (B, H, L, S)
-- is formed as a tensor, as scores would be.
function Attention:kv_cache_heads()
   return self.n_kv_head, self.head_dim, self.n_head, true
end

--- The additive score mask (B, H, L, S) of L queries over the S cached values v (B, Hkv, S, D): each
-- key's bias exp(A * softplus(dt_proj(v))), -inf where causality or padding (pad (B, S) or nil)
-- hides the key or, past keep_window_size keys, where it is not among a query's highest (or tied
-- with the last of them: TIE_TOLERANCE).
function Attention:dynamic_mask(v, L, pad)
   local B, Hkv, S, D = v:size(1), v:size(2), v:size(3), v:size(4)
   local dt = self.dt_proj(v:transpose(2, 3):reshape(B, S, Hkv * D))                  -- (B, S, Hkv)
   local bias = (dt:softplus() * self.A):exp():transpose(2, 3):unsqueeze(3):expand(B, Hkv, L, S)
   local seen = common.attention_mask(L, S, pad, nil, v.device)                       -- (L, S), (B, 1, L, S) or nil
   if seen then bias = bias:masked_fill(seen:logical_not(), -math.huge) end
   if S > self.keep_window then
      local kth = bias:topk(self.keep_window, -1):narrow(4, self.keep_window, 1)      -- (B, Hkv, L, 1)
      bias = bias:masked_fill(bias:lt(kth * (1 - M.TIE_TOLERANCE)), -math.huge)      -- (biases are > 0)
   end
   local H = self.n_head
   return bias:unsqueeze(3):expand(B, Hkv, H / Hkv, L, S):reshape(B, H, L, S)
end

--- q (B, H, L, D) over the cached k, v (B, Hkv, S, D) under the dynamic mask: (B, L, H * D).
function Attention:attend_heads(q, k, v, past, pad)
   if rawget(k, "_q8_scales") then                                                    -- an int8 cache
      local floats = require("moonload.models.kv_cache").floats
      k, v = floats(k, q.dtype), floats(v, q.dtype)
   end
   local B, H, L = q:size(1), q:size(2), q:size(3)
   if pad and pad.device ~= q.device then pad = pad:to(q.device) end
   local mask = self:dynamic_mask(v.device == q.device and v or v:to(q.device), L, pad)
   local qa, ma, back = common.queries_to_keys(q, k, mask)
   local y = common.attention(qa, k, v, ma, false, self.scale)                        -- (B, H, L, D)
   if back then y = y:to(back) end
   return y:transpose(2, 3):reshape(B, L, H * self.head_dim)
end

-- --- cross-domain MoE -------------------------------------------------------------------------

local CDMoE = nn.Module:extend("DogeCDMoE")
M.DogeCDMoE = CDMoE

function CDMoE:__init(cfg)
   nn.Module.__init(self)
   local hidden, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
   self.gate_proj = nn.Linear(hidden, I, { bias = bias })
   self.up_proj = nn.Linear(hidden, I, { bias = bias })
   self.down_proj = nn.Linear(I, hidden, { bias = bias })
   self.router_gate = nn.Linear(hidden, 2 * cfg.expert_keys, { bias = false })
   self.down_embed = nn.Embedding(cfg.num_experts, hidden)
   self.up_embed = nn.Embedding(cfg.num_experts, hidden)
   self.act_fn = common.activation_module(cfg.hidden_act, WHO, cfg._source)
   rawset(self, "keys", cfg.expert_keys)
   rawset(self, "top_k", cfg.top_k)
   rawset(self, "norm_topk_prob", cfg.norm_topk_prob)
end

--- x (B, T, hidden): the shared expert's output plus the routed experts'.
function CDMoE:forward(x)
   local B, L, hidden = x:size(1), x:size(2), x:size(3)
   local N, K = B * L, self.keys
   -- (transformers' view of the (N, 2K) logits as (2, N, K): the buffer's halves, not each token's)
   local logits = self.router_gate(x):contiguous():view(2, N, K)
   local sums = logits:select(1, 1):unsqueeze(3) + logits:select(1, 2):unsqueeze(2)  -- (N, K, K)
   local scores, experts = sums:reshape(N, K * K):topk(self.top_k, -1)                -- expert x * K + y
   local weights = scores:softmax(-1)
   if self.norm_topk_prob then weights = weights / weights:sum(-1, true) end
   local down, up = self.down_embed(experts), self.up_embed(experts)                   -- (N, k, hidden)
   local h = self.act_fn(down:matmul(x:reshape(N, hidden, 1)):squeeze(3)) * weights    -- (N, k)
   local routed = h:unsqueeze(2):matmul(up):view(B, L, hidden)
   return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) + routed
end

-- --- layers and models ------------------------------------------------------------------------

local MLP = llama.LlamaMLP:extend("DogeMLP")
M.DogeMLP = MLP

local function mlp(cfg, layer_idx) return cfg.is_moe and CDMoE(cfg) or MLP(cfg, layer_idx) end

local LM = moe.decoder_family("doge", "Doge", Attention, mlp, "mlp", M.config, M)
local Layer, Model = M.DogeDecoderLayer, M.DogeModel

function Layer:__init(cfg, layer_idx)
   llama.LlamaDecoderLayer.__init(self, cfg, layer_idx)
   self.input_residual = nn.Module.new_parameter({ cfg.hidden_size })
   self.post_attention_residual = nn.Module.new_parameter({ cfg.hidden_size })
end

function Layer:forward(x, cos, sin, cache, pad)
   x = x * self.input_residual + self.self_attn(self.input_layernorm(x), cos, sin, cache, pad)
   return x * self.post_attention_residual + self.mlp(self.post_attention_layernorm(x))
end

--- Llama's forward; with is_moe, a block schedule that would cut the batch or the prompt is refused.
function Model:forward(input_ids, cache, pad, pos, blocks)
   if blocks and self.config.is_moe then
      local B, L = input_ids:size(1), input_ids:size(2)
      if L > 1 and ((blocks.micro_batch_size or B) < B or (blocks.prefill_chunk_size or L) < L) then
         error(WHO .. ": a block schedule (micro_batch_size, prefill_chunk_size) is not supported with is_moe: "
            .. "its router mixes the scores of the forward's tokens, as transformers' does", 0)
      end
   end
   return llama.LlamaModel.forward(self, input_ids, cache, pad, pos, blocks)
end

M.DogeForCausalLM = LM
return M
