--- NLLB-MoE (transformers' NllbMoeForConditionalGeneration: facebook/nllb-moe-54b) with Hugging
-- Face parameter names: model.{shared, encoder.{embed_tokens, layers.N.{self_attn.{q,k,v,out}_proj,
-- self_attn_layer_norm, ffn.{fc1, fc2} | ffn.{router.classifier, experts.expert_E.{fc1, fc2}},
-- ff_layer_norm}, layer_norm}, decoder.{... the same, plus layers.N.{cross_attention.*,
-- cross_attention_layer_norm}}}, lm_head (tied to shared).
--
-- M2M100's model (models/bart.lua: pre-norm, fairseq's sinusoidal positions, scaled embeddings,
-- ReLU, final norms) whose every encoder_sparse_step-th layer (decoder_sparse_step-th in the
-- decoder) has a mixture of experts for its feed-forward, behind a top-2 router (a linear layer,
-- float32 whatever the model's dtype): each token's first expert is the one of highest
-- probability, its second the best of the rest ("all": second_expert_policy's sampling policies
-- are refused). Per call, each expert takes at most ceil(moe_eval_capacity_token_fraction x the
-- call's tokens, batch included) of them (expert_capacity when the fraction is not positive):
-- first choices before second ones, tokens in order or, with batch_prioritized_routing, the most
-- confident first. The encoder's padding goes to no expert (unless router_ignore_padding_tokens).
-- A token's two probabilities are renormalized to sum to 1 over the experts it kept (over both
-- choices with normalize_router_prob_before_dropping), and the weighted outputs scaled by
-- 1 - moe_token_dropout. A token that kept no expert adds nothing to its residual.
--
-- The experts run as the router chose them, as fairseq and transformers 4 run them; transformers
-- 5.24's NllbMoeExperts sends every token to expert_1 then expert_0 instead (see gen_models.py's
-- nllb_moe_experts_as_routed), which these classes do not copy.
--
--    local model = ml.models.from_pretrained(dir)            -- an NllbMoeForConditionalGeneration
--    local out = model:generate(ids, {attention_mask = mask, forced_bos_token_id = fra_Latn})
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local bart = require("moonload.models.bart")
local switch = require("moonload.models.switch_transformers")

local M = {}
local WHO = "models.nllb_moe"

local FLOAT_EPS = { float32 = 2 ^ -23, bfloat16 = 2 ^ -7, float16 = 2 ^ -10 }   -- (torch.finfo(dtype).eps)

local function check(cfg)
   if cfg.second_expert_policy ~= "all" then    -- ("sampling" and "random" draw at inference too)
      config.fail(cfg, WHO, 'config key "second_expert_policy" "%s" is not supported (only "all")', cfg.second_expert_policy)
   end
   if cfg.router_dtype ~= "float32" then
      config.fail(cfg, WHO, 'config key "router_dtype" "%s" is not supported (only "float32")', cfg.router_dtype)
   end
   if cfg.moe_token_dropout < 0 or cfg.moe_token_dropout >= 1 then
      config.fail(cfg, WHO, 'config key "moe_token_dropout" must be in [0, 1), got %s', tostring(cfg.moe_token_dropout))
   end
end

