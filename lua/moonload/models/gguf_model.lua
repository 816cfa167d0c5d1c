--- ml.models.from_gguf(path[, {dtype = "float32", requantize = "int8", device_map, max_memory,
-- offload_folder, reserve_for, quantize, ...}]) -> a causal model from one of llama.cpp's GGUF files.
--
-- The architectures "llama" (Llama, Mistral and the others llama.cpp converts as llama), "qwen2",
-- "qwen3" and "qwen3moe" (Qwen3-30B-A3B, Qwen3-235B-A22B: each layer's experts stacked in
-- ffn_{gate,up,down}_exps, split here into the experts' own layers without copying) become
-- LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and Qwen3MoeForCausalLM, their config built
-- from the file's metadata (llama.cpp's keys) and their tensors renamed from llama.cpp's
-- (blk.N.attn_q.weight -> model.layers.N.self_attn.q_proj.weight, ...). Tensors are read as
-- they are stored:
--  * Q8_0 and Q4_0 linear weights become nn.QuantizedLinear layers, int8 and int4: the file's
--    values, their float16 scales widened to float32 (cpu/ggml_blocks.c), so nothing is
--    re-rounded; a Q8_0 or Q4_0 embedding becomes an nn.QuantizedEmbedding (rows widened as they
--    are looked up), and a tied head reads the same int8 / int4 tensors;
--  * Q4_1, Q5_0, Q5_1 and the K-quants Q2_K to Q6_K (the Q4_K_M, Q5_K_M, Q6_K ... files) are
--    widened to float32 and quantized again as requantize says: "int8" (the default: a scale per 32
--    bounds each value's change by 1/254 of its block's largest, below these formats' own steps),
--    "int4" (smaller, adds Q4_0's rounding) or "float" (kept in dtype); a widened embedding too
--    (as a QuantizedEmbedding, its tied head sharing it);
--  * F32, F16 and BF16 tensors are views of the mapped file (then converted to dtype, which is
--    float32 unless given, as transformers' GGUF loading does);
--  * Llama's q and k rows, which llama.cpp's converter permutes for its rotary pairs, are put back
--    in Hugging Face's order; Llama 3's rope scaling (a rope_freqs tensor) divides the rotary
--    frequencies as llama.cpp does.
--  * "gpt-oss" (gpt-oss-20b, -120b) becomes GptOssForCausalLM: its MXFP4 experts (ffn_gate_exps,
--    ffn_up_exps, ffn_down_exps, gate and up apart as llama.cpp stores them) stay packed, read as
--    strided views of the file's 17-byte blocks in llama.cpp's nibble order (F.mxfp4_linear);
--    the sinks, the router (ffn_gate_inp) and the biases are read as they are. Its YaRN rotary
--    embedding is transformers' (no truncation of the correction range), as the model was trained.
-- Other ggml types (the I-quants, ...) and other architectures are errors that name them. The file's tokenizer is not read: use the model's tokenizer.json (ml.tokenizers).
-- With device_map, the loaded model is placed as from_pretrained's (planned, offloaded, streamed).
local gguf = require("moonload.gguf")
local QuantizedLinear = require("moonload.nn.quantized_linear")
local QuantizedEmbedding = require("moonload.nn.quantized_embedding")

local M = {}
local WHO = "from_gguf"

local CLASSES = {
   llama = { model_type = "llama", class = "LlamaForCausalLM", permute = true },
   qwen2 = { model_type = "qwen2", class = "Qwen2ForCausalLM" },
   qwen3 = { model_type = "qwen3", class = "Qwen3ForCausalLM" },
   qwen3moe = { model_type = "qwen3_moe", class = "Qwen3MoeForCausalLM", experts = true },
   ["gpt-oss"] = { model_type = "gpt_oss", class = "GptOssForCausalLM", experts = true, stacked = true },
}
local ARCHS = "llama, qwen2, qwen3, qwen3moe and gpt-oss"

-- llama.cpp's tensor names -> transformers'
local GLOBAL = { ["token_embd"] = "model.embed_tokens", ["output_norm"] = "model.norm", ["output"] = "lm_head" }
local BLOCK = {
   attn_norm = "input_layernorm", attn_q = "self_attn.q_proj", attn_k = "self_attn.k_proj",
   attn_v = "self_attn.v_proj", attn_output = "self_attn.o_proj", ffn_norm = "post_attention_layernorm",
   ffn_gate = "mlp.gate_proj", ffn_up = "mlp.up_proj", ffn_down = "mlp.down_proj",
   attn_q_norm = "self_attn.q_norm", attn_k_norm = "self_attn.k_norm",
   ffn_gate_inp = "mlp.gate",                                    -- a MoE layer's router
}
-- a MoE layer's experts, stacked (experts, out, in) in one tensor each
local EXPERTS = { ffn_gate_exps = "gate_proj", ffn_up_exps = "up_proj", ffn_down_exps = "down_proj" }
-- gpt-oss's own names (llama.cpp's tensor list for the arch: a norm after attention, a router with
-- a bias, sinks)
local GPT_OSS = { post_attention_norm = "post_attention_layernorm", ffn_gate_inp = "mlp.router",
                  attn_sinks = "self_attn.sinks" }

local function fail(path, fmt, ...) error(string.format("%s: %s: " .. fmt, WHO, path, ...), 0) end

--- hf_name(name[, arch]) -> the transformers name of a llama.cpp tensor name, or nil.
function M.hf_name(name, arch)
   local base, kind = name:match("^([%w_]+)%.(%a+)$")
   if base and GLOBAL[base] then return GLOBAL[base] .. "." .. kind end
   local n, part, k = name:match("^blk%.(%d+)%.([%w_]+)%.(%a+)$")
   if n and arch == "gpt-oss" and GPT_OSS[part] then
      if part == "attn_sinks" then return string.format("model.layers.%s.self_attn.sinks", n) end   -- a parameter
      return string.format("model.layers.%s.%s.%s", n, GPT_OSS[part], k)
   end
   if n and BLOCK[part] then return string.format("model.layers.%s.%s.%s", n, BLOCK[part], k) end
   return nil
end

-- The ids that end generation, as llama.cpp's end-of-generation set: the file's eos, and its
-- end-of-turn and end-of-message ids where it names them (Llama 3 instruct files record 128001 as
-- eos and 128009, <|eot_id|>, as eot). One id, or a list of the distinct ones; nil for none.
local function end_ids(md)
   local ids, seen = {}, {}
   for _, k in ipairs({ "eos", "eot", "eom" }) do
      local id = md["tokenizer.ggml." .. k .. "_token_id"]
      if type(id) == "number" and not seen[id] then
         seen[id] = true
         ids[#ids + 1] = id
      end
   end
   if #ids <= 1 then return ids[1] end
   return ids
end

-- The transformers config of the file's metadata.
local function config_of(f, arch)
   local md = f.metadata
   local function key(k, required)
      local v = md[arch .. "." .. k]
      if v == nil and required then fail(f.path, 'metadata "%s.%s" is missing', arch, k) end
      return v
   end
   local heads = key("attention.head_count", true)
   local hidden = key("embedding_length", true)
   local vocab = key("vocab_size") or (type(md["tokenizer.ggml.tokens"]) == "table" and #md["tokenizer.ggml.tokens"])
   if not vocab then
      local e = f.by_name["token_embd.weight"]
      vocab = e and e.shape[1]
   end
   local experts = CLASSES[arch].experts
   local cfg = {
      model_type = CLASSES[arch].model_type, architectures = { CLASSES[arch].class },
      vocab_size = vocab, hidden_size = hidden,
      intermediate_size = key("feed_forward_length", not experts) or key("expert_feed_forward_length", true),
      num_hidden_layers = key("block_count", true), num_attention_heads = heads,
      num_key_value_heads = key("attention.head_count_kv") or heads,
      max_position_embeddings = key("context_length") or 2048,
      rms_norm_eps = key("attention.layer_norm_rms_epsilon") or 1e-6,
      rope_theta = key("rope.freq_base") or 10000.0,
      head_dim = key("attention.key_length") or hidden / heads,
      hidden_act = "silu", tie_word_embeddings = f.by_name["output.weight"] == nil,
      attention_bias = f.by_name["blk.0.attn_q.bias"] ~= nil,
      bos_token_id = md["tokenizer.ggml.bos_token_id"], eos_token_id = end_ids(md),
      pad_token_id = md["tokenizer.ggml.padding_token_id"],
   }
   local scaling = key("rope.scaling.type")
   if scaling == "linear" then
      cfg.rope_scaling = { rope_type = "linear", factor = key("rope.scaling.factor", true) }
   elseif scaling == "yarn" and arch == "gpt-oss" then
      cfg.rope_scaling = { rope_type = "yarn", factor = key("rope.scaling.factor", true), beta_fast = 32.0,
         beta_slow = 1.0, truncate = false,
         original_max_position_embeddings = key("rope.scaling.original_context_length") or 4096 }
   elseif scaling ~= nil and scaling ~= "none" then
      fail(f.path, 'rope scaling "%s" is not read (linear, and Llama 3\'s rope_freqs, are)', tostring(scaling))
   end
   local swa = key("attention.sliding_window")
   if swa then cfg.sliding_window = swa end
   if arch == "gpt-oss" then
      -- transformers' names for the experts; their tensors stacked, gate and up apart, MXFP4 in
      -- llama.cpp's order when every expert tensor is (others are read as floats)
      cfg.num_local_experts, cfg.num_experts_per_tok = key("expert_count", true), key("expert_used_count", true)
      cfg.experts_split, cfg.mxfp4_order = true, "ggml"
      local all = true
      for i = 0, cfg.num_hidden_layers - 1 do
         for _, p in ipairs({ "gate", "up", "down" }) do
            local t = f.by_name[string.format("blk.%d.ffn_%s_exps.weight", i, p)]
            all = all and t ~= nil and t.type_name == "MXFP4"
         end
      end
      if all then cfg.quantization_config = { quant_method = "mxfp4" } end
   elseif experts then
      -- llama.cpp's qwen3moe: every layer sparse, the chosen experts' weights renormalized
      cfg.num_experts, cfg.num_experts_per_tok = key("expert_count", true), key("expert_used_count", true)
      cfg.moe_intermediate_size = key("expert_feed_forward_length", true)
      cfg.norm_topk_prob, cfg.decoder_sparse_step, cfg.mlp_only_layers = true, 1, {}
   end
   return cfg
end

-- Rows of a q or k weight (or bias) from llama.cpp's rotary pairs back to transformers' halves:
-- within each head, row (i, s) of llama.cpp's (pairs) is row (s, i) of transformers'.
local function unpermute(t, n_head)
   local rows = t:size(1)
   local half = rows / n_head / 2
   local idx = {}
   for h = 0, n_head - 1 do
      for s = 0, 1 do
         for i = 0, half - 1 do idx[#idx + 1] = h * 2 * half + i * 2 + s end
      end
   end
   return t:index_select(1, require("moonload.tensor").tensor(idx, { dtype = "int64" })):contiguous()
end

-- One stacked experts tensor (experts, out, in) as each expert's <prefix>E.<proj> weight: rows of
-- one int8 / int4 matrix for Q8_0 and Q4_0 (views, one unpacking for all), views of the mapped
-- file for floats, widened for the other block types.
local function read_experts(f, t, prefix, proj, r)
   if #t.shape ~= 3 then fail(f.path, "%s has shape [%s], expected (experts, out, in)", t.name, table.concat(t.shape, ", ")) end
   local E, out = t.shape[1], t.shape[2]
   local q, scales, bits = f:quantized(t.name)
   local v = not q and f:tensor(t.name) or nil
   for e = 0, E - 1 do
      local module = prefix .. e .. "." .. proj
      if q then
         r.sd[module .. ".weight"] = q:narrow(1, e * out + 1, out)
         r.sd[module .. ".weight_scale"] = scales:narrow(1, e * out + 1, out)
         r.quantized[module] = bits
      else
         r.sd[module .. ".weight"] = v:select(1, e + 1)
         if f:is_block_quantized(t.name) then r.widened[#r.widened + 1] = module end
      end
   end
end

-- The file's tensors by transformers' names, read as they are stored: sd, the quantized linear
-- layers ({module = bits}), the linear layers whose blocks were widened to floats, the bits of a
-- Q8_0 / Q4_0 embedding (nil otherwise) and whether the embedding was widened, and rope_freqs.
local function read_tensors(f, cfg, arch)
   local path = f.path
   local r = { sd = {}, quantized = {}, widened = {} }
   for _, t in ipairs(f.tensors) do
      local name = M.hf_name(t.name, arch)
      local layer, stacked, kind = t.name:match("^blk%.(%d+)%.([%w_]+)%.(%a+)$")
      if CLASSES[arch].stacked and EXPERTS[stacked] then
         -- gpt-oss: the stacked tensors as they are (MXFP4 blocks and scales, or floats), biases too
         local base = string.format("model.layers.%s.mlp.experts.%s", layer, EXPERTS[stacked])
         if kind == "bias" then
            r.sd[base .. "_bias"] = f:tensor(t.name)
         elseif cfg.quantization_config then
            r.sd[base .. "_blocks"], r.sd[base .. "_scales"] = f:mxfp4(t.name)
         else
            r.sd[base] = f:tensor(t.name)
         end
      elseif name and name:find("%.mlp%.router%.") then
         r.sd[name] = f:tensor(t.name)               -- (not a linear layer: always read as floats)
      elseif CLASSES[arch].experts and kind == "weight" and EXPERTS[stacked] then
         read_experts(f, t, string.format("model.layers.%s.mlp.experts.", layer), EXPERTS[stacked], r)
      elseif t.name == "rope_freqs.weight" then
         r.rope_freqs = f:tensor(t.name):float()
      elseif not name then
         fail(path, 'tensor "%s" has no place in a %s model', t.name, CLASSES[arch].class)
      else
         local heads = name:find("self_attn%.q_proj") and cfg.num_attention_heads
            or name:find("self_attn%.k_proj") and cfg.num_key_value_heads or nil
         local permuted = CLASSES[arch].permute and heads and name:find("_proj%.") ~= nil
         local embedding = name == "model.embed_tokens.weight"
         local q, scales, bits = nil, nil, nil
         if #t.shape == 2 then q, scales, bits = f:quantized(t.name) end
         if q then
            if permuted then q, scales = unpermute(q, heads), unpermute(scales, heads) end
            local module = name:gsub("%.weight$", "")
            if embedding then r.embed_bits = bits else r.quantized[module] = bits end
            r.sd[module .. ".weight"], r.sd[module .. ".weight_scale"] = q, scales
         else
            local ok, v = pcall(f.tensor, f, t.name)
            if not ok then fail(path, "%s", (tostring(v):gsub("^gguf: ", ""))) end
            r.sd[name] = permuted and unpermute(v, heads) or v
            if #t.shape == 2 and f:is_block_quantized(t.name) then
               if embedding then r.embed_widened = true else r.widened[#r.widened + 1] = (name:gsub("%.weight$", "")) end
            end
         end
      end
   end
   if r.embed_bits and cfg.tie_word_embeddings then
      -- the head reads the embedding's int8 / int4 tensors (one copy, as llama.cpp reads them;
      -- loading fills them through the tie, scales included)
      r.quantized["lm_head"] = r.embed_bits
   end
   return r
end

-- The model of cfg on meta, its stored-quantized layers built as such.
local function skeleton(cfg, r)
   local models = require("moonload.models")
   return require("moonload.big_modeling").init_empty_weights(function()
      local m = models.from_config(cfg)
      if r.embed_bits then
         local e = m.model.embed_tokens
         m:set_submodule("model.embed_tokens", QuantizedEmbedding(e.num_embeddings, e.embedding_dim, { bits = r.embed_bits }))
      end
      for module, bits in pairs(r.quantized) do
         local lin = m:get_submodule(module)
         m:set_submodule(module, QuantizedLinear(lin.in_features, lin.out_features, { bias = lin.bias ~= nil, bits = bits }))
      end
      return m
   end)
end

-- The widened block types quantized again (in memory, before any dispatch): linear layers, and a
-- widened embedding with the head tied to it.
local function requantize_widened(model, cfg, r, bits)
   for _, module in ipairs(r.widened) do
      model:set_submodule(module, QuantizedLinear.from_float(model:get_submodule(module), bits))
   end
   if r.embed_widened then
      require("moonload.quantize").quantize(model, { dtype = bits == 8 and "int8" or "int4", embeddings = true,
         skip = { "^model%.layers%." } })
   end
end

function M.from_gguf(path, opts)
   opts = opts or {}
   if type(path) ~= "string" then error(WHO .. ": expected a .gguf file path, got " .. type(path), 2) end
   if type(opts) ~= "table" then error(WHO .. ": options must be a table, got " .. type(opts), 2) end
   local requantize = opts.requantize or "int8"
   if requantize ~= "int8" and requantize ~= "int4" and requantize ~= "float" then
      error(string.format('%s: requantize must be "int8", "int4" or "float", got %s', WHO, tostring(requantize)), 2)
   end
   local f = gguf.open(path)
   local arch = f.metadata["general.architecture"]
   if not CLASSES[arch] then
      fail(path, 'architecture "%s" is not read (%s are)', tostring(arch), ARCHS)
   end
   local models = require("moonload.models")
   local cfg = config_of(f, arch)
   local r = read_tensors(f, cfg, arch)
   local model = skeleton(cfg, r)
   models.load_into(model, r.sd, { strict = opts.strict, who = WHO })
   if r.quantized["lm_head"] and r.embed_bits and cfg.tie_word_embeddings then       -- one copy, tied
      local e = model.model.embed_tokens
      model.lm_head.weight, model.lm_head.weight_scale = e.weight, e.weight_scale
   end
   local dtype = opts.dtype or "float32"
   model:to(dtype)
   if r.rope_freqs then
      -- llama.cpp divides each rotary frequency's angle by its factor (Llama 3's rope scaling)
      local rot = model.model.rotary_emb
      if r.rope_freqs:numel() ~= rot.inv_freq:numel() then
         fail(path, "rope_freqs has %d factors for %d rotary frequencies", r.rope_freqs:numel(), rot.inv_freq:numel())
      end
      rot.inv_freq = rot.inv_freq / r.rope_freqs
   end
   if requantize ~= "float" then requantize_widened(model, cfg, r, requantize == "int8" and 8 or 4) end
   rawset(model, "generation_config", require("moonload.models.generation_config").from_model_config(cfg))
   if opts.device_map ~= nil then
      local resolved = setmetatable({ dtype = dtype }, { __index = opts })
      return models._place_loaded(model, resolved, opts.no_split_module_classes or model.no_split_modules, WHO)
   end
   if opts.quantize ~= nil then
      require("moonload.quantize").quantize(model, { dtype = opts.quantize, embeddings = opts.quantize_embeddings })
   end
   return model
end

return M
