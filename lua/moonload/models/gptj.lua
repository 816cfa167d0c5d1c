--- GPT-J (transformers' GPTJForCausalLM: EleutherAI/gpt-j-6b, Accelerate's big-model example)
-- with Hugging Face parameter names: transformer.{wte, h.N.{ln_1, attn.{q_proj, k_proj, v_proj,
-- out_proj}, mlp.{fc_in, fc_out}}, ln_f}, lm_head (with a bias). Attention and MLP both read ln_1's
-- output (parallel residual); the first rotary_dim dims of each head turn in pairs of neighbours
-- (GPT-J's rotate-every-two). A score is a dot product, so giving q and k's rotary dims the same
-- order (evens, then odds) changes nothing in it; in that order the pairs are Llama's halves, so
-- Llama's rotary kernel turns them, and the weights stay as the checkpoint has them (save_model
-- writes them back unchanged).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")

local M = {}
local WHO = "models.gptj"

M.schema = {
   { "vocab_size", "int" },
   { "n_embd", "int" },
   { "n_layer", "int" },
   { "n_head", "int" },
   { "n_positions", "int", 2048 },
   { "rotary_dim", "int0", 64 },
   { "n_inner", "int", function(c) return 4 * c.n_embd end },
   { "activation_function", "string", "gelu_new" },
   { "layer_norm_epsilon", "posnum", 1e-5 },
   { "tie_word_embeddings", "bool", false },
}

--- Reads and checks a GPT-J config (path, folder or table); a family of GPT-J's layout (CodeGen)
-- reads its own schema, its errors naming who.
function M.config(source, schema, who)
   who = who or WHO
   local cfg = config.load(source, schema or M.schema, who)
   if cfg.n_embd % cfg.n_head ~= 0 then
      config.fail(cfg, who, "n_embd %d is not a multiple of n_head %d", cfg.n_embd, cfg.n_head)
   end
   cfg.head_dim = cfg.n_embd / cfg.n_head
   local rot = cfg.rotary_dim == 0 and cfg.head_dim or cfg.rotary_dim     -- (0, as null: the whole head)
   if rot > cfg.head_dim or rot % 2 ~= 0 then
      config.fail(cfg, who, "rotary_dim %d must be even and at most head_dim %d", rot, cfg.head_dim)
   end
   cfg.num_hidden_layers, cfg.hidden_size = cfg.n_layer, cfg.n_embd
   cfg.rope = llama.rope_from(cfg, who, {}, 10000)
   cfg.rope_theta = cfg.rope.rope_theta
   llama.set_rotary_dim(cfg, who, rot / cfg.head_dim)
   common.activation(cfg.activation_function, who, cfg._source)
   return cfg
end

