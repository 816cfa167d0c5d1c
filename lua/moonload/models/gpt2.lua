--- GPT-2 (transformers' GPT2LMHeadModel) with Hugging Face parameter names:
-- transformer.{wte, wpe, h.N.{ln_1, attn.{c_attn, c_proj}, ln_2, mlp.{c_fc, c_proj}}, ln_f},
-- lm_head (tied to transformer.wte). Conv1D layers, gelu_new, pre-norm blocks.
--
--    local gpt2 = require("moonload.models.gpt2")
--    local model = gpt2.GPT2LMHeadModel("path/to/config.json")  -- or a config table
--    local logits = model(ids)                                   -- (B, T, vocab)
--    local out = model:generate({464, 2068}, {max_new_tokens = 20})
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local block_schedule = require("moonload.models.block_schedule")
local generation = require("moonload.models.generation")

local M = {}
local WHO = "models.gpt2"

M.schema = {
   { "vocab_size", "int" },
   { "n_positions", "int" },
   { "n_embd", "int" },
   { "n_layer", "int" },
   { "n_head", "int" },
   { "n_inner", "int", function(c) return 4 * c.n_embd end },
   { "activation_function", "string", "gelu_new" },
   { "layer_norm_epsilon", "posnum", 1e-5 },
   { "scale_attn_weights", "bool", true },
   { "scale_attn_by_inverse_layer_idx", "bool", false },
   { "reorder_and_upcast_attn", "bool", false },
   { "tie_word_embeddings", "bool", true },
}

--- Reads and checks a GPT-2 config (path, folder or table).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.n_embd % cfg.n_head ~= 0 then
      config.fail(cfg, WHO, "n_embd %d is not divisible by n_head %d", cfg.n_embd, cfg.n_head)
   end
   common.activation(cfg.activation_function, WHO, cfg._source)
   return cfg
end

-- --- attention ------------------------------------------------------------------------------

local GPT2Attention = nn.Module:extend("GPT2Attention")

--- Key/value heads and head size per cached token, and no score tensor (see LlamaAttention).
function GPT2Attention:kv_cache_heads() return self.n_head, self.head_dim, self.n_head, false end
M.GPT2Attention = GPT2Attention

function GPT2Attention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local C = cfg.n_embd
   self.c_attn = nn.Conv1D(3 * C, C)
   self.c_proj = nn.Conv1D(C, C)
   self.attn_dropout = nn.Dropout(0)
   self.resid_dropout = nn.Dropout(0)
   rawset(self, "n_head", cfg.n_head)
   rawset(self, "head_dim", C / cfg.n_head)
   rawset(self, "layer_idx", layer_idx)       -- 1-based
   local scale = cfg.scale_attn_weights and 1 / math.sqrt(C / cfg.n_head) or 1
   if cfg.scale_attn_by_inverse_layer_idx then scale = scale / layer_idx end
   rawset(self, "scale", scale)
end

--- x (B, T, C); cache: a models.common cache or nil; pad (B, past + T) bool or nil.
-- Returns (B, T, C).
function GPT2Attention:forward(x, cache, pad)
   local B, L, C = x:size(1), x:size(2), x:size(3)
   local H, D = self.n_head, self.head_dim
   local qkv = self.c_attn(x)                                  -- (B, T, 3C)
   local parts = qkv:split(C, 3)
   local q = parts[1]:reshape(B, L, H, D):transpose(2, 3)      -- (B, H, T, D)
   local k = parts[2]:reshape(B, L, H, D):transpose(2, 3)
   local v = parts[3]:reshape(B, L, H, D):transpose(2, 3)
   local past = 0
   if cache then
      past = cache.length
      k, v = cache:update(self.layer_idx, k, v)
   end
   local qa, pa, back = common.queries_to_keys(q, k, pad)
   local y = common.causal_attention(qa, k, v, past, self.scale, pa) -- (B, H, T, D)
   if back then y = y:to(back) end
   y = y:transpose(2, 3):reshape(B, L, C)
   return self.c_proj(y)
end

-- --- MLP and block --------------------------------------------------------------------------

local GPT2MLP = nn.Module:extend("GPT2MLP")
M.GPT2MLP = GPT2MLP

function GPT2MLP:__init(cfg)
   nn.Module.__init(self)
   self.c_fc = nn.Conv1D(cfg.n_inner, cfg.n_embd)
   self.c_proj = nn.Conv1D(cfg.n_embd, cfg.n_inner)
   self.act = common.activation_module(cfg.activation_function, WHO, cfg._source)
   self.dropout = nn.Dropout(0)
end

function GPT2MLP:forward(x)
   return self.c_proj(self.act(self.c_fc(x)))
end

local GPT2Block = nn.Module:extend("GPT2Block")
M.GPT2Block = GPT2Block
GPT2Block.Attention, GPT2Block.MLP = GPT2Attention, GPT2MLP    -- (GPTBigCode's own)

function GPT2Block:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.ln_1 = nn.LayerNorm(cfg.n_embd, { eps = cfg.layer_norm_epsilon })
   self.attn = self.Attention(cfg, layer_idx)
   self.ln_2 = nn.LayerNorm(cfg.n_embd, { eps = cfg.layer_norm_epsilon })
   self.mlp = self.MLP(cfg)
end

function GPT2Block:forward(x, cache, pad)
   x = x + self.attn(self.ln_1(x), cache, pad)
   return x + self.mlp(self.ln_2(x))
end

-- --- models ---------------------------------------------------------------------------------

local GPT2Model = nn.Module:extend("GPT2Model")
M.GPT2Model = GPT2Model
-- the block class, the name errors give and the config reader: a family built on GPT-2's own
GPT2Model.Block, GPT2Model.who = GPT2Block, WHO
function GPT2Model.read_config(source) return M.config(source) end
-- the config key of cfg.n_positions that errors name (GPT-Neo's is max_position_embeddings)
GPT2Model.positions_key = "n_positions"

function GPT2Model:__init(cfg)
   nn.Module.__init(self)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = self.read_config(cfg) end
   self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
   self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
   self.drop = nn.Dropout(0)
   local blocks = {}
   for i = 1, cfg.n_layer do blocks[i] = self.Block(cfg, i) end
   self.h = nn.ModuleList(blocks)
   self.ln_f = nn.LayerNorm(cfg.n_embd, { eps = cfg.layer_norm_epsilon })
   rawset(self, "config", cfg)
end

--- input_ids (B, T) int64; cache optional; pad (B, past + T) bool or nil; pos (B, T) int64
-- or nil (positions past .. past+T-1); blocks {micro_batch_size, prefill_chunk_size} or nil (see
-- models/block_schedule.lua). Returns the final hidden states (B, T, C).
function GPT2Model:forward(input_ids, cache, pad, pos, blocks)
   local cfg = self.config
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   common.check_positions(self.who, past, L, cfg.n_positions, self.positions_key, 3)
   pos = pos or T.arange(past, past + L, { device = input_ids.device })
   local x = self.wte(input_ids) + self.wpe(pos)
   local n = cfg.n_layer
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, self.who)
   for i = 1, n do x = block_schedule.call(schedule, i, self.h[i], x, cache, pad) end
   if cache then cache:advance(L) end
   return self.ln_f(x)
end

local GPT2LMHeadModel = nn.Module:extend("GPT2LMHeadModel")
M.GPT2LMHeadModel = GPT2LMHeadModel

GPT2LMHeadModel.base_model_prefix = "transformer"
GPT2LMHeadModel.tied_weights = { ["lm_head.weight"] = "transformer.wte.weight" }
GPT2LMHeadModel.ignore_unexpected = { "%.attn%.bias$", "%.attn%.masked_bias$" }
GPT2LMHeadModel.no_split_modules = { "GPT2Block" }
GPT2LMHeadModel.Model = GPT2Model             -- (its read_config reads the config: a family's own)

--- GPT2LMHeadModel(config): config is a config.json path, a folder holding one, or a table.
function GPT2LMHeadModel:__init(cfg)
   nn.Module.__init(self)
   cfg = self.Model.read_config(cfg)
   self.transformer = self.Model(cfg)
   self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   self:tie_weights()
end

--- Ties lm_head.weight to transformer.wte.weight (same tensor object) when the config says so.
function GPT2LMHeadModel:tie_weights()
   if self.config.tie_word_embeddings then
      self.lm_head.weight = self.transformer.wte.weight
   end
end

--- forward(input_ids[, {cache, attention_mask, position_ids, logits_to_keep}]) -> logits (B, T, vocab),
-- or (B, n, vocab) for the last n positions only when logits_to_keep = n (generate asks for 1).
-- attention_mask (B, past + T), 1 = token, 0 = padding; position_ids (B, T) default to
-- past .. past+T-1 (generate derives them from the mask, as transformers does).
-- input_ids: int64 tensor (B, T) or (T), or Lua lists of 0-based token ids.
GPT2LMHeadModel.forward = common.causal_lm_forward(WHO .. ".forward", "transformer", "wte")

--- A fresh key-value cache for this model (generate makes its own).
function GPT2LMHeadModel:new_cache(capacity, device, dtype)
   return common.new_cache(self.config.n_layer, capacity, device, dtype)
end

--- Longest sequence the model accepts.
function GPT2LMHeadModel:max_length()
   return self.config.n_positions
end

GPT2LMHeadModel.generate = generation.generate

function M.from_config(cfg) return GPT2LMHeadModel(cfg) end

return M
