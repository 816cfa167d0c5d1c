--- compressed-tensors checkpoints as llm-compressor writes "w4a16" models: a Llama-shaped model
-- of 8 layers (d=2048, 16 heads, MLP 5632, vocab 32000; 540 M weights), written once by this file
-- into .bench/llama-w4a16 with every attention and MLP projection int4 in int32 words
-- (pack-quantized: symmetric, a bfloat16 scale per group of 128), the embeddings, norms and head
-- bfloat16. moonload reads it into nn.QuantizedLinear (int4, half a byte a weight, plus a float32
-- scale per 32: F.unpack_int_words rewrites the words in place of a copy of the checkpoint);
-- transformers reads it with compressed-tensors, which decompresses every layer to bfloat16 on a
-- machine without a GPU. Reported for each, in a process of its own: seconds to load, the growth
-- of resident memory over the load, seconds for 16 greedy tokens after a 32-token prompt, and
-- whether both generated the same ids (same_prefix: how many agree first).
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local DIR, PROMPT, NEW, GROUP = ".bench/llama-w4a16", 32, 16, 128
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

local CONFIG = { architectures = { "LlamaForCausalLM" }, model_type = "llama", vocab_size = 32000,
   hidden_size = 2048, intermediate_size = 5632, num_hidden_layers = 8, num_attention_heads = 16,
   num_key_value_heads = 16, max_position_embeddings = 4096, rms_norm_eps = 1e-6, tie_word_embeddings = false,
   dtype = "bfloat16", bos_token_id = 1, eos_token_id = 2, rope_theta = 10000.0,
   quantization_config = { quant_method = "compressed-tensors", format = "pack-quantized",
      quantization_status = "compressed", ignore = { "lm_head" },
      config_groups = { group_0 = { targets = { "Linear" }, format = "pack-quantized",
         weights = { num_bits = 4, type = "int", symmetric = true, strategy = "group", group_size = GROUP,
                     dynamic = false } } } } }

-- Random int32 words (every nibble a valid int4) for an (O, I) weight: (O, I / 8).
local function random_words(O, I)
   local function half() return (ml.rand({ O, I / 8 }, { dtype = "float64" }) * 65536):to("int64") end
   return (half() * 65536 + half() - 2 ^ 31):to("int32")
end

local function write_checkpoint()
   ml.manual_seed(0)
   local plain = {}
   for k, v in pairs(CONFIG) do if k ~= "quantization_config" then plain[k] = v end end
   local model = ml.init_empty_weights(function() return ml.models.llama.LlamaForCausalLM(plain) end)
   local sd = {}
   for name, p in model:named_parameters() do
      local owner = name:match("^(.*_proj)%.weight$")
      if owner then
         local O, I = p.shape[1], p.shape[2]
         sd[owner .. ".weight_packed"] = random_words(O, I)
         -- int4 values of about 4.6 in magnitude: weights of about 0.02, as an initialisation gives
         sd[owner .. ".weight_scale"] = ml.full({ O, I / GROUP }, 0.02 / 4.6):to("bfloat16")
         sd[owner .. ".weight_shape"] = ml.tensor({ O, I }, { dtype = "int64" })
      elseif p:dim() == 1 then
         sd[name] = ml.ones(p.shape):to("bfloat16")
      else
         sd[name] = (ml.randn(p.shape) * 0.02):to("bfloat16")
      end
   end
   ml.safetensors.save_file(sd, DIR .. "/model.safetensors")
   B.write_config_last(DIR, cjson.encode(CONFIG))
end

-- (moonload computes the int4 layers in float32 from the bfloat16 activations, transformers in
-- bfloat16 from weights rounded to bfloat16: on random weights the top logits are close, so the
-- ids may part after a few tokens; same_prefix counts those that agree first)
if arg[1] == "--write-only" then              -- (bench/rewrite_offload.lua reads the same folder)
   if not io.open(DIR .. "/config.json") then
      os.execute("mkdir -p " .. DIR)
      write_checkpoint()
   end
   return
end
B.load_generate_main("compressed_load", DIR, PROMPT, NEW, threads, write_checkpoint)
