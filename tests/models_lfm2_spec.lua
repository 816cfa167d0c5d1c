-- ml.models LFM2 (short convolutions beside grouped-query attention with q/k norms) against
-- transformers (tests/fixtures/gen_models.py lfm2): names, logits, greedy ids, decoding token by
-- token through the convolutions' carried inputs, padded batches, block schedules, offload, the
-- feed-forward width transformers derives, and bad configs.
local ml = require("moonload")
local models = require("moonload.models")
local lfm2 = require("moonload.models.lfm2")
local H = require("models_helpers")

local TOL = 1e-4
local NAME = "lfm2_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.lfm2 (tests/fixtures/models/lfm2_tiny: conv, attention, conv, attention)", function()
   H.collect_warnings()
   local exp = H.expected(NAME)
   local model = models.from_pretrained(DIR)

   it("builds Lfm2ForCausalLM with every tensor of the checkpoint, under its names, the head tied", function()
      assert.are.equal("Lfm2ForCausalLM", model.__name)
      local names = H.sorted_keys((model:state_dict()))
      local want = H.sorted_keys(ml.safetensors.load_file(DIR .. "/model.safetensors"))
      want[#want + 1] = "lm_head.weight"                   -- (tied: not in the file)
      table.sort(want)
      assert.are.same(want, names)
      assert.are.equal(model.model.embed_tokens.weight, model.lm_head.weight)
      assert.are.equal("Lfm2ShortConv", model.model.layers[1].conv.__name)
      assert.are.equal("Lfm2Attention", model.model.layers[2].self_attn.__name)
      -- 96 * 2 / 3 = 64, times 1.5 = 96, a multiple of 16
      assert.are.equal(96, model.model.layers[1].feed_forward.w1.out_features)
   end)

   it("gives transformers' logits and greedy ids", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
   end)

   it("decodes token by token through the convolutions' last inputs as one full forward", function()
      local ids = exp.input_ids[1]
      local cache = model:new_cache()
      local out = { model({ { ids[1], ids[2] } }, { cache = cache }) }
      for i = 3, #ids do out[#out + 1] = model({ { ids[i] } }, { cache = cache }) end
      assert.is_true(H.max_abs_diff(ml.cat(out, 2), { exp.logits[1] }) < TOL)
      assert.are.same({ 1, 2, 32 }, cache.states[1].conv.shape)          -- the last 2 of 3 taps' inputs
      assert.is_nil(cache.states[2])
      assert.is_false(cache:can_crop(#ids - 1))
   end)

   H.it_matches_padded(model, NAME, "positions and zeroes padding before the convolutions")

   it("runs the prompt in a block schedule and split over CPU and disk with the same tokens", function()
      local pad = H.read_json(DIR .. "/padded.json")
      assert.are.same(pad.greedy_ids, model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
         max_new_tokens = pad.max_new_tokens, eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 2 }))
      local dir = H.tmpdir()
      local split = models.from_pretrained(DIR, { device_map = { ["model.embed_tokens"] = "cpu", ["model.layers.0"] = "disk",
         ["model.layers.1"] = "cpu", ["model.layers.2"] = "disk", ["model.layers.3"] = "cpu", ["model.rotary_emb"] = "cpu",
         ["model.embedding_norm"] = "disk", lm_head = "cpu" }, offload_folder = dir })
      assert.are.same(exp.greedy_ids, split:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(dir)
   end)

   it("refuses assisted generation (the convolutions' inputs cannot be cropped back)", function()
      local ok, err = pcall(model.generate, model, { 1, 7, 9 }, { max_new_tokens = 3, prompt_lookup_num_tokens = 2 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("does not support Lfm2ForCausalLM", 1, true), tostring(err))
   end)

   it("names what is wrong in a config, and reads full_attn_idxs and LFM2's key names", function()
      local base = H.read_json(DIR .. "/config.json")
      local function with(over)
         local cfg = {}
         for k, v in pairs(base) do cfg[k] = v end
         for k, v in pairs(over) do cfg[k] = v end
         return cfg
      end
      local cases = {
         { { layer_types = { "conv", "full_attention", "mamba", "conv" } }, 'layer_types[3] is "mamba" (supported: conv, full_attention)' },
         { { layer_types = { "conv" } }, 'config key "layer_types" must list 4 layer types' },
         { { block_ffn_dim_multiplier = -1 }, 'config key "block_ffn_dim_multiplier" must be a positive number, got -1' },
      }
      for _, c in ipairs(cases) do
         local ok, err = pcall(lfm2.config, with(c[1]))
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
      end
      local raw = with({ full_attn_idxs = { 0, 2 }, norm_eps = 1e-3, block_auto_adjust_ff_dim = false })
      raw.layer_types = nil
      local cfg = lfm2.config(raw)
      assert.are.same({ "full_attention", "conv", "full_attention", "conv" }, cfg.layer_types)
      assert.are.equal(1e-3, cfg.rms_norm_eps)
      assert.are.equal(96, cfg.intermediate_size)
   end)
end)

describe("models.lfm2_moe (tests/fixtures/models/lfm2_moe_tiny: the first layer dense, then 6 experts, top 2)", function()
   H.collect_warnings()
   local name = "lfm2_moe_tiny"
   local exp = H.expected(name)
   local model = models.from_pretrained(H.FIX .. "/" .. name)

   it("builds Lfm2MoeForCausalLM with every tensor of the checkpoint (the experts one by one, expert_bias)", function()
      assert.are.equal("Lfm2MoeForCausalLM", model.__name)
      local want = H.sorted_keys(ml.safetensors.load_file(H.FIX .. "/" .. name .. "/model.safetensors"))
      want[#want + 1] = "lm_head.weight"
      table.sort(want)
      assert.are.same(want, H.sorted_keys((model:state_dict())))
      assert.are.equal("Lfm2MLP", model.model.layers[1].feed_forward.__name)
      assert.are.equal(48, model.model.layers[1].feed_forward.w1.out_features)         -- (not adjusted)
      assert.are.equal("Lfm2MoeSparseMoeBlock", model.model.layers[2].feed_forward.__name)
   end)

   it("gives transformers' logits and greedy ids, alone and as a padded batch", function()
      assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < TOL)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      local pad = H.read_json(H.FIX .. "/" .. name .. "/padded.json")
      assert.are.same(pad.greedy_ids, model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
         max_new_tokens = pad.max_new_tokens, eos_token_id = false }))
   end)

   it("chooses experts by score + expert_bias and weighs them by the scores alone", function()
      local m = models.from_pretrained(H.FIX .. "/" .. name)
      for i = 2, 4 do m.model.layers[i].feed_forward.expert_bias:fill_(0) end
      assert.is_true(H.max_abs_diff(m(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) > 1e-3)
      local block = model.model.layers[2].feed_forward
      local w = block:route(ml.randn(3, 32))
      assert.is_true(math.abs(w:sum(2):max():item() - 1.5) < 1e-5)            -- renormalized, times 1.5
   end)

   it("reads only the experts the router picked with them on disk", function()
      local dir = H.tmpdir()
      local m = models.from_pretrained(H.FIX .. "/" .. name, { device_map = "auto", max_memory = { cpu = 150000 },
         offload_folder = dir, device_overrides = { ["%.feed_forward%.experts%.%d+$"] = "disk" } })
      assert.are.equal("disk", m.hf_device_map["model.layers.1.feed_forward.experts.0"])
      assert.are.same(exp.greedy_ids[1], m:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(dir)
   end)
end)
