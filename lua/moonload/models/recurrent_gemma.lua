--- RecurrentGemma (RecurrentGemmaForCausalLM, model_type "recurrent_gemma": recurrentgemma-2b, -9b
-- and their -it versions; Griffin) with Hugging Face parameter names: model.{embed_tokens,
-- layers.N.{temporal_pre_norm, temporal_block.*, channel_pre_norm, mlp_block.*}, final_norm}, lm_head
-- (tied to the embedding).
--
-- The embeddings are scaled by sqrt(hidden_size) rounded to bfloat16 (transformers keeps it in a
-- bfloat16 buffer whatever the model's dtype). Each layer: an RMSNorm scaling by (1 + weight), a
-- temporal block, a residual; an RMSNorm, a GeLU-gated MLP (gate_proj, up_proj, down_proj, biased,
-- intermediate_size / 2 wide), a residual. block_types, repeated over the layers, says which temporal
-- block: "attention" is local attention over the last attention_window_size tokens (grouped keys
-- and values, q/k/v biased per attention_bias, o_proj always, rotary embeddings over the first
-- partial_rotary_factor of each head); "recurrent" is Griffin's recurrent block:
--    linear_out(rg_lru(conv_1d(linear_x x)) * act(linear_y x))
-- with a depthwise causal convolution of conv1d_width taps (biased, no activation) and the RG-LRU:
-- per head of lru_width / num_attention_heads channels, an input gate i and a recurrence gate r
-- (sigmoid(x W + b), block-diagonal weights), a = exp(-8 r softplus(recurrent_param)), and per token
--    h = a h + sqrt(1 - a^2) i x
-- in float32, where a token at position 0 resets the state (h = i x). The recurrence runs token
-- after token in Lua, a few (B, lru_width) tensor operations a step (no C kernel of its own:
-- F.ssm_scan's, with one channel per head and a state of one value, took 5 times as long for
-- Griffin's shapes). Padding tokens enter the recurrent blocks as zeros (conv inputs and RG-LRU
-- inputs), so a left-padded row gives what the row alone gives. (transformers masks nothing there:
-- its padding's states reach the real tokens through the convolution's window, and without the
-- reset at the first real token, through the recurrence: its padded rows' logits differ from the
-- rows alone.)
-- The logits are soft-capped: cap x tanh(logits / cap), cap = logits_soft_cap.
--
-- A generation's cache holds the recurrent blocks' last conv inputs and float32 states (a fixed
-- size, whatever the length) and the attention layers' last window of keys and values; the states
-- cannot be cropped back, so assisted generation is refused.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local causal_conv = require("moonload.models.causal_conv")
local llama = require("moonload.models.llama")
local gemma = require("moonload.models.gemma")
local mamba2 = require("moonload.models.mamba2")
local block_schedule = require("moonload.models.block_schedule")

local M = {}
local WHO = "models.recurrent_gemma"

-- RecurrentGemmaConfig's keys and defaults (recurrentgemma-2b's geometry).
local SCHEMA = {
   { "vocab_size", "int", 256000 },
   { "hidden_size", "int", 2560 },
   { "intermediate_size", "int", 3 * 2560 },
   { "num_hidden_layers", "int", 26 },
   { "num_attention_heads", "int", 10 },
   { "num_key_value_heads", "int", function(c) return c.num_attention_heads end },
   { "lru_width", "int", function(c) return c.hidden_size end },
   { "attention_window_size", "int", 2048 },
   { "conv1d_width", "int", 4 },
   { "logits_soft_cap", "posnum", 30 },
   { "rms_norm_eps", "posnum", 1e-6 },
   { "hidden_activation", "string", "gelu_pytorch_tanh" },
   { "block_types", "table", function() return { "recurrent", "recurrent", "attention" } end },
   { "attention_bias", "bool", false },
   { "tie_word_embeddings", "bool", true },
   { "rope_parameters", "table", function() return {} end },
}

local KINDS = { recurrent = true, attention = true }

