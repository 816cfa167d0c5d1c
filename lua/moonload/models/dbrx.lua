--- DBRX (transformers' DbrxForCausalLM: Databricks' dbrx-base and dbrx-instruct, 132B, 16 experts
-- of which 4 run per token) with Hugging Face parameter names: transformer.{wte,
-- blocks.N.{norm_attn_norm.{norm_1, attn.{Wqkv, out_proj}, norm_2}, ffn.{router.layer,
-- experts.mlp.{w1, v1, w2}}}, norm_f}, lm_head (never tied).
-- Llama's rotary grouped-query attention (kv_n_heads) from one fused Wqkv whose output is clamped
-- to +-clip_qkv; LayerNorms without bias; every block sparse: a softmax router's top moe_top_k
-- experts, weighted by those probabilities divided by their p-norm (p = moe_normalize_expert_weights,
-- 1 on the hub; null: as they are). Each expert is a SwiGLU whose weights are slices of three 2-D
-- tensors, (moe_num_experts x ffn_hidden_size, d_model) each, as the hub stores them: models/moe.lua's
-- sparse block runs only the chosen experts, so under offload hooks (the weights views of a mapped
-- file) a token reads its experts' pages only.
-- The config nests its attention and FFN keys (attn_config, ffn_config); errors name them so.
local cjson = require("cjson")
local nn = require("moonload.nn")
local F = require("moonload.nn.functional")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local json = require("moonload.utils.json")

local M = {}
local WHO = "models.dbrx"

-- transformers' DbrxConfig keys (its defaults where a checkpoint may leave a key out).
M.schema = {
   { "vocab_size", "int" },
   { "d_model", "int" },
   { "n_heads", "int" },
   { "n_layers", "int" },
   { "max_seq_len", "int", 2048 },
   { "tie_word_embeddings", "bool", false },
   { "attn_config", "table", function() return {} end },
   { "ffn_config", "table", function() return {} end },
   { "rope_parameters", "table", function() return {} end },
   { "rope_scaling", "table", function() return {} end },
}

-- The nested configs' keys, checked under their paths (DbrxAttentionConfig's, DbrxFFNConfig's defaults).
M.nested_schema = {
   { "attn_config.kv_n_heads", "int", 1 },
   { "ffn_config.ffn_hidden_size", "int", 3584 },
   { "ffn_config.moe_num_experts", "int", 4 },
   { "ffn_config.moe_top_k", "int", 1 },
   { "ffn_config.ffn_act_fn", "table", function() return { name = "silu" } end },
}

