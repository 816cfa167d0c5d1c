-- ml.models GPT-1 (model_type openai-gpt: GPT-2's Conv1D attention and MLP in post-norm blocks,
-- no final norm) against transformers (tests/fixtures/gen_models.py openai_gpt): names, the
-- checkpoint's tensors, logits, greedy ids, the cache, a left-padded batch, a CPU + disk split, an
-- older checkpoint's layout, what each difference changes, the sequence limit and configs.
local ml = require("moonload")
local openai = require("moonload.models.openai")
local H = require("models_helpers")

local NAME = "openai_gpt_tiny"
local DIR = H.FIX .. "/" .. NAME

describe("models.openai (tests/fixtures/models/openai_gpt_tiny: n_embd 48, 4 heads, 64 positions)", function()
   local exp, model, ids, logits_after = H.fixture_model(NAME)

   it("builds OpenAIGPTLMHeadModel with transformers' names, post-norm blocks and a tied head", function()
      assert.are.equal("OpenAIGPTLMHeadModel", model.__name)
      assert.are.same({ "Block" }, model.no_split_modules)
      assert.are.equal(openai.OpenAIGPTLMHeadModel, ml.models.openai.OpenAIGPTLMHeadModel)
      assert.are.equal(openai.OpenAIGPTLMHeadModel, ml.models.class_for("openai-gpt", "test"))
      H.assert_holds_checkpoint(model, DIR, true)
      assert.are.equal(model.lm_head.weight, model.transformer.tokens_embed.weight)
      local block = model.transformer.h[2]
      assert.are.same({ 48, 144 }, block.attn.c_attn.weight.shape)            -- Conv1D: (in, out)
      assert.are.same({ 48, 192 }, block.mlp.c_fc.weight.shape)
      assert.are.equal("GELU(approximate='tanh')", tostring(block.mlp.act))
      assert.is_nil(model.transformer.ln_f)
      assert.are.equal(64, model:max_length())
   end)

   H.it_matches_expected(model, NAME)
   H.it_matches_padded(model, NAME, "positions")
   H.it_splits_over_cpu_and_disk(NAME, { budget = 150000, overrides = { ["^transformer%.h%.1$"] = "disk" },
      places = { ["transformer.h.1"] = "disk" } })

   it("reads an older checkpoint: no transformer. prefix, and the causal masks it stored", function()
      local src = H.tmpdir()
      H.copy(DIR .. "/config.json", src .. "/config.json")
      local out = {}
      for k, t in pairs(ml.safetensors.load_file(DIR .. "/model.safetensors")) do out[k:gsub("^transformer%.", "")] = t end
      out["h.0.attn.bias"] = ml.ones(64, 64):tril():view(1, 1, 64, 64)
      out["h.1.attn.bias"] = ml.ones(64, 64):tril():view(1, 1, 64, 64)
      ml.safetensors.save_file(out, src .. "/model.safetensors")
      local old = ml.models.from_pretrained(src)
      assert.is_true(H.max_abs_diff(old(ids), exp.logits) < 1e-4)
      H.rmdir(src)
   end)

   it("needs each norm after its residual, the tanh GELU and the scaled scores", function()
      local changes = {
         function(m)
            for _, b in ipairs(m.transformer.h) do
               rawset(b, "forward", function(self, x, cache, pad)
                  x = x + self.attn(self.ln_1(x), cache, pad)
                  return x + self.mlp(self.ln_2(x))
               end)
            end
         end,
         function(m) for _, b in ipairs(m.transformer.h) do b.mlp.act = ml.nn.GELU() end end,
         function(m) for _, b in ipairs(m.transformer.h) do rawset(b.attn, "scale", 1) end end,
      }
      for i, change in ipairs(changes) do assert.is_true(H.max_abs_diff(logits_after(change), exp.logits) > 1e-3, i) end
   end)

   it("runs within n_positions and names a longer sequence", function()
      local long = {}
      for i = 1, 65 do long[i] = i % 90 + 1 end
      local ok, err = pcall(model, { long })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("models.openai: sequence of 65 tokens (0 cached + 65 new) exceeds n_positions 64", 1, true), err)
   end)

   it("reads GPT-1's activation names and transformers' defaults, and names what it refuses", function()
      local raw = H.read_json(DIR .. "/config.json")
      local got = {}
      for _, afn in ipairs({ "gelu", "relu", "silu", "swish" }) do
         raw.afn = afn
         got[#got + 1] = openai.config(raw).activation_function
      end
      assert.are.same({ "gelu_new", "relu", "silu", "silu" }, got)
      raw.afn, raw.n_positions, raw.layer_norm_epsilon = nil, nil, nil
      local cfg = openai.config(raw)
      assert.are.same({ "gelu_new", 512, 1e-5, 192 }, { cfg.activation_function, cfg.n_positions, cfg.layer_norm_epsilon, cfg.n_inner })
      local function fails(change, msg) H.assert_config_fails(openai.config, DIR, change, msg) end
      fails({ afn = "gelu_new" }, 'models.openai: config key "afn" must be one of gelu, relu, silu, swish, got "gelu_new"')
      fails({ n_head = 5 }, "models.openai: n_embd 48 is not divisible by n_head 5")
      fails({ n_layer = "2" }, 'models.openai: config key "n_layer" in config table must be')
   end)
end)