--- Reads and checks a RecurrentGemma config (path, folder or table): its keys (RecurrentGemmaConfig's
-- defaults), each layer's temporal block (cfg.recurrent_layers[i] true or attention), the
-- attention's geometry (head_dim, the window per layer, the rotary dims and base) and the RG-LRU's
-- (cfg.lru_width in num_attention_heads heads).
function M.config(source)
   local raw, src = config.read(source, WHO)
   local cfg = config.validate(raw, SCHEMA, src, WHO, 2)
   common.activation(cfg.hidden_activation, WHO, src)
   cfg.hidden_act = cfg.hidden_activation
   local kinds = cfg.block_types
   if #kinds == 0 then config.fail(cfg, WHO, 'config key "block_types" must list block types') end
   cfg.recurrent_layers, cfg.layer_windows = {}, {}
   for i = 1, cfg.num_hidden_layers do
      local kind = kinds[(i - 1) % #kinds + 1]               -- (the list repeats over the layers)
      if not KINDS[kind] then
         config.fail(cfg, WHO, 'block_types[%d] is "%s" (supported: attention, recurrent)', (i - 1) % #kinds + 1, tostring(kind))
      end
      cfg.recurrent_layers[i] = kind == "recurrent"
      cfg.layer_windows[i] = kind == "attention" and cfg.attention_window_size
   end
   local H = cfg.num_attention_heads
   if H % cfg.num_key_value_heads ~= 0 then
      config.fail(cfg, WHO, "num_attention_heads %d is not a multiple of num_key_value_heads %d", H, cfg.num_key_value_heads)
   end
   if cfg.lru_width % H ~= 0 then
      config.fail(cfg, WHO, "lru_width %d is not a multiple of num_attention_heads %d", cfg.lru_width, H)
   end
   cfg.head_dim = math.floor(cfg.hidden_size / H)             -- (transformers derives it, whatever the file says)
   cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, true
   -- rotary embeddings: transformers' default type only, over partial_rotary_factor (0.5) of each head
   local rp = cfg.rope_parameters
   cfg.rope = llama.rope_from(cfg, WHO, { { { rope_theta = cfg.rope_theta }, "" }, { rp, "rope_parameters." } }, 10000)
   if cfg.rope.rope_type ~= "default" then
      config.fail(cfg, WHO, 'rope type "%s" is not supported (supported: default, as transformers\' RecurrentGemma)',
         tostring(cfg.rope.rope_type))
   end
   cfg.rope_theta = cfg.rope.rope_theta
   llama.set_rotary_dim(cfg, WHO, rp.partial_rotary_factor or cfg.partial_rotary_factor or 0.5)
   cfg.family = "recurrent_gemma"
   return cfg
end

-- --- the RG-LRU and the recurrent block -------------------------------------------------------------

local RecurrentGemmaRglru = nn.Module:extend("RecurrentGemmaRglru")
M.RecurrentGemmaRglru = RecurrentGemmaRglru

-- transformers' order: the recurrence parameter, then each gate's weight and bias
function RecurrentGemmaRglru:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, W = cfg.num_attention_heads, cfg.lru_width
   local bw = W / H
   self.recurrent_param = nn.Module.new_parameter({ W })
   self.input_gate_weight = nn.Module.new_parameter({ H, bw, bw })
   self.input_gate_bias = nn.Module.new_parameter({ H, bw })
   self.recurrent_gate_weight = nn.Module.new_parameter({ H, bw, bw })
   self.recurrent_gate_bias = nn.Module.new_parameter({ H, bw })
   if not self.recurrent_param:is_meta() then
      for _, p in ipairs({ self.recurrent_param, self.input_gate_weight, self.input_gate_bias, self.recurrent_gate_weight,
                           self.recurrent_gate_bias }) do p:fill_(0) end
   end
   rawset(self, "heads", H)
   rawset(self, "block_width", bw)
   rawset(self, "layer_idx", layer_idx)
end

-- sigmoid(x W_h + b_h) per head h: x (B, L, width) -> (B, L, width).
local function gate(self, x, w, b)
   local B, L, W = x:size(1), x:size(2), x:size(3)
   local xh = x:reshape(B * L, self.heads, self.block_width):transpose(1, 2)      -- (H, B L, bw)
   if w.dtype ~= x.dtype then w, b = w:to(x.dtype), b:to(x.dtype) end
   return (xh:matmul(w) + b:unsqueeze(2)):transpose(1, 2):reshape(B, L, W):sigmoid()
end

--- x (B, L, width), reset (B, L) bool or nil (the tokens at position 0), cache or nil (the state
-- its recurrent block made: {recurrent = (B, width) float32}, found there rather than passed, so
-- that a hook moving this module's inputs leaves it where it lives), keep (B, L, 1) or nil (0 at
-- padding: no input there) -> (B, L, width) in x's dtype.
function RecurrentGemmaRglru:forward(x, reset, cache, keep)
   local B, L, W = x:size(1), x:size(2), x:size(3)
   local input_gate = gate(self, x, self.input_gate_weight, self.input_gate_bias)
   local r = gate(self, x, self.recurrent_gate_weight, self.recurrent_gate_bias):float()
   local sp = self.recurrent_param:float():softplus()                            -- (width)
   if sp.device ~= x.device then sp = sp:to(x.device) end
   local log_a = r * -8 * sp                                                    -- (transformers' order)
   local multiplier = (1 - (log_a * 2):exp()):sqrt()                           -- sqrt(1 - a^2)
   local a = log_a:exp()
   if reset then
      local at = reset:unsqueeze(3)
      multiplier, a = multiplier:masked_fill(at, 1), a:masked_fill(at, 0)
   end
   local u = x * input_gate * (multiplier.dtype == x.dtype and multiplier or multiplier:to(x.dtype))
   if keep then u = u * keep end
   u = u:float()
   -- the recurrence, token after token (each step a few (B, width) operations: a 512-token prompt
   -- of recurrentgemma-2b's width 2560 takes about 10 ms on the CPU)
   local state = cache and cache:layer_state(self.layer_idx, B, function()
      error("RecurrentGemmaRglru: its recurrent block makes the cache's state first", 3)
   end).recurrent
   local h = state and (state.device == x.device and state or state:to(x.device))
   local y = T.empty({ B, L, W }, { dtype = "float32", device = x.device })
   for t = 1, L do
      local ut = u:select(2, t)
      h = h and a:select(2, t) * h + ut or ut
      y:select(2, t):copy_(h)
   end
   if state then state:copy_(h) end                   -- (where it lives: a step may run elsewhere)
   return y.dtype == x.dtype and y or y:to(x.dtype)
end

local RecurrentGemmaRecurrentBlock = nn.Module:extend("RecurrentGemmaRecurrentBlock")
M.RecurrentGemmaRecurrentBlock = RecurrentGemmaRecurrentBlock

-- transformers' order: linear_y, linear_x, linear_out, the conv, the RG-LRU
function RecurrentGemmaRecurrentBlock:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local W = cfg.lru_width
   self.linear_y = nn.Linear(cfg.hidden_size, W)
   self.linear_x = nn.Linear(cfg.hidden_size, W)
   self.linear_out = nn.Linear(W, cfg.hidden_size)
   self.conv_1d = causal_conv.Conv1d(W, cfg.conv1d_width, { bias = true })
   self.rg_lru = RecurrentGemmaRglru(cfg, layer_idx)
   self.act_fn = common.activation_module(cfg.hidden_activation, WHO, cfg._source)
   rawset(self, "width", W)
   rawset(self, "taps", cfg.conv1d_width)
   rawset(self, "layer_idx", layer_idx)
end

--- Bytes a cache keeps for this layer per batch of B sequences (utils/runtime_memory.lua): the
-- last taps - 1 conv inputs (el bytes each) and the float32 state, whatever the length.
function RecurrentGemmaRecurrentBlock:state_bytes(B, el)
   return B * ((self.taps - 1) * self.width * el + self.width * 4)
end

--- Values a forward forms per token at once, beside the layer's input and MLP (for memory
-- planning): both branches, the conv's window and output, the gates, and the recurrence's float32
-- inputs (a, sqrt(1 - a^2), the input) and output.
function RecurrentGemmaRecurrentBlock:token_values()
   return 2 * self.width + 2 * self.width + 2 * self.width + 10 * self.width
end

--- x (B, L, hidden); cache optional (the conv inputs and the state carry over); pad (B, past + L)
-- bool or nil: padding tokens enter as zeros; positions (B, L) int64: a token at position 0 resets
-- the state.
function RecurrentGemmaRecurrentBlock:forward(x, cache, pad, positions)
   local B = x:size(1)
   local keep = mamba2.keep_mask(x, pad)
   local y = self.act_fn(self.linear_y(x))
   local state = cache and cache:layer_state(self.layer_idx, B, function(rows)
      return { conv = causal_conv.initial_state(self.conv_1d, rows, x),
               recurrent = T.zeros({ rows, self.width }, { dtype = "float32", device = x.device }) }
   end)
   local xs = self.linear_x(x)
   if keep then xs = xs * keep end
   local conv = causal_conv.run(self.conv_1d, xs, state and state.conv)
   local reset = positions and positions:eq(0)
   local h = self.rg_lru(conv, reset, cache, keep)
   return self.linear_out(h * y)
end

-- --- attention, MLP, layer --------------------------------------------------------------------------

local RecurrentGemmaAttention = llama.LlamaAttention:extend("RecurrentGemmaAttention")
M.RecurrentGemmaAttention = RecurrentGemmaAttention

local RecurrentGemmaMlp = llama.LlamaMLP:extend("RecurrentGemmaMlp")
M.RecurrentGemmaMlp = RecurrentGemmaMlp

-- down(act(gate(x)) * up(x)), all biased, intermediate_size / 2 wide
function RecurrentGemmaMlp:__init(cfg)
   nn.Module.__init(self)
   local I = math.floor(cfg.intermediate_size / 2)
   self.gate_proj = nn.Linear(cfg.hidden_size, I)
   self.up_proj = nn.Linear(cfg.hidden_size, I)
   self.down_proj = nn.Linear(I, cfg.hidden_size)
   self.act_fn = common.activation_module(cfg.hidden_activation, WHO, cfg._source)
end

local RecurrentGemmaRMSNorm = gemma.Gemma2RMSNorm:extend("RecurrentGemmaRMSNorm")
M.RecurrentGemmaRMSNorm = RecurrentGemmaRMSNorm

local RecurrentGemmaDecoderLayer = nn.Module:extend("RecurrentGemmaDecoderLayer")
M.RecurrentGemmaDecoderLayer = RecurrentGemmaDecoderLayer

-- transformers' order: the temporal norm and block, the channel norm and the MLP
function RecurrentGemmaDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.temporal_pre_norm = RecurrentGemmaRMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   if cfg.recurrent_layers[layer_idx] then
      self.temporal_block = RecurrentGemmaRecurrentBlock(cfg, layer_idx)
   else
      self.temporal_block = RecurrentGemmaAttention(cfg, layer_idx)
   end
   self.channel_pre_norm = RecurrentGemmaRMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.mlp_block = RecurrentGemmaMlp(cfg)
   rawset(self, "recurrent", cfg.recurrent_layers[layer_idx])
end

--- x (B, L, hidden); cos, sin for the attention; cache; pad (B, past + L) or nil; positions (B, L)
-- int64 for the recurrent block's resets.
function RecurrentGemmaDecoderLayer:forward(x, cos, sin, cache, pad, positions)
   local h = self.temporal_pre_norm(x)
   if self.recurrent then
      h = self.temporal_block(h, cache, pad, positions)
   else
      h = self.temporal_block(h, cos, sin, cache, pad)
   end
   x = h + x
   return x + self.mlp_block(self.channel_pre_norm(x))
end

-- --- model ------------------------------------------------------------------------------------------

local RecurrentGemmaRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("RecurrentGemmaRotaryEmbedding")
M.RecurrentGemmaRotaryEmbedding = RecurrentGemmaRotaryEmbedding

local RecurrentGemmaModel = llama.LlamaModel:extend("RecurrentGemmaModel")
M.RecurrentGemmaModel = RecurrentGemmaModel
RecurrentGemmaModel.family, RecurrentGemmaModel.norm_name = "recurrent_gemma", "final_norm"

-- transformers' order: the embedding, the layers, the final norm (the rotary tables: its
-- attention layers', here the model's)
function RecurrentGemmaModel:__init(cfg)
   nn.Module.__init(self)
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = RecurrentGemmaDecoderLayer(cfg, i) end
   self.layers = nn.ModuleList(layers)
   self.final_norm = RecurrentGemmaRMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.rotary_emb = RecurrentGemmaRotaryEmbedding(cfg)
   rawset(self, "config", cfg)
   -- (transformers' normalizer buffer is bfloat16 whatever the model's dtype)
   rawset(self, "normalizer", gemma.in_dtype(math.sqrt(cfg.hidden_size), "bfloat16"))
end

--- input_ids (B, T) int64; cache optional; pad (B, past + T) bool or nil; pos (B, T) int64 or nil;
-- blocks {micro_batch_size, prefill_chunk_size} or nil. The recurrent blocks get the positions (cut
-- into the schedule's blocks as the hidden states are). Returns the final hidden states.
function RecurrentGemmaModel:forward(input_ids, cache, pad, pos, blocks)
   local cfg = self.config
   local B, L = input_ids:size(1), input_ids:size(2)
   local past = cache and cache.length or 0
   local x = self.embed_tokens(input_ids) * self.normalizer
   local positions = pos or T.arange(past, past + L, { device = input_ids.device })
   local rope = self:layer_rotary(positions, x)[1]
   if positions:dim() == 1 then positions = positions:view(1, L):expand(B, L) end
   local n = cfg.num_hidden_layers
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, WHO)
   for i = 1, n do
      x = block_schedule.call(schedule, i, self.layers[i], x, cache, pad, rope[1], rope[2], positions)
   end
   if cache then cache:advance(L) end
   return self.final_norm(x)
end

local RecurrentGemmaForCausalLM = llama.LlamaForCausalLM:extend("RecurrentGemmaForCausalLM")
M.RecurrentGemmaForCausalLM = RecurrentGemmaForCausalLM
RecurrentGemmaForCausalLM.family, RecurrentGemmaForCausalLM.Model = "recurrent_gemma", RecurrentGemmaModel
RecurrentGemmaForCausalLM.no_split_modules = { "RecurrentGemmaDecoderLayer" }
RecurrentGemmaForCausalLM.stateful = true          -- its cache cannot be cropped: no assisted generation
-- (the attention layers' own rotary tables in transformers, never saved)
RecurrentGemmaForCausalLM.ignore_unexpected = { "rotary_emb%.inv_freq$", "%.normalizer$" }
RecurrentGemmaForCausalLM.forward = llama.scaled_logits_forward(WHO,
   function(logits, cfg) return gemma.soft_cap(logits, cfg.logits_soft_cap) end)

function RecurrentGemmaForCausalLM:read_config(source) return M.config(source) end

return M
