-- Memory beside the weights: the key-value cache and activations a causal model needs while it
-- generates (utils/runtime_memory.lua), and infer_auto_device_map / from_pretrained budgeting
-- them (runtime_sizes, workspace_size, reserve_for).
local ml = require("moonload")
local models = require("moonload.models")
local u = require("moonload.utils")
local rm = require("moonload.utils.runtime_memory")
local big = require("moonload.big_modeling")
local nn = require("moonload.nn")
local H = require("models_helpers")

local FAMILIES = { "gpt2_tiny", "llama_tiny_untied", "mistral_tiny", "qwen2_tiny", "qwen3_tiny", "phi3_tiny",
                   "gemma2_tiny", "gemma3_tiny", "gemma3_multimodal_tiny", "qwen3_moe_tiny", "mixtral_tiny",
                   "gpt_neox_tiny", "qwen2_moe_tiny", "starcoder2_tiny", "olmo2_tiny", "phi_tiny",
                   "deepseek_v3_tiny", "deepseek_v2_lite_tiny", "glm4_moe_tiny", "gpt_oss_tiny",
                   "gpt_oss_mxfp4_tiny", "qwen3_next_tiny", "olmo_hybrid_tiny", "minimax_tiny", "qwen3_5_tiny",
                   "qwen3_5_moe_multimodal_tiny", "lfm2_tiny",
                   "lfm2_moe_tiny", "lfm3_tiny", "lfm3_plain_tiny", "minimax_m2_tiny", "olmo3_tiny", "llama4_tiny", "ernie4_5_tiny", "ernie4_5_moe_tiny", "exaone4_tiny",
                   "hunyuan_v1_dense_tiny", "hunyuan_v1_moe_tiny", "cohere_tiny", "cohere2_tiny", "glm4_tiny", "granite_tiny", "granitemoe_tiny", "olmoe_tiny", "phimoe_tiny", "internlm3_tiny", "arcee_tiny", "apertus_tiny", "gemma_tiny", "ministral_tiny", "helium_tiny", "glm_tiny", "olmo_tiny", "nemotron_tiny", "stablelm_tiny", "stablelm_12b_tiny", "gpt_bigcode_tiny", "gpt_bigcode_mha_tiny", "exaone_tiny", "vaultgemma_tiny", "mpt_tiny", "solar_open_tiny", "dbrx_tiny", "gpt_neo_tiny", "codegen_tiny", "flex_olmo_tiny", "cohere2_moe_tiny", "cohere2_moe_sigmoid_tiny", "afmoe_tiny", "hy_v3_tiny", "mimo_v2_flash_tiny", "longcat_flash_tiny", "laguna_tiny", "laguna_per_element_tiny", "exaone_moe_tiny", "minicpm3_tiny", "zamba_tiny", "zamba2_tiny", "zamba2_untied_tiny", "recurrent_gemma_tiny", "youtu_tiny", "diffllama_tiny", "doge_tiny", "doge_moe_tiny", "gpt_neox_japanese_tiny", "lara_mini_tiny", "zaya_tiny", "apertus1p5_text_tiny", "apertus1p5_multimodal_tiny", "cohere_compass_text_tiny", "cohere_compass_multimodal_tiny", "jetmoe_tiny", "sarvam_moe_tiny", "sarvam_mla_tiny", "kolibri1_tiny", "flint_tiny", "axk1_tiny", "mellum_tiny", "persimmon_tiny", "xglm_tiny", "biogpt_tiny", "openai_gpt_tiny", "ctrl_tiny", "gpt_sw3_tiny", "iquestcoder_tiny", "cwm_tiny", "jais2_tiny", "bitnet_tiny", "nanochat_tiny", "granitemoeshared_tiny", "granite_swa_tiny", "granitemoe_swa_tiny", "hyperclovax_tiny",
                   "glm4v_multimodal_tiny", "glm4v_moe_multimodal_tiny", "dots1_tiny",
                   "bamba_tiny", "granitemoehybrid_tiny", "granitemoehybrid_dense_tiny",
                   "nemotron_h_tiny", "nemotron_h_latent_tiny", "mamba2_tiny", "mamba2_tiny_tied", "jamba_tiny", "mamba_tiny", "falcon_mamba_tiny", "falcon_h1_tiny",
                   "gemma4_tiny", "gemma4_moe_tiny", "gemma4_multimodal_tiny" }

