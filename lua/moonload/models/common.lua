--- Pieces shared by the ml.models architectures: activations by Hugging Face name, attention
-- through the C kernel (causal, padded, grouped-query), token-id and mask conversion.
local C = require("moonload.C")
local T = require("moonload.tensor")

local lib, ffi = C.lib, C.ffi
local M = {}

-- --- activations (transformers' ACT2FN names) ----------------------------------------------

local ACT = {
   gelu = function(x) return x:gelu() end,
   gelu_new = function(x) return x:gelu("tanh") end,
   gelu_pytorch_tanh = function(x) return x:gelu("tanh") end,
   gelu_fast = function(x) return x:gelu("tanh") end,
   relu = function(x) return x:relu() end,
   silu = function(x) return x:silu() end,
   swish = function(x) return x:silu() end,
   tanh = function(x) return x:tanh() end,
   relu2 = function(x) return require("moonload.nn.functional").relu2(x) end,
   -- (as a function: xIELU at transformers' initial parameters; as a module its own, learned)
   xielu = function(x)
      local raw = function(v) return math.log(math.exp(v) - 1) end
      return require("moonload.nn.functional").xielu(x, raw(0.8), raw(0.3), 0.5, -1e-6)
   end,
}

-- The same activations as parameterless modules, so models register them under Hugging Face's
-- child names (GPT2MLP.act, LlamaMLP.act_fn, BertIntermediate.intermediate_act_fn) and
-- named_modules/device maps list the same keys as transformers.
local ACT_MODULE = {
   gelu = function(nn) return nn.GELU() end,
   gelu_new = function(nn) return nn.GELU({ approximate = "tanh" }) end,
   gelu_pytorch_tanh = function(nn) return nn.GELU({ approximate = "tanh" }) end,
   gelu_fast = function(nn) return nn.GELU({ approximate = "tanh" }) end,
   relu = function(nn) return nn.ReLU() end,
   silu = function(nn) return nn.SiLU() end,
   swish = function(nn) return nn.SiLU() end,
   tanh = function(nn) return nn.Tanh() end,
   relu2 = function(nn) return nn.ReLUSquaredActivation() end,
   xielu = function(nn) return nn.XIELUActivation() end,
}

--- The activation as an nn module (validated like M.activation).
function M.activation_module(name, who, src)
   M.activation(name, who, src)
   return ACT_MODULE[name](require("moonload.nn"))
end

--- The activation function for a Hugging Face `hidden_act` / `activation_function` name.
function M.activation(name, who, src)
   local f = ACT[name]
   if not f then
      local known = {}
      for k in pairs(ACT) do known[#known + 1] = k end
      table.sort(known)
      error(string.format('%s: activation "%s" in %s is not supported (supported: %s)',
         who, tostring(name), src or "config", table.concat(known, ", ")), 3)
   end
   return f
end

-- --- attention ------------------------------------------------------------------------------

local out1 = ffi.new("ml_tensor*[1]")

-- Query rows up to which attention reads an int8 cache's bytes directly (decoding, short
-- chunks); a longer input dequantizes the layer's keys and values once and runs the GEMMs.
M.Q8_DIRECT_ROWS = 32

--- softmax(q k^T * scale [+ mask]) v through the C kernel. q (..., L, E), k (..., S, E),
-- v (..., S, Ev) (or an int8 cache's views: models/kv_cache.lua); mask bool (true = attend)
-- broadcast to (..., L, S), or nil; sinks (H) a logit per query head joining each softmax
-- without a value (gpt-oss), or nil.
function M.attention(q, k, v, mask, is_causal, scale, sinks)
   local ks = rawget(k, "_q8_scales")
   local sc = sinks and sinks._c or nil
   if ks and q:size(-2) <= M.Q8_DIRECT_ROWS then
      C.check(lib.ml_sdpa_q8(q._c, k._c, ks._c, v._c, rawget(v, "_q8_scales")._c, mask and mask._c or nil, sc,
         is_causal and true or false, scale or 0, out1), 2)
      return T.wrap(out1[0])
   end
   if ks then
      local floats = require("moonload.models.kv_cache").floats
      k, v = floats(k, q.dtype), floats(v, q.dtype)
   end
   C.check(lib.ml_sdpa(q._c, k._c, v._c, mask and mask._c or nil, sc, is_causal and true or false,
      scale or 0, out1), 2)
   return T.wrap(out1[0])
end

--- The attention mask for L new queries over S = past + L keys when some keys are padding:
-- pad (B, S) bool, true = real token. Returns (B, 1, L, S) bool: causal and not padding; each
-- query also sees itself, so a padding query never has an empty row (its output is unused,
-- but NaN there would reach real rows through 0 * NaN in the next layer's attention).
function M.padded_causal_mask(pad, L, S)
   local B = pad:size(1)
   local causal = T.ones({ L, S }, { dtype = "bool", device = pad.device }):tril(S - L)
   local diagonal = causal:triu(S - L)
   return causal:logical_and(pad:view(B, 1, 1, S)):logical_or(diagonal)
end

--- The sliding-window band for L new queries over S keys (queries at the last L positions):
-- a query sees itself and the window - 1 keys before it (transformers' sliding_window_overlay,
-- kv > q - window). (L, S) bool.
function M.window_band(L, S, window, device)
   return T.ones({ L, S }, { dtype = "bool", device = device }):tril(S - L):triu(S - L - window + 1)
end

--- The boolean mask (true = attend) of causal attention for L new queries at the last L of S
-- positions, hiding padding keys (pad (B, S) bool) and keys more than window - 1 positions
-- before their query: (L, S) or (B, 1, L, S); nil when every query may see every key.
function M.attention_mask(L, S, pad, window, device)
   local band = window and S > window and M.window_band(L, S, window, device) or nil
   if pad then
      local mask = M.padded_causal_mask(pad, L, S)
      return band and mask:logical_and(band) or mask
   end
   if band then return band end
   if L == 1 then return nil end
   return T.ones({ L, S }, { dtype = "bool", device = device }):tril(S - L)
end

--- Causal attention of L new queries at positions past..past+L-1 over S = past + L keys.
-- Prefill (past 0) uses the kernel's causal flag; otherwise the mask above. pad (B, S) bool
-- (optional) hides padding keys; window (optional, Mistral and Qwen2's sliding attention) hides
-- keys more than window - 1 positions before their query; sinks (optional): see attention.
function M.causal_attention(q, k, v, past, scale, pad, window, sinks)
   local L, S = q:size(-2), k:size(-2)
   if past == 0 and L > 1 and not pad and not (window and S > window) then
      return M.attention(q, k, v, nil, true, scale, sinks)
   end
   return M.attention(q, k, v, M.attention_mask(L, S, pad, window, q.device), false, scale, sinks)
end

--- Grouped-query attention: q (B, H, L, D) against k, v (B, Hkv, S, D) with H = Hkv * n_rep.
-- The kernel reads query head h from key/value head h / n_rep (PyTorch's enable_gqa), so the
-- key/value heads are never repeated into copies.
function M.gqa_attention(q, k, v, past, scale, pad, window, sinks)
   return M.causal_attention(q, k, v, past, scale, pad, window, sinks)
end

-- --- token ids ------------------------------------------------------------------------------

--- Moves ids made from Lua lists (CPU) to the device of the embedding weight, when it has one
-- (a model moved with :to("cuda:0")); under hooks the weight is on meta and hooks move inputs.
function M.to_weight_device(ids, weight)
   local dev = weight.device
   if dev ~= "meta" and dev ~= ids.device then return ids:to(dev) end
   return ids
end

--- Token ids as an int64 tensor (B, T). Accepts a flat Lua list (batch 1), a list of equal-length
-- lists, or an integer tensor of 1 or 2 dims. Returns the tensor and how the input was shaped
-- ("flat", "nested" or "tensor") so results can come back in the same form.
function M.ids_tensor(ids, who)
   if T.is_tensor(ids) then
      local dt = ids.dtype
      if not (dt == "int64" or dt == "int32" or dt == "int16" or dt == "int8" or dt == "uint8") then
         error(string.format("%s: input_ids must be an integer tensor, got %s", who, dt), 3)
      end
      local nd = ids:dim()
      if nd == 1 then ids = ids:unsqueeze(1)
      elseif nd ~= 2 then
         error(string.format("%s: input_ids must have 1 or 2 dimensions (batch, sequence), got %d", who, nd), 3)
      end
      if dt ~= "int64" then ids = ids:to("int64") end
      return ids, "tensor"
   end
   if type(ids) ~= "table" or #ids == 0 then
      error(string.format("%s: input_ids must be a non-empty Lua list of 0-based token ids or an int64 tensor", who), 3)
   end
   local form = type(ids[1]) == "table" and "nested" or "flat"
   local rows = form == "nested" and ids or { ids }
   local n = #rows[1]
   if n == 0 then error(string.format("%s: input_ids has an empty sequence", who), 3) end
   for b = 1, #rows do
      local row = rows[b]
      if type(row) ~= "table" or #row ~= n then
         error(string.format("%s: input_ids rows must all have %d tokens (row %d differs)", who, n, b), 3)
      end
      for i = 1, n do
         local v = row[i]
         if type(v) ~= "number" or v ~= math.floor(v) or v < 0 then
            error(string.format("%s: input_ids[%d][%d] = %s is not a non-negative integer token id",
               who, b, i, tostring(v)), 3)
         end
      end
   end
   return T.tensor(rows, { dtype = "int64" }), form
end

--- Checks every id is below the vocabulary size (the embedding kernel would reject it too,
-- but with a less helpful message).
function M.check_vocab(ids, vocab, who)
   local mx = ids:max():item()
   local mn = ids:min():item()
   if mx >= vocab or mn < 0 then
      error(string.format("%s: token id %d is out of range for vocab_size %d (ids are 0-based)",
         who, mx >= vocab and mx or mn, vocab), 3)
   end
end

--- A 0/1 attention mask (Lua lists or a tensor) of shape (B, T) as a bool tensor.
function M.mask_tensor(mask, B, L, who)
   if not T.is_tensor(mask) then
      if type(mask) ~= "table" then
         error(string.format("%s: attention_mask must be a tensor or a Lua list", who), 3)
      end
      if type(mask[1]) ~= "table" then mask = { mask } end
      mask = T.tensor(mask, { dtype = "int64" })
   end
   if mask:dim() == 1 then mask = mask:unsqueeze(1) end
   local s = mask.shape
   if #s ~= 2 or s[1] ~= B or s[2] ~= L then
      error(string.format("%s: attention_mask has shape [%s], expected [%d, %d]",
         who, table.concat(s, ", "), B, L), 3)
   end
   if mask.dtype ~= "bool" then mask = mask:ne(0) end
   return mask
end

--- Reads the causal-model forward options shared by GPT-2 and Llama: the padding mask
-- (B, past + L) as bool or nil, and position ids (B, L) int64 or nil (= past .. past+L-1).
function M.causal_inputs(ids, opts, past, who)
   local B, L = ids:size(1), ids:size(2)
   local pad, pos
   if opts.attention_mask ~= nil then
      pad = M.mask_tensor(opts.attention_mask, B, past + L, who)
      if pad.device ~= ids.device then pad = pad:to(ids.device) end
   end
   if opts.position_ids ~= nil then
      pos = M.ids_tensor(opts.position_ids, who .. " (position_ids)")
      local s = pos.shape
      if s[2] ~= L or (s[1] ~= B and s[1] ~= 1) then
         error(string.format("%s: position_ids has shape [%s], expected [%d, %d]", who,
            table.concat(s, ", "), B, L), 3)
      end
      if pos.device ~= ids.device then pos = pos:to(ids.device) end
   end
   return pad, pos
end

--- Position ids as generate derives them from a padding mask (B, S): the count of real tokens
-- before each position (padding positions get 1, as transformers does), last L columns.
function M.positions_from_mask(mask, L)
   local m = mask:to("int64")
   local pos = m:cumsum(2) - 1
   pos = pos:masked_fill(m:eq(0), 1)
   return pos:narrow(2, pos:size(2) - L + 1, L)
end

-- --- causal language-model heads -----------------------------------------------------------

--- The forward method of a causal LM head (GPT2LMHeadModel, LlamaForCausalLM): base is the
-- field holding the base model, embed the base model's token-embedding field (a dotted path
-- for one further down: OPT's "decoder.embed_tokens"), head the output
-- projection's (default lm_head; GPT-NeoX's is embed_out). The method:
-- forward(input_ids[, {cache, attention_mask, position_ids, logits_to_keep, micro_batch_size,
-- prefill_chunk_size, output_hidden_states}]) -> logits (B, T, vocab), or (B, n, vocab) for the
-- last n positions only when logits_to_keep = n, or with output_hidden_states the base model's
-- last hidden states (B, T, hidden) instead. micro_batch_size and prefill_chunk_size run the layers in a block
-- schedule (models/block_schedule.lua). With embeds_first the base model is given the token
-- embeddings (B, T, hidden) instead of the ids: ZAYA's, which holds weights of its own, so that
-- its offload hook counts batch x sequence rows (hooks.set_compute_in_place), not the ids' batch.
function M.causal_lm_forward(who, base, embed, head, embeds_first)
   head = head or "lm_head"
   return function(self, input_ids, opts)
      opts = opts or {}
      local ids = M.ids_tensor(input_ids, who)
      -- generate's own steps feed back sampled tokens, in range by construction: skipping the
      -- check spares two device-to-host syncs per token on a GPU
      if not opts._ids_in_range then M.check_vocab(ids, self.config.vocab_size, who) end
      local model = self[base]
      local embedding = model
      for part in embed:gmatch("[^.]+") do embedding = embedding[part] end
      ids = M.to_weight_device(ids, embedding.weight)
      local cache = opts.cache
      local pad, pos = M.causal_inputs(ids, opts, cache and cache.length or 0, who)
      local blocks
      if opts.micro_batch_size or opts.prefill_chunk_size then
         require("moonload.models.block_schedule").check(opts, who)
         blocks = { micro_batch_size = opts.micro_batch_size, prefill_chunk_size = opts.prefill_chunk_size }
      end
      local keep = opts.logits_to_keep
      -- (keep: a model may skip what the other positions need no more, Gemma 4's last layers)
      local h = model(embeds_first and embedding(ids) or ids, cache, pad, pos, blocks,
         not opts.output_hidden_states and keep or nil)
      if opts.output_hidden_states then return h end              -- (embedding models pool these)
      if keep and keep > 0 and keep < h:size(2) then h = h:narrow(2, h:size(2) - keep + 1, keep) end
      return self[head](h)
   end
end

--- Raises "<who>: sequence of N tokens (past cached + L new) exceeds <key> <limit>" when past + L
-- positions do not fit a model's table of limit positions (config key `key`); level: error's.
function M.check_positions(who, past, L, limit, key, level)
   if past + L > limit then
      error(string.format("%s: sequence of %d tokens (%d cached + %d new) exceeds %s %d", who, past + L, past, L,
         key, limit), (level or 1) + 1)
   end
end

--- What a causal LM head class's methods are, set on cls: forward (causal_lm_forward over base,
-- embed and head), new_cache over config[layers_key] layers, max_length (config[positions_key],
-- nil without one: rotary and ALiBi models have no table of positions) and generate.
function M.causal_lm_methods(cls, who, base, embed, head, layers_key, positions_key)
   cls.forward = M.causal_lm_forward(who .. ".forward", base, embed, head)
   function cls:new_cache(capacity, device, dtype)
      return M.new_cache(self.config[layers_key], capacity, device, dtype)
   end
   function cls:max_length() return positions_key and self.config[positions_key] or nil end
   function cls.generate(...) return require("moonload.models.generation").generate(...) end
end

-- --- key-value cache ------------------------------------------------------------------------

--- A fresh key-value cache for n_layers layers, kept on device when given, stored as dtype
-- ("int8", or nil: as computed) (see models/kv_cache.lua).
function M.new_cache(n_layers, capacity, device, dtype)
   return require("moonload.models.kv_cache").new(n_layers, capacity, device, dtype)
end

--- x with the entries of its last dim reordered, the even ones first, then the odd ones: rotary
-- pairs of neighbouring dims (x0, x1), (x2, x3), ... (DeepSeek's, GLM-5's indexer's, Llama 4's)
-- become rotate_half's pairs (i, i + D/2). Applied alike to queries and keys, it leaves their
-- products unchanged. The index is kept on owner (one per module, made again for another device).
function M.deinterleave(owner, x, n)
   local D = x:size(x:dim())
   n = n or D                  -- (the first n dims only, with partial rotary embeddings: GLM-4)
   local perm = rawget(owner, "_deinterleave")
   if perm == nil or perm.device ~= x.device or perm:numel() ~= D or rawget(owner, "_deinterleave_n") ~= n then
      local idx = {}
      for i = 0, n - 1, 2 do idx[#idx + 1] = i end
      for i = 1, n - 1, 2 do idx[#idx + 1] = i end
      for i = n, D - 1 do idx[#idx + 1] = i end
      perm = T.tensor(idx, { dtype = "int64", device = x.device })
      rawset(owner, "_deinterleave", perm)
      rawset(owner, "_deinterleave_n", n)
   end
   return x:index_select(x:dim(), perm)
end

--- Where the key-value cache lives on another device than the queries (kv_cache_device),
-- attention runs there: returns q and pad moved to the keys' device and the device the result
-- goes back to (nil when nothing moved).
function M.queries_to_keys(q, k, pad)
   if q.device == k.device then return q, pad, nil end
   return q:to(k.device), pad and pad:to(k.device), q.device
end

--- For a model whose checkpoint fuses each layer's q, k and v projections in one (the query heads'
-- rows, then the keys', then the values') where its attention keeps them apart, as transformers'
-- conversion mapping splits them: string.format(layer, i) .. "." .. fused .. ".weight" (and .bias)
-- split into q_proj, k_proj and v_proj beside it as the checkpoint loads (views of it, no copy;
-- checkpoint_rewrite.lua, so that a disk offload writes the split tensors once to the offload folder).
function M.split_fused_qkv(model, layer, fused)
   local cfg = model.config
   local q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
   local schemes = {}
   for i = 0, cfg.num_hidden_layers - 1 do
      schemes[string.format(layer, i) .. "." .. fused] = { out_features = q + 2 * kv, in_features = cfg.hidden_size }
   end
   local function split(owner, _, need, sd)
      local base, out = owner:sub(1, #owner - #fused - 1), {}
      for _, field in ipairs({ "weight", "bias" }) do
         local t = field == "weight" and need(field) or sd[owner .. "." .. field]
         if t then
            out[base .. ".q_proj." .. field] = t:narrow(1, 1, q)
            out[base .. ".k_proj." .. field] = t:narrow(1, q + 1, kv)
            out[base .. ".v_proj." .. field] = t:narrow(1, q + kv + 1, kv)
         end
      end
      return out
   end
   rawset(model, "rewrite_checkpoint", require("moonload.checkpoint_rewrite").new(schemes, { weight = true, bias = true },
      split, "q, k and v fused in " .. fused))
end

return M
