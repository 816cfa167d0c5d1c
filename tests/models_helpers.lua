-- Shared helpers for the models_*_spec files: fixtures and float comparisons.
local N = require("nn_helpers")

local H = {}

H.FIX = "tests/fixtures/models"

H.read_json = N.read_json
H.max_abs_diff = N.max_abs_diff

--- The logits of ids (a flat list) given n_first at once, then one at a time through a cache
-- (cache: the model's new one by default), concatenated: (1, #ids, vocab).
function H.decoded_logits(model, ids, n_first, cache)
   cache = cache or model:new_cache()
   local prefix = {}
   for i = 1, n_first do prefix[i] = ids[i] end
   local out = { model({ prefix }, { cache = cache }) }
   for i = n_first + 1, #ids do out[#out + 1] = model({ { ids[i] } }, { cache = cache }) end
   return require("moonload").cat(out, 2)
end

--- Forces every latent attention (models/deepseek.lua) to attend one way while fn runs: true
-- absorbed (where kv_b_proj's weight can be read), false expanded.
function H.attending(way, fn)
   local MLA = require("moonload.models.deepseek").MLAttention
   local saved = MLA.absorbs
   MLA.absorbs = function(self, L, S)
      return way and saved(self, 0, math.huge) or false
   end
   local ok, err = pcall(fn)
   MLA.absorbs = saved
   if not ok then error(err, 0) end
end

function H.expected(name)
   return H.read_json(H.FIX .. "/" .. name .. "/expected.json")
end

--- The names of model's parameters, in registration order.
function H.param_names(model)
   local names = {}
   for name in model:named_parameters() do names[#names + 1] = name end
   return names
end

--- The keys of a table, sorted (a state dict's names, a checkpoint's).
function H.sorted_keys(t)
   local out = {}
   for k in pairs(t) do out[#out + 1] = k end
   table.sort(out)
   return out
end

--- The experts (0-based) a MoE block's experts module ran during fn(): its expert method wrapped
-- for the call (gpt-oss's and the stacked experts' one method per expert).
function H.experts_run(experts, fn)
   local ran = {}
   local expert = experts.expert
   rawset(experts, "expert", function(self, e, x)
      ran[#ran + 1] = e
      return expert(self, e, x)
   end)
   fn()
   rawset(experts, "expert", nil)
   return ran
end

--- The token ids an example printed as it generated (its one line of ids and spaces).
function H.printed_ids(text)
   local ids = {}
   for id in assert(text:match("\n([%d ]+)\n"), text):gmatch("%d+") do ids[#ids + 1] = tonumber(id) end
   return ids
end

function H.tmpdir()
   local p = os.tmpname()
   os.remove(p)
   assert(os.execute("mkdir -p " .. p) == 0 or true)
   return p
end

function H.write(path, text)
   local f = assert(io.open(path, "wb"))
   f:write(text)
   f:close()
end

--- A fresh temporary file holding text; returns its path.
function H.tmpfile(text)
   local p = os.tmpname()
   H.write(p, text)
   return p
end

function H.copy(src, dst)
   local a = assert(io.open(src, "rb"))
   local data = a:read("*a")
   a:close()
   H.write(dst, data)
end

function H.rmdir(p)
   os.execute("rm -rf '" .. p .. "'")
end

--- The fixture `name` (tests/fixtures/models/<name>): its expected values, its model, the input
-- ids, and logits_after(fn): the logits of a fresh copy of the model after fn(model) changed it.
function H.fixture_model(name)
   local ml, models = require("moonload"), require("moonload.models")
   local dir = H.FIX .. "/" .. name
   local exp = H.expected(name)
   local ids = ml.tensor(exp.input_ids, { dtype = "int64" })
   local function logits_after(fn)
      local m = models.from_pretrained(dir)
      fn(m)
      return m(ids)
   end
   return exp, models.from_pretrained(dir), ids, logits_after
end

--- Asserts model's state dict has exactly the tensors of dir's model.safetensors; with tied, the
-- head's weight too (stored once, as the embedding).
function H.assert_holds_checkpoint(model, dir, tied)
   local assert = getfenv(2).assert
   local stored = require("moonload").safetensors.load_file(dir .. "/model.safetensors")
   if tied then stored["lm_head.weight"] = true end
   assert.are.same(H.sorted_keys(stored), H.sorted_keys((model:state_dict())))
end

--- A copy of the checkpoint folder src (config.json, model.safetensors) in a new temporary folder,
-- its experts (one module each: <prefix>.E.{gate,up,down}_proj.weight, E from 0 to n - 1, for each
-- prefix of `prefixes`) stacked per projection as transformers holds them in memory:
-- <prefix>.gate_up_proj (n, 2 x inter, hidden), gate rows then up rows, and <prefix>.down_proj
-- (n, hidden, inter). rename(key), when given, renames the other tensors; `extra` adds tensors.
-- Returns the folder.
function H.copy_with_stacked_experts(src, prefixes, n, rename, extra)
   local ml = require("moonload")
   local dir = H.tmpdir()
   H.copy(src .. "/config.json", dir .. "/config.json")
   local file = ml.safetensors.load_file(src .. "/model.safetensors")
   local out = {}
   for k, t in pairs(file) do
      if not k:find("%.experts%.") then out[rename and rename(k) or k] = t end
   end
   for _, prefix in ipairs(prefixes) do
      local gu, down = {}, {}
      for e = 0, n - 1 do
         local p = prefix .. "." .. e .. "."
         gu[e + 1] = ml.cat({ file[p .. "gate_proj.weight"], file[p .. "up_proj.weight"] }, 1):unsqueeze(1)
         down[e + 1] = file[p .. "down_proj.weight"]:unsqueeze(1)
      end
      out[prefix .. ".gate_up_proj"], out[prefix .. ".down_proj"] = ml.cat(gu, 1), ml.cat(down, 1)
   end
   for k, t in pairs(extra or {}) do out[k] = t end
   ml.safetensors.save_file(out, dir .. "/model.safetensors")
   return dir
end

--- B prompts of P token ids within model's vocabulary, row b left-padded by b - 1 positions:
-- the ids and the 0/1 attention mask, as Lua lists.
function H.padded_prompts(model, B, P)
   local vocab = model.config.vocab_size or model.config.text_config.vocab_size
   local ids, mask = {}, {}
   for b = 1, B do
      ids[b], mask[b] = {}, {}
      for t = 1, P do
         ids[b][t] = (b * 7 + t * 3) % vocab
         mask[b][t] = t >= b and 1 or 0
      end
   end
   return ids, mask
end

--- Called inside a describe: the returned list collects the warnings moonload gives during each
-- test (emptied before it); the previous handler comes back after it.
function H.collect_warnings()
   local log = require("moonload.utils.log")
   local list, prev = {}, nil
   local spec = getfenv(2)                   -- busted's before_each/after_each live in the spec's environment
   spec.before_each(function()
      for i = #list, 1, -1 do list[i] = nil end
      prev = log.set_warning_handler(function(msg) list[#list + 1] = msg end)
   end)
   spec.after_each(function() log.set_warning_handler(prev) end)
   return list
end

--- Builds build() under init_empty_weights and checks it against transformers' skeleton of the
-- same config (fix: {parameters = count, shapes = {name = shape}}, a subset of the names): the
-- parameter count and those shapes. Returns the model. (Called from a spec: its assert.)
function H.assert_matches_skeleton(build, fix)
   local assert = getfenv(2).assert
   local m = require("moonload").init_empty_weights(build)
   local count, shapes = 0, {}
   for name, p in m:named_parameters() do
      count = count + p:numel()
      shapes[name] = p.shape
   end
   assert.are.equal(fix.parameters, count)
   for name, shape in pairs(fix.shapes) do assert.are.same(shape, shapes[name], name) end
   return m
end

-- A left-padded batch (the fixture's padded.json: the first row's first two ids are padding):
-- transformers' logits at the real positions and its greedy ids.
-- (called from a spec: busted's it and assert are that file's)
function H.it_matches_padded(model, fixture, what)
   local env = getfenv(2)
   local it, assert = env.it, env.assert
   it("counts " .. what .. " from a left-padded batch's mask, as transformers does", function()
      local pad = H.read_json(H.FIX .. "/" .. fixture .. "/padded.json")
      local logits = model(pad.input_ids, { attention_mask = pad.attention_mask })
      assert.is_true(H.max_abs_diff(logits:select(1, 1):narrow(1, 3, 4),
         { pad.logits[1][3], pad.logits[1][4], pad.logits[1][5], pad.logits[1][6] }) < 1e-4)
      assert.is_true(H.max_abs_diff(logits:select(1, 2), pad.logits[2]) < 1e-4)
      assert.are.same(pad.greedy_ids, model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
         max_new_tokens = pad.max_new_tokens, eos_token_id = false }))
   end)
end

--- An it() checking model against its fixture's expected.json: the logits, the greedy ids, and the
-- second prompt decoded through the cache (5 tokens at once, then one at a time) to the same logits.
function H.it_matches_expected(model, fixture, what)
   local env = getfenv(2)
   local it, assert = env.it, env.assert
   it("gives transformers' logits and greedy ids" .. (what or "") .. ", and decodes with the cache to a full forward's logits",
      function()
         local exp = H.expected(fixture)
         assert.is_true(H.max_abs_diff(model(exp.input_ids), exp.logits) < 1e-4)
         assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
         assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 5), { exp.logits[2] }) < 1e-4)
      end)
end

--- A device map for a model whose layers are prefix .. ".layers.i": layer 0 on disk, then cpu, disk,
-- ... for n layers; others (module -> place) for the rest.
function H.alternating_layers(prefix, n, others)
   local map = {}
   for k, v in pairs(others) do map[k] = v end
   for i = 0, n - 1 do map[prefix .. ".layers." .. i] = i % 2 == 0 and "disk" or "cpu" end
   return map
end

--- The it()s of a model whose cache keeps a state (a mixer's, a linear attention's): the fixture's
-- greedy ids through a block schedule (one row, 3 prompt tokens at a time) and from a copy split
-- over CPU and disk by device_map; and assisted generation refused, as the state cannot be cropped.
function H.it_runs_stateful(model, fixture, device_map)
   local env = getfenv(2)
   local it, assert = env.it, env.assert
   local dir = H.FIX .. "/" .. fixture
   it("runs the prompt in a block schedule and split over CPU and disk with the same tokens", function()
      local exp = H.expected(fixture)
      assert.are.same(exp.greedy_ids, model:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
         eos_token_id = false, micro_batch_size = 1, prefill_chunk_size = 3 }))
      local off = H.tmpdir()
      local split = require("moonload.models").from_pretrained(dir, { device_map = device_map, offload_folder = off })
      local places = {}
      for _, dev in pairs(split.hf_device_map) do places[tostring(dev)] = true end
      assert.is_true(places.cpu and places.disk, "a CPU + disk split")
      assert.is_true(H.max_abs_diff(split(exp.input_ids), exp.logits) < 1e-4)
      assert.are.same(exp.greedy_ids, split:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
      H.rmdir(off)
   end)
   it("refuses assisted generation (its cache's state cannot be cropped back)", function()
      local ok, err = pcall(model.generate, model, { 1, 7, 9 }, { max_new_tokens = 3, prompt_lookup_num_tokens = 2 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("does not support " .. model.__name, 1, true), tostring(err))
   end)
end

--- An it() checking a latent-attention model (models/deepseek.lua's MLAttention) both ways it attends,
-- absorbed and expanded: the fixture's logits in a prefill, and its second prompt decoded through
-- the latent cache (5 tokens at once, then one at a time).
function H.it_attends_both_ways(model, fixture)
   local env = getfenv(2)
   local it, assert = env.it, env.assert
   it("attends absorbed and expanded alike, in a prefill and decoding from the latent cache", function()
      local exp = H.expected(fixture)
      for _, way in ipairs({ true, false }) do
         H.attending(way, function()
            assert.is_true(H.max_abs_diff(model(exp.input_ids), exp.logits) < 1e-4)
            assert.is_true(H.max_abs_diff(H.decoded_logits(model, exp.input_ids[2], 5), { exp.logits[2] }) < 1e-4)
         end)
      end
   end)
end

--- An it() loading the fixture split over CPU and disk by device_map "auto" under a CPU budget
-- (opts.budget), then again with opts.overrides (default: every expert to the disk) under
-- opts.overrides_budget (default: the same), each time with transformers' logits and greedy ids;
-- opts.places: module name -> the place it must get the second time.
function H.it_splits_over_cpu_and_disk(fixture, opts)
   local env = getfenv(2)
   local it, assert = env.it, env.assert
   it("gives transformers' logits and tokens split over CPU and disk by device_map auto, with its experts on disk too",
      function()
         local models = require("moonload.models")
         local exp = H.expected(fixture)
         local overrides = opts.overrides or { ["%.mlp%.experts%.%d+$"] = "disk" }
         for _, pass in ipairs({ { opts.budget }, { opts.overrides_budget or opts.budget, overrides } }) do
            local off = H.tmpdir()
            local m = models.from_pretrained(H.FIX .. "/" .. fixture, { device_map = "auto", max_memory = { cpu = pass[1] },
               offload_folder = off, device_overrides = pass[2] })
            local on = {}
            for _, dev in pairs(m.hf_device_map) do on[tostring(dev)] = true end
            assert.is_true(on.disk and (on.cpu or pass[2] ~= nil), "a CPU + disk split")
            for name, place in pairs(pass[2] and opts.places or {}) do
               assert.are.equal(place, tostring(m.hf_device_map[name]), name)
            end
            assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < 1e-4)
            assert.are.same(exp.greedy_ids, m:generate(exp.input_ids, { max_new_tokens = exp.max_new_tokens,
               eos_token_id = false }))
            H.rmdir(off)
         end
      end)
end

--- A temporary copy of fixture name's weights beside its config.json changed by change(raw): the
-- folder (the caller removes it).
function H.fixture_with_config(name, change)
   local dir = H.tmpdir()
   H.copy(H.FIX .. "/" .. name .. "/model.safetensors", dir .. "/model.safetensors")
   local raw = H.read_json(H.FIX .. "/" .. name .. "/config.json")
   change(raw)
   H.write(dir .. "/config.json", require("cjson").encode(raw))
   return dir
end

-- --- encoders (sentence embeddings: BERT's kin) -------------------------------------------------

--- An encoder fixture's last hidden states for its right-padded batch (expected.json's input_ids
-- and attention_mask) through model.
function H.encoder_states(model, exp)
   local T = require("moonload.tensor")
   return model(T.tensor(exp.input_ids, { dtype = "int64" }), { attention_mask = exp.attention_mask }).last_hidden_state
end

--- An it() loading an encoder fixture split over the CPU and the disk by device_map "auto" under
-- a CPU budget: transformers' last hidden states all the same.
function H.it_splits_encoder(fixture, budget)
   local env = getfenv(2)
   env.it("splits over the CPU and the disk under a RAM budget, same states", function()
      local off = H.tmpdir()
      local m = require("moonload.models").from_pretrained(H.FIX .. "/" .. fixture, { device_map = "auto",
         max_memory = { cpu = budget }, offload_folder = off })
      local on = {}
      for _, dev in pairs(m.hf_device_map) do on[tostring(dev)] = true end
      env.assert.is_true(on.cpu and on.disk, "expected a CPU + disk split")
      local exp = H.expected(fixture)
      env.assert.is_true(H.max_abs_diff(H.encoder_states(m, exp), exp.last_hidden_state) < 1e-4)
      H.rmdir(off)
   end)
end

--- A #cuda describe for an encoder fixture: transformers' last hidden states on cuda:0, and its
-- sentence embedding with the layers placed by device_map (cuda:0, cpu and disk).
function H.describe_encoder_on_cuda(fixture, device_map)
   local env = getfenv(2)
   env.describe("models." .. fixture .. " on cuda #cuda", setfenv(function()
      H.collect_warnings()
      env.it(fixture .. ": the same states on cuda:0, and the same embedding over cuda:0, the CPU and the disk", function()
         local models = require("moonload.models")
         local exp = H.expected(fixture)
         local dir = H.FIX .. "/" .. fixture
         local on_gpu = H.encoder_states(models.from_pretrained(dir):to("cuda:0"), exp)
         env.assert.is_true(H.max_abs_diff(on_gpu:to("cpu"), exp.last_hidden_state) < 1e-4)
         local off = H.tmpdir()
         local split = models.from_pretrained(dir, { offload_folder = off, device_map = device_map })
         local emb = split:sentence_embedding(exp.input_ids, { attention_mask = exp.attention_mask })
         env.assert.is_true(H.max_abs_diff(emb:to("cpu"), exp.sentence_embedding) < 1e-4)
         H.rmdir(off)
      end)
   end, env))                                        -- (collect_warnings finds busted's hooks there)
end

--- Asserts that read_config(raw) raises an error holding msg, raw being dir's config.json changed by
-- change (a function of the table, or a table of keys to set).
function H.assert_config_fails(read_config, dir, change, msg)
   local assert = getfenv(2).assert
   local raw = H.read_json(dir .. "/config.json")
   if type(change) == "function" then change(raw) else for k, v in pairs(change) do raw[k] = v end end
   local ok, err = pcall(read_config, raw)
   assert.is_false(ok)
   assert.truthy(tostring(err):find(msg, 1, true), err)
end

--- Like assert_config_fails, with the changed config.json written to a folder read_config reads
-- from: the error must name that file after msg ("<msg> in <dir>/config.json").
function H.assert_config_file_fails(read_config, dir, change, msg)
   local assert = getfenv(2).assert
   local tmp = H.tmpdir()
   local raw = H.read_json(dir .. "/config.json")
   if type(change) == "function" then change(raw) else for k, v in pairs(change) do raw[k] = v end end
   H.write(tmp .. "/config.json", require("cjson").encode(raw))
   local ok, err = pcall(read_config, tmp)
   H.rmdir(tmp)
   assert.is_false(ok)
   assert.truthy(tostring(err):find(msg .. " in " .. tmp .. "/config.json", 1, true), err)
end

--- it(...): a copy of the fixture with its experts stacked as transformers saves them
-- (H.copy_with_stacked_experts: o.prefixes, o.experts, o.rename) gives the same logits for o.ids
-- (within o.tol of o.logits), and layer o.layer's StackedExperts runs 2 experts for one token.
function H.it_reads_stacked_experts(o)
   local it, assert = getfenv(2).it, getfenv(2).assert
   it("reads transformers' stacked layout too (gate_up_proj, down_proj per layer), running 2 experts a token", function()
      local dir = H.copy_with_stacked_experts(o.dir, o.prefixes, o.experts, o.rename)
      local stacked = require("moonload").models.from_pretrained(dir)
      assert.is_true(H.max_abs_diff(stacked(o.ids), o.logits) < o.tol)
      local experts = stacked.model.layers[o.layer].mlp.experts
      assert.are.equal("StackedExperts", experts.__name)
      assert.are.equal(2, #H.experts_run(experts, function() stacked({ { 7 } }) end))
      H.rmdir(dir)
   end)
end

return H
