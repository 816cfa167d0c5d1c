--- GPT-Neo (transformers' GPTNeoForCausalLM: EleutherAI gpt-neo-125M, 1.3B, 2.7B) with Hugging Face
-- parameter names: transformer.{wte, wpe, h.N.{ln_1, attn.attention.{k_proj, v_proj, q_proj,
-- out_proj}, ln_2, mlp.{c_fc, c_proj}}, ln_f}, lm_head (tied to transformer.wte). GPT-2's learned
-- positions and sequential blocks, with these differences:
--   - q/k/v projections without biases, nn.Linear weights (out, in) everywhere;
--   - scores are never scaled by 1/sqrt(head_dim);
--   - layers are "global" (causal) or "local" (attention_layers, or attention_types expanded): a
--     local query sees window_size keys, its own included, and its cache keeps only those. The
--     window counts cache slots, padding included, as transformers' mask does.
-- The block, model and head extend gpt2.lua's (their forward, tie, max_length and generate); the
-- self-attention is Llama's without rotary embeddings.
--
--    local gpt_neo = require("moonload.models.gpt_neo")
--    local model = gpt_neo.GPTNeoForCausalLM("path/to/config.json")  -- or a config table
--    local out = model:generate({464, 2068}, {max_new_tokens = 20})
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local gpt2 = require("moonload.models.gpt2")
local gpt_bigcode = require("moonload.models.gpt_bigcode")
local llama = require("moonload.models.llama")

local M = {}
local WHO = "models.gpt_neo"

M.schema = {
   { "vocab_size", "int" },
   { "hidden_size", "int" },
   { "num_layers", "int" },
   { "num_heads", "int" },
   { "max_position_embeddings", "int", 2048 },
   { "window_size", "int", 256 },
   { "intermediate_size", "int", function(c) return 4 * c.hidden_size end },
   { "activation_function", "string", "gelu_new" },
   { "layer_norm_epsilon", "posnum", 1e-5 },
   { "tie_word_embeddings", "bool", true },
}

M.ATTENTION_KINDS = { global = true, ["local"] = true }

-- attention_types [[kinds, count], ...] expanded as transformers' expand_attention_types_params:
-- each kinds list repeated count times.
local function expand_types(cfg)
   local types = cfg.attention_types or { { { "global", "local" }, 12 } }    -- (transformers' default)
   local bad = 'config key "attention_types" must be a list of [[kind, ...], count] pairs'
   if type(types) ~= "table" then config.fail(cfg, WHO, bad) end
   local out = {}
   for _, item in ipairs(types) do
      local kinds, count = type(item) == "table" and item[1], type(item) == "table" and item[2]
      if type(kinds) ~= "table" or type(count) ~= "number" or count < 0 or count ~= math.floor(count) then
         config.fail(cfg, WHO, bad)
      end
      for _ = 1, count do
         for _, kind in ipairs(kinds) do out[#out + 1] = kind end
      end
   end
   return out
end

--- The kind of each layer ("global" or "local"): the file's attention_layers when it has them (they
-- win over attention_types in transformers too), else attention_types expanded.
function M.attention_layers(cfg)
   local layers, from = cfg.attention_layers, "attention_layers"
   if layers == nil then
      layers, from = expand_types(cfg), "attention_types"
   elseif type(layers) ~= "table" then
      config.fail(cfg, WHO, 'config key "attention_layers" must be a list of "global" and "local"')
   end
   if #layers ~= cfg.num_layers then
      config.fail(cfg, WHO, 'config key "%s" gives %d layer kinds, num_layers is %d', from, #layers, cfg.num_layers)
   end
   for i, kind in ipairs(layers) do
      if not M.ATTENTION_KINDS[kind] then
         config.fail(cfg, WHO, 'config key "%s" gives layer %d the kind %s (supported: "global", "local")', from, i - 1,
            type(kind) == "string" and string.format('"%s"', kind) or tostring(kind))
      end
   end
   return layers
end

--- Reads and checks a GPT-Neo config (path, folder or table). Adds GPT-2's names of its sizes (the
-- blocks and model are GPT-2's), Llama's names of the attention's, and layer_windows.
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.hidden_size % cfg.num_heads ~= 0 then
      config.fail(cfg, WHO, "hidden_size %d is not divisible by num_heads %d", cfg.hidden_size, cfg.num_heads)
   end
   common.activation(cfg.activation_function, WHO, cfg._source)
   cfg.attention_layers = M.attention_layers(cfg)
   cfg.n_embd, cfg.n_layer, cfg.n_head = cfg.hidden_size, cfg.num_layers, cfg.num_heads
   cfg.n_inner, cfg.n_positions = cfg.intermediate_size, cfg.max_position_embeddings
   cfg.num_attention_heads, cfg.num_key_value_heads = cfg.num_heads, cfg.num_heads
   cfg.head_dim = cfg.hidden_size / cfg.num_heads
   cfg.layer_windows = {}
   for i, kind in ipairs(cfg.attention_layers) do cfg.layer_windows[i] = kind == "local" and cfg.window_size or false end
   return cfg
end

-- --- attention ------------------------------------------------------------------------------

-- Llama's attention (its forward: the windowed cache, the padding mask following it) with no
-- rotary embedding and no score scale.
local GPTNeoSelfAttention = llama.LlamaAttention:extend("GPTNeoSelfAttention")
M.GPTNeoSelfAttention = GPTNeoSelfAttention
GPTNeoSelfAttention.out_name = "out_proj"

function GPTNeoSelfAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local C = cfg.hidden_size
   self.k_proj = nn.Linear(C, C, { bias = false })
   self.v_proj = nn.Linear(C, C, { bias = false })
   self.q_proj = nn.Linear(C, C, { bias = false })
   self.out_proj = nn.Linear(C, C)
   llama.attention_geometry(self, cfg, layer_idx)
   rawset(self, "scale", 1)                   -- GPT-Neo's scores are plain dot products
   rawset(self, "nope", true)                 -- (positions are learned, added to the embeddings)
end

-- transformers' attn: the self-attention under attn.attention.
local GPTNeoAttention = nn.Module:extend("GPTNeoAttention")
M.GPTNeoAttention = GPTNeoAttention
GPTNeoAttention.part_of_layer = true     -- (memory planning counts the block's MLP with the attention inside)

function GPTNeoAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.attention = GPTNeoSelfAttention(cfg, layer_idx)
   rawset(self, "attention_type", cfg.attention_layers[layer_idx])
end

--- x (B, T, C); cache optional; pad (B, past + T) bool or nil. Returns (B, T, C).
function GPTNeoAttention:forward(x, cache, pad)
   return self.attention(x, nil, nil, cache, pad)
end

-- --- MLP, block and models ------------------------------------------------------------------

-- GPTBigCode's nn.Linear c_fc/c_proj MLP, under this family's name.
local GPTNeoMLP = gpt_bigcode.GPTBigCodeMLP:extend("GPTNeoMLP")
M.GPTNeoMLP = GPTNeoMLP

local GPTNeoBlock = gpt2.GPT2Block:extend("GPTNeoBlock")
M.GPTNeoBlock = GPTNeoBlock
GPTNeoBlock.Attention, GPTNeoBlock.MLP = GPTNeoAttention, GPTNeoMLP

-- GPT-2's model (its forward, the bound on positions named for this family) of these blocks.
local GPTNeoModel = gpt2.GPT2Model:extend("GPTNeoModel")
M.GPTNeoModel = GPTNeoModel
GPTNeoModel.Block, GPTNeoModel.who, GPTNeoModel.positions_key = GPTNeoBlock, WHO, "max_position_embeddings"
function GPTNeoModel.read_config(source) return M.config(source) end

-- GPT-2's head: base_model_prefix, the tie, new_cache, max_length and generate.
local GPTNeoForCausalLM = gpt2.GPT2LMHeadModel:extend("GPTNeoForCausalLM")
M.GPTNeoForCausalLM = GPTNeoForCausalLM
GPTNeoForCausalLM.Model = GPTNeoModel
GPTNeoForCausalLM.no_split_modules = { "GPTNeoBlock" }
-- the causal masks older checkpoints saved as buffers
GPTNeoForCausalLM.ignore_unexpected = { "%.attn%.attention%.bias$", "%.attn%.attention%.masked_bias$" }

--- forward(input_ids[, opts]) -> logits (B, T, vocab): as GPT2LMHeadModel's.
GPTNeoForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "transformer", "wte")

function M.from_config(cfg) return GPTNeoForCausalLM(cfg) end

return M