--- The head dims in the order that makes rotate-every-two rotate-half: the rotary dims' even
-- ones, their odd ones, then the others (0-based, for index_select).
function M.pair_order(rotary_dim, head_dim)
   local order = {}
   for i = 0, rotary_dim - 1, 2 do order[#order + 1] = i end
   for i = 1, rotary_dim - 1, 2 do order[#order + 1] = i end
   for i = rotary_dim, head_dim - 1 do order[#order + 1] = i end
   return order
end

local GPTJAttention = nn.Module:extend("GPTJAttention")
M.GPTJAttention = GPTJAttention

--- Key/value heads and head size per cached token, and no score tensor (see LlamaAttention).
function GPTJAttention:kv_cache_heads() return self.n_head, self.head_dim, self.n_head, false end

function GPTJAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local C = cfg.n_embd
   self.k_proj = nn.Linear(C, C, { bias = false })
   self.v_proj = nn.Linear(C, C, { bias = false })
   self.q_proj = nn.Linear(C, C, { bias = false })
   self.out_proj = nn.Linear(C, C, { bias = false })
   self:geometry(cfg, layer_idx)
end

--- The plain fields forward reads: heads, head size, cache slot, the head dims' rotary order.
function GPTJAttention:geometry(cfg, layer_idx)
   rawset(self, "n_head", cfg.n_head)
   rawset(self, "head_dim", cfg.head_dim)
   rawset(self, "layer_idx", layer_idx)
   rawset(self, "order", T.tensor(M.pair_order(cfg.rotary_dim, cfg.head_dim), { dtype = "int64" }))
end

--- q, k, v (B, T, H, D) from x (B, T, C) (CodeGen's come from one fused projection).
function GPTJAttention:project(x, B, L)
   local H, D = self.n_head, self.head_dim
   return self.q_proj(x):view(B, L, H, D), self.k_proj(x):view(B, L, H, D), self.v_proj(x):view(B, L, H, D)
end

function GPTJAttention:forward(x, cos, sin, cache, pad)
   local B, L = x:size(1), x:size(2)
   local H, D = self.n_head, self.head_dim
   local order = self.order
   if order.device ~= x.device then
      order = order:to(x.device)
      rawset(self, "order", order)
   end
   local q, k, v = self:project(x, B, L)
   q = llama.apply_rotary(q:transpose(2, 3):index_select(4, order), cos, sin)      -- (B, H, T, D)
   k = llama.apply_rotary(k:transpose(2, 3):index_select(4, order), cos, sin)
   v = v:transpose(2, 3)
   local past = 0
   if cache then
      past = cache.length
      k, v = cache:update(self.layer_idx, k, v:contiguous())
   end
   local qa, pa, back = common.queries_to_keys(q, k, pad)
   local y = common.causal_attention(qa, k, v, past, 1 / math.sqrt(D), pa)       -- (B, H, T, D)
   if back then y = y:to(back) end
   return self.out_proj(y:transpose(2, 3):reshape(B, L, H * D))
end

local GPTJMLP = nn.Module:extend("GPTJMLP")
M.GPTJMLP = GPTJMLP

function GPTJMLP:__init(cfg)
   nn.Module.__init(self)
   self.fc_in = nn.Linear(cfg.n_embd, cfg.n_inner)
   self.fc_out = nn.Linear(cfg.n_inner, cfg.n_embd)
   self.act = common.activation_module(cfg.activation_function, WHO, cfg._source)
end

function GPTJMLP:forward(x) return self.fc_out(self.act(self.fc_in(x))) end

local GPTJBlock = nn.Module:extend("GPTJBlock")
M.GPTJBlock = GPTJBlock
GPTJBlock.Attention, GPTJBlock.MLP = GPTJAttention, GPTJMLP    -- (CodeGen's own)

function GPTJBlock:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.ln_1 = nn.LayerNorm(cfg.n_embd, { eps = cfg.layer_norm_epsilon })
   self.attn = self.Attention(cfg, layer_idx)
   self.mlp = self.MLP(cfg)
end

function GPTJBlock:forward(x, cos, sin, cache, pad)
   local h = self.ln_1(x)
   return x + self.attn(h, cos, sin, cache, pad) + self.mlp(h)
end

local GPTJRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("GPTJRotaryEmbedding")
M.GPTJRotaryEmbedding = GPTJRotaryEmbedding

local GPTJModel = llama.LlamaModel:extend("GPTJModel")
M.GPTJModel = GPTJModel

-- Llama's forward (positions, rotary tables, cache, block schedule) over these layers
GPTJModel.embed_name, GPTJModel.layers_name, GPTJModel.norm_name = "wte", "h", "ln_f"
GPTJModel.Block, GPTJModel.Rotary = GPTJBlock, GPTJRotaryEmbedding         -- (CodeGen's own)

function GPTJModel:__init(cfg)
   self:build_parts(cfg, cfg.n_embd, self.Block, cfg.n_layer, nn.LayerNorm(cfg.n_embd, { eps = cfg.layer_norm_epsilon }),
      self.Rotary)
end

local GPTJForCausalLM = nn.Module:extend("GPTJForCausalLM")
M.GPTJForCausalLM = GPTJForCausalLM
GPTJForCausalLM.base_model_prefix = "transformer"
GPTJForCausalLM.tied_weights = { ["lm_head.weight"] = "transformer.wte.weight" }
GPTJForCausalLM.ignore_unexpected = { "%.attn%.bias$", "%.attn%.masked_bias$" }
GPTJForCausalLM.no_split_modules = { "GPTJBlock" }
-- the model class and the config reader (CodeGen's own)
GPTJForCausalLM.Model = GPTJModel
function GPTJForCausalLM.read_config(source) return M.config(source) end

function GPTJForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = self.read_config(cfg)
   self.transformer = self.Model(cfg)
   self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.lm_head.weight = self.transformer.wte.weight end
end

common.causal_lm_methods(GPTJForCausalLM, WHO, "transformer", "wte", nil, "n_layer") -- (rotary embeddings: no max_length)

function M.from_config(cfg) return GPTJForCausalLM(cfg) end

return M
