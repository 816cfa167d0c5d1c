--- GPTBigCode (transformers' GPTBigCodeForCausalLM: StarCoder 1, StarCoderBase, SantaCoder,
-- WizardCoder, granite-20b-code) with Hugging Face parameter names: GPT-2's
-- transformer.{wte, wpe, h.N.{ln_1, attn.{c_attn, c_proj}, ln_2, mlp.{c_fc, c_proj}}, ln_f}, lm_head
-- (tied to transformer.wte unless tie_word_embeddings is false), with nn.Linear weights (out, in)
-- instead of GPT-2's Conv1D. c_attn holds, per multi_query:
--   true (the default): every query head, then one key and one value head shared by all
--     (multi-query attention: the cache keeps that one head);
--   false: each head's q, k and v side by side.
-- MLP, block, model and head extend gpt2.lua's classes and run GPT-2's forward (the head its
-- tie, cache, max_length and generate too).
--
--    local gpt_bigcode = require("moonload.models.gpt_bigcode")
--    local model = gpt_bigcode.GPTBigCodeForCausalLM("path/to/config.json")  -- or a config table
--    local out = model:generate({464, 2068}, {max_new_tokens = 20})
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local gpt2 = require("moonload.models.gpt2")
local falcon = require("moonload.models.falcon")

local M = {}
local WHO = "models.gpt_bigcode"

-- GPT-2's keys (less its per-layer score scaling and reordered upcast, which GPTBigCode lacks,
-- and with transformers' default activation for this family), then GPTBigCode's own.
-- attention_softmax_in_fp32 and scale_attention_softmax_in_fp32 are read for their kind only:
-- transformers 5 no longer reads them (softmax runs in float32 anyway, as the kernel here does), and
-- the older code's upcast only moved a factor between the scores and the softmax, the same product.
M.schema = config.schema_from(gpt2.schema, {
   activation_function = { "activation_function", "string", "gelu_pytorch_tanh" },
   scale_attn_by_inverse_layer_idx = false, reorder_and_upcast_attn = false,
}, {
   { "multi_query", "bool", true },
   { "attention_softmax_in_fp32", "bool", true },
   { "scale_attention_softmax_in_fp32", "bool", true },
   { "add_cross_attention", "bool", false },
})

--- Reads and checks a GPTBigCode config (path, folder or table); adds head_dim and kv_heads.
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.n_embd % cfg.n_head ~= 0 then
      config.fail(cfg, WHO, "n_embd %d is not divisible by n_head %d", cfg.n_embd, cfg.n_head)
   end
   if cfg.add_cross_attention then
      config.fail(cfg, WHO, "add_cross_attention = true (cross-attention to an encoder) is not supported")
   end
   common.activation(cfg.activation_function, WHO, cfg._source)
   cfg.head_dim = cfg.n_embd / cfg.n_head
   cfg.kv_heads = cfg.multi_query and 1 or cfg.n_head
   return cfg
end

-- --- attention ------------------------------------------------------------------------------

-- (its own class: GPT-2's forward splits c_attn into three equal parts)
local GPTBigCodeAttention = nn.Module:extend("GPTBigCodeAttention")
M.GPTBigCodeAttention = GPTBigCodeAttention

--- Key/value heads (1 with multi_query) and head size per cached token, query heads, and no score
-- tensor (see LlamaAttention).
function GPTBigCodeAttention:kv_cache_heads() return self.n_kv, self.head_dim, self.n_head, false end

function GPTBigCodeAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local C, D, Hkv = cfg.n_embd, cfg.head_dim, cfg.kv_heads
   self.c_attn = nn.Linear(C, C + 2 * Hkv * D)
   self.c_proj = nn.Linear(C, C)
   self.resid_dropout = nn.Dropout(0)
   rawset(self, "n_head", cfg.n_head)
   rawset(self, "n_kv", Hkv)
   rawset(self, "head_dim", D)
   rawset(self, "layer_idx", layer_idx)       -- 1-based
   rawset(self, "scale", cfg.scale_attn_weights and 1 / math.sqrt(D) or 1)
end

-- c_attn's two layouts are those of Falcon's query_key_value with one key/value head (falcon-7b's
-- multi-query) and with one per head: its split, (B, L, (H + 2 Hkv) D) -> q (B, H, L, D), k, v
-- (B, Hkv, L, D).
GPTBigCodeAttention.split = falcon.FalconAttention.split

--- x (B, T, C); cache: a models.common cache or nil; pad (B, past + T) bool or nil.
-- Returns (B, T, C).
function GPTBigCodeAttention:forward(x, cache, pad)
   local B, L, C = x:size(1), x:size(2), x:size(3)
   local q, k, v = self:split(self.c_attn(x), B, L)
   local past = 0
   if cache then
      past = cache.length
      k, v = cache:update(self.layer_idx, k, v)         -- (the Hkv heads only, never repeated)
   end
   local qa, pa, back = common.queries_to_keys(q, k, pad)
   -- the kernel reads query head h from key/value head h / (H / Hkv)
   local y = common.gqa_attention(qa, k, v, past, self.scale, pa)   -- (B, H, T, D)
   if back then y = y:to(back) end
   return self.c_proj(y:transpose(2, 3):reshape(B, L, C))
end

-- --- MLP and block --------------------------------------------------------------------------

local GPTBigCodeMLP = gpt2.GPT2MLP:extend("GPTBigCodeMLP")
M.GPTBigCodeMLP = GPTBigCodeMLP

function GPTBigCodeMLP:__init(cfg)
   nn.Module.__init(self)
   self.c_fc = nn.Linear(cfg.n_embd, cfg.n_inner)
   self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd)
   self.act = common.activation_module(cfg.activation_function, WHO, cfg._source)
   self.dropout = nn.Dropout(0)
end

local GPTBigCodeBlock = gpt2.GPT2Block:extend("GPTBigCodeBlock")
M.GPTBigCodeBlock = GPTBigCodeBlock
GPTBigCodeBlock.Attention, GPTBigCodeBlock.MLP = GPTBigCodeAttention, GPTBigCodeMLP

-- --- models ---------------------------------------------------------------------------------

-- GPT-2's model (its forward, the n_positions bound named for this family) of these blocks.
local GPTBigCodeModel = gpt2.GPT2Model:extend("GPTBigCodeModel")
M.GPTBigCodeModel = GPTBigCodeModel
GPTBigCodeModel.Block, GPTBigCodeModel.who = GPTBigCodeBlock, WHO
function GPTBigCodeModel.read_config(source) return M.config(source) end

-- GPT-2's head: base_model_prefix, the tie, the old attn.bias buffers ignored, new_cache,
-- max_length (n_positions) and generate.
local GPTBigCodeForCausalLM = gpt2.GPT2LMHeadModel:extend("GPTBigCodeForCausalLM")
M.GPTBigCodeForCausalLM = GPTBigCodeForCausalLM

GPTBigCodeForCausalLM.no_split_modules = { "GPTBigCodeBlock" }

--- GPTBigCodeForCausalLM(config): config is a config.json path, a folder holding one, or a table.
function GPTBigCodeForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.transformer = GPTBigCodeModel(cfg)
   self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   self:tie_weights()
end

--- forward(input_ids[, opts]) -> logits (B, T, vocab): as GPT2LMHeadModel's.
GPTBigCodeForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "transformer", "wte")

function M.from_config(cfg) return GPTBigCodeForCausalLM(cfg) end

return M
