-- ml.models CodeGen (Salesforce codegen-350M/2B/6B/16B): Hugging Face names, GPT-J's parallel block
-- and rotate-every-two over rotary_dim, the fused qkv_proj cut into 4 model-parallel shards of
-- queries, values and keys, logits and greedy generation against transformers
-- (tests/fixtures/gen_models.py codegen: 8 heads of 6, 4 rotary dims), left-padded batches, device
-- maps, int8, bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local codegen = require("moonload.models.codegen")
local H = require("models_helpers")

local NAME = "codegen_tiny"
local DIR = H.FIX .. "/" .. NAME
local TOL = 1e-4

local function tiny(over)
   local c = { vocab_size = 50, n_embd = 32, n_layer = 1, n_head = 4, rotary_dim = 4 }
   for k, v in pairs(over or {}) do c[k] = v end
   return c
end

describe("models.codegen", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   describe("structure", function()
      it("uses transformers' parameter names, in registration order, and holds every checkpoint tensor", function()
         local names = H.param_names(model)
         assert.are.same({ "transformer.wte.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
            "transformer.h.0.attn.out_proj.weight", "transformer.h.0.attn.qkv_proj.weight", "transformer.h.0.mlp.fc_in.weight" },
            { unpack(names, 1, 6) })
         assert.are.same({ "lm_head.weight", "lm_head.bias" }, { names[#names - 1], names[#names] })
         H.assert_holds_checkpoint(model, DIR, false)
         assert.are.equal(codegen.CodeGenForCausalLM, getmetatable(model))
      end)

      it("has a fused qkv_proj and an out_proj without biases, and an untied head with a bias", function()
         local attn = model.transformer.h[1].attn
         assert.are.same({ 3 * 48, 48 }, attn.qkv_proj.weight.shape)
         assert.is_nil(attn.qkv_proj.bias)
         assert.is_nil(attn.out_proj.bias)
         assert.is_false(model.lm_head.weight:equal(model.transformer.wte.weight))
         assert.are.same({ 100 }, model.lm_head.bias.shape)
         assert.are.equal(4, model.config.rotary_dim)
      end)

      it("prints as transformers' module tree", function()
         local text = tostring(model)
         assert.truthy(text:find("CodeGenForCausalLM(\n  (transformer): CodeGenModel(\n    (wte): Embedding(100, 48)", 1, true))
         assert.truthy(text:find("(0-1): 2 x CodeGenBlock(", 1, true))
         assert.truthy(text:find("(attn): CodeGenAttention(\n          (out_proj): Linear(in_features=48, out_features=48, bias=False)\n"
            .. "          (qkv_proj): Linear(in_features=48, out_features=144, bias=False)", 1, true))
         assert.truthy(text:find("(mlp): CodeGenMLP(\n          (fc_in): Linear(in_features=48, out_features=96, bias=True)", 1, true))
         assert.truthy(text:find("(lm_head): Linear(in_features=48, out_features=100, bias=True)", 1, true))
      end)

      it("keeps blocks whole in device maps and caches every head", function()
         assert.are.same({ "CodeGenBlock" }, model.no_split_modules)
         assert.are.same({ 8, 6, 8, false }, { model.transformer.h[1].attn:kv_cache_heads() })
         assert.is_nil(model:max_length())                          -- (rotary positions)
      end)

      it("splits qkv_proj's output as 4 shards of queries, values and keys, the heads in order", function()
         -- a projection whose output channel j is j: each part's channels tell where they were read
         local attn = codegen.CodeGenForCausalLM(tiny({ n_embd = 16, n_head = 8, rotary_dim = 2 })).transformer.h[1].attn
         local w = ml.zeros({ 48, 16 })
         w:select(2, 1):copy_(ml.arange(0, 48):float())
         attn.qkv_proj.weight:copy_(w)
         local x = ml.zeros({ 1, 1, 16 })
         x:select(3, 1):fill_(1)
         local q, k, v = attn:project(x, 1, 1)
         -- shard s: channels 12 s .. 12 s + 11, 2 heads' queries first, then their values, then keys
         assert.are.same({ { { 0, 1 }, { 2, 3 }, { 12, 13 }, { 14, 15 }, { 24, 25 }, { 26, 27 }, { 36, 37 }, { 38, 39 } } },
            q:select(1, 1):tolist())
         assert.are.same({ { { 4, 5 }, { 6, 7 }, { 16, 17 }, { 18, 19 }, { 28, 29 }, { 30, 31 }, { 40, 41 }, { 42, 43 } } },
            v:select(1, 1):tolist())
         assert.are.same({ { { 8, 9 }, { 10, 11 }, { 20, 21 }, { 22, 23 }, { 32, 33 }, { 34, 35 }, { 44, 45 }, { 46, 47 } } },
            k:select(1, 1):tolist())
      end)

      it("builds from a config table with transformers' defaults", function()
         local m = codegen.CodeGenForCausalLM(tiny())
         assert.are.equal(2048, m.config.n_positions)
         assert.are.same({ 128, 32 }, m.transformer.h[1].mlp.fc_in.weight.shape)
         assert.are.equal("gelu_new", m.config.activation_function)
         assert.is_false(m.config.tie_word_embeddings)
         -- (rotary_dim's default 64 is wider than these heads of 8)
         local ok, err = pcall(codegen.CodeGenForCausalLM, { vocab_size = 50, n_embd = 32, n_layer = 1, n_head = 4 })
         assert.is_false(ok)
         assert.truthy(err:find("models.codegen: rotary_dim 64 must be even and at most head_dim 8 in config table", 1, true), err)
      end)
   end)

   describe("against transformers (codegen_tiny)", function()
      H.it_matches_expected(model, NAME, " (batch of 2, attention and MLP in parallel)")
      H.it_matches_padded(model, NAME, "rotary positions")

      it("differs from transformers with q, k, v split as GPT-J's or Llama's (in that order, or per head)", function()
         local plain = logits_after(function(m)
            for i = 1, 2 do
               rawset(m.transformer.h[i].attn, "project", function(self, x, B, L)
                  local p = self.qkv_proj(x):split(48, 3)
                  return p[1]:reshape(B, L, 8, 6), p[2]:reshape(B, L, 8, 6), p[3]:reshape(B, L, 8, 6)
               end)
            end
         end)
         assert.is_true(H.max_abs_diff(plain, exp.logits) > 0.1)
         local per_head = logits_after(function(m)          -- each head's q, v, k side by side
            for i = 1, 2 do
               rawset(m.transformer.h[i].attn, "project", function(self, x, B, L)
                  local p = self.qkv_proj(x):view(B, L, 8, 18):split(6, 4)
                  return p[1]:reshape(B, L, 8, 6), p[3]:reshape(B, L, 8, 6), p[2]:reshape(B, L, 8, 6)
               end)
            end
         end)
         assert.is_true(H.max_abs_diff(per_head, exp.logits) > 0.1)
      end)

      it("takes the rest of a prompt after any cached prefix, rotated from the cache's length", function()
         local full = model(ids)
         for split = 1, 7 do
            local cache = model:new_cache(1)   -- (the buffers grow)
            model(ids:narrow(2, 1, split), { cache = cache })
            local rest = model(ids:narrow(2, split + 1, 8 - split), { cache = cache })
            assert.is_true(H.max_abs_diff(rest, full:narrow(2, split + 1, 8 - split):tolist()) < 1e-5, split)
         end
      end)

      it("gives the same greedy ids in a block schedule and, row by row, with prompt lookup", function()
         local function greedy(prompt, more)
            local opts = { max_new_tokens = exp.max_new_tokens, eos_token_id = false }
            for k, v in pairs(more) do opts[k] = v end
            return model:generate(prompt, opts)
         end
         assert.are.same(exp.greedy_ids, greedy(exp.input_ids, { micro_batch_size = 1, prefill_chunk_size = 5 }))
         for b = 1, 2 do assert.are.same(exp.greedy_ids[b], greedy(exp.input_ids[b], { prompt_lookup_num_tokens = 2 })) end
      end)
   end)

   describe("loading options", function()
      H.collect_warnings()                    -- kept quiet

      it("runs blocks placed by a custom map (the first on disk), same logits and greedy ids", function()
         local off = H.tmpdir()
         local m = models.from_pretrained(DIR, { offload_folder = off, device_map = {
            ["transformer.wte"] = "cpu", ["transformer.h.0"] = "disk", ["transformer.h.1"] = "cpu",
            ["transformer.ln_f"] = "disk", ["transformer.rotary_emb"] = "cpu", lm_head = "disk" } })
         assert.are.equal("disk", tostring(m.hf_device_map["transformer.h.0"]))
         assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
         assert.are.same(exp.greedy_ids, m:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
         H.rmdir(off)
      end)

      it("skips the causal_mask and masked_bias buffers older checkpoints hold", function()
         local sd = ml.safetensors.load_file(DIR .. "/model.safetensors")
         sd["transformer.h.0.attn.causal_mask"] = ml.ones({ 1, 1, 64, 64 }, { dtype = "bool" })
         sd["transformer.h.1.attn.masked_bias"] = ml.tensor(-1e9)
         local path = os.tmpname()
         os.remove(path)
         path = path .. ".safetensors"
         ml.safetensors.save_file(sd, path)
         local m = codegen.CodeGenForCausalLM(H.read_json(DIR .. "/config.json"))
         models.load_checkpoint(m, path)
         os.remove(path)
         assert.is_true(H.max_abs_diff(m(ids), exp.logits) < TOL)
      end)

      it("saved and loaded back gives transformers' logits; int8 and bfloat16 stay close", function()
         local dir = H.tmpdir()
         ml.save_model(model, dir)
         assert.is_true(H.max_abs_diff(models.from_pretrained(dir)(ids), exp.logits) < TOL)
         H.rmdir(dir)
         assert.is_true(H.max_abs_diff(models.from_pretrained(DIR, { quantize = "int8" })(ids), exp.logits) < 0.3)
         local logits = models.from_pretrained(DIR, { dtype = "bfloat16" })(ids)
         assert.are.equal("bfloat16", logits.dtype)
         assert.is_true(H.max_abs_diff(logits:float(), exp.logits) < 0.25)
      end)
   end)

   describe("bad input", function()
      it("rejects token ids outside the vocabulary", function()
         assert.has_error(function() model({ 1, 100 }) end,
            "models.codegen.forward: token id 100 is out of range for vocab_size 100 (ids are 0-based)")
      end)

      it("names a missing config key, a value of the wrong kind, and the file", function()
         H.assert_config_fails(codegen.config, DIR, function(raw) raw.n_embd = nil end,
            'models.codegen: config key "n_embd" is missing in config table')
         H.assert_config_fails(codegen.config, DIR, { rotary_dim = 0 },
            'models.codegen: config key "rotary_dim" in config table must be a positive integer, got number 0')
         local dir = H.tmpdir()
         H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
         H.write(dir .. "/config.json", '{"model_type": "codegen", "vocab_size": 100, "n_embd": 48, "n_layer": 2, "n_head": 8, "rotary_dim": "4"}')
         assert.has_error(function() models.from_pretrained(dir) end,
            'models.codegen: config key "rotary_dim" in ' .. dir .. '/config.json must be a positive integer, got string "4"')
         H.rmdir(dir)
      end)

      it("rejects widths qkv_proj's 4 shards or the heads do not divide, and odd or too wide rotary_dim", function()
         H.assert_config_fails(codegen.config, DIR, { n_embd = 42, n_head = 7 },
            "models.codegen: n_embd 42 is not a multiple of 4 (qkv_proj's output is split into mp_num = 4 shards) in config table")
         H.assert_config_fails(codegen.config, DIR, { n_head = 5 },
            "models.codegen: n_embd 48 is not a multiple of n_head 5 in config table")
         H.assert_config_fails(codegen.config, DIR, { rotary_dim = 3 },
            "models.codegen: rotary_dim 3 must be even and at most head_dim 6 in config table")
         H.assert_config_fails(codegen.config, DIR, { rotary_dim = 8 },
            "models.codegen: rotary_dim 8 must be even and at most head_dim 6 in config table")
      end)

      it("refuses a checkpoint whose qkv_proj is not 3 x n_embd wide, changing nothing", function()
         local m = codegen.CodeGenForCausalLM(H.read_json(DIR .. "/config.json"))
         local before = m.transformer.wte.weight:clone()
         local dir = H.tmpdir()
         local sd = ml.safetensors.load_file(DIR .. "/model.safetensors")
         sd["transformer.h.1.attn.qkv_proj.weight"] = sd["transformer.h.1.attn.qkv_proj.weight"]:narrow(1, 1, 96):contiguous()
         ml.safetensors.save_file(sd, dir .. "/model.safetensors")
         local ok, err = pcall(models.load_checkpoint, m, dir .. "/model.safetensors")
         assert.is_false(ok)
         assert.truthy(err:find('"transformer.h.1.attn.qkv_proj.weight" (checkpoint [96, 48], model [144, 48])', 1, true), err)
         assert.is_true(m.transformer.wte.weight:equal(before))
         H.rmdir(dir)
      end)
   end)
end)
