--- Llama 4 (Llama4ForCausalLM, model_type "llama4_text"; and the language model of "llama4"
-- folders, Llama4ForConditionalGeneration: Llama-4-Scout-17B-16E, Llama-4-Maverick-17B-128E) with
-- Hugging Face parameter names. Llama's grouped-query attention, except that:
-- - the rotary embedding turns pairs of neighbouring dims (complex numbers, as Meta's code), and
--   only on the layers no_rope_layers marks 1: every no_rope_layer_interval-th layer has no
--   position embedding at all (NoPE);
-- - on the rotary layers, queries and keys are RMS-normalized after rotating, without a weight
--   (use_qk_norm), and attention stays inside chunks of attention_chunk_size positions, counted
--   from each row's first real token;
-- - on the NoPE layers, which attend to every key, queries are scaled by
--   1 + attn_scale * log(1 + floor((p + 1) / floor_scale)) for cache slot p (attn_temperature_tuning).
-- The feed-forward (feed_forward) is a dense MLP of intermediate_size_mlp, or on moe_layers (every
-- interleave_moe_layer_step-th) a shared expert plus num_local_experts experts stacked per
-- projection as x @ W multiplies them, (E, hidden, 2 x inter) and (E, inter, hidden); the router
-- picks each token's num_experts_per_tok best logits, and the chosen experts take the token
-- multiplied by sigmoid(logit) on the way in (not their outputs weighted after).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local F = require("moonload.nn.functional")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.llama4"

-- A per-layer list from the config (0/1 flags or booleans), or nil when the file has none.
local function layer_flags(cfg, key, n)
   local list = cfg[key]
   if list == nil or (type(list) == "table" and #list == 0) then return nil end
   if type(list) ~= "table" or #list ~= n then config.fail(cfg, WHO, 'config key "%s" must list %d layers', key, n) end
   local out = {}
   for i, v in ipairs(list) do
      if v ~= 0 and v ~= 1 and type(v) ~= "boolean" then
         config.fail(cfg, WHO, '%s[%d] must be 0 or 1, got %s', key, i, tostring(v))
      end
      out[i] = v == 1 or v == true
   end
   return out
end

--- Reads and checks a Llama 4 text config (path, folder or table; a "llama4" folder's
-- text_config). Per layer (1-based): cfg.nope_layers (true: no rotary, as models/llama.lua reads
-- it), cfg.layer_chunks (chunk
-- size or false) and cfg.sparse_layers.
function M.config(source)
   local cfg = llama.config(source, "llama4_text")
   local n = cfg.num_hidden_layers
   local function int(v, name, min) return config.integer(cfg, WHO, name, v, min) end
   cfg.num_experts = int(cfg.num_local_experts == nil and 16 or cfg.num_local_experts, "num_local_experts", 1)
   cfg.num_experts_per_tok = int(cfg.num_experts_per_tok or 1, "num_experts_per_tok", 1)
   if cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_local_experts %d", cfg.num_experts_per_tok, cfg.num_experts)
   end
   cfg.moe_intermediate_size = cfg.intermediate_size                -- (the experts' and the shared expert's width)
   cfg.intermediate_size_mlp = int(cfg.intermediate_size_mlp == nil and 16384 or cfg.intermediate_size_mlp,
      "intermediate_size_mlp", 1)
   -- NoPE layers: every no_rope_layer_interval-th unless no_rope_layers lists them (1 = rotary)
   local interval = int(cfg.no_rope_layer_interval or 4, "no_rope_layer_interval", 1)
   local rope = layer_flags(cfg, "no_rope_layers", n)
   cfg.nope_layers = {}
   for i = 1, n do
      if rope then cfg.nope_layers[i] = not rope[i] else cfg.nope_layers[i] = i % interval == 0 end
   end
   cfg.rope_pairs_interleaved = true               -- (Meta's pairs: neighbouring dims)
   -- sparse layers: moe_layers (0-based) or every interleave_moe_layer_step-th
   cfg.sparse_layers = {}
   if cfg.moe_layers ~= nil then
      if type(cfg.moe_layers) ~= "table" then config.fail(cfg, WHO, 'config key "moe_layers" must be a list of layer indices') end
      for _, i in ipairs(cfg.moe_layers) do
         if type(i) ~= "number" or i ~= math.floor(i) or i < 0 or i >= n then
            config.fail(cfg, WHO, "moe_layers names layer %s, but the model has layers 0 to %d", tostring(i), n - 1)
         end
         cfg.sparse_layers[i + 1] = true
      end
   else
      local step = int(cfg.interleave_moe_layer_step or 1, "interleave_moe_layer_step", 1)
      for i = 1, n do cfg.sparse_layers[i] = i % step == 0 end
   end
   for i = 1, n do cfg.sparse_layers[i] = cfg.sparse_layers[i] == true end
   -- chunked attention on the rotary layers (layer_types, when the file has it, says which; JSON's
   -- null reads as absent: transformers' default 8192)
   local chunk = int(cfg.attention_chunk_size or 8192, "attention_chunk_size", 1)
   local types = config.layer_types(cfg, WHO, { "full_attention", "chunked_attention" },
      function(i) return cfg.nope_layers[i] and "full_attention" or "chunked_attention" end)
   cfg.layer_chunks = {}
   for i = 1, n do cfg.layer_chunks[i] = types[i] == "chunked_attention" and chunk or false end
   cfg.use_qk_norm = cfg.use_qk_norm ~= false
   cfg.attn_temperature_tuning = cfg.attn_temperature_tuning ~= false
   local function number(name, default, min)
      local v = cfg[name]
      if v == nil then v = default end
      if type(v) ~= "number" or v < min then
         config.fail(cfg, WHO, 'config key "%s" must be a number >= %s, got %s', name, tostring(min), tostring(v))
      end
      return v
   end
   cfg.floor_scale = number("floor_scale", 8192, 1)
   cfg.attn_scale = number("attn_scale", 0.1, 0)
   return cfg
end

-- --- attention ------------------------------------------------------------------------------------

--- The boolean mask (true = attend) of L queries at slots past .. past + L - 1 over S keys when
-- attention stays inside chunks of C positions: a query sees the keys from its chunk's first
-- position up to itself. Positions count from each row's first real token (pad (B, S) bool,
-- left padding, or nil), as transformers' chunked_overlay does. (B or 1, 1, L, S).
function M.chunk_mask(L, S, past, C, pad, device)
   local leads = { 0 }
   if pad then leads = pad:to("int64"):cumsum(2):eq(0):to("int64"):sum(2):tolist() end
   local firsts = {}
   for b, lead in ipairs(leads) do
      local row = {}
      for t = 1, L do
         local slot = past + t - 1
         row[t] = slot - (slot - lead) % C          -- (Lua's % floors, as Python's //)
      end
      firsts[b] = row
   end
   local first = T.tensor(firsts, { dtype = "int64", device = device }):view(#leads, 1, L, 1)
   local in_chunk = T.arange(0, S, { device = device }):view(1, 1, 1, S):ge(first)
   local causal = pad and common.padded_causal_mask(pad, L, S)
      or T.ones({ L, S }, { dtype = "bool", device = device }):tril(S - L)
   return causal:logical_and(in_chunk)
end

local function setup_attention(Attention)
   local Base = llama.LlamaAttention

   function Attention:__init(cfg, layer_idx)
      Base.__init(self, cfg, layer_idx)
      local rope = not self.nope                      -- (attention_geometry's flags: nope, pairs_interleaved)
      rawset(self, "chunk", cfg.layer_chunks[layer_idx] or nil)
      rawset(self, "qk_norm_eps", cfg.use_qk_norm and rope and cfg.rms_norm_eps or nil)
      rawset(self, "temperature", not rope and cfg.attn_temperature_tuning)
   end

   --- x (B, T, hidden); on a rotary layer cos, sin (T, D) or (B, 1, T, D); on a NoPE layer cos
   -- is the queries' temperature (T, 1) (Llama4TextModel:layer_rotary); cache optional; pad
   -- (B, past + T) or nil.
   function Attention:forward(x, cos, sin, cache, pad)
      local B, L = x:size(1), x:size(2)
      local D = self.head_dim
      local q, k, v = self:project(x, B, L)
      q, k, v = q:transpose(2, 3), k:transpose(2, 3), v:transpose(2, 3) -- (B, H, T, D), (B, Hkv, T, D)
      if not self.nope then
         if self.pairs_interleaved then q, k = self:deinterleave(q), self:deinterleave(k) end
         q, k = llama.apply_rotary(q, cos, sin), llama.apply_rotary(k, cos, sin)
         local eps = self.qk_norm_eps
         if eps then q, k = F.rms_norm(q, { D }, nil, eps), F.rms_norm(k, { D }, nil, eps) end
      elseif self.temperature then
         q = q.dtype == cos.dtype and q * cos or (q:float() * cos:float()):to(q.dtype)
      end
      local past = 0
      if cache then
         past = cache.length
         k, v = cache:update(self.layer_idx, k, v)
      end
      return self.o_proj(self:attend_heads(q, k, v, past, pad))
   end

   --- Causal attention, inside chunks on the chunked layers. Without padding, the keys before
   -- the first query's chunk are left out, so a decoding step reads its chunk's keys alone.
   function Attention:attend(q, k, v, past, pad)
      local C = self.chunk
      if not C then return Base.attend(self, q, k, v, past, pad) end
      local L, S = q:size(-2), k:size(-2)
      if not pad and not rawget(k, "_q8_scales") then
         local first = past - past % C
         if first > 0 then
            k, v = k:narrow(-2, first + 1, S - first), v:narrow(-2, first + 1, S - first)
            past, S = past - first, S - first
         end
         if past + L <= C then return common.gqa_attention(q, k, v, past, self.scale) end
      end
      return common.attention(q, k, v, M.chunk_mask(L, S, past, C, pad, q.device), false, self.scale)
   end
end

-- --- the feed-forward -----------------------------------------------------------------------------

local Llama4TextMLP = moe.Qwen3MoeMLP:extend("Llama4TextMLP")
M.Llama4TextMLP = Llama4TextMLP

--- The experts, stacked as the hub stores them: gate_up_proj (E, hidden, 2 x inter), down_proj
-- (E, inter, hidden); each takes its rows already weighted by the router.
local Llama4TextExperts = moe.StackedExperts:extend("Llama4TextExperts")
M.Llama4TextExperts = Llama4TextExperts

function Llama4TextExperts:__init(cfg)
   moe.StackedExperts.__init(self, cfg, WHO, "in_out")
end

function Llama4TextExperts:forward(flat, top_w, top_i)
   return moe.run_expert_method(self, flat, top_w, top_i, true)
end

local Llama4TextMoe = moe.SparseMoeBlock:extend("Llama4TextMoe")
M.Llama4TextMoe = Llama4TextMoe

function Llama4TextMoe:__init(cfg)
   nn.Module.__init(self)
   self.experts = Llama4TextExperts(cfg)
   self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   self.shared_expert = Llama4TextMLP(cfg, cfg.intermediate_size)
   self:routing(cfg)
end

--- Each row's top_k experts by router logit, weighted by sigmoid(logit) (float32).
function Llama4TextMoe:route(flat)
   local top_v, top_i = self.router(flat):topk(self.top_k, 2)
   return top_v:float():sigmoid(), top_i:tolist()
end

--- The routed experts take their rows weighted on the way in, stacked or (quantized) apart.
function Llama4TextMoe:routed(flat, top_w, top_i)
   local experts = self.experts
   if experts.takes_routing then return experts(flat, top_w, top_i) end
   return moe.run_experts(experts, flat, top_w, top_i, true)
end

function Llama4TextMoe:forward(x)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local flat = x:reshape(B * L, H)
   local top_w, top_i = self:route(flat)
   return (self.shared_expert(flat) + self:routed(flat, top_w, top_i)):view(B, L, H)
end

-- --- the model ------------------------------------------------------------------------------------

local function feed_forward(cfg, layer_idx)
   if cfg.sparse_layers[layer_idx] then return Llama4TextMoe(cfg) end
   return Llama4TextMLP(cfg, cfg.intermediate_size_mlp)
end

local LM = moe.decoder_family("llama4_text", "Llama4Text", llama.LlamaAttention, feed_forward, "feed_forward",
   M.config, M, "Llama4ForCausalLM")
setup_attention(M.Llama4TextAttention)

local Model = M.Llama4TextModel

function Model:forward(input_ids, cache, pad, pos, blocks)
   rawset(self, "_past", cache and cache.length or 0)         -- (the NoPE layers' temperature counts cache slots)
   return llama.LlamaModel.forward(self, input_ids, cache, pad, pos, blocks)
end

--- Per layer: the rotary layers' cos and sin for positions; the NoPE layers' query temperature
-- for the cache slots past .. past + T - 1 (transformers counts those, not the positions, so a
-- padded row is scaled as an unpadded one) as a (T, 1) float32 column, in the cos slot.
function Model:layer_rotary(positions, x)
   local cfg = self.config
   local cos, sin = self.rotary_emb(positions)
   local rope = { llama.rotary_for(cos, sin, x) }
   local nope
   local per_layer = {}
   for i = 1, cfg.num_hidden_layers do
      if not cfg.nope_layers[i] then
         per_layer[i] = rope
      else
         if not nope then
            local past, scales = rawget(self, "_past") or 0, {}
            for t = 1, x:size(2) do
               scales[t] = 1 + cfg.attn_scale * math.log(1 + math.floor((past + t) / cfg.floor_scale))
            end
            local column = T.tensor(scales, { dtype = "float32", device = x.device }):view(x:size(2), 1)
            nope = { column, column }
         end
         per_layer[i] = nope
      end
   end
   return per_layer
end

-- "llama4" folders (Llama4ForConditionalGeneration): the language model under language_model.*,
-- its config in text_config; the vision tower and projector left out.
LM.checkpoint_renames = config.LANGUAGE_MODEL_RENAMES
LM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^vision_model%.", "^multi_modal_projector%.",
   "^model%.vision_model%.", "^model%.multi_modal_projector%." }

function LM:read_config(source)
   return config.read_text_config(source, WHO, { llama4 = true }, M.config)
end

return M
