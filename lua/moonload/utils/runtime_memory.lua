--- The memory a model needs while it runs, beside its weights: every attention layer's key-value
-- cache, and the activations of one forward. Accelerate's planner counts weights only, so a long
-- context or a batch runs out of memory on a device the map filled to its budget; llama.cpp's
-- --fit sizes the context with the layers. infer_auto_device_map takes what this computes as
-- runtime_sizes (a cache follows its layer's execution device) and workspace_size (kept free on
-- each device that computes).
--
-- The cache is exact (generate allocates prompt + new tokens once, per layer, in the
-- activation dtype). The activations are an estimate from the layer widths, on the high side;
-- tests/utils_runtime_memory_spec.lua checks it against the measured peak of every model family.
local sizes = require("moonload.utils.sizes")

local M = {}
local WHO = "reserve_for"

local function check_count(v, key, default)
   if v == nil then return default end
   if type(v) ~= "number" or v < 1 or v ~= math.floor(v) then
      error(string.format("%s: %s must be an integer >= 1, got %s", WHO, key, tostring(v)), 4)
   end
   return v
end

local KEYS = { batch_size = true, max_length = true, prompt_length = true, dtype = true,
   micro_batch_size = true, prefill_chunk_size = true, kv_cache_device = true, kv_cache_dtype = true }