local prompts = H.padded_prompts

local function sum(t)
   local s = 0
   for _, v in pairs(t) do s = s + v end
   return s
end

describe("utils.runtime_memory", function()
   H.collect_warnings()
   after_each(function() ml.set_gc_cap("cpu", 0) end)

   describe("kv_cache_sizes", function()
      for _, name in ipairs(FAMILIES) do
         it(name .. ": equals what generate's cache allocates, layer by layer", function()
            local model = models.from_pretrained(H.FIX .. "/" .. name)
            local B, P, max_length = 2, 5, 40
            local sizes = rm.kv_cache_sizes(model, { batch_size = B, max_length = max_length, prompt_length = P })
            local names = {}
            for n in pairs(sizes) do names[#names + 1] = n end
            local cache = model:new_cache(max_length)
            model(prompts(model, B, P), { cache = cache })
            -- every layer that keeps something, and nothing else (Nemotron-H's MLP layers keep nothing)
            local keeping = 0
            for i = 1, cache.n_layers do
               if cache.states[i] then keeping = keeping + 1 end     -- (Falcon-H1's layers keep both)
               if cache.k[i] then keeping = keeping + 1 end
            end
            assert.are.equal(keeping, #names)
            -- a linear attention's state (Qwen3-Next), or the keys and values
            local function held(c, i, m)
               if m.state_bytes then
                  local n = 0
                  for _, t in pairs(c.states[i]) do n = n + t:nbytes() end
                  return n
               end
               return c.k[i]:nbytes() + c.v[i]:nbytes() + (c.ks[i] and c.ks[i]:nbytes() + c.vs[i]:nbytes() or 0)
            end
            -- module order = layer order; a module that knows its layer says which
            local i, sliding = 0, 0
            for n, m in model:named_modules() do
               if sizes[n] then
                  i = i + 1
                  assert.are.equal(held(cache, m.layer_idx or i, m), sizes[n], n)
                  if m.window then sliding = sliding + 1 end
               end
            end
            assert.are.equal(#names, i)
            -- an int8 cache: int8 values and their float32 scales, as allocated
            local int8 = rm.kv_cache_sizes(model, { batch_size = B, max_length = max_length, prompt_length = P,
               kv_cache_dtype = "int8" })
            local c8 = model:new_cache(max_length, nil, "int8")
            model(prompts(model, B, P), { cache = c8 })
            i = 0
            for n, m in model:named_modules() do
               if sizes[n] then
                  i = i + 1
                  assert.are.equal(held(c8, m.layer_idx or i, m), int8[n], n)
               end
            end
            -- the sliding layers (windows of 3 to 5 tokens in the fixtures) keep 5 + 2 windows, not 40
            local windows = { mistral_tiny = 2, qwen2_tiny = 1, qwen3_tiny = 1, phi3_tiny = 2, gemma2_tiny = 2,
                              gemma3_tiny = 2, gemma3_multimodal_tiny = 2, starcoder2_tiny = 2,
                              gpt_oss_tiny = 2, gpt_oss_mxfp4_tiny = 2, olmo3_tiny = 3, exaone4_tiny = 3, cohere2_tiny = 3,
                              phimoe_tiny = 2, dots1_tiny = 1, ministral_tiny = 2, vaultgemma_tiny = 2, gpt_neo_tiny = 2, cohere2_moe_tiny = 2, cohere2_moe_sigmoid_tiny = 2, afmoe_tiny = 2, mimo_v2_flash_tiny = 2, lfm3_tiny = 1, lfm3_plain_tiny = 1, laguna_tiny = 2, exaone_moe_tiny = 2,
                              gemma4_tiny = 2, gemma4_moe_tiny = 5, gemma4_multimodal_tiny = 2,
                              granite_swa_tiny = 3, granitemoe_swa_tiny = 2, cwm_tiny = 2, kolibri1_tiny = 2, flint_tiny = 2, mellum_tiny = 2,
                              cohere_compass_text_tiny = 3, cohere_compass_multimodal_tiny = 3, zaya_tiny = 1, lara_mini_tiny = 2, recurrent_gemma_tiny = 1 }
            assert.are.equal(windows[name] or 0, sliding)
         end)
      end
   end)

   describe("activation_size", function()
      -- Measured in a fresh process (tests/runtime_memory_probe.lua): it collects garbage at
      -- every new tensor so that the peak holds live tensors only, which the suite's large Lua
      -- heap would make slow.
      local luajit = os.getenv("LUAJIT") or "luajit"
      local p = io.popen(luajit .. " tests/runtime_memory_probe.lua " .. table.concat(FAMILIES, " ") .. " 2>&1")
      local out = p:read("*a")
      p:close()
      local results = {}
      for line in out:gmatch("[^\n]+") do
         local ok, r = pcall(require("cjson").decode, line)
         if ok and type(r) == "table" then results[r.name] = r end
      end

      it("measures the block schedule for one family per decoder loop and attention kind", function()
         local n = 0
         for _, r in pairs(results) do if r.blocked then n = n + 1 end end
         assert.are.equal(7, n)
      end)

      for _, name in ipairs(FAMILIES) do
         it(name .. ": bounds the measured peak from above, within 3x (3.5x in blocks)", function()
            local r = results[name]
            assert.is_table(r, "probe output: " .. out)
            -- (the probe measures the block schedule for some families only)
            local cases = { "generate", "prefill", "decode", r.blocked and "blocked" or nil }
            for _, case in ipairs(cases) do
               local m = r[case]
               assert.is_table(m, case .. " missing from the probe output: " .. out)
               local label = string.format("%s %s: estimate %d, measured %d", name, case, m.estimate, m.measured)
               assert.is_true(m.measured > 0 and m.estimate >= m.measured, label)
               -- one decoding step of a tiny model is outweighed by generate's masks and the logits
               -- (Gemma 2's score tensors, counted 4 times for a block's rows over all keys, weigh
               -- most in a tiny model)
               if case ~= "decode" then assert.is_true(m.estimate <= (case == "blocked" and 3.5 or 3) * m.measured, label) end
            end
         end)
      end
   end)

   describe("reserve_for", function()
      local model = models.from_config(H.FIX .. "/llama_tiny_untied/config.json")
      it("names what is wrong", function()
         local cases = {
            { {}, "max_length is required" },
            { { max_length = 0 }, "max_length must be an integer >= 1, got 0" },
            { { max_length = 8, batch_size = 1.5 }, "batch_size must be an integer >= 1, got 1.5" },
            { { max_length = 8, prompt_length = 9 }, "prompt_length 9 exceeds max_length 8" },
            { { max_length = 8, context = 4 }, 'unknown key "context"' },
            { { max_length = 8, micro_batch_size = 0 }, "micro_batch_size must be an integer >= 1, got 0" },
            { { max_length = 8, prefill_chunk_size = "4" }, "prefill_chunk_size must be an integer >= 1, got 4" },
            { { max_length = 8, kv_cache_dtype = "int4" }, 'kv_cache_dtype must be "int8" (or absent: the computing dtype), got int4' },
         }
         for _, c in ipairs(cases) do
            local ok, err = pcall(u.runtime_memory_sizes, model, c[1])
            assert.is_false(ok)
            assert.truthy(tostring(err):find(c[2], 1, true), tostring(err))
         end
         local ok, err = pcall(u.kv_cache_sizes, model, 4096)
         assert.is_false(ok)
         assert.truthy(err:find("reserve_for must be a table", 1, true), err)
      end)

      it("scales the cache with batch, length and dtype", function()
         local one = sum(u.kv_cache_sizes(model, { max_length = 10 }))
         -- int8 weights leave the activations, and so the cache, in the model's dtype
         local int8 = ml.quantize(models.from_pretrained(H.FIX .. "/llama_tiny_untied"))
         assert.are.equal(one, sum(u.kv_cache_sizes(int8, { max_length = 10 })))
         -- int8: head dim 8, one scale per 8 values (1.5 bytes a value where float32 takes 4)
         assert.are.equal(one * 1.5 / 4, sum(u.kv_cache_sizes(model, { max_length = 10, kv_cache_dtype = "int8" })))
         -- decoding reads the int8 bytes; a prompt over 32 tokens dequantizes a layer's keys and values
         local _, w = u.runtime_memory_sizes(model, { max_length = 10 })
         local _, w8 = u.runtime_memory_sizes(model, { max_length = 10, kv_cache_dtype = "int8" })
         assert.are.same(w, w8)
         _, w = u.runtime_memory_sizes(model, { max_length = 100, prompt_length = 64 })
         _, w8 = u.runtime_memory_sizes(model, { max_length = 100, prompt_length = 64, kv_cache_dtype = "int8" })
         assert.is_true(w8.gpu > w.gpu)
         assert.are.equal(3 * 7 * one, sum(u.kv_cache_sizes(model, { batch_size = 3, max_length = 70 })))
         assert.are.equal(one / 2, sum(u.kv_cache_sizes(model, { max_length = 10, dtype = "bfloat16" })))
      end)

      it("counts a block schedule's activations as one block's beside the layer's input and output", function()
         local whole = { batch_size = 8, max_length = 300, prompt_length = 256 }
         local blocked = { batch_size = 8, max_length = 300, prompt_length = 256, micro_batch_size = 2, prefill_chunk_size = 64 }
         assert.are.same(u.kv_cache_sizes(model, whole), u.kv_cache_sizes(model, blocked))
         local a, b = u.activation_size(model, whole), u.activation_size(model, blocked)
         assert.is_true(b < a / 3, string.format("blocked %d, whole %d", b, a))
         -- the hidden states of the whole batch (in and out of a layer) are in it
         assert.is_true(b > 2 * 8 * 256 * 32 * 4)
         -- blocks as large as the batch and prompt are no blocks
         assert.are.equal(a, u.activation_size(model, { batch_size = 8, max_length = 300, prompt_length = 256,
            micro_batch_size = 8, prefill_chunk_size = 999 }))
      end)

      it("gives workspaces with the garbage share and, on the CPU, the block cache and prefetch", function()
         local r = { batch_size = 2, max_length = 64 }
         local runtime, workspace, garbage = u.runtime_memory_sizes(model, r)
         local act = u.activation_size(model, r)
         assert.are.same(u.kv_cache_sizes(model, r), runtime)
         assert.are.equal(math.max(16 * 1024 * 1024, math.ceil(act / 4)), garbage)
         assert.are.equal(act + garbage, workspace.gpu)
         local ahead = require("moonload.hooks").prefetch_lookahead()
         assert.are.equal(act + 2 * garbage + ahead + 32 * 1024 * 1024, workspace.cpu)
      end)
   end)
end)

-- A model of four equal blocks (1000 float32 each, 4000 bytes) for checking placement by hand.
-- Accelerate's planner keeps room on a main device for the largest layer still to place (4000
-- until the last block, then nothing).
local Block = nn.Module:extend("Block")
function Block:__init() nn.Module.__init(self); self.w = nn.Parameter(ml.zeros(1000)) end
local Net = nn.Module:extend("Net")
function Net:__init()
   nn.Module.__init(self)
   for i = 0, 3 do self:add_module("b" .. i, Block()) end
end

describe("infer_auto_device_map with runtime memory", function()
   local net = Net()
   local no_split = { "Block" }
   local function runtime(bytes)
      local t = {}
      for i = 0, 3 do t["b" .. i] = bytes end
      return t
   end
   local function map_of(opts)
      opts.no_split_module_classes = no_split
      local map = u.infer_auto_device_map(net, opts)
      local out = {}
      for i = 0, 3 do out[i + 1] = map["b" .. i] or map[""] end
      return out
   end
   H.collect_warnings()

   it("on the CPU alone, takes every cache and the workspace off the CPU budget", function()
      -- Accelerate's map: 15000 - 4000 kept = 11000 holds two blocks
      assert.are.same({ "cpu", "cpu", "disk", "disk" }, map_of({ max_memory = { cpu = 15000 } }))
      -- whatever their placement, the blocks run on the CPU: 4 x 1000 off the budget
      assert.are.same({ "cpu", "disk", "disk", "disk" },
         map_of({ max_memory = { cpu = 15000 }, runtime_sizes = runtime(1000) }))
      assert.are.same({ "disk", "disk", "disk", "disk" },
         map_of({ max_memory = { cpu = 15000 }, runtime_sizes = runtime(1000), workspace_size = { cpu = 3500 } }))
      local ok, err = pcall(u.infer_auto_device_map, net,
         { max_memory = { cpu = 15000 }, runtime_sizes = runtime(5000), no_split_module_classes = no_split })
      assert.is_false(ok)
      assert.truthy(err:find("max_memory for cpu (15000 bytes) cannot hold the runtime_sizes", 1, true), err)
      -- what is left must still run the largest block from disk
      ok, err = pcall(u.infer_auto_device_map, net,
         { max_memory = { cpu = 15000 }, runtime_sizes = runtime(2800), no_split_module_classes = no_split })
      assert.is_false(ok)
      assert.truthy(err:find("max_memory for cpu leaves 3800 bytes beside the memory reserved for the run (11200 bytes), less than the largest layer (4000 bytes)", 1, true), err)
   end)

   it("charges a GPU's own layers there and the offloaded layers' caches to the main GPU", function()
      -- Accelerate's map: all four fit (the last block needs no room kept beside it)
      assert.are.same({ 0, 0, 0, 0 }, map_of({ max_memory = { [0] = 19000, cpu = 1e9 } }))
      -- each block needs 1000 more where it runs; offloaded blocks run on 0, which keeps room
      -- for their caches: two blocks with theirs (10000), 2000 for the others', 4000 for a layer
      assert.are.same({ 0, 0, "cpu", "cpu" },
         map_of({ max_memory = { [0] = 19000, cpu = 1e9 }, runtime_sizes = runtime(1000) }))
      -- a second GPU runs its own blocks, caches there: 0 keeps nothing for them
      assert.are.same({ 0, 0, 1, 1 },
         map_of({ max_memory = { [0] = 14000, [1] = 20000, cpu = 1e9 }, runtime_sizes = runtime(1000) }))
      -- the workspace comes off every GPU: 15000 left holds one block, its cache and three others'
      assert.are.same({ 0, "cpu", "cpu", "cpu" },
         map_of({ max_memory = { [0] = 19000, cpu = 1e9 }, runtime_sizes = runtime(1000), workspace_size = { gpu = 4000 } }))
   end)

   it("shares the runtime memory out in balanced budgets", function()
      local plain = u.get_balanced_memory(net, { max_memory = { [0] = 1e9, [1] = 1e9, cpu = 1e9 }, no_split_module_classes = no_split })
      local with = u.get_balanced_memory(net, { max_memory = { [0] = 1e9, [1] = 1e9, cpu = 1e9 }, no_split_module_classes = no_split,
         runtime_sizes = runtime(1000), workspace_size = 500 })
      assert.are.equal(plain[0] + 2000 + 500, with[0])
   end)

   it("rejects malformed runtime_sizes and workspace_size", function()
      local cases = {
         { { runtime_sizes = 5 }, "runtime_sizes must be a table" },
         { { runtime_sizes = { b0 = -1 } }, "runtime_sizes[b0] = -1 is not a byte count" },
         { { workspace_size = "1GB" }, "workspace_size must be a byte count" },
         { { workspace_size = { disk = 5 } }, 'workspace_size[disk] = 5: expected keys "cpu" and "gpu"' },
      }
      for _, c in ipairs(cases) do
         c[1].max_memory = { cpu = 15000 }
         local ok, err = pcall(u.infer_auto_device_map, net, c[1])
         assert.is_false(ok)
         assert.truthy(err:find(c[2], 1, true), err)
      end
   end)
end)

describe("from_pretrained with reserve_for", function()
   local warnings = H.collect_warnings()
   local default_cache = ml.cpu_cache_limit()
   after_each(function()
      ml.set_gc_cap("cpu", 0)
      ml.set_cpu_cache_limit(default_cache)
   end)

   local name = "llama_tiny_untied"
   local reserve = { batch_size = 2, max_length = 40, prompt_length = 20 }

   it("keeps the cache and activations inside the CPU budget, moving layers to disk for them", function()
      local exp = H.expected(name)
      local dir = H.tmpdir()
      local skeleton = big.init_empty_weights(function() return models.from_config(H.FIX .. "/" .. name .. "/config.json") end)
      local runtime, workspace = u.runtime_memory_sizes(skeleton, reserve)
      local reserved = sum(runtime) + workspace.cpu
      local weights_budget = 70000                            -- what models_dispatch_spec gives the weights
      local plain = models.from_pretrained(H.FIX .. "/" .. name,
         { device_map = "auto", max_memory = { cpu = reserved + weights_budget }, offload_folder = dir })
      assert.is_nil(rawget(plain, "reserved_for"))
      local model = models.from_pretrained(H.FIX .. "/" .. name, { device_map = "auto", reserve_for = reserve,
         max_memory = { cpu = reserved + weights_budget }, offload_folder = dir })
      -- the same split as the weights alone get from weights_budget
      local alone = models.from_pretrained(H.FIX .. "/" .. name,
         { device_map = "auto", max_memory = { cpu = weights_budget }, offload_folder = dir })
      assert.are.same(alone.hf_device_map, model.hf_device_map)
      assert.are_not.same(plain.hf_device_map, model.hf_device_map)
      assert.are.same({ batch_size = 2, max_length = 40, prompt_length = 20 }, model.reserved_for)
      -- the dispatcher capped the garbage at the plan's share
      local _, _, garbage = u.runtime_memory_sizes(skeleton, reserve)
      assert.are.equal(garbage, ml.set_gc_cap("cpu", garbage))
      assert.are.equal(garbage, ml.set_cpu_cache_limit(garbage))

      -- a generation of the reserved size allocates no more than the plan kept beside the block
      -- cache (which is not counted as allocated)
      local ids, mask = prompts(model, 2, 20)
      collectgarbage()
      local base = ml.memory_allocated("cpu")
      ml.reset_peak_memory("cpu")
      local out = model:generate(ids, { max_new_tokens = 20, attention_mask = mask })
      local _, peak = ml.memory_allocated("cpu")
      local tensors = reserved - garbage - 32 * 1024 * 1024
      assert.is_true(peak - base <= tensors, string.format("allocated %d of %d", peak - base, tensors))
      assert.are.same(alone:generate(ids, { max_new_tokens = 20, attention_mask = mask }), out)
      assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens }))
      local function reserve_warnings()
         local n = 0
         for _, w in ipairs(warnings) do if w:find("reserve_for", 1, true) then n = n + 1 end end
         return n
      end
      assert.are.equal(0, reserve_warnings())

      -- beyond the reserved size: a warning that says so
      model:generate(ids[1], { max_new_tokens = 30 })
      assert.are.equal(1, reserve_warnings())
      assert.truthy(warnings[#warnings]:find("more than the device map reserved memory for (reserve_for = {batch_size = 2, max_length = 40, prompt_length = 20})", 1, true), warnings[1])
      H.rmdir(dir)
   end)

   it("counts the cache on the CPU with kv_cache_device = \"cpu\", leaving the GPU to the layers", function()
      local skeleton = big.init_empty_weights(function() return models.from_config(H.FIX .. "/" .. name .. "/config.json") end)
      local r = { batch_size = 64, max_length = 64 }
      local runtime, workspace = u.runtime_memory_sizes(skeleton, r)
      local cache = sum(runtime)
      local weights = u.compute_module_sizes(skeleton)[""]
      -- room on GPU 0 for the weights and the workspace, and half the cache
      local max_memory = { [0] = weights + workspace.gpu + cache / 2, cpu = 4 * cache }
      local function plan(reserve)
         local map, reserved = big._plan_device_map(skeleton, { device_map = "sequential", max_memory = max_memory,
            reserve_for = reserve }, "test")
         return map, reserved
      end
      -- the caches follow their layers: the GPU cannot hold them, nor those of layers moved off it
      local ok, err = pcall(plan, r)
      assert.is_false(ok)
      assert.truthy(err:find("cannot hold the runtime memory of the offloaded modules", 1, true), err)
      local on_cpu, reserved = plan({ batch_size = 64, max_length = 64, kv_cache_device = "cpu" })
      assert.are.same({ [""] = 0 }, on_cpu)
      assert.are.same({ device = "cpu", bytes = cache }, reserved.cache_elsewhere)
      assert.are.equal("cpu", reserved.reserve_for.kv_cache_device)
      -- the cache must fit the CPU's budget
      max_memory.cpu = cache - 1
      ok, err = pcall(plan, { batch_size = 64, max_length = 64, kv_cache_device = "cpu" })
      assert.is_false(ok)
      assert.truthy(err:find("test: reserve_for: the key-value cache (" .. cache .. " bytes) does not fit in max_memory for cpu", 1, true), err)
      ok, err = pcall(plan, { max_length = 64, kv_cache_device = "disk" })
      assert.is_false(ok)
      assert.truthy(err:find('kv_cache_device must be "cpu" or a GPU ("cuda:N" or N), got disk', 1, true), err)
   end)

   it("plans an int8 cache and generates with it", function()
      local dir = H.tmpdir()
      local r = { batch_size = 2, max_length = 40, prompt_length = 10, kv_cache_dtype = "int8" }
      local model = models.from_pretrained(H.FIX .. "/" .. name, { device_map = "auto", reserve_for = r,
         offload_folder = dir })
      assert.are.equal("int8", model.reserved_for.kv_cache_dtype)
      local made = {}
      local new_cache = model.new_cache
      model.new_cache = function(self, cap, dev, dtype)
         made[#made + 1] = dtype
         return new_cache(self, cap, dev, dtype)
      end
      local ids, mask = prompts(model, 2, 10)
      model:generate(ids, { max_new_tokens = 3, attention_mask = mask })
      assert.are.same({ "int8" }, made)
      H.rmdir(dir)
   end)

   it("runs generate in the block schedule it planned for, unless told otherwise", function()
      local schedule = require("moonload.models.block_schedule")
      local dir = H.tmpdir()
      local blocked = { batch_size = 4, max_length = 40, prompt_length = 20, micro_batch_size = 2, prefill_chunk_size = 8 }
      local model = models.from_pretrained(H.FIX .. "/" .. name, { device_map = "auto", reserve_for = blocked,
         offload_folder = dir })
      assert.are.same(blocked, model.reserved_for)
      local seen = {}
      local plan = schedule.plan
      schedule.plan = function(opts, ...)
         seen[#seen + 1] = { opts.micro_batch_size, opts.prefill_chunk_size }
         return plan(opts, ...)
      end
      local ids, mask = prompts(model, 4, 20)
      local ok, err = pcall(function()
         local want = models.from_pretrained(H.FIX .. "/" .. name):generate(ids, { max_new_tokens = 3, attention_mask = mask })
         assert.are.same({}, seen)
         assert.are.same(want, model:generate(ids, { max_new_tokens = 3, attention_mask = mask }))
         assert.are.same({ { 2, 8 }, { 2, 8 }, { 2, 8 } }, seen)
         model:generate(ids, { max_new_tokens = 1, attention_mask = mask, micro_batch_size = 4 })
         assert.are.same({ 4, 8 }, seen[4])
      end)
      schedule.plan = plan
      H.rmdir(dir)
      assert(ok, err)
   end)

   it("says when the budget cannot hold what it reserves, or the map is not planned", function()
      local ok, err = pcall(models.from_pretrained, H.FIX .. "/" .. name,
         { device_map = "auto", reserve_for = reserve, max_memory = { cpu = 1000000 } })
      assert.is_false(ok)
      assert.truthy(err:find("max_memory for cpu (1000000 bytes) cannot hold the workspace_size", 1, true), err)
      ok, err = pcall(models.from_pretrained, H.FIX .. "/" .. name,
         { device_map = { [""] = "cpu" }, reserve_for = reserve })
      assert.is_false(ok)
      assert.truthy(err:find('from_pretrained: reserve_for plans a device map, so device_map must be "auto"', 1, true), err)
   end)
end)
