--- FP8 checkpoints as DeepSeek-V3 ships them: a DeepSeek-V3-shaped model shrunk to 4 layers
-- (d=2048, 16 heads, q_lora_rank 768, kv_lora_rank 512 + rotary 128, the first layer dense, then
-- 32 experts of width 512, 4 per token within the top 2 of 4 groups, and a shared one; vocab
-- 32000), written once by this file into .bench/deepseek-v3-fp8 with every projection float8_e4m3fn
-- and a float32 scale per 128 x 128 tile (the embeddings, norms, routers and head bfloat16).
-- moonload loads it as it is (nn.Fp8Linear: one byte a weight, expanded tile by tile as each
-- layer runs); transformers reads it with FineGrainedFP8Config(dequantize = True), its way on a
-- machine without a GPU (bfloat16 weights in memory); a rotary 128 wide (V3: 64) keeps every dim a
-- multiple of 128, which that path needs. Reported for each, in a process of its own: seconds to
-- load, the growth of resident memory over the load, seconds for 16 greedy tokens after a
-- 32-token prompt, and whether both generated the same ids (same_prefix: how many agree first).
-- Environment: BENCH_THREADS (default: all cores).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")

local DIR, PROMPT, NEW, TILE = ".bench/deepseek-v3-fp8", 32, 16, 128
local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()

local CONFIG = { architectures = { "DeepseekV3ForCausalLM" }, model_type = "deepseek_v3", vocab_size = 32000,
   hidden_size = 2048, intermediate_size = 5632, moe_intermediate_size = 512, num_hidden_layers = 4,
   num_attention_heads = 16, num_key_value_heads = 16, n_shared_experts = 1, n_routed_experts = 32,
   routed_scaling_factor = 2.5, kv_lora_rank = 512, q_lora_rank = 768, qk_rope_head_dim = 128,
   v_head_dim = 128, qk_nope_head_dim = 128, n_group = 4, topk_group = 2, num_experts_per_tok = 4,
   first_k_dense_replace = 1, norm_topk_prob = true, max_position_embeddings = 4096, rms_norm_eps = 1e-6,
   tie_word_embeddings = false, rope_interleave = true, dtype = "bfloat16", bos_token_id = 0, eos_token_id = 1,
   rope_parameters = { rope_type = "default", rope_theta = 10000.0 },
   quantization_config = { quant_method = "fp8", fmt = "e4m3", activation_scheme = "dynamic",
                           weight_block_size = { TILE, TILE } } }

-- w (O, I), both multiples of TILE -> float8 values and float32 scales per tile (amax / 448).
local function to_fp8(w)
   local O, I = w:size(1), w:size(2)
   local tiles = w:float():view(O / TILE, TILE, I / TILE, TILE)
   local scale = tiles:abs():max(4):max(2) / 448                          -- (O / TILE, I / TILE)
   scale = scale:clamp(1e-12)
   local q = (tiles / scale:view(O / TILE, 1, I / TILE, 1)):view(O, I):to("float8_e4m3fn")
   return q, scale:contiguous()
end

local function write_checkpoint()
   ml.manual_seed(0)
   local plain = {}
   for k, v in pairs(CONFIG) do if k ~= "quantization_config" then plain[k] = v end end
   local model = ml.init_empty_weights(function() return ml.models.deepseek.DeepseekV3ForCausalLM(plain) end)
   local sd = {}
   for name, p in model:named_parameters() do
      local w = ml.randn(p.shape) * (p:dim() == 1 and 0 or 0.02)
      if p:dim() == 1 then w = w + 1 end
      if p:dim() == 2 and name:find("_proj%.weight$") or name:find("kv_a_proj_with_mqa%.weight$") then
         sd[name], sd[name:gsub("%.weight$", ".weight_scale_inv")] = to_fp8(w)
      else
         sd[name] = w:to("bfloat16")
      end
   end
   for name, b in model:named_buffers() do
      if name:find("e_score_correction_bias$") then sd[name] = ml.zeros(b.shape) end
   end
   ml.safetensors.save_file(sd, DIR .. "/model.safetensors")
   B.write_config_last(DIR, cjson.encode(CONFIG))
end

-- (both compute in bfloat16, rounding in other places: on random weights the top logits are
-- close, so the ids may part after a few tokens; same_prefix counts those that agree first)
B.load_generate_main("fp8_load", DIR, PROMPT, NEW, threads, write_checkpoint)