--- Reads {batch_size = 1, max_length, prompt_length = max_length, dtype, micro_batch_size,
-- prefill_chunk_size, kv_cache_device, kv_cache_dtype}: the batch and total tokens (prompt +
-- generated) generate will run with; the longest prompt, run in one forward; the block schedule
-- it runs with (whole batch and prompt when absent: models/block_schedule.lua); the device
-- holding the key-value cache whatever device runs a layer (absent: the layer's), normalized to
-- "cpu" or "cuda:N"; the cache's storage ("int8", absent: the computing dtype).
function M.check_reserve_for(r)
   if type(r) ~= "table" then
      error(string.format("%s must be a table {batch_size, max_length, prompt_length}, got %s", WHO, type(r)), 3)
   end
   for k in pairs(r) do
      if not KEYS[k] then
         error(string.format('%s: unknown key "%s" (expected batch_size, max_length, prompt_length, dtype, micro_batch_size, prefill_chunk_size, kv_cache_device, kv_cache_dtype)', WHO, tostring(k)), 3)
      end
   end
   if r.max_length == nil then error(WHO .. ": max_length is required (prompt + generated tokens)", 3) end
   local out = { batch_size = check_count(r.batch_size, "batch_size", 1), max_length = check_count(r.max_length, "max_length") }
   out.prompt_length = check_count(r.prompt_length, "prompt_length", out.max_length)
   if out.prompt_length > out.max_length then
      error(string.format("%s: prompt_length %d exceeds max_length %d", WHO, out.prompt_length, out.max_length), 3)
   end
   out.dtype = r.dtype
   out.micro_batch_size = check_count(r.micro_batch_size, "micro_batch_size")
   out.prefill_chunk_size = check_count(r.prefill_chunk_size, "prefill_chunk_size")
   if r.kv_cache_device ~= nil then
      local d = require("moonload.hooks").norm_device(r.kv_cache_device)
      if type(d) ~= "string" or not (d == "cpu" or d:match("^cuda:%d+$")) then
         error(string.format('%s: kv_cache_device must be "cpu" or a GPU ("cuda:N" or N), got %s', WHO, tostring(r.kv_cache_device)), 3)
      end
      out.kv_cache_device = d
   end
   if r.kv_cache_dtype ~= nil and not require("moonload.models.kv_cache").DTYPES[r.kv_cache_dtype] then
      error(string.format('%s: kv_cache_dtype must be "int8" (or absent: the computing dtype), got %s', WHO,
         tostring(r.kv_cache_dtype)), 3)
   end
   out.kv_cache_dtype = r.kv_cache_dtype
   return out
end

local function out_in(m)                 -- Linear (out_features) or GPT-2's Conv1D (nf)
   return m.out_features or m.nf, m.in_features or m.nx
end

-- The dtype m's activations (and so its cache) have: its compute dtype (int8 layers aside).
local function first_param_dtype(m)
   return require("moonload.quantize").compute_dtype(m) or "float32"
end

-- Per-token width of what a block's MLP part holds at once: its widest projection (the
-- intermediate, or a fused gate_up); for a sparse MoE block, top_k experts' widths, the router's
-- scores and any shared expert, since every token runs k experts. Experts stacked in one module
-- (gpt-oss's) give their width as expert_width.
local function mlp_width(m, skip)
   if m == skip then return 0 end
   if m.top_k and (m.experts or m.expert_width) then          -- (JetMoE's block holds its experts itself)
      local first = m.experts and m.experts[1]
      local w = m.top_k * (first and mlp_width(first) or m.expert_width or m.experts.expert_width)
      for name, child in m:named_children() do
         if name ~= "experts" then w = w + mlp_width(child) end
      end
      return w
   end
   local widest, extra = out_in(m) or 0, 0
   for _, child in m:named_children() do
      widest = math.max(widest, mlp_width(child, skip))
      extra = math.max(extra, child.extra_widths or 0)
   end
   -- (an activation holding more intermediate-wide temporaries than the four a layer's MLP is
   -- counted for, as xIELU: extra_widths more)
   return widest * (1 + extra / 4)
end

-- The decoder layers that cache keys and values, or keep a state of fixed size instead (linear
-- attention: a module with state_bytes): {name, layer, attention} in module order.
local function attention_layers(model)
   local found, parent_of = {}, {}
   for name, m in model:named_modules() do
      for cname, child in m:named_children() do
         parent_of[child] = { name == "" and cname or (name .. "." .. cname), m, name }
      end
      if type(m.kv_cache_heads) == "function" or type(m.state_bytes) == "function" then
         local p = parent_of[m]
         -- (a part of the layer holding the attention, as DBRX's norm_attn_norm, says so: part_of_layer)
         if p and p[2].part_of_layer and parent_of[p[2]] then p = parent_of[p[2]] end
         found[#found + 1] = { name = name, layer = p and p[2] or m, attention = m }
      end
   end
   return found
end

local function vocab_size(model)
   local cfg = rawget(model, "config")
   return cfg and (cfg.vocab_size or (cfg.text_config and cfg.text_config.vocab_size)) or 0
end

--- kv_cache_sizes(model, reserve_for) -> {[attention module name] = bytes}: what generate's
-- cache holds per layer for batch_size sequences of max_length tokens, prompt_length of them in
-- the first forward (a sliding-window layer keeps at most that + 2 windows: models/kv_cache.lua).
-- An encoder-decoder's attention says its cache_role: "self" (the default: a decoder's cache),
-- "cross" (the keys and values of the encoder's prompt_length states, kept for the whole
-- generation, in the computing dtype) or "none" (an encoder's: nothing kept). A linear
-- attention's entry is its state_bytes(batch_size, element size): the same for any length.
function M.kv_cache_sizes(model, reserve_for)
   local r = M.check_reserve_for(reserve_for)
   local capacity = require("moonload.models.kv_cache").layer_capacity
   local out = {}
   for _, e in ipairs(attention_layers(model)) do
      local role = e.attention.cache_role or "self"
      if e.attention.state_bytes then
         out[e.name] = e.attention:state_bytes(r.batch_size, sizes.dtype_byte_size(r.dtype or first_param_dtype(e.attention)))
      elseif role ~= "none" then
         local kv_heads, head_dim = e.attention:kv_cache_heads()
         local el = sizes.dtype_byte_size(r.dtype or first_param_dtype(e.attention))
         local tokens = r.prompt_length
         if role == "self" then
            el = require("moonload.models.kv_cache").value_bytes(r.kv_cache_dtype, head_dim, el)
            tokens = capacity(r.max_length, r.prompt_length, e.attention.window or nil)
         end
         -- (a row's bytes are whole: an int8 row's value_bytes are 1 + 4 / head_dim, a fraction)
         out[e.name] = 2 * r.batch_size * tokens * kv_heads * math.floor(head_dim * el + 0.5)
      end
   end
   return out
end

-- Bytes a layer holds at once for L queries over S keys in a batch of B (see activation_size);
-- an int8 cache adds the keys and values it dequantizes for a long input's attention.
local function layer_bytes(e, B, L, S, dtype, kv_dtype)
   local el = sizes.dtype_byte_size(dtype or first_param_dtype(e.attention))
   local H = 0
   for _, m in e.attention:named_modules() do
      local _, i = out_in(m)
      if i and i > H then H = i end
   end
   local mlp = 4 * mlp_width(e.layer, e.attention)
   local per_token = 4 * H + mlp
   -- a linear attention or a mixer says what it forms per token (no scores, no masks over the keys);
   -- those are gone before the layer's MLP runs, so the larger of the two counts
   if e.attention.state_bytes then return B * L * (4 * H + math.max(mlp, e.attention:token_values())) * el, H end
   local kv_heads, head_dim, q_heads, forms_scores = e.attention:kv_cache_heads()
   local attn = q_heads * head_dim + 2 * kv_heads * head_dim
   -- an attention that forms more than q, k, v and its output says how much, per batch row
   -- (DeepSeek's latent attention: expanded keys and values, or the latents it attends over)
   local attn_values = e.attention.activation_values and e.attention:activation_values(L, S) or 2 * attn * L
   local bytes = B * (L * per_token + attn_values) * el + 3 * B * L * S      -- bool masks (B, 1, L, S)
   if kv_dtype == "int8" and L > require("moonload.models.common").Q8_DIRECT_ROWS then
      bytes = bytes + 2 * B * S * kv_heads * head_dim * el          -- (dequantized for the GEMMs)
   end
   if forms_scores then                     -- float32 scores, a block of query rows at a time
      local rows = math.min(L, e.attention.query_block or L)
      bytes = bytes + 4 * B * q_heads * rows * S * 4
   end
   return bytes, H
end

--- activation_size(model, reserve_for) -> bytes: the most one forward holds live at once, in
-- the prefill (batch_size x prompt_length tokens) or a decoding step (one token over max_length
-- keys). In a layer: the residual and normed hidden states, q/k/v and the attention output, four
-- MLP-wide tensors, the masks, and the score tensors of attention that forms them; after the
-- layers: the last position's logits with sampling's float32 copies. Beside them, generate's
-- padding mask and positions. With a block schedule, a prefill layer's tensors are those of one
-- block (micro_batch_size rows, prefill_chunk_size tokens) beside the layer's whole input and
-- output; decoding steps run the whole batch (models/block_schedule.lua).
function M.activation_size(model, reserve_for)
   local r = M.check_reserve_for(reserve_for)
   local B, P, S = r.batch_size, r.prompt_length, r.max_length
   local rows, chunk = math.min(r.micro_batch_size or B, B), math.min(r.prefill_chunk_size or P, P)
   local blocked = rows < B or chunk < P
   local peak, hidden = 0, 0
   for _, e in ipairs(attention_layers(model)) do
      local prefill, H = layer_bytes(e, rows, chunk, P, r.dtype, r.kv_cache_dtype)
      local decode = layer_bytes(e, B, 1, S, r.dtype, r.kv_cache_dtype)   -- decoding steps run whole
      if blocked then
         local el = sizes.dtype_byte_size(r.dtype or first_param_dtype(e.attention))
         prefill = prefill + 2 * B * P * H * el
      end
      peak = math.max(peak, prefill, decode)
      hidden = math.max(hidden, H)
   end
   -- generate's own: the padding mask and the positions derived from it, int64 (B, max_length)
   local steps = 5 * 8 * B * S
   return math.max(peak, 2 * B * P * hidden * 4 + B * vocab_size(model) * 16) + steps
end

-- The least garbage allowed between collections on a device a plan reserved memory on.
local MIN_GARBAGE = 16 * 1024 * 1024
-- What the process itself holds in RAM beside tensors: the Lua heap, OpenBLAS's per-thread
-- buffers, thread stacks, kernel scratch (about 16 MiB measured with a Llama-shaped model).
local PROCESS_OVERHEAD = 32 * 1024 * 1024

--- runtime_memory_sizes(model, reserve_for) -> runtime_sizes, workspace_size, garbage: what
-- infer_auto_device_map needs to keep a causal language model's run inside its budgets.
-- runtime_sizes: each attention layer's key-value cache. workspace_size {cpu = , gpu = }: the
-- activations and the dead tensors allowed between two collections (`garbage` bytes: a quarter
-- of the activations, at least 16 MiB; on the CPU the dispatcher caps the collection threshold at
-- it with ml.set_gc_cap, while a GPU collects when an allocation fails and keeps it as a margin),
-- and on the CPU as much again for the freed blocks its
-- cache keeps for reuse (the dispatcher sets that limit too), the pages the hook runtime's prefetch
-- maps ahead of the layer running (hooks.prefetch_lookahead), and 32 MiB for the process itself.
function M.runtime_memory_sizes(model, reserve_for)
   local runtime = M.kv_cache_sizes(model, reserve_for)
   local act = M.activation_size(model, reserve_for)
   local garbage = math.max(MIN_GARBAGE, math.ceil(act / 4))
   local ahead = require("moonload.hooks").prefetch_lookahead()
   return runtime, { cpu = act + 2 * garbage + ahead + PROCESS_OVERHEAD, gpu = act + garbage }, garbage
end

return M
