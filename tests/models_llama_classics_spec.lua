-- ml.models Gemma 1, Ministral, Helium, GLM, OLMo and Nemotron (Llama's network with each family's
-- norms, rotary layout, MLP and windows) against transformers (tests/fixtures/gen_models.py gemma
-- ministral helium glm olmo nemotron): names, the checkpoint's tensors, logits, greedy ids, the
-- cache, a left-padded batch, what each difference changes, and their configs.
local ml = require("moonload")
local models = require("moonload.models")
local llama = require("moonload.models.llama")
local gemma = require("moonload.models.gemma")
local H = require("models_helpers")

local function dir(name) return H.FIX .. "/" .. name end

describe("models.gemma (tests/fixtures/models/gemma_tiny: Gemma 1, one key/value head)", function()
   local exp, model, ids, logits_after = H.fixture_model("gemma_tiny")

   it("builds GemmaForCausalLM: (1 + w) norms before attention and MLP only, a tied head", function()
      assert.are.equal("GemmaForCausalLM", model.__name)
      assert.are.same({ "GemmaDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, dir("gemma_tiny"), true)
      local layer = model.model.layers[1]
      assert.are.equal("GemmaRMSNorm", layer.input_layernorm.__name)
      assert.is_nil(layer.pre_feedforward_layernorm)
      assert.are.equal(model.lm_head.weight, model.model.embed_tokens.weight)
      assert.are.equal(1, layer.self_attn.n_kv_head)
      assert.are.equal(gemma.GemmaForCausalLM, ml.models.gemma.GemmaForCausalLM)
   end)

   H.it_matches_expected(model, "gemma_tiny")
   H.it_matches_padded(model, "gemma_tiny", "positions")

   it("needs the embedding scale and the (1 + w) norms", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.model, "embed_scale", function() return 1 end)
      end), exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         local function by_weight(self, x) return ml.nn.functional.rms_norm(x, { self.dim }, self.weight, self.eps) end
         for _, l in ipairs(m.model.layers) do l.input_layernorm.forward = by_weight end
      end), exp.logits) > 1e-3)
   end)

   it("reads the hub's legacy hidden_act gelu as the tanh GELU, and names what it refuses", function()
      local raw = H.read_json(dir("gemma_tiny") .. "/config.json")
      raw.hidden_act, raw.head_dim = "gelu", nil
      local cfg = gemma.config(raw, "gemma")
      assert.are.same({ "gelu_pytorch_tanh", 256 }, { cfg.hidden_act, cfg.head_dim })
      raw.hidden_act = nil
      assert.are.equal("gelu_pytorch_tanh", gemma.config(raw, "gemma").hidden_act)
      local read = function(r) return gemma.config(r, "gemma") end
      H.assert_config_fails(read, dir("gemma_tiny"), { use_bidirectional_attention = true },
         "models.gemma2: use_bidirectional_attention (EmbeddingGemma) is not supported")
      H.assert_config_fails(read, dir("gemma_tiny"), { hidden_act = "swish2" },
         'models.gemma: activation "swish2" in config table is not supported')
   end)
end)

describe("models.ministral (tests/fixtures/models/ministral_tiny: window 3 on layers 1 and 3)", function()
   local exp, model, ids, logits_after = H.fixture_model("ministral_tiny")

   it("builds MinistralForCausalLM with the windows layer_types names", function()
      assert.are.equal("MinistralForCausalLM", model.__name)
      assert.are.same({ "MinistralDecoderLayer" }, model.no_split_modules)
      H.assert_holds_checkpoint(model, dir("ministral_tiny"))
      assert.are.same({ 3, false, 3 }, model.config.layer_windows)
   end)

   H.it_matches_expected(model, "ministral_tiny", " past the window")
   H.it_matches_padded(model, "ministral_tiny", "positions")

   it("needs the window on the layers that slide, and none on the others", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.model.layers[1].self_attn, "window", false)
      end), exp.logits) > 1e-3)
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         rawset(m.model.layers[2].self_attn, "window", 3)
      end), exp.logits) > 1e-3)
   end)

   it("slides on every layer when layer_types is absent, on none without a window, and names bad ones", function()
      local raw = H.read_json(dir("ministral_tiny") .. "/config.json")
      raw.layer_types = nil
      assert.are.same({ 3, 3, 3 }, llama.config(raw, "ministral").layer_windows)
      raw.sliding_window = nil
      assert.are.same({ false, false, false }, llama.config(raw, "ministral").layer_windows)
      local read = function(r) return llama.config(r, "ministral") end
      H.assert_config_fails(read, dir("ministral_tiny"), { layer_types = { "full_attention" } },
         'models.ministral: config key "layer_types" must list 3 layer types')
      H.assert_config_fails(read, dir("ministral_tiny"), { sliding_window = 0 },
         'models.ministral: config key "sliding_window" in config table must be a positive integer or null, got 0')
   end)
