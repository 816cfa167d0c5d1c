--- ml.nn.functional (alias F): the stateless layer functions, in PyTorch's argument order.
-- Optional positional arguments may be nil; PyTorch's keyword-only ones go in a trailing table.
--    F.linear(x, w[, b])                       x (..., in) @ w(out, in)^T + b
--    F.quantize_q8(w) -> q, scales             int8 weights, a scale per block of 32
--    F.q8_linear(x, q, scales[, b])            x @ (q * scales)^T + b
--    F.quantize_q8_into(x, q, scales)          int8 rows into views (the key-value cache)
--    F.dequantize_q8(q, scales[, dtype])       q * scales, a new tensor
--    F.quantize_q4(w), F.q4_linear(...), F.dequantize_q4(...)   int4 weights, two a byte
--    F.dequantize_fp8_blocks(w, scale_inv, block[, dtype]), F.fp8_linear(x, w, scale_inv, block[, b])
--                                              float8 weights with block scales
--    F.dequantize_mxfp4(blocks, scales[, dtype, order]), F.mxfp4_linear(x, blocks, scales[, b, order])
--                                              MXFP4 weights (gpt-oss's experts), two a byte
--    F.embedding(ids, weight)                  ids hold 0-based rows
--    F.layer_norm(x, normalized_shape[, w, b, eps = 1e-5])
--    F.rms_norm(x, normalized_shape[, w, eps]) eps defaults to the dtype's machine epsilon
--    F.scaled_dot_product_attention(q, k, v[, {attn_mask, is_causal, scale}])
--    F.gated_delta_rule(q, k, v, g, beta[, state]) -> out, state   Qwen3-Next's linear attention
--    F.ssm_scan(x, dt, A, B, C[, D[, state]]) -> out, state         Mamba's selective scan
--    F.softmax(x, dim) F.log_softmax(x, dim) F.gelu(x[, approximate]) F.silu F.relu F.tanh
--    F.relu2 F.xielu(x, alpha_p, alpha_n, beta, eps)
--    F.sigmoid F.dropout(x[, p = 0.5[, training = false]]) F.normalize(x[, p = 2[, dim = 2[, eps]]])
local C = require("moonload.C")
local Tensor = require("moonload.tensor")

local ffi, lib = C.ffi, C.lib
local is_tensor, wrap = Tensor.is_tensor, Tensor.wrap

local F = {}

local out = ffi.new("ml_tensor*[1]")

local function check(status)
   if status ~= 0 then error(ffi.string(lib.ml_last_error()), 3) end
end

local function need_tensor(fn, what, x, level)
   if not is_tensor(x) then
      error(string.format("%s: %s must be a tensor, got %s", fn, what, type(x)), (level or 2) + 1)
   end
end

local function opt_tensor(fn, what, x)
   if x == nil or x == false then return nil end
   need_tensor(fn, what, x, 3)
   return x._c
end

--- linear(x, w[, b]): x (..., in), w (out, in), b (out).
function F.linear(x, w, b)
   need_tensor("linear", "input", x)
   need_tensor("linear", "weight", w)
   check(lib.ml_linear(x._c, w._c, opt_tensor("linear", "bias", b), out))
   return wrap(out[0])
end

-- The C code of an output dtype name (float32 when nil).
local function dtype_code(fn, dtype)
   local dt = require("moonload.dtypes")
   local code = dt.by_name[dtype or "float32"]
   if code == nil then
      error(string.format('%s: unknown dtype "%s" (one of %s)', fn, tostring(dtype), dt.list), 3)
   end
   return code
end

--- quantize_q8(w) -> q, scales: a floating weight (out, in) as int8 values (out, in), on its device
-- and a float32 scale per block of 32 along in (out, in / 32): max |w| / 127 over the block, values
-- rounded to nearest (core/src/cpu/q8.c; a GPU gives the same bytes). in must be a multiple of 32.
local out2 = ffi.new("ml_tensor*[1]")
function F.quantize_q8(w)
   need_tensor("quantize_q8", "weight", w)
   check(lib.ml_quantize_q8(w._c, out, out2))
   return wrap(out[0]), wrap(out2[0])
end

--- q8_linear(x, q, scales[, b]): x (..., in) @ (q * scales)^T + b, computed in float32, in x's
-- dtype; the int8 weight and scales of quantize_q8, all on one device.
function F.q8_linear(x, q, scales, b)
   need_tensor("q8_linear", "input", x)
   need_tensor("q8_linear", "weight", q)
   need_tensor("q8_linear", "scales", scales)
   check(lib.ml_q8_linear(x._c, q._c, scales._c, opt_tensor("q8_linear", "bias", b), out))
   return wrap(out[0])
end

--- quantize_q8_into(x, q, scales): x (..., D) as int8 values into q (..., D) and float32 scales
-- into scales (..., D / block), each a view (a key-value cache's slots): a scale per block of the
-- last dim, rounded as quantize_q8 rounds.
function F.quantize_q8_into(x, q, scales)
   need_tensor("quantize_q8_into", "input", x)
   need_tensor("quantize_q8_into", "int8 values", q)
   need_tensor("quantize_q8_into", "scales", scales)
   check(lib.ml_quantize_q8_into(x._c, q._c, scales._c))
end

--- dequantize_q8(q, scales[, dtype = "float32"]) -> q * scales (a scale per block of the last dim)
-- as a new contiguous tensor of dtype (float32, float16, bfloat16), on their device.
function F.dequantize_q8(q, scales, dtype)
   need_tensor("dequantize_q8", "int8 values", q)
   need_tensor("dequantize_q8", "scales", scales)
   check(lib.ml_dequantize_q8(q._c, scales._c, dtype_code("dequantize_q8", dtype), out))
   return wrap(out[0])
end

--- quantize_q4(w) -> q, scales: a floating weight (out, in) as int4 values, two a byte (uint8
-- (out, in / 2), llama.cpp's Q4_0 layout: see moonload.h), and a float32 scale per block of 32
-- (out, in / 32) that makes the block's largest-magnitude value -8; on its device (a GPU gives
-- the CPU's bytes). in must be a multiple of 32.
function F.quantize_q4(w)
   need_tensor("quantize_q4", "weight", w)
   check(lib.ml_quantize_q4(w._c, out, out2))
   return wrap(out[0]), wrap(out2[0])
end

--- q4_linear(x, q, scales[, b]): x (..., in) @ (q * scales)^T + b with quantize_q4's weight,
-- computed in float32, in x's dtype.
function F.q4_linear(x, q, scales, b)
   need_tensor("q4_linear", "input", x)
   need_tensor("q4_linear", "weight", q)
   need_tensor("q4_linear", "scales", scales)
   check(lib.ml_q4_linear(x._c, q._c, scales._c, opt_tensor("q4_linear", "bias", b), out))
   return wrap(out[0])
end

--- unpack_int_words(packed, bits) -> q: integer weights packed into int32 words (compressed-tensors'
-- "pack-quantized" weight_packed, (..., W) on the CPU) in moonload's layouts, the same integers:
-- bits 4 -> uint8 (..., W * 4) as quantize_q4 lays out int4 (W * 8 a multiple of 32), bits 8 ->
-- int8 (..., W * 4) as quantize_q8's.
function F.unpack_int_words(packed, bits)
   need_tensor("unpack_int_words", "packed words", packed)
   check(lib.ml_unpack_int_words(packed._c, bits, out))
   return wrap(out[0])
end

--- int_words_values(packed, bits[, {order = "awq", along = "rows", transpose = true}]) -> the raw
-- unsigned values of int32 words (R, C), one a byte, as uint8: packed along the columns (the
-- default) U (R, C * 32 / bits), along = "rows" U (R * 32 / bits, C); transpose gives U^T
-- (contiguous). order "awq": AutoAWQ's nibble order (4 bits).
function F.int_words_values(packed, bits, opts)
   need_tensor("int_words_values", "packed words", packed)
   opts = opts or {}
   if type(opts) ~= "table" or (opts.order ~= nil and opts.order ~= "awq")
      or (opts.along ~= nil and opts.along ~= "rows" and opts.along ~= "columns") then
      error('int_words_values: options are {order = "awq", along = "rows" or "columns", transpose = true}', 2)
   end
   check(lib.ml_int_words_values(packed._c, bits, opts.order == "awq", opts.along == "rows", opts.transpose == true, out))
   return wrap(out[0])
end

--- int_values_to_q(values, zeros, bits_out[, zero_offset = 0]) -> q: raw values uint8 (out, in)
-- minus their group's zero point (zeros uint8 (out, groups), plus zero_offset; or zeros one number
-- for all) in moonload's int4 (bits_out 4) or int8 (8) layout; a difference outside that range is
-- an error.
function F.int_values_to_q(values, zeros, bits_out, zero_offset)
   need_tensor("int_values_to_q", "values", values)
   local zt = type(zeros) ~= "number" and zeros or nil
   if zt ~= nil then need_tensor("int_values_to_q", "zero points", zt) end
   check(lib.ml_int_values_to_q(values._c, zt and zt._c or nil, zt and (zero_offset or 0) or zeros, bits_out, out))
   return wrap(out[0])
end

--- dequantize_fp8_blocks(w, scale_inv, {block_o, block_i}[, dtype = "float32"]) -> the float8
-- weight w (O, I) times its float32 scale_inv (ceil(O / block_o), ceil(I / block_i)) tile by tile,
-- as a new contiguous (O, I) tensor of dtype (float32, float16, bfloat16), on their device.
function F.dequantize_fp8_blocks(w, scale_inv, block, dtype)
   need_tensor("dequantize_fp8_blocks", "float8 weight", w)
   need_tensor("dequantize_fp8_blocks", "scales", scale_inv)
   if type(block) ~= "table" or type(block[1]) ~= "number" or type(block[2]) ~= "number" then
      error("dequantize_fp8_blocks: block must be {block_o, block_i}, got " .. tostring(block), 2)
   end
   check(lib.ml_dequantize_fp8_blocks(w._c, scale_inv._c, block[1], block[2],
      dtype_code("dequantize_fp8_blocks", dtype), out))
   return wrap(out[0])
end

--- fp8_linear(x, w, scale_inv, {block_o, block_i}[, b]) -> x W^T + b in x's dtype (float32,
-- float16, bfloat16), W the float8 weight times its tile scales (see dequantize_fp8_blocks); a
-- few rows on the CPU read the float8 bytes as they are.
function F.fp8_linear(x, w, scale_inv, block, b)
   need_tensor("fp8_linear", "input", x)
   need_tensor("fp8_linear", "float8 weight", w)
   need_tensor("fp8_linear", "scales", scale_inv)
   if type(block) ~= "table" or type(block[1]) ~= "number" or type(block[2]) ~= "number" then
      error("fp8_linear: block must be {block_o, block_i}, got " .. tostring(block), 2)
   end
   check(lib.ml_fp8_linear(x._c, w._c, scale_inv._c, block[1], block[2], opt_tensor("fp8_linear", "bias", b), out))
   return wrap(out[0])
end

-- An MXFP4 nibble order by name: true for llama.cpp's.
local function mxfp4_order(who, order)
   if order == nil or order == "transformers" then return false end
   if order == "ggml" then return true end
   error(string.format('%s: order must be "transformers" or "ggml", got %s', who, tostring(order)), 3)
end

--- dequantize_mxfp4(blocks, scales[, dtype = "float32"[, order]]) -> MXFP4 weights (gpt-oss's experts):
-- uint8 blocks (..., O, G, 16), two e2m1 values a byte (value 2j in byte j's low nibble, 2j + 1
-- in its high one), and uint8 scales (..., O, G), a power of two 2^(s - 127) a group of 32, as a
-- new contiguous (..., O, G * 32) tensor of dtype (float32, float16, bfloat16), on their device:
-- the (out, in) weight of F.linear (transformers transposes it to (..., I, O) for x @ W).
-- order "ggml": llama.cpp's nibble order (GGUF's MXFP4: value j in byte j's low nibble, j + 16
-- in its high one) instead of transformers' ("transformers", the default).
function F.dequantize_mxfp4(blocks, scales, dtype, order)
   need_tensor("dequantize_mxfp4", "blocks", blocks)
   need_tensor("dequantize_mxfp4", "scales", scales)
   check(lib.ml_dequantize_mxfp4(blocks._c, scales._c, mxfp4_order("dequantize_mxfp4", order),
      dtype_code("dequantize_mxfp4", dtype), out))
   return wrap(out[0])
end

--- mxfp4_linear(x, blocks, scales[, b]) -> x W^T + b in x's dtype (float32, float16, bfloat16),
-- W (O, G * 32) the weight of blocks (O, G, 16) and scales (O, G) (see dequantize_mxfp4); a few
-- rows on the CPU read the packed bytes as they are; order as dequantize_mxfp4's.
function F.mxfp4_linear(x, blocks, scales, b, order)
   need_tensor("mxfp4_linear", "input", x)
   need_tensor("mxfp4_linear", "blocks", blocks)
   need_tensor("mxfp4_linear", "scales", scales)
   check(lib.ml_mxfp4_linear(x._c, blocks._c, scales._c, mxfp4_order("mxfp4_linear", order),
      opt_tensor("mxfp4_linear", "bias", b), out))
   return wrap(out[0])
end

--- dequantize_q4(q, scales[, dtype = "float32"]) -> the (out, in) weight quantize_q4's values
-- stand for, as a new tensor of dtype (float32, float16, bfloat16).
function F.dequantize_q4(q, scales, dtype)
   need_tensor("dequantize_q4", "int4 values", q)
   need_tensor("dequantize_q4", "scales", scales)
   check(lib.ml_dequantize_q4(q._c, scales._c, dtype_code("dequantize_q4", dtype), out))
   return wrap(out[0])
end

--- embedding(ids, weight): rows of weight (n, d) picked by 0-based integer ids.
function F.embedding(ids, weight)
   need_tensor("embedding", "input", ids)
   need_tensor("embedding", "weight", weight)
   check(lib.ml_embedding(ids._c, weight._c, out))
   return wrap(out[0])
end

-- The number of trailing dims normalized_shape covers, after checking it matches x.
local function norm_dims(fn, x, normalized_shape)
   local ns = normalized_shape
   if type(ns) == "number" then ns = { ns } end
   if type(ns) ~= "table" or #ns == 0 then
      error(string.format("%s: normalized_shape must be a number or a non-empty list of sizes, got %s", fn,
         type(normalized_shape)), 3)
   end
   local shape = x.shape
   local nd, nn = #shape, #ns
   local ok = nn <= nd
   if ok then
      for i = 1, nn do
         if shape[nd - nn + i] ~= ns[i] then ok = false end
      end
   end
   if not ok then
      error(string.format("%s: normalized_shape [%s] does not match the last dims of the input of shape [%s]",
         fn, table.concat(ns, ", "), table.concat(shape, ", ")), 3)
   end
   return nn
end

--- layer_norm(x, normalized_shape[, weight, bias, eps = 1e-5])
function F.layer_norm(x, normalized_shape, w, b, eps)
   need_tensor("layer_norm", "input", x)
   local nn = norm_dims("layer_norm", x, normalized_shape)
   check(lib.ml_layer_norm(x._c, nn, opt_tensor("layer_norm", "weight", w), opt_tensor("layer_norm", "bias", b),
      eps or 1e-5, out))
   return wrap(out[0])
end

local machine_eps = { float32 = 1.1920928955078125e-07, float16 = 0.0009765625, bfloat16 = 0.0078125,
                      float64 = 2.220446049250313e-16 }

--- rms_norm(x, normalized_shape[, weight, eps]) (eps nil: the dtype's machine epsilon, as PyTorch).
function F.rms_norm(x, normalized_shape, w, eps)
   need_tensor("rms_norm", "input", x)
   local nn = norm_dims("rms_norm", x, normalized_shape)
   check(lib.ml_rms_norm(x._c, nn, opt_tensor("rms_norm", "weight", w), eps or machine_eps[x.dtype] or 1.1920928955078125e-07, out))
   return wrap(out[0])
end

--- scaled_dot_product_attention(q, k, v[, {attn_mask, is_causal, scale, sinks}]); q (..., L, E),
-- k (..., S, E), v (..., S, Ev). A bool mask keeps true positions; a float mask is added.
-- sinks (beyond PyTorch): (H,) a logit per query head (dim -3) that joins each row's softmax
-- without a value, as gpt-oss's attention sinks. PyTorch's positional form (q, k, v, attn_mask,
-- dropout_p, is_causal, scale) works too.
function F.scaled_dot_product_attention(q, k, v, opts, dropout_p, is_causal, scale)
   need_tensor("scaled_dot_product_attention", "query", q)
   need_tensor("scaled_dot_product_attention", "key", k)
   need_tensor("scaled_dot_product_attention", "value", v)
   local mask, sinks
   if is_tensor(opts) or opts == nil or opts == false then
      mask = opts or nil
   elseif type(opts) == "table" then
      mask, is_causal, scale, dropout_p, sinks = opts.attn_mask, opts.is_causal, opts.scale, opts.dropout_p, opts.sinks
   else
      error("scaled_dot_product_attention: the fourth argument must be an options table or a mask tensor, got "
         .. type(opts), 2)
   end
   if dropout_p ~= nil and dropout_p ~= 0 then
      error("scaled_dot_product_attention: dropout_p is not supported (inference only), got " .. tostring(dropout_p), 2)
   end
   if scale ~= nil and (type(scale) ~= "number" or scale <= 0) then
      error("scaled_dot_product_attention: scale must be a positive number, got " .. tostring(scale), 2)
   end
   if mask ~= nil and is_causal then
      error("scaled_dot_product_attention: give attn_mask or is_causal, not both", 2)
   end
   check(lib.ml_sdpa(q._c, k._c, v._c, opt_tensor("scaled_dot_product_attention", "attn_mask", mask),
      opt_tensor("scaled_dot_product_attention", "sinks", sinks), is_causal and true or false, scale or 0, out))
   return wrap(out[0])
end
F.sdpa = F.scaled_dot_product_attention

--- rotary_embedding(x, cos, sin): rotary position embedding in the rotate-half form of
-- transformers' Llama, x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1) over the
-- two halves of the last dim; cos and sin broadcast to x's shape. One kernel on cpu and cuda,
-- the same values as the composed ops.
function F.rotary_embedding(x, cos, sin)
   need_tensor("rotary_embedding", "x", x)
   need_tensor("rotary_embedding", "cos", cos)
   need_tensor("rotary_embedding", "sin", sin)
   check(lib.ml_rotary_embedding(x._c, cos._c, sin._c, out))
   return wrap(out[0])
end

-- t itself when its last dim is unit-stride (or of size 1), else a contiguous copy.
local function unit_last(t)
   local n = t:dim()
   if n == 0 or t:size(n) <= 1 or t:stride(n) == 1 then return t end
   return t:contiguous()
end

--- gated_delta_rule(q, k, v, g, beta[, state]) -> out, state: the gated delta rule, the linear
-- attention of Qwen3-Next (transformers' torch_recurrent_gated_delta_rule with
-- use_qk_l2norm_in_kernel). q, k (B, T, Hk, Dk), v (B, T, Hv, Dv), g (log decay) and beta
-- (B, T, Hv), float32, bfloat16 or float16, computed in float32; value head h reads key head
-- h / (Hv / Hk). state (B, Hv, Dk, Dv) float32 contiguous is the initial state and is updated in
-- place to the final one (nil: zeros, a new tensor on q's device). out (B, T, Hv, Dv) is a new
-- tensor of v's dtype. Views (q, k, v narrowed from one tensor) are read where they lie; a q, k
-- or v whose last dim is not unit-stride is copied contiguous first.
function F.gated_delta_rule(q, k, v, g, beta, state)
   local fn = "gated_delta_rule"
   need_tensor(fn, "q", q)
   need_tensor(fn, "k", k)
   need_tensor(fn, "v", v)
   need_tensor(fn, "g", g)
   need_tensor(fn, "beta", beta)
   if state ~= nil then need_tensor(fn, "state", state) end
   q, k, v = unit_last(q), unit_last(k), unit_last(v)     -- (g and beta are read at any strides)
   -- badly shaped q or v: the C checks name them, over placeholders for what cannot be shaped
   local shaped = q:dim() == 4 and v:dim() == 4
   local qs, vs = q.shape, v.shape
   if state == nil then
      state = Tensor.zeros(shaped and { qs[1], vs[3], qs[4], vs[4] } or { 0 }, { device = q.device })
   end
   local o = Tensor.empty(shaped and vs or { 0 }, { dtype = v.dtype, device = q.device })
   check(lib.ml_gated_delta_rule(q._c, k._c, v._c, g._c, beta._c, state._c, o._c))
   return o, state
end

--- ssm_scan(x, dt, A, B, C[, D[, state[, {A_log = false}]]]) -> out, state: the selective state-space scan of
-- Mamba layers (transformers' mamba2_selective_state_update or mamba_selective_scan, token after
-- token). x (B, T, H, P); dt, the step already through softplus and its bias, (B, T, H) per head
-- (Mamba-2) or (B, T, H, P) per row (Mamba-1: one head of P channels); A, the decay rate
-- (-exp(A_log)), (H) or (H, P, N); B and C (B, T, G, N); D, an optional skip, (H) or (H, P);
-- float32, bfloat16 or float16, computed in float32; head h reads group h / (H / G). Per token
-- S[p][n] = exp(dt[p] A[p][n]) S[p][n] + dt[p] x[p] B[n] and out[p] = S[p] . C + D[p] x[p].
-- state (B, H, P, N) float32 contiguous is the initial state and is updated in place to the final
-- one (nil: zeros, a new tensor on x's device). out is a new float32 tensor (B, T, H, P). Views are
-- read where they lie; an x, B or C whose last dim is not unit-stride is copied contiguous first.
-- With A_log, A is the models' A_log and the kernel takes the rates -exp(A_log) as it reads them
-- (no pass of their own: Mamba-1's are as many values as a token's state).
function F.ssm_scan(x, dt, A, B, C, D, state, opts)
   local fn = "ssm_scan"
   need_tensor(fn, "x", x)
   need_tensor(fn, "dt", dt)
   need_tensor(fn, "A", A)
   need_tensor(fn, "B", B)
   need_tensor(fn, "C", C)
   if D ~= nil then need_tensor(fn, "D", D) end
   if state ~= nil then need_tensor(fn, "state", state) end
   x, B, C = unit_last(x), unit_last(B), unit_last(C)     -- (dt, A and D are read at any strides)
   local shaped = x:dim() == 4 and B:dim() == 4
   local xs, bs = x.shape, B.shape
   if state == nil then
      state = Tensor.zeros(shaped and { xs[1], xs[3], xs[4], bs[4] } or { 0 }, { device = x.device })
   end
   local o = Tensor.empty(x:dim() == 4 and xs or { 0 }, { device = x.device })
   check(lib.ml_ssm_scan(x._c, dt._c, A._c, B._c, C._c, D and D._c, opts ~= nil and opts.A_log == true, state._c, o._c))
   return o, state
end

function F.softmax(x, dim) need_tensor("softmax", "input", x); return x:softmax(dim) end
function F.log_softmax(x, dim) need_tensor("log_softmax", "input", x); return x:log_softmax(dim) end

--- gelu(x[, approximate = "none" | "tanh"]) (or {approximate = ...}).
function F.gelu(x, approximate) need_tensor("gelu", "input", x); return x:gelu(approximate) end
function F.silu(x) need_tensor("silu", "input", x); return x:silu() end
function F.relu(x) need_tensor("relu", "input", x); return x:relu() end

--- relu2(x): relu(x)^2 (transformers' "relu2", ReLUSquaredActivation: Arcee's MLP).
function F.relu2(x)
   need_tensor("relu2", "input", x)
   local r = x:relu()
   return r * r
end

--- xielu(x, alpha_p, alpha_n, beta, eps): xIELU (https://arxiv.org/abs/2411.13010, Apertus's MLP),
-- as transformers' XIELUActivation computes it from its raw parameters: with a_p = softplus(alpha_p)
-- and a_n = beta + softplus(alpha_n), a_p x^2 + beta x where x > 0, else
-- (expm1(min(x, eps)) - x) a_n + beta x. alpha_p, alpha_n: tensors of one value (or numbers), beta
-- and eps numbers or 0-d tensors. expm1 as 2t / (1 - t), t = tanh(y / 2), which keeps its precision
-- near 0 where exp(y) - 1 would not.
function F.xielu(x, alpha_p, alpha_n, beta, eps)
   need_tensor("xielu", "input", x)
   local function softplus(a)
      if type(a) == "number" then return a > 20 and a or math.log(1 + math.exp(a)) end
      return a:softplus()
   end
   local a_p, a_n = softplus(alpha_p), softplus(alpha_n) + beta
   local t = (x:minimum(eps) * 0.5):tanh()
   local expm1 = t * 2 / (1 - t)
   local linear = x * beta
   return Tensor.where(x:gt(0), x * x * a_p + linear, (expm1 - x) * a_n + linear)
end
function F.tanh(x) need_tensor("tanh", "input", x); return x:tanh() end
--- softplus(x[, beta = 1[, threshold = 20]]): log(1 + exp(beta x)) / beta, x itself where
-- beta x > threshold, as torch.nn.functional.softplus.
function F.softplus(x, beta, threshold) need_tensor("softplus", "input", x); return x:softplus(beta, threshold) end
function F.sigmoid(x) need_tensor("sigmoid", "input", x); return x:sigmoid() end

--- dropout(x[, p = 0.5[, training = false]]): identity unless training (inference library, so
-- the default differs from PyTorch's training=True: pass true to drop).
function F.dropout(x, p, training)
   need_tensor("dropout", "input", x)
   if type(p) == "table" then p, training = p.p, p.training end
   p = p or 0.5
   if type(p) ~= "number" or p < 0 or p > 1 then
      error("dropout: dropout probability has to be between 0 and 1, but got " .. tostring(p), 2)
   end
   if not training or p == 0 then return x end
   if p == 1 then return x * 0 end
   local keep = Tensor.rand(x.shape, { device = x.device }):ge(p)
   return x * keep:to(x.dtype) * (1 / (1 - p))
end

--- normalize(x[, p = 2[, dim = 2[, eps = 1e-12]]]): x / max(||x||_p over dim, eps).
function F.normalize(x, p, dim, eps)
   need_tensor("normalize", "input", x)
   if type(p) == "table" then p, dim, eps = p.p, p.dim, p.eps end
   p, dim, eps = p or 2, dim or 2, eps or 1e-12
   local norm
   if p == 2 then
      norm = (x * x):sum(dim, true):sqrt()
   elseif p == 1 then
      norm = x:abs():sum(dim, true)
   else
      norm = x:abs():pow(p):sum(dim, true):pow(1 / p)
   end
   return x / norm:clamp(eps)
end

return F
