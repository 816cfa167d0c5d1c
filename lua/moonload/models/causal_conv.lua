--- The depthwise causal convolution of Qwen3-Next's and Qwen3.5's linear attention and LFM2's short
-- convolutions: each channel's output at a token is a weighted sum of that channel's input there
-- and at the taps - 1 tokens before. A generation carries those last inputs from one forward to the
-- next in its cache (KVCache:layer_state's `conv`), so a decoding step convolves one token.
local nn = require("moonload.nn")
local T = require("moonload.tensor")

local M = {}

-- The weight (channels, 1, taps) and bias (channels, optional) under transformers' names.
local Conv1d = nn.Module:extend("Conv1d")
M.Conv1d = Conv1d

--- Conv1d(channels, taps[, {bias = true}]).
function Conv1d:__init(channels, taps, opts)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ channels, 1, taps })
   if opts and opts.bias then self.bias = nn.Module.new_parameter({ channels }) end
   if not self.weight:is_meta() then
      self.weight:fill_(0)
      if self.bias then self.bias:fill_(0) end
   end
   rawset(self, "channels", channels)
   rawset(self, "taps", taps)
end

--- x (B, taps - 1 + L, channels): the inputs preceded by the taps - 1 before them -> the
-- convolution at the last L (B, L, channels).
function Conv1d:forward(x)
   local K = self.taps
   local L = x:size(2) - K + 1
   local w = self.weight:view(self.channels, K):t()                      -- (taps, channels)
   if w.dtype ~= x.dtype then w = w:to(x.dtype) end
   local y = x:narrow(2, 1, L) * w:select(1, 1)
   for j = 2, K do y = y + x:narrow(2, j, L) * w:select(1, j) end
   if self.bias then y = y + (self.bias.dtype == x.dtype and self.bias or self.bias:to(x.dtype)) end
   return y
end

function Conv1d:__tostring()
   return string.format("Conv1d(%d, %d, kernel_size=(%d,), stride=(1,), padding=(%d,), groups=%d, bias=%s)",
      self.channels, self.channels, self.taps, self.taps - 1, self.channels, self.bias and "True" or "False")
end

--- The zeros a sequence starts from: what conv's cache state holds for `rows` sequences before
-- their first token, as x's dtype and device.
function M.initial_state(conv, rows, x)
   return T.zeros({ rows, conv.taps - 1, conv.channels }, { dtype = x.dtype, device = x.device })
end

--- conv (a Conv1d) over x (B, L, channels) after the inputs state (B, taps - 1, channels) holds
-- (nil: zeros, no cache), which then becomes the last taps - 1 of them, in place. (A state made
-- where the prompt ran may meet a step run elsewhere -- a decoding step in place on the CPU under
-- set_compute_in_place -- it is read here and written back where it lives.)
function M.run(conv, x, state)
   local before = state or M.initial_state(conv, x:size(1), x)
   if before.dtype ~= x.dtype or before.device ~= x.device then before = before:to(x.device):to(x.dtype) end
   local window = T.cat({ before, x }, 2)                                 -- (B, taps - 1 + L, channels)
   if state then state:copy_(window:narrow(2, x:size(2) + 1, conv.taps - 1)) end
   return conv(window)
end

return M