end)

describe("models.helium (tests/fixtures/models/helium_tiny: rotary pairs of neighbours, biased q/k/v)", function()
   local exp, model, ids, logits_after = H.fixture_model("helium_tiny")

   it("builds HeliumForCausalLM: q/k/v biased, the output projection not", function()
      assert.are.equal("HeliumForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, dir("helium_tiny"))
      local attn = model.model.layers[1].self_attn
      assert.is_not_nil(attn.q_proj.bias)
      assert.is_nil(attn.o_proj.bias)
   end)

   H.it_matches_expected(model, "helium_tiny")
   H.it_matches_padded(model, "helium_tiny", "positions")

   it("needs the rotary pairs of neighbouring dims", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "pairs_interleaved", false) end
      end), exp.logits) > 1e-3)
   end)

   it("reads transformers' defaults (head_dim 128, eps 1e-8)", function()
      local raw = H.read_json(dir("helium_tiny") .. "/config.json")
      raw.head_dim, raw.rms_norm_eps = nil, nil
      local cfg = llama.config(raw, "helium")
      assert.are.same({ 128, 1e-8 }, { cfg.head_dim, cfg.rms_norm_eps })
   end)
end)

describe("models.glm (tests/fixtures/models/glm_tiny: half of each head rotated, fused gate_up_proj)", function()
   local exp, model, ids, logits_after = H.fixture_model("glm_tiny")

   it("builds GlmForCausalLM: biased q/k/v, a fused MLP, Llama's two norms a layer", function()
      assert.are.equal("GlmForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, dir("glm_tiny"))
      local layer = model.model.layers[1]
      assert.is_not_nil(layer.mlp.gate_up_proj)
      assert.is_nil(layer.post_self_attn_layernorm)
      assert.is_not_nil(layer.self_attn.k_proj.bias)
      assert.is_nil(layer.self_attn.o_proj.bias)
      assert.are.equal(4, model.config.rotary_dim)
   end)

   H.it_matches_expected(model, "glm_tiny")
   H.it_matches_padded(model, "glm_tiny", "positions")

   it("rotates half of each head by default, as transformers' GlmConfig", function()
      local raw = H.read_json(dir("glm_tiny") .. "/config.json")
      raw.rope_parameters.partial_rotary_factor = nil
      assert.are.equal(4, llama.config(raw, "glm").rotary_dim)
      raw.rope_parameters.partial_rotary_factor = 1
      assert.are.equal(8, llama.config(raw, "glm").rotary_dim)
   end)
end)

describe("models.olmo (tests/fixtures/models/olmo_tiny: weightless LayerNorms, clip_qkv 0.4)", function()
   local exp, model, ids, logits_after = H.fixture_model("olmo_tiny")

   it("builds OlmoForCausalLM: LayerNorms without parameters", function()
      assert.are.equal("OlmoForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, dir("olmo_tiny"))
      assert.are.equal("OlmoLayerNorm", model.model.norm.__name)
      assert.is_nil(model.model.layers[1].input_layernorm.weight)
      for name in model:named_parameters() do assert.is_nil(name:find("norm"), name) end
   end)

   H.it_matches_expected(model, "olmo_tiny")
   H.it_matches_padded(model, "olmo_tiny", "positions")

   it("needs the clipping of q, k and v", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "clip_qkv", nil) end
      end), exp.logits) > 1e-3)
   end)

   it("names a bad clip_qkv", function()
      H.assert_config_fails(function(r) return llama.config(r, "olmo") end, dir("olmo_tiny"), { clip_qkv = -1 },
         'models.olmo: config key "clip_qkv" must be a positive number or null, got -1')
   end)
end)

