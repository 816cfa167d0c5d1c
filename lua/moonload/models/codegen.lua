--- CodeGen (transformers' CodeGenForCausalLM: Salesforce codegen-350M/2B/6B/16B mono, multi, nl)
-- with Hugging Face parameter names: transformer.{wte, h.N.{ln_1, attn.{qkv_proj, out_proj},
-- mlp.{fc_in, fc_out}}, ln_f}, lm_head (untied, with a bias). GPT-J's layout (attention and MLP in
-- parallel on ln_1's output; the first rotary_dim dims of each head turned in neighbour pairs), but
-- q, k and v come from one qkv_proj (no bias) whose output is cut as the 4 model-parallel shards
-- CodeGen was trained on (mp_num): shard s holds, one after the other, the queries, the values and
-- the keys of n_embd / 4 channels; those channels, shard after shard, are the heads in order.
-- Block, model and head extend gptj.lua's classes and run their forward.
--
--    local codegen = require("moonload.models.codegen")
--    local model = codegen.CodeGenForCausalLM("path/to/config.json")  -- or a config table
--    local out = model:generate({464, 2068}, {max_new_tokens = 20})
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local gptj = require("moonload.models.gptj")

local M = {}
local WHO = "models.codegen"

M.MP_NUM = 4

-- GPT-J's keys, rotary_dim a positive count (0 or null is no whole-head rotation here: transformers'
-- CodeGen fails on both).
M.schema = config.schema_from(gptj.schema, { rotary_dim = { "rotary_dim", "int", 64 } })

--- Reads and checks a CodeGen config (path, folder or table): GPT-J's checks, and a width qkv_proj's
-- output splits into the 4 shards.
function M.config(source)
   local cfg = gptj.config(source, M.schema, WHO)
   if cfg.n_embd % M.MP_NUM ~= 0 then
      config.fail(cfg, WHO, "n_embd %d is not a multiple of 4 (qkv_proj's output is split into mp_num = 4 shards)",
         cfg.n_embd)
   end
   return cfg
end

local CodeGenAttention = gptj.GPTJAttention:extend("CodeGenAttention")
M.CodeGenAttention = CodeGenAttention

function CodeGenAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local C = cfg.n_embd
   self.out_proj = nn.Linear(C, C, { bias = false })         -- (transformers' order)
   self.qkv_proj = nn.Linear(C, 3 * C, { bias = false })
   self:geometry(cfg, layer_idx)
end

--- q, k, v (B, T, H, D): qkv_proj's output (B, T, 3C) as (B, T, 4, 3C/4), each shard's queries,
-- values, keys (C/4 each); a part's 4 shards side by side are its C channels, H heads of D.
function CodeGenAttention:project(x, B, L)
   local H, D = self.n_head, self.head_dim
   local local_dim = H * D / M.MP_NUM
   local shards = self.qkv_proj(x):view(B, L, M.MP_NUM, 3 * local_dim)
   local function part(i) return shards:narrow(4, i * local_dim + 1, local_dim):reshape(B, L, H, D) end
   return part(0), part(2), part(1)
end

-- GPT-J's MLP (fc_in, fc_out) and block, under this family's names.
local CodeGenMLP = gptj.GPTJMLP:extend("CodeGenMLP")
M.CodeGenMLP = CodeGenMLP

local CodeGenBlock = gptj.GPTJBlock:extend("CodeGenBlock")
M.CodeGenBlock = CodeGenBlock
CodeGenBlock.Attention, CodeGenBlock.MLP = CodeGenAttention, CodeGenMLP

local CodeGenRotaryEmbedding = gptj.GPTJRotaryEmbedding:extend("CodeGenRotaryEmbedding")
M.CodeGenRotaryEmbedding = CodeGenRotaryEmbedding

local CodeGenModel = gptj.GPTJModel:extend("CodeGenModel")
M.CodeGenModel = CodeGenModel
CodeGenModel.Block, CodeGenModel.Rotary = CodeGenBlock, CodeGenRotaryEmbedding

-- GPT-J's head: a biased lm_head, untied unless tie_word_embeddings.
local CodeGenForCausalLM = gptj.GPTJForCausalLM:extend("CodeGenForCausalLM")
M.CodeGenForCausalLM = CodeGenForCausalLM
CodeGenForCausalLM.Model = CodeGenModel
function CodeGenForCausalLM.read_config(source) return M.config(source) end
CodeGenForCausalLM.no_split_modules = { "CodeGenBlock" }
-- the causal masks older checkpoints saved as buffers
CodeGenForCausalLM.ignore_unexpected = { "%.attn%.causal_mask$", "%.attn%.masked_bias$", "%.attn%.bias$" }

common.causal_lm_methods(CodeGenForCausalLM, WHO, "transformer", "wte", nil, "n_layer") -- (rotary: no max_length)

function M.from_config(cfg) return CodeGenForCausalLM(cfg) end

return M
