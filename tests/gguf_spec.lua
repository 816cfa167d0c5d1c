-- llama.cpp's GGUF files (ml.gguf, models/gguf_model.lua, cpu/ggml_blocks.c) against gguf-py
-- and transformers (tests/fixtures/gen_gguf.py): the bytes of a block read by hand, the logits of
-- Hugging Face models holding the files' dequantized weights, and GGUF files written here, byte
-- by byte, for each error.
local ml = require("moonload")
local H = require("models_helpers")
local bit = require("bit")

local DIR = "tests/fixtures/gguf/"
local expected = H.read_json(DIR .. "expected.json")

-- IEEE half precision bits -> number.
local function half(lo, hi)
   local h = lo + hi * 256
   local sign = bit.band(h, 0x8000) ~= 0 and -1 or 1
   local e, m = bit.band(bit.rshift(h, 10), 0x1f), bit.band(h, 0x3ff)
   if e == 0 then return sign * m * 2 ^ -24 end
   return sign * (1 + m / 1024) * 2 ^ (e - 15)
end

-- A GGUF file (version 3) from metadata {{key, type, value}} and tensors {{name, dims (GGUF order),
-- ggml type, bytes}}, for the error cases.
local function write_gguf(path, kvs, tensors, version)
   local function u32(v) return string.char(v % 256, math.floor(v / 256) % 256, math.floor(v / 65536) % 256, math.floor(v / 16777216) % 256) end
   local function u64(v) return u32(v % 4294967296) .. u32(math.floor(v / 4294967296)) end
   local function str(s) return u64(#s) .. s end
   local parts = { "GGUF", u32(version or 3), u64(#tensors), u64(#kvs) }
   for _, kv in ipairs(kvs) do
      parts[#parts + 1] = str(kv[1])
      if kv[2] == "str" then parts[#parts + 1] = u32(8) .. str(kv[3]) else parts[#parts + 1] = u32(4) .. u32(kv[3]) end
   end
   local offset = 0
   for _, t in ipairs(tensors) do
      parts[#parts + 1] = str(t[1]) .. u32(#t[2])
      for _, d in ipairs(t[2]) do parts[#parts + 1] = u64(d) end
      parts[#parts + 1] = u32(t[3]) .. u64(offset)
      offset = offset + math.ceil(#t[4] / 32) * 32
   end
   local head = table.concat(parts)
   local out = { head, string.rep("\0", math.ceil(#head / 32) * 32 - #head) }
   for _, t in ipairs(tensors) do out[#out + 1] = t[4] .. string.rep("\0", math.ceil(#t[4] / 32) * 32 - #t[4]) end
   local f = assert(io.open(path, "wb"))
   f:write(table.concat(out))
   f:close()
end

local function f_type(file, tensor) return ml.gguf.open(DIR .. file).by_name[tensor].type_name end


-- The file's model with its experts on disk and the rest in RAM gives the greedy ids of exp
-- (their offload index points into the file's own bytes).
local function generates_with_experts_on_disk(file, exp, n)
   local dir = os.tmpname()
   os.remove(dir)
   local placed = ml.models.from_gguf(DIR .. file, { device_map = "auto", offload_folder = dir,
      max_memory = { cpu = "200MB" }, device_overrides = { ["%.experts$"] = "disk" } })
   assert.are.equal("disk", placed.hf_device_map["model.layers.1.mlp.experts"])
   assert.are.same(exp.greedy_ids[1], placed:generate(exp.input_ids[1], { max_new_tokens = n, eos_token_id = false }))
   os.execute("rm -rf '" .. dir .. "'")
end

describe("gguf files", function()
   H.collect_warnings()         -- (dispatching with disk offload warns of weights on meta)

   it("reads metadata, tensor shapes in PyTorch's order, float views and Q8_0 / Q4_0 blocks as they are", function()
      local f = ml.gguf.open(DIR .. "llama_mixed.gguf")
      assert.are.equal(3, f.version)
      assert.are.equal("llama", f.metadata["general.architecture"])
      assert.are.equal(4, f.metadata["llama.attention.head_count"])
      local t = f.by_name["blk.0.ffn_down.weight"]
      assert.are.same({ 32, 64 }, t.shape)
      assert.are.equal("F32", t.type_name)
      local down = f:tensor("blk.0.ffn_down.weight")
      assert.are.equal("float32", down.dtype)
      local C = require("moonload.C")
      local src = C.ffi.new("const char*[1]")
      assert.are.equal(0, C.lib.ml_tensor_file_source(down._c, src, C.ffi.new("uint64_t[1]"), C.ffi.new("uint64_t[1]"),
         C.ffi.new("int64_t[1]")))                                    -- a view of the mapped file
      assert.truthy(C.ffi.string(src[0]):find("llama_mixed.gguf", 1, true))
      assert.are.equal("float16", f:tensor("blk.0.attn_v.weight").dtype)
      assert.are.equal("bfloat16", f:tensor("blk.0.attn_output.weight").dtype)
      -- the first Q8_0 and Q4_0 blocks, read from the file by hand
      local file = assert(io.open(DIR .. "llama_mixed.gguf", "rb"))
      local function block(name, n)
         file:seek("set", f.by_name[name].offset)
         return { file:read(n):byte(1, n) }
      end
      local b8 = block("blk.0.attn_k.weight", 34)
      local q8, s8, bits8 = f:quantized("blk.0.attn_k.weight")
      assert.are.equal(8, bits8)
      assert.are.equal(half(b8[1], b8[2]), s8:tolist()[1][1])
      local row = q8:tolist()[1]
      for j = 1, 32 do assert.are.equal(b8[2 + j] >= 128 and b8[2 + j] - 256 or b8[2 + j], row[j]) end
      local b4 = block("blk.0.attn_q.weight", 18)
      local q4, s4, bits4 = f:quantized("blk.0.attn_q.weight")
      assert.are.equal(4, bits4)
      assert.are.equal(half(b4[1], b4[2]), s4:tolist()[1][1])
      assert.are.same({ unpack(b4, 3, 18) }, { unpack(q4:tolist()[1], 1, 16) })
      file:close()
      -- a Q8_0 tensor as floats: its values times their scales
      local w = f:tensor("token_embd.weight")
      assert.are.same({ 100, 32 }, w.shape)
      local eq, es = f:quantized("token_embd.weight")
      assert.is_true(ml.equal(w, ml.nn.F.dequantize_q8(eq, es)))
      assert.is_nil(f:quantized("blk.0.attn_v.weight"))
   end)

   -- file: its class, int8 / int4 layers, whether the head is tied, eos id
   for name, want in pairs({
      ["llama_mixed.gguf"] = { "LlamaForCausalLM", { [8] = 5, [4] = 4 }, false, 2 },
      ["llama3_tied.gguf"] = { "LlamaForCausalLM", { [8] = 8, [4] = 7 }, true, 2 },      -- (+ the tied head)
      ["qwen2_mixed.gguf"] = { "Qwen2ForCausalLM", { [8] = 8, [4] = 6 }, true, nil },
      ["qwen3_mixed.gguf"] = { "Qwen3ForCausalLM", { [8] = 7, [4] = 8 }, false, nil },
      ["chat_tiny.gguf"] = { "LlamaForCausalLM", {}, true, 2 },
   }) do
      it(name .. ": gives the logits transformers computes with the file's weights", function()
         local exp = expected[name]
         local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
         local model = ml.models.from_gguf(DIR .. name)
         assert.are.equal(want[1], model.__name)
         assert.is_true(H.max_abs_diff(model(ids), exp.logits) < 1e-4)
         local bits = {}
         for _, m in ipairs(model:modules_list()) do
            if m.__name == "QuantizedLinear" then bits[m.bits] = (bits[m.bits] or 0) + 1 end
         end
         assert.are.same(want[2], bits)
         -- a Q8_0 / Q4_0 embedding stays quantized, and a tied head reads its very tensors
         local embed = model.model.embed_tokens
         local quantized_embed = f_type(name, "token_embd.weight") == "Q8_0" or f_type(name, "token_embd.weight") == "Q4_0"
         assert.are.equal(quantized_embed and "QuantizedEmbedding" or "Embedding", embed.__name)
         if quantized_embed and want[3] then
            assert.is_true(rawequal(embed.weight, model.lm_head.weight))
            assert.is_true(rawequal(embed.weight_scale, model.lm_head.weight_scale))
         end
         assert.are.equal(want[3], model.config.tie_word_embeddings)
         assert.are.equal(want[4], model.generation_config.eos_token_id)
         assert.are.equal(13, #model:generate({ 1, 7, 9 }, { max_new_tokens = 10, eos_token_id = false }))
      end)
   end

   it("qwen3moe_mixed.gguf: splits each layer's stacked experts into the experts' layers, and gives transformers' logits and greedy ids", function()
      local exp = expected["qwen3moe_mixed.gguf"]
      local model = ml.models.from_gguf(DIR .. "qwen3moe_mixed.gguf")
      assert.are.equal("Qwen3MoeForCausalLM", model.__name)
      assert.are.same({ 6, 2, 32 }, { model.config.num_experts, model.config.num_experts_per_tok, model.config.moe_intermediate_size })
      assert.is_true(model.config.norm_topk_prob)
      -- layer 0's experts Q8_0, layer 1's Q4_0: rows of one unpacked matrix each; layer 2's F16 as floats
      local first, second = model.model.layers[1].mlp.experts, model.model.layers[2].mlp.experts
      assert.are.equal(8, first[1].gate_proj.bits)
      assert.are.equal(4, second[6].down_proj.bits)
      assert.are.same({ 32, 32 }, first[1].down_proj.weight.shape)
      assert.are.equal(first[1].gate_proj.weight:data_ptr() + 32 * 32, first[2].gate_proj.weight:data_ptr())
      assert.are.equal("Linear", model.model.layers[3].mlp.experts[3].up_proj.__name)
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < 1e-4)
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = 8, eos_token_id = false }))
      generates_with_experts_on_disk("qwen3moe_mixed.gguf", exp, 8)
   end)

   it("gpt_oss_mxfp4.gguf: keeps the MXFP4 experts as views of the file's blocks, and gives transformers' logits and greedy ids", function()
      local exp = expected["gpt_oss_mxfp4.gguf"]
      local model = ml.models.from_gguf(DIR .. "gpt_oss_mxfp4.gguf")
      assert.are.equal("GptOssForCausalLM", model.__name)
      local experts = model.model.layers[2].mlp.experts
      assert.is_true(experts.mxfp4 and experts.split)
      local blocks, scales = experts.up_proj_blocks, experts.up_proj_scales
      assert.are.same({ 4, 64, 2, 16 }, blocks.shape)            -- (E, inter, hidden / 32, 16)
      assert.are.same({ 64 * 2 * 17, 2 * 17, 17, 1 }, blocks:stride())
      assert.are.equal(scales:data_ptr() + 1, blocks:data_ptr())  -- each 17-byte block: the scale, then 16 bytes
      assert.is_true(require("moonload.C").lib.ml_storage_is_borrowed(require("moonload.C").lib.ml_tensor_storage(blocks._c)))
      assert.are.same({ 4, false, 4 }, { model.model.layers[1].self_attn.window, model.model.layers[2].self_attn.window or false,
         model.model.layers[3].self_attn.window })
      assert.are.equal(8, model.model.layers[1].self_attn.q_proj.bits)      -- (Q8_0, as stored)
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < 1e-4)
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = 10, eos_token_id = false }))
      generates_with_experts_on_disk("gpt_oss_mxfp4.gguf", exp, 10)
      local ok, err = pcall(ml.save_model, model, os.tmpname() .. ".d")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("llama.cpp's layout", 1, true), err)
   end)

   it("gpt_oss_f16.gguf: float experts (gate and up apart) as floats, transformers' logits and greedy ids", function()
      local exp = expected["gpt_oss_f16.gguf"]
      local model = ml.models.from_gguf(DIR .. "gpt_oss_f16.gguf")
      local experts = model.model.layers[1].mlp.experts
      assert.is_false(experts.mxfp4)
      assert.are.same({ 4, 64, 64 }, experts.gate_proj.shape)
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < 1e-4)
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = 10, eos_token_id = false }))
   end)

   it("reads Q4_1, Q5_0, Q5_1 and the K-quants Q2_K to Q6_K as gguf-py widens them, quantized again to int8 by default", function()
      local exp = expected["llama_kquants.gguf"]
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      local ref = ml.tensor(exp.logits)
      local function rel(a) return ((a - ref):abs():max() / ref:abs():max()):item() end
      local float = ml.models.from_gguf(DIR .. "llama_kquants.gguf", { requantize = "float" })
      assert.are.equal("Linear", float.model.layers[1].self_attn.q_proj.__name)
      assert.is_true(rel(float(ids)) < 1e-5)
      local int8 = ml.models.from_gguf(DIR .. "llama_kquants.gguf")
      for _, name in ipairs({ "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj" }) do
         assert.are.equal(8, int8.model.layers[1]:get_submodule(name).bits, name)
      end
      assert.are.equal(8, int8.lm_head.bits)
      assert.are.equal("QuantizedEmbedding", int8.model.embed_tokens.__name)       -- (a Q6_K table)
      assert.are.equal("Embedding", float.model.embed_tokens.__name)
      assert.is_true(rel(int8(ids)) < 0.02)
      local int4 = ml.models.from_gguf(DIR .. "llama_kquants.gguf", { requantize = "int4" })
      assert.are.equal(4, int4.model.layers[1].mlp.up_proj.bits)
      assert.has_error(function() ml.models.from_gguf(DIR .. "llama_kquants.gguf", { requantize = "q4_k" }) end,
         'from_gguf: requantize must be "int8", "int4" or "float", got q4_k')
   end)

   it("places a GGUF model by a device map, and converts its floats to the dtype asked", function()
      local exp = expected["llama_mixed.gguf"]
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      local dir = H.tmpdir()
      local model = ml.models.from_gguf(DIR .. "llama_mixed.gguf", { offload_folder = dir, device_map = {
         ["model.embed_tokens"] = "cpu", ["model.layers.0"] = "cpu", ["model.layers.1"] = "disk",
         ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" } })
      assert.is_true(model.model.layers[2].mlp.up_proj.weight:is_meta())
      assert.is_true(H.max_abs_diff(model(ids), exp.logits) < 1e-4)
      H.rmdir(dir)
      local bf = ml.models.from_gguf(DIR .. "llama_mixed.gguf", { dtype = "bfloat16" })
      assert.are.equal("bfloat16", bf.model.layers[1].self_attn.v_proj.weight.dtype)
      assert.are.equal("float32", bf.model.layers[1].self_attn.q_proj.weight_scale.dtype)
      assert.is_true(((bf(ids):float() - ml.tensor(exp.logits)):abs():max() / ml.tensor(exp.logits):abs():max()):item() < 0.05)
   end)

   it("ends generation at the file's eos, end-of-turn and end-of-message ids", function()
      local dir = H.tmpdir()
      local path = dir .. "/eot.gguf"
      local meta = { { "general.architecture", "str", "llama" }, { "llama.embedding_length", "u32", 32 },
                     { "llama.block_count", "u32", 1 }, { "llama.feed_forward_length", "u32", 64 },
                     { "llama.attention.head_count", "u32", 4 }, { "llama.vocab_size", "u32", 16 } }
      local function eos_of(extra)
         local kv = { unpack(meta) }
         for _, e in ipairs(extra) do kv[#kv + 1] = e end
         write_gguf(path, kv, {})
         -- (only the config matters here: the weights the file lacks stay as built)
         return ml.models.from_gguf(path, { strict = false }).generation_config.eos_token_id
      end
      assert.are.equal(2, eos_of({ { "tokenizer.ggml.eos_token_id", "u32", 2 } }))
      assert.are.same({ 2, 7 }, eos_of({ { "tokenizer.ggml.eos_token_id", "u32", 2 }, { "tokenizer.ggml.eot_token_id", "u32", 7 } }))
      assert.are.equal(7, eos_of({ { "tokenizer.ggml.eos_token_id", "u32", 7 }, { "tokenizer.ggml.eot_token_id", "u32", 7 } }))
      H.rmdir(dir)
   end)

   it("names what is malformed or not read", function()
      local dir = H.tmpdir()
      local path = dir .. "/x.gguf"
      local arch = { "general.architecture", "str", "llama" }
      local meta = { arch, { "llama.embedding_length", "u32", 32 }, { "llama.block_count", "u32", 1 },
                     { "llama.feed_forward_length", "u32", 64 }, { "llama.attention.head_count", "u32", 4 } }
      local f32 = string.rep("\0", 32 * 4)
      local cases = {
         { function() write_gguf(path, meta, {}, 1); ml.gguf.open(path) end, "version 1 (2 and 3 are read)" },
         { function()
              write_gguf(path, meta, { { "token_embd.weight", { 32, 4 }, 0, string.rep("\0", 512) } })
              local fh = io.open(path, "rb"); local all = fh:read("*a"); fh:close()
              fh = io.open(path, "wb"); fh:write(all:sub(1, #all - 100)); fh:close()
              ml.gguf.open(path)
           end, "token_embd.weight (512 bytes at" },
         { function()
              local fh = io.open(path, "wb"); fh:write("GGUF\3\0\0\0\1\0"); fh:close()
              ml.gguf.open(path)
           end, "it ends inside the tensor count" },
         { function() ml.gguf.open("tests/fixtures/models/gpt2_tiny/model.safetensors") end, "does not start with GGUF" },
         { function()
              write_gguf(path, { { "general.architecture", "str", "gpt2" } }, {})
              ml.models.from_gguf(path)
           end, 'architecture "gpt2" is not read (llama, qwen2, qwen3, qwen3moe and gpt-oss are)' },
         { function()
              write_gguf(path, { arch }, {})
              ml.models.from_gguf(path)
           end, 'metadata "llama.attention.head_count" is missing' },
         { function()
              write_gguf(path, meta, { { "blk.0.attn_q.weight", { 256, 32 }, 16, string.rep("\0", 32 * 66) } })
              ml.models.from_gguf(path)
           end, "blk.0.attn_q.weight in " .. path .. " is IQ2_XXS; moonload reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K to Q6_K and MXFP4" },
         { function()
              write_gguf(path, meta, { { "blk.0.mystery.weight", { 32 }, 0, f32 } })
              ml.models.from_gguf(path)
           end, 'tensor "blk.0.mystery.weight" has no place in a LlamaForCausalLM model' },
         { function()
              write_gguf(path, meta, { { "blk.0.attn_q.weight", { 48, 32 }, 12, string.rep("\0", 144) } })
              ml.gguf.open(path)
           end, "blk.0.attn_q.weight: 48 values a row are not whole Q4_K blocks of 256" },
      }
      for _, c in ipairs(cases) do
         local ok, err = pcall(c[1])
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
      H.rmdir(dir)
   end)
end)

describe("gguf tokenizers", function()
   for _, name in ipairs({ "gpt2_bpe", "llama3_bpe", "qwen2_bpe", "o200k_bpe" }) do
      it(name .. ": gives tokenizers' ids and text from the vocabulary a GGUF file carries", function()
         local exp = H.read_json("tests/fixtures/tokenizers/" .. name .. "/expected.json")
         local tok = ml.tokenizers.from_gguf(DIR .. "tok_" .. name .. ".gguf")
         for _, c in ipairs(exp.cases) do
            assert.are.same(c.ids, tok:encode(c.text), c.text)
            assert.are.same(c.ids_no_special, tok:encode(c.text, { add_special_tokens = false }), c.text)
            assert.are.equal(c.decoded, tok:decode(c.ids))
            assert.are.equal(c.decoded_skip_special, tok:decode(c.ids, { skip_special_tokens = true }))
         end
      end)
   end

   it("llama2_spm: rebuilds a SentencePiece vocabulary's merges from its scores, as transformers does", function()
      local exp = H.read_json("tests/fixtures/tokenizers/llama2_spm/expected.json")
      local tok = ml.tokenizers.from_gguf(DIR .. "tok_llama2_spm.gguf")
      for _, c in ipairs(exp.cases) do
         assert.are.same(c.ids, tok:encode(c.text), c.text)
         assert.are.same(c.ids_no_special, tok:encode(c.text, { add_special_tokens = false }), c.text)
         assert.are.equal(c.decoded, tok:decode(c.ids))
         -- (the fixture's tokenizer.json lists its byte tokens as special, which skipping drops;
         -- a GGUF file's byte tokens are ordinary ones, as in Llama 2's own tokenizer.json)
         local has_bytes = false
         for _, id in ipairs(c.ids) do if id >= 3 and id <= 258 then has_bytes = true end end
         if not has_bytes then assert.are.equal(c.decoded_skip_special, tok:decode(c.ids, { skip_special_tokens = true })) end
      end
   end)

   it("loads through from_pretrained too when the path is a .gguf file", function()
      local exp = expected["llama_mixed.gguf"]
      local model = ml.models.from_pretrained(DIR .. "llama_mixed.gguf")
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < 1e-4)
      local tok = ml.tokenizers.from_pretrained(DIR .. "tok_gpt2_bpe.gguf")
      assert.are.same(ml.tokenizers.from_gguf(DIR .. "tok_gpt2_bpe.gguf"):encode("Hello world"), tok:encode("Hello world"))
   end)

   it("runs examples/chat.lua on a GGUF chat model as on its folder (model, tokenizer, template, eos)", function()
      local exp = H.expected("chat_tiny")
      local p = assert(io.popen("luajit examples/chat.lua " .. DIR .. "chat_tiny.gguf "
         .. "\"The quick brown fox jumps over the lazy dog. It's 12:45!\" 16 2>&1"))
      local out = p:read("*a")
      p:close()
      assert.truthy(out:find("answer: " .. exp.text, 1, true), out)
   end)

   it("converts a GGUF chat model into a Hugging Face folder (save_model + tokenizer save_pretrained)", function()
      local exp = H.expected("chat_tiny")
      local out = H.tmpdir()
      ml.save_model(ml.models.from_gguf(DIR .. "chat_tiny.gguf"), out)
      ml.tokenizers.from_gguf(DIR .. "chat_tiny.gguf"):save_pretrained(out)
      local p = assert(io.popen("luajit examples/chat.lua " .. out .. " "
         .. "\"The quick brown fox jumps over the lazy dog. It's 12:45!\" 16 2>&1"))
      local text = p:read("*a")
      p:close()
      assert.truthy(text:find("answer: " .. exp.text, 1, true), text)
      -- a SentencePiece vocabulary survives the round trip too (merges of pieces with spaces)
      local spm = ml.tokenizers.from_gguf(DIR .. "tok_llama2_spm.gguf")
      spm:save_pretrained(out .. "/spm")
      local back = ml.tokenizers.from_pretrained(out .. "/spm")
      for _, c in ipairs(H.read_json("tests/fixtures/tokenizers/llama2_spm/expected.json").cases) do
         assert.are.same(c.ids, back:encode(c.text), c.text)
      end
      H.rmdir(out)
   end)

   it("keeps the file's chat template and special token strings", function()
      local tok = ml.tokenizers.from_gguf(ml.gguf.open(DIR .. "tok_llama3_bpe.gguf"))
      assert.are.equal("<|eot_id|>user: hi", tok:apply_chat_template({ { role = "user", content = "hi" } }, { tokenize = false }))
      assert.are.equal("<|begin_of_text|>", tok.special_token_strings.bos_token)
   end)

   it("names the vocabularies it does not read", function()
      local dir = H.tmpdir()
      local path = dir .. "/t.gguf"
      write_gguf(path, { { "tokenizer.ggml.model", "str", "bert" } }, {})
      local ok, err = pcall(ml.tokenizers.from_gguf, path)
      assert.is_false(ok)
      assert.truthy(err:find('has tokenizer.ggml.model "bert"; byte-level BPE ("gpt2") and SentencePiece ("llama") vocabularies are read', 1, true), err)
      write_gguf(path, { { "tokenizer.ggml.model", "str", "llama" } }, {})
      ok, err = pcall(ml.tokenizers.from_gguf, path)
      assert.is_false(ok)
      assert.truthy(err:find("has no tokenizer.ggml.tokens and tokenizer.ggml.scores lists", 1, true), err)
      write_gguf(path, { { "tokenizer.ggml.model", "str", "gpt2" }, { "tokenizer.ggml.pre", "str", "falcon" } }, {})
      ok, err = pcall(ml.tokenizers.from_gguf, path)
      assert.is_false(ok)
      assert.truthy(err:find('has tokenizer.ggml.pre "falcon"; moonload knows gpt-2, gpt-4o, llama-bpe, llama3, qwen2', 1, true), err)
      H.rmdir(dir)
   end)
end)

describe("gguf files on cuda #cuda", function()
   H.collect_warnings()
   it("puts a GGUF model's int8 and int4 layers on the GPU and gives the CPU's logits", function()
      local exp = expected["llama3_tied.gguf"]
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      local model = ml.models.from_gguf(DIR .. "llama3_tied.gguf", { device_map = { ["model.embed_tokens"] = 0,
         ["model.layers.0"] = 0, ["model.layers.1"] = "cpu", ["model.norm"] = 0, ["model.rotary_emb"] = 0, lm_head = 0 } })
      assert.are.equal("cuda:0", model.model.layers[1].mlp.up_proj.weight.device)
      assert.is_true(H.max_abs_diff(model(ids:to("cuda:0")):to("cpu"), exp.logits) < 1e-4)
   end)

   it("runs gpt-oss's MXFP4 experts from a GGUF file on the GPU, placed whole and streamed from RAM", function()
      local exp = expected["gpt_oss_mxfp4.gguf"]
      local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
      local model = ml.models.from_gguf(DIR .. "gpt_oss_mxfp4.gguf"):to("cuda:0")
      assert.are.equal("cuda:0", model.model.layers[2].mlp.experts.down_proj_blocks.device)
      assert.is_true(H.max_abs_diff(model(ids:to("cuda:0")):to("cpu"), exp.logits) < 1e-4)
      local streamed = ml.models.from_gguf(DIR .. "gpt_oss_mxfp4.gguf")
      ml.cpu_offload(streamed, { execution_device = "cuda:0" })
      assert.are.same(exp.greedy_ids[1], streamed:generate(exp.input_ids[1], { max_new_tokens = 10, eos_token_id = false }))
   end)
end)