-- M2M100's keys and defaults, plus the router's (transformers' NllbMoeConfig defaults).
bart.FAMILIES["nllb-moe"] = { who = WHO, pre_norm = true, positions = "fairseq", check = check,
   schema = config.schema_from(bart.schema, { activation_function = { "activation_function", "string", "relu" },
      scale_embedding = { "scale_embedding", "bool", true } }, {
      { "pad_token_id", "int0", 1 },
      { "num_experts", "int", 128 },
      { "expert_capacity", "int", 64 },
      { "encoder_sparse_step", "int0", 4 },
      { "decoder_sparse_step", "int0", 4 },
      { "router_bias", "bool", false },
      { "router_dtype", "string", "float32" },
      { "router_ignore_padding_tokens", "bool", false },
      { "second_expert_policy", "string", "all" },
      { "normalize_router_prob_before_dropping", "bool", false },
      { "batch_prioritized_routing", "bool", false },
      { "moe_eval_capacity_token_fraction", "number", 1.0 },
      { "moe_token_dropout", "number", 0.2 },
   }) }

--- Reads and checks an NLLB-MoE config (path, folder or table).
function M.config(source) return bart.config(source, "nllb-moe") end

--- Whether layer i (1-based) of a stack with the given sparse step has experts (transformers:
-- (index + 1) % step == 0 counted from 0; none with step 0).
function M.is_sparse(i, step) return step > 0 and i % step == 0 end

-- --- the router -----------------------------------------------------------------------------

local Top2Router = nn.Module:extend("NllbMoeTop2Router")
M.NllbMoeTop2Router = Top2Router

function Top2Router:__init(cfg)
   nn.Module.__init(self)
   self.classifier = switch.RouterClassifier(cfg.d_model, cfg.num_experts, { bias = cfg.router_bias })
   for _, k in ipairs({ "num_experts", "expert_capacity", "router_ignore_padding_tokens",
      "normalize_router_prob_before_dropping", "batch_prioritized_routing", "moe_eval_capacity_token_fraction" }) do
      rawset(self, k, cfg[k])
   end
end

--- The experts' capacity for a call over N tokens.
function Top2Router:capacity(N)
   if self.moe_eval_capacity_token_fraction > 0 then return math.ceil(self.moe_eval_capacity_token_fraction * N) end
   return self.expert_capacity
end

--- flat (N, d_model), pad (a Lua list of N booleans, true for a padding token, or nil) -> top_w (N, 2)
-- in flat's dtype, the weights of each token's first and second expert, and top_i, a list per
-- token of its 2 experts (0-based), -1 for a choice the capacity or the padding dropped.
function Top2Router:forward(flat, pad)
   local N, E = flat:size(1), self.num_experts
   local logits = self.classifier(flat)                                      -- (N, E) float32
   local probs = logits:softmax(-1):to(flat.dtype)
   local p1, i1 = probs:max(2, true)                                         -- (N, 1)
   local experts = T.arange(0, E, { dtype = "int64", device = logits.device })
   local _, i2 = logits:masked_fill(experts:eq(i1), -math.huge):max(2, true)   -- (the best of the rest, by logit)
   local p2 = probs:gather(2, i2)
   local first, second = i1:view(N):tolist(), i2:view(N):tolist()
   if self.router_ignore_padding_tokens then pad = nil end
   -- the tokens' order for the capacity: as they come, or the most confident first
   local order = {}
   for n = 1, N do order[n] = n end
   if self.batch_prioritized_routing then
      local conf = p1:view(N):float():tolist()
      table.sort(order, function(a, b) if conf[a] ~= conf[b] then return conf[a] > conf[b] end return a < b end)
   end
   local firsts = {}                                 -- first choices per expert: second ones queue after
   for n = 1, N do
      if not (pad and pad[n]) then firsts[first[n]] = (firsts[first[n]] or 0) + 1 end
   end
   local cap = self:capacity(N)
   local taken1, taken2, top_i = {}, {}, {}
   local keep1, keep2 = {}, {}
   for _, n in ipairs(order) do
      local a, b = first[n], second[n]
      local ka, kb = false, false
      if not (pad and pad[n]) then
         ka = (taken1[a] or 0) < cap
         kb = (firsts[b] or 0) + (taken2[b] or 0) < cap
         taken1[a], taken2[b] = (taken1[a] or 0) + 1, (taken2[b] or 0) + 1
      end
      top_i[n] = { ka and a or -1, kb and b or -1 }
      keep1[n], keep2[n] = { ka and 1 or 0 }, { kb and 1 or 0 }
   end
   local dev = { dtype = flat.dtype, device = flat.device }
   local m1, m2 = T.tensor(keep1, dev), T.tensor(keep2, dev)                -- (N, 1)
   local eps = FLOAT_EPS[flat.dtype] or FLOAT_EPS.float32
   if not self.normalize_router_prob_before_dropping then p1, p2 = p1 * m1, p2 * m2 end
   local sum = (p1 + p2):clamp(eps)
   return T.cat({ p1 / sum * m1, p2 / sum * m2 }, 2), top_i
end

-- --- feed-forward ---------------------------------------------------------------------------

local DenseActDense = nn.Module:extend("NllbMoeDenseActDense")
M.NllbMoeDenseActDense = DenseActDense

function DenseActDense:__init(cfg, ffn_dim)
   nn.Module.__init(self)
   self.fc1 = nn.Linear(cfg.d_model, ffn_dim)
   self.fc2 = nn.Linear(ffn_dim, cfg.d_model)
   self.dropout = nn.Dropout(0)
   self.act = common.activation_module(cfg.activation_function, WHO, cfg._source)
end

function DenseActDense:forward(x) return self.fc2(self.act(self.fc1(x))) end

local Experts = switch.SwitchTransformersExperts:extend("NllbMoeExperts")
M.NllbMoeExperts = Experts

local SparseMLP = nn.Module:extend("NllbMoeSparseMLP")
M.NllbMoeSparseMLP = SparseMLP

function SparseMLP:__init(cfg, ffn_dim)
   nn.Module.__init(self)
   self.router = Top2Router(cfg)
   self.experts = Experts(cfg.num_experts, function() return DenseActDense(cfg, ffn_dim) end)
   rawset(self, "output_scale", cfg.moe_token_dropout > 0 and 1 - cfg.moe_token_dropout or nil)
end

--- x (B, L, d_model), pad (B, L) bool, true for padding, or nil.
function SparseMLP:forward(x, pad)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local flat = x:reshape(B * L, H)
   local top_w, top_i = self.router(flat, pad and pad:reshape(B * L):tolist() or nil)
   return switch.run_experts(self.experts, flat, top_w, top_i, self.output_scale):view(B, L, H)
end

-- --- layers and the model -------------------------------------------------------------------

local function layer_class(name, is_decoder)
   local cls = nn.Module:extend(name)
   local side = is_decoder and "decoder" or "encoder"
   function cls:__init(cfg, i)
      nn.Module.__init(self)
      local d, heads = cfg.d_model, cfg[side .. "_attention_heads"]
      self.self_attn = bart.BartAttention(d, heads, is_decoder and "self" or "none")
      self.attn_dropout = nn.Dropout(0)
      self.self_attn_layer_norm = nn.LayerNorm(d)
      if is_decoder then
         self.cross_attention = bart.BartAttention(d, heads, "cross")
         self.cross_attention_layer_norm = nn.LayerNorm(d)
      end
      local sparse = M.is_sparse(i, cfg[side .. "_sparse_step"])
      self.ffn = sparse and SparseMLP(cfg, cfg[side .. "_ffn_dim"]) or DenseActDense(cfg, cfg[side .. "_ffn_dim"])
      self.ff_layer_norm = nn.LayerNorm(d)
      self.ff_dropout = nn.Dropout(0)
      rawset(self, "is_sparse", sparse)
   end

   --- As BartLayer's forward (models/bart.lua); the encoder's padding (mask: (B, 1, 1, S) bool,
   -- true for a token) goes to no expert.
   function cls:forward(x, mask, enc, enc_mask, memo, cache, i)
      local h = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache, i)
      if enc then
         h = h + self.cross_attention:cross(self.cross_attention_layer_norm(h), enc, enc_mask, memo, i)
      end
      local y = self.ff_layer_norm(h)
      if self.is_sparse then
         local pad = not is_decoder and mask and mask:view(mask:size(1), mask:size(4)):logical_not() or nil
         return h + self.ffn(y, pad)
      end
      return h + self.ffn(y)
   end
   return cls
end

M.NllbMoeEncoderLayer = layer_class("NllbMoeEncoderLayer", false)
M.NllbMoeDecoderLayer = layer_class("NllbMoeDecoderLayer", true)

local Model = bart.BartModel:extend("NllbMoeModel")
M.NllbMoeModel = Model
Model.Encoder = bart.stack_class("NllbMoeEncoder", M.NllbMoeEncoderLayer, false)
Model.Decoder = bart.stack_class("NllbMoeDecoder", M.NllbMoeDecoderLayer, true)

local LM = bart.BartForConditionalGeneration:extend("NllbMoeForConditionalGeneration")
M.NllbMoeForConditionalGeneration = LM
LM.Model, LM.model_type, LM.family_name = Model, "nllb-moe", "NllbMoe"
LM.no_split_modules = { "NllbMoeEncoderLayer", "NllbMoeDecoderLayer" }
LM.ignore_unexpected = bart.M2M100ForConditionalGeneration.ignore_unexpected

function M.from_config(cfg) return LM(cfg) end

return M
