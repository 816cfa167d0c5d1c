-- ml.models Qwen3-Next (Gated DeltaNet linear attention beside gated full attention, (1 + w)
-- norms, routed and shared experts) against transformers (tests/fixtures/gen_models.py
-- qwen3_next, and beams): names, logits, greedy ids, decoding token by token through the cache's
-- recurrent state, padded batches, block schedules, offload, beam search (models_beam_search_spec),
-- what the cache can and cannot do with a state, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local qwen3_next = require("moonload.models.qwen3_next")
local H = require("models_helpers")

-- The fixture's hidden states reach 70, so float32 rounding gives logits (up to 12) a few 1e-4
-- apart: transformers' own batch of one and of two differ by 5e-5, and its float64 logits are
-- 2.4e-4 from the float32 ones it wrote; the kernel's recurrence is within 2e-7 of float64's.
-- Splitting the tokens or rows otherwise than the fixture rounds otherwise again.
local TOL = 5e-4
local SPLIT_TOL = 1e-3
local NAME = "qwen3_next_tiny"
local DIR = H.FIX .. "/" .. NAME

local sorted_keys = H.sorted_keys

describe("models.qwen3_next (tests/fixtures/models/qwen3_next_tiny: linear, full, linear, full; the third layer dense)", function()
   H.collect_warnings()
   local exp = H.expected(NAME)
   local model = models.from_pretrained(DIR)

   it("builds Qwen3NextForCausalLM with every tensor of the checkpoint, under its names", function()
      assert.are.equal("Qwen3NextForCausalLM", model.__name)
      assert.are.same(sorted_keys(ml.safetensors.load_file(DIR .. "/model.safetensors")), sorted_keys(model:state_dict()))
      local layers = model.model.layers
      assert.are.equal("Qwen3NextGatedDeltaNet", layers[1].linear_attn.__name)
      assert.are.equal("Qwen3NextAttention", layers[2].self_attn.__name)
      assert.are.equal("Qwen3NextSparseMoeBlock", layers[1].mlp.__name)
      assert.are.equal("Qwen3NextMLP", layers[3].mlp.__name)
      assert.are.equal(4, model.config.rotary_dim)                     -- half of each 8-dim head
      assert.truthy(tostring(model):find("Conv1d(56, 56, kernel_size=(4,), stride=(1,), padding=(3,), groups=56, bias=False)", 1, true))
   end)

   it("gives transformers' logits and greedy ids", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   it("decodes token by token through the cache's conv inputs and states as one full forward", function()
      local ids = exp.input_ids[2]
      local cache = model:new_cache()
      local out = { model({ { ids[1], ids[2], ids[3] } }, { cache = cache }) }
      for i = 4, #ids do out[#out + 1] = model({ { ids[i] } }, { cache = cache }) end
      assert.is_true(H.max_abs_diff(ml.cat(out, 2), { exp.logits[2] }) < SPLIT_TOL)
      -- the linear layers keep a state, the full ones keys and values
      assert.are.same({ "conv", "recurrent" }, sorted_keys(cache.states[1]))
      assert.are.same({ 1, 3, 56 }, cache.states[1].conv.shape)
      assert.are.same({ 1, 4, 8, 6 }, cache.states[3].recurrent.shape)
      assert.is_nil(cache.states[2])
      assert.are.equal(#ids, cache.k[2]:size(3) >= #ids and #ids or -1)
      local state = 0
      for _, i in ipairs({ 1, 3 }) do state = state + cache.states[i].conv:nbytes() + cache.states[i].recurrent:nbytes() end
      assert.are.equal(state + cache.k[2]:nbytes() + cache.v[2]:nbytes() + cache.k[4]:nbytes() + cache.v[4]:nbytes(),
         cache:nbytes())
   end)

   H.it_matches_padded(model, NAME, "positions and zeroes padding before the linear layers")

   it("runs the prompt in a block schedule (2-token chunks, one row at a time) with the same tokens", function()
      local pad = H.read_json(DIR .. "/padded.json")
      assert.are.same(pad.greedy_ids, model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
         max_new_tokens = pad.max_new_tokens, eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 2 }))
      -- a forward without a cache in chunks: the schedule's own cache carries the state between them
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" }), { prefill_chunk_size = 3 }),
         exp.logits) < SPLIT_TOL)
   end)

   it("gives the same tokens split over CPU and disk, and streamed by cpu_offload", function()
      local dir = H.tmpdir()
      local split = models.from_pretrained(DIR, { device_map = { ["model.embed_tokens"] = "cpu",
         ["model.layers.0"] = "disk", ["model.layers.1"] = "cpu", ["model.layers.2"] = "disk", ["model.layers.3"] = "cpu",
         ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "disk" }, offload_folder = dir })
      assert.are.same(exp.greedy_ids, split:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(dir)
      local streamed = models.from_pretrained(DIR)
      ml.cpu_offload(streamed, { execution_device = "cpu" })
      assert.are.same(exp.greedy_ids[1], streamed:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   it("keeps the cache's states from going back, and refuses assisted generation", function()
      local cache = model:new_cache()
      model({ { 1, 7, 9, 33 } }, { cache = cache })
      assert.is_true(cache:can_crop(4))
      assert.is_false(cache:can_crop(2))
      local ok, err = pcall(cache.crop, cache, 2)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("layer 1 keeps a recurrent state (linear attention) that has seen all 4 tokens: cannot crop it back to 2", 1, true), tostring(err))
      for _, opts in ipairs({ { prompt_lookup_num_tokens = 3 }, { assistant_model = model } }) do
         opts.max_new_tokens = 4
         ok, err = pcall(model.generate, model, { 1, 7, 9, 33 }, opts)
         assert.is_false(ok)
         assert.truthy(tostring(err):find("does not support Qwen3NextForCausalLM: its linear-attention layers keep a recurrent state", 1, true), tostring(err))
      end
   end)

   it("reorders the states with the rows (beam search's reorder)", function()
      local cache = model:new_cache()
      model({ { 1, 7, 9 }, { 1, 60, 61 } }, { cache = cache })
      local before = cache.states[1].recurrent:clone()
      cache:reorder({ 1, 1, 0 })
      assert.are.same({ 3, 4, 8, 6 }, cache.states[1].recurrent.shape)
      assert.is_true(H.max_abs_diff(cache.states[1].recurrent:select(1, 3), before:select(1, 1):tolist()) == 0)
      assert.is_true(H.max_abs_diff(cache.states[1].recurrent:select(1, 1), before:select(1, 2):tolist()) == 0)
   end)

   it("leaves out the checkpoint's multi-token-prediction head (mtp.*)", function()
      local dir = H.tmpdir()
      H.copy(DIR .. "/config.json", dir .. "/config.json")
      local tensors = ml.safetensors.load_file(DIR .. "/model.safetensors")
      tensors["mtp.fc.weight"] = ml.zeros({ 32, 64 })
      tensors["mtp.layers.0.input_layernorm.weight"] = ml.zeros({ 32 })
      ml.safetensors.save_file(tensors, dir .. "/model.safetensors")
      local m = models.from_pretrained(dir)
      assert.is_true(H.max_abs_diff(m(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      H.rmdir(dir)
   end)

   -- (bfloat16 logits are not compared: in this tiny random model a rounding flips expert choices,
   -- and transformers' own bfloat16 logits land up to 7.5 from its float32 ones)
   it("keeps a bfloat16 model's conv inputs in bfloat16 and its state in float32", function()
      local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
      local cache = m:new_cache()
      local logits = m(ml.tensor(exp.input_ids, { dtype = "int64" }), { cache = cache })
      local f = logits:float()
      assert.are.equal(f:numel(), f:eq(f):sum():item())                  -- no NaN
      assert.are.equal("bfloat16", cache.states[1].conv.dtype)
      assert.are.equal("float32", cache.states[1].recurrent.dtype)
   end)

   it("names what is wrong in a config", function()
      local base = H.read_json(DIR .. "/config.json")
      local cases = {
         { { layer_types = { "linear_attention", "full_attention", "mamba", "full_attention" } },
           'layer_types[3] is "mamba" (supported: linear_attention, full_attention)' },
         { { layer_types = { "linear_attention" } }, 'config key "layer_types" must list 4 layer types' },
         { { linear_num_value_heads = 3 }, "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2" },
         { { linear_conv_kernel_dim = 0 }, "linear_conv_kernel_dim" },
      }
      for _, c in ipairs(cases) do
         local cfg = {}
         for k, v in pairs(base) do cfg[k] = v end
         for k, v in pairs(c[1]) do cfg[k] = v end
         local ok, err = pcall(qwen3_next.config, cfg)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
      -- without layer_types: every full_attention_interval-th layer is full
      local cfg = {}
      for k, v in pairs(base) do cfg[k] = v end
      cfg.layer_types, cfg.full_attention_interval = nil, 2
      assert.are.same(base.layer_types, qwen3_next.config(cfg).layer_types)
   end)
end)

describe("examples/hybrid.lua", function()
   it("runs the test folder with its experts on disk, prints the model's greedy tokens and the cache it kept", function()
      local p = assert(io.popen("luajit examples/hybrid.lua 2>/dev/null"))
      local text = p:read("*a")
      p:close()
      assert.truthy(text:find("Qwen3NextForCausalLM, [%d.]+ MB of weights in RAM, [%d.]+ MB on disk"), text)
      assert.truthy(text:find("layers: linear full linear full", 1, true), text)
      local want = models.from_pretrained(DIR, { dtype = "bfloat16" }):generate({ 1, 5, 17, 42, 3 },
         { max_new_tokens = 16, eos_token_id = false })
      assert.are.same({ unpack(want, 6) }, H.printed_ids(text))
      -- 2 linear layers: conv inputs (3 x 56 bfloat16) and a 4 x 8 x 6 float32 state each
      assert.truthy(text:find("21 tokens; cache: 2.2 KB of fixed-size state", 1, true), text)
   end)
end)