-- (LongRoPE's per-frequency factors and the "dynamic" base growing with the length: not here)
local ROPE_TYPES = { default = true, linear = true, llama3 = true, yarn = true }

-- transformers reads an explicit null moe_normalize_expert_weights as "no normalization" (absent: 1);
-- config.read drops nulls, so look at the source as written.
local function normalization_is_null(source, src)
   local raw = source
   if type(source) == "string" then raw = json.read(src, WHO, true) end       -- (src: the file config.read read)
   local ffn = type(raw) == "table" and raw.ffn_config
   return type(ffn) == "table" and ffn.moe_normalize_expert_weights == cjson.null
end

--- Reads and checks a DBRX config (path, folder or table) into what Llama's and the MoE classes read:
-- hidden_size, num_attention_heads, num_key_value_heads, num_hidden_layers, head_dim, rope (the
-- rope_parameters transformers 5 writes, else the hub's attn_config.rope_theta), clip_qkv,
-- num_experts, num_experts_per_tok, moe_intermediate_size, hidden_act and normalize_p (nil: none).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   local flat = {}
   for _, part in ipairs({ "attn_config", "ffn_config" }) do
      for k, v in pairs(cfg[part]) do flat[part .. "." .. k] = v end
   end
   local sub = config.validate(flat, M.nested_schema, cfg._source, WHO, 2)
   if cfg.tie_word_embeddings then
      config.fail(cfg, WHO, 'config key "tie_word_embeddings" is true: DBRX never ties its head '
         .. "(transformers refuses it too)")
   end
   local H, Hkv = cfg.n_heads, sub["attn_config.kv_n_heads"]
   if cfg.d_model % H ~= 0 then config.fail(cfg, WHO, "d_model %d is not a multiple of n_heads %d", cfg.d_model, H) end
   if H % Hkv ~= 0 then config.fail(cfg, WHO, "n_heads %d is not a multiple of attn_config.kv_n_heads %d", H, Hkv) end
   cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads = cfg.d_model, H, Hkv
   cfg.num_hidden_layers, cfg.max_position_embeddings, cfg.head_dim = cfg.n_layers, cfg.max_seq_len, cfg.d_model / H
   local clip = cfg.attn_config.clip_qkv
   if clip ~= nil and (type(clip) ~= "number" or clip <= 0) then
      config.fail(cfg, WHO, 'config key "attn_config.clip_qkv" must be a positive number or null, got %s', tostring(clip))
   end
   cfg.clip_qkv = clip
   -- transformers 5's rotary embedding reads rope_parameters alone (its default base 10000 under the
   -- hub's attn_config.rope_theta); the hub's files have only the latter, which DBRX was trained with
   local rp, rp_name = llama.rope_table(cfg, WHO, ROPE_TYPES)
   cfg.rope = llama.rope_from(cfg, WHO, { { { rope_theta = cfg.attn_config.rope_theta }, "attn_config." },
      { { rope_theta = cfg.rope_theta }, "" }, { rp, rp_name .. "." } }, 10000)
   cfg.rope_theta = cfg.rope.rope_theta
   llama.set_rotary_dim(cfg, WHO, 1)
   cfg.layer_windows = {}
   for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   -- the experts
   cfg.num_experts, cfg.num_experts_per_tok = sub["ffn_config.moe_num_experts"], sub["ffn_config.moe_top_k"]
   cfg.moe_intermediate_size = sub["ffn_config.ffn_hidden_size"]
   if cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, WHO, "ffn_config.moe_top_k %d is more than ffn_config.moe_num_experts %d", cfg.num_experts_per_tok,
         cfg.num_experts)
   end
   local act = sub["ffn_config.ffn_act_fn"].name or "silu"
   if type(act) ~= "string" then
      config.fail(cfg, WHO, 'config key "ffn_config.ffn_act_fn.name" must be a string, got %s', tostring(act))
   end
   common.activation(act, WHO, cfg._source)
   cfg.hidden_act = act
   local p = cfg.ffn_config.moe_normalize_expert_weights
   if p == nil and not normalization_is_null(source, cfg._source) then p = 1 end
   if p ~= nil and (type(p) ~= "number" or p <= 0) then
      config.fail(cfg, WHO, 'config key "ffn_config.moe_normalize_expert_weights" must be a positive number or null, got %s',
         tostring(p))
   end
   cfg.normalize_p = p
   cfg.norm_topk_prob = false                  -- (the p-norm instead: DbrxFFN:route)
   cfg.family = "dbrx"
   return cfg
end

-- --- attention ----------------------------------------------------------------------------------

local DbrxAttention = llama.LlamaAttention:extend("DbrxAttention")
M.DbrxAttention = DbrxAttention
DbrxAttention.out_name = "out_proj"

function DbrxAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
   self.Wqkv = nn.Linear(cfg.hidden_size, (H + 2 * Hkv) * D, { bias = false })
   self.out_proj = nn.Linear(H * D, cfg.hidden_size, { bias = false })
   llama.attention_geometry(self, cfg, layer_idx)
   rawset(self, "clip_qkv", cfg.clip_qkv)
end

--- q (B, T, H, D), k and v (B, T, Hkv, D): Wqkv's query, key and value columns in that order, each
-- clamped to +-clip_qkv when the config says (transformers clamps them fused: the same values).
function DbrxAttention:project(x, B, L)
   local D = self.head_dim
   local qkv, parts, at = self.Wqkv(x), {}, 0                          -- (B, T, (H + 2 Hkv) D)
   for i, heads in ipairs({ self.n_head, self.n_kv_head, self.n_kv_head }) do
      parts[i] = qkv:narrow(3, at + 1, heads * D)
      at = at + heads * D
   end
   local q, k, v = llama.clip_projections(self, parts[1], parts[2], parts[3])
   return q:reshape(B, L, self.n_head, D), k:reshape(B, L, self.n_kv_head, D), v:reshape(B, L, self.n_kv_head, D)
end

-- The attention between its two norms: norm_1 before it, norm_2 on the residual after it.
local DbrxNormAttentionNorm = nn.Module:extend("DbrxNormAttentionNorm")
DbrxNormAttentionNorm.part_of_layer = true    -- (memory planning counts the block's MLP with its attention)
M.DbrxNormAttentionNorm = DbrxNormAttentionNorm

function DbrxNormAttentionNorm:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.norm_1 = nn.LayerNorm(cfg.hidden_size, { bias = false })
   self.attn = DbrxAttention(cfg, layer_idx)
   self.norm_2 = nn.LayerNorm(cfg.hidden_size, { bias = false })
end

--- x (B, T, hidden) -> the residual after attention, and that residual normed (the FFN's input).
function DbrxNormAttentionNorm:forward(x, cos, sin, cache, pad)
   local h = x + self.attn(self.norm_1(x), cos, sin, cache, pad)
   return h, self.norm_2(h)
end

-- --- the sparse FFN -----------------------------------------------------------------------------

local DbrxRouter = nn.Module:extend("DbrxRouter")
M.DbrxRouter = DbrxRouter

--- DbrxRouter(cfg): the experts' scores, layer (num_experts, hidden) (moe_jitter_eps: training only).
function DbrxRouter:__init(cfg)
   nn.Module.__init(self)
   self.layer = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
end

function DbrxRouter:forward(x) return self.layer(x) end

-- The experts' weights as the hub stores them: w1 (gate), v1 (up) and w2 (down), each
-- (num_experts x ffn_hidden_size, hidden), expert e's rows e x I + 1 .. (e + 1) x I. Called with the
-- routing, as models/moe.lua's stacked experts are, so that its hooks put the weights in place.
local DbrxExpertGLU = nn.Module:extend("DbrxExpertGLU")
M.DbrxExpertGLU = DbrxExpertGLU
DbrxExpertGLU.takes_routing = true

function DbrxExpertGLU:__init(cfg)
   nn.Module.__init(self)
   local E, I = cfg.num_experts, cfg.moe_intermediate_size
   for _, name in ipairs({ "w1", "v1", "w2" }) do
      self[name] = nn.Module.new_parameter({ E * I, cfg.hidden_size })
      if not self[name]:is_meta() then self[name]:fill_(0) end
   end
   self.act_fn = common.activation_module(cfg.hidden_act, WHO, cfg._source)
   rawset(self, "num_experts", E)
   rawset(self, "intermediate_size", I)
   rawset(self, "hidden_act", cfg.hidden_act)
end

-- Expert e's (0-based) I rows of a fused weight, in dtype.
local function expert_rows(w, e, I, dtype)
   w = w:narrow(1, e * I + 1, I)
   if w.dtype ~= dtype then w = w:to(dtype) end
   return w
end

--- Expert e (0-based) on x (n, hidden): (act(x w1_e^T) * x v1_e^T) w2_e (w2 is stored (inter, hidden)).
function DbrxExpertGLU:expert(e, x)
   local I, dt = self.intermediate_size, x.dtype
   local h = self.act_fn(F.linear(x, expert_rows(self.w1, e, I, dt))) * F.linear(x, expert_rows(self.v1, e, I, dt))
   return h:matmul(expert_rows(self.w2, e, I, dt))
end

-- flat (N, hidden), top_w (N, k), top_i: the weighted sum of each row's experts (moe.run_experts).
DbrxExpertGLU.forward = moe.StackedExperts.forward
DbrxExpertGLU.extra_repr = moe.StackedExperts.extra_repr

-- transformers' DbrxExperts: the expert weights one level down (experts.mlp).
local DbrxExperts = nn.Module:extend("DbrxExperts")
M.DbrxExperts = DbrxExperts
DbrxExperts.takes_routing = true

function DbrxExperts:__init(cfg)
   nn.Module.__init(self)
   self.mlp = DbrxExpertGLU(cfg)
   rawset(self, "expert_width", 2 * cfg.moe_intermediate_size)   -- (planning: utils/runtime_memory.lua)
end

function DbrxExperts:forward(flat, top_w, top_i) return self.mlp(flat, top_w, top_i) end

--- The experts one module each (models/moe.lua's Qwen3MoeMLP: gate_proj w1's rows, up_proj v1's,
-- down_proj w2's transposed), viewing these weights, for quantize to turn into quantized linear
-- layers; nil while the weights are offloaded (meta). ml.save_model then writes them apart
-- (ffn.experts.E.*), which from_pretrained builds back as such (DbrxForCausalLM.build_opts_for).
function DbrxExperts:unstacked()
   local g = self.mlp
   if g.w1:is_meta() or g.v1:is_meta() or g.w2:is_meta() then return nil end
   local I = g.intermediate_size
   local cfg = { hidden_size = g.w1:size(2), hidden_act = g.hidden_act, _source = "DBRX's fused experts" }
   local experts = {}
   for e = 0, g.num_experts - 1 do
      local x = require("moonload.big_modeling").init_empty_weights(function() return moe.Qwen3MoeMLP(cfg, I) end)
      x.gate_proj.weight = g.w1:narrow(1, e * I + 1, I)
      x.up_proj.weight = g.v1:narrow(1, e * I + 1, I)
      x.down_proj.weight = g.w2:narrow(1, e * I + 1, I):t():contiguous()
      experts[e + 1] = x
   end
   return nn.ModuleList(experts)
end

-- The sparse block: models/moe.lua's, its router's top-k softmax weights divided by their p-norm.
local DbrxFFN = moe.SparseMoeBlock:extend("DbrxFFN")
M.DbrxFFN = DbrxFFN
DbrxFFN.gate_name = "router"

function DbrxFFN:__init(cfg)
   nn.Module.__init(self)
   self.router = DbrxRouter(cfg)
   -- (the hub's fused experts, or one module each as ml.save_model writes them after quantize)
   self.experts = cfg.experts_layout == "apart" and moe.experts_for(cfg, WHO, moe.Qwen3MoeMLP, "apart")
      or DbrxExperts(cfg)
   self:routing(cfg)
   rawset(self, "normalize_p", cfg.normalize_p)
end

--- top_w (N, k) float32 and top_i as SparseMoeBlock:route gives them, top_w / ||top_w||_p (the weights
-- are probabilities: no absolute values needed).
function DbrxFFN:route(flat)
   local top_w, top_i = moe.SparseMoeBlock.route(self, flat)
   local p = self.normalize_p
   if p then top_w = top_w / top_w:pow(p):sum(2, true):pow(1 / p) end
   return top_w, top_i
end

-- --- blocks and models --------------------------------------------------------------------------

local DbrxBlock = nn.Module:extend("DbrxBlock")
M.DbrxBlock = DbrxBlock

function DbrxBlock:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.norm_attn_norm = DbrxNormAttentionNorm(cfg, layer_idx)
   self.ffn = DbrxFFN(cfg)
end

function DbrxBlock:forward(x, cos, sin, cache, pad)
   local h, normed = self.norm_attn_norm(x, cos, sin, cache, pad)
   return h + self.ffn(normed)
end

local DbrxRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("DbrxRotaryEmbedding")
M.DbrxRotaryEmbedding = DbrxRotaryEmbedding

local DbrxModel = llama.LlamaModel:extend("DbrxModel")
M.DbrxModel = DbrxModel
-- Llama's forward (positions, rotary tables, cache, block schedule) over these names
DbrxModel.embed_name, DbrxModel.layers_name, DbrxModel.norm_name = "wte", "blocks", "norm_f"

function DbrxModel:__init(cfg)
   self:build_parts(cfg, cfg.hidden_size, DbrxBlock, cfg.num_hidden_layers, nn.LayerNorm(cfg.hidden_size, { bias = false }),
      DbrxRotaryEmbedding)
end

local DbrxForCausalLM = llama.LlamaForCausalLM:extend("DbrxForCausalLM")
M.DbrxForCausalLM = DbrxForCausalLM
DbrxForCausalLM.base_model_prefix = "transformer"
DbrxForCausalLM.tied_weights = {}
DbrxForCausalLM.no_split_modules = { "DbrxBlock" }
DbrxForCausalLM.family, DbrxForCausalLM.Model = "dbrx", DbrxModel

--- from_pretrained's build options for a checkpoint's tensor names: its experts apart (a quantized
-- model's, saved by ml.save_model) or, as the hub holds them, fused.
function DbrxForCausalLM.build_opts_for(names, shape_of)
   return moe.experts_layout(names, shape_of) == "apart" and { experts_layout = "apart" } or nil
end

--- DbrxForCausalLM(config[, build_opts]): config is a config.json path, a folder holding one, or a table.
function DbrxForCausalLM:__init(cfg, opts)
   nn.Module.__init(self)
   cfg = self:read_config(cfg)
   cfg.experts_layout = opts and opts.experts_layout or nil
   self.transformer = DbrxModel(cfg)
   self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
end

function DbrxForCausalLM:read_config(source) return M.config(source) end

DbrxForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "transformer", "wte")

function M.from_config(cfg) return DbrxForCausalLM(cfg) end

return M