describe("models.nemotron (tests/fixtures/models/nemotron_tiny: LayerNorm1P, half-head rotary, ReLU²)", function()
   local exp, model, ids, logits_after = H.fixture_model("nemotron_tiny")

   it("builds NemotronForCausalLM: 1P LayerNorms with biases, an up/down MLP", function()
      assert.are.equal("NemotronForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, dir("nemotron_tiny"))
      local layer = model.model.layers[1]
      assert.are.equal("NemotronLayerNorm1P", layer.input_layernorm.__name)
      assert.is_not_nil(layer.input_layernorm.bias)
      assert.is_nil(layer.mlp.gate_proj)
      assert.are.equal("ReLUSquaredActivation", layer.mlp.act_fn.__name)
      assert.are.equal(4, model.config.rotary_dim)
   end)

   H.it_matches_expected(model, "nemotron_tiny")
   H.it_matches_padded(model, "nemotron_tiny", "positions")

   it("needs the one added to the norms' weights", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do l.input_layernorm.forward = ml.nn.LayerNorm.forward end
      end), exp.logits) > 1e-3)
   end)

   it("reads norm_eps, transformers' defaults, and names a bad eps", function()
      local raw = H.read_json(dir("nemotron_tiny") .. "/config.json")
      raw.norm_eps, raw.hidden_act = 1e-3, nil
      raw.rope_parameters.partial_rotary_factor = nil
      local cfg = llama.config(raw, "nemotron")
      assert.are.same({ 1e-3, "relu2", 4 }, { cfg.rms_norm_eps, cfg.hidden_act, cfg.rotary_dim })
      H.assert_config_fails(function(r) return llama.config(r, "nemotron") end, dir("nemotron_tiny"),
         { norm_eps = -1 }, 'models.nemotron: config key "rms_norm_eps"')
   end)
end)

describe("models.exaone (tests/fixtures/models/exaone_tiny: EXAONE 3's hub names and keys, llama3 rope)", function()
   local exp, model = H.fixture_model("exaone_tiny")

   it("reads the hub's GPT-2-like names and config keys into Llama's layers", function()
      assert.are.equal("ExaoneForCausalLM", model.__name)
      assert.are.same({ "ExaoneDecoderLayer" }, model.no_split_modules)
      local stored = ml.safetensors.load_file(dir("exaone_tiny") .. "/model.safetensors")
      assert.is_not_nil(stored["transformer.h.0.attn.attention.out_proj.weight"])
      assert.is_not_nil(stored["transformer.h.1.mlp.c_fc_1.weight"])
      local n = 0
      for _ in pairs(stored) do n = n + 1 end
      local held = 0
      for _ in pairs(model:state_dict()) do held = held + 1 end
      assert.are.equal(n, held)
      local cfg = model.config
      assert.are.same({ 2, "silu", "llama3" }, { cfg.num_hidden_layers, cfg.hidden_act, cfg.rope.rope_type })
   end)

   H.it_matches_expected(model, "exaone_tiny")
   H.it_matches_padded(model, "exaone_tiny", "positions")

   it("saves under moonload's names and loads that folder back", function()
      local out = H.tmpdir()
      ml.save_model(model, out)
      local back = models.from_pretrained(out)
      assert.is_true(H.max_abs_diff(back(exp.input_ids), exp.logits) < 1e-4)
      H.rmdir(out)
   end)

   it("names the layer count when the file has none", function()
      H.assert_config_fails(function(r) return llama.config(r, "exaone") end, dir("exaone_tiny"),
         function(r) r.num_layers = nil end, 'models.exaone: config key "num_hidden_layers"')
   end)
end)

describe("models.vaultgemma (tests/fixtures/models/vaultgemma_tiny: Gemma 2 without its post norms)", function()
   local exp, model, ids, logits_after = H.fixture_model("vaultgemma_tiny")

   it("builds VaultGemmaForCausalLM: two norms a layer, Gemma 2's attention and caps", function()
      assert.are.equal("VaultGemmaForCausalLM", model.__name)
      H.assert_holds_checkpoint(model, dir("vaultgemma_tiny"), true)
      local layer = model.model.layers[1]
      assert.is_not_nil(layer.pre_feedforward_layernorm)
      assert.is_nil(layer.post_attention_layernorm)
      assert.are.same({ 3, false, 3 }, model.config.layer_windows)
      assert.are.same({ 3, 8 }, { layer.self_attn.softcap, model.config.final_logit_softcapping })
   end)

   H.it_matches_expected(model, "vaultgemma_tiny", " past the window")
   H.it_matches_padded(model, "vaultgemma_tiny", "positions")

   it("needs the scores' soft cap", function()
      assert.is_true(H.max_abs_diff(logits_after(function(m)
         for _, l in ipairs(m.model.layers) do rawset(l.self_attn, "softcap", nil) end
      end), exp.logits) > 1e-3)
   end)
end)
