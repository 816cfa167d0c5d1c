--- nn.LoraLinear: a linear layer with a LoRA adapter beside it, as peft's LoraLayer computes it:
-- y = base_layer(x) + lora_B(lora_A(x)) * scaling. base_layer is any linear layer (nn.Linear,
-- GPT-2's Conv1D, nn.QuantizedLinear: a float adapter over int8 or int4 weights is QLoRA's
-- inference), left as it was, hooks included, so it may be offloaded or streamed; lora_A (r x in)
-- and lora_B (out x r) are small and stay where they were put (or where an offloading hook brings
-- them). When x arrives on another device or dtype (a layer computed in place on the CPU, a
-- bfloat16 model), the adapter's weights are copied there once and kept.
local Module = require("moonload.nn.module")
local F = require("moonload.nn.functional")

local LoraLinear = Module:extend("LoraLinear")
-- lora_A and lora_B: a weight each, so that the names are peft's (lora_A.weight, lora_B.weight),
-- and modules of their own, so that offloading hooks (cpu_offload after load_adapter) bring their
-- weights as they bring any layer's.
local LoraWeight = Module:extend("LoraWeight")

function LoraWeight:__init(w)
   self:register_parameter("weight", w)
   rawset(self, "_copy", nil)
end

-- x @ weight^T, the weight copied once to x's device and dtype when they differ (a layer
-- computed in place on the CPU, a bfloat16 model) and kept while the parameter is the same tensor.
function LoraWeight:forward(x)
   local w = self.weight
   if w.device ~= x.device or w.dtype ~= x.dtype then
      local c = rawget(self, "_copy")
      if not (c and c.src == w and c.w.device == x.device and c.w.dtype == x.dtype) then
         c = { src = w, w = w:to(x.device):to(x.dtype) }
         rawset(self, "_copy", c)
      end
      w = c.w
   end
   return F.linear(x, w)
end

function LoraWeight:extra_repr()
   return string.format("%d x %d", self.weight:size(1), self.weight:size(2))
end

--- LoraLinear(base_layer, lora_A, lora_B, scaling): lora_A (r, in) and lora_B (out, r) tensors.
function LoraLinear:__init(base_layer, lora_A, lora_B, scaling)
   self.base_layer = base_layer
   self.in_features = base_layer.in_features or base_layer.nx
   self.out_features = base_layer.out_features or base_layer.nf
   self.r, self.scaling = lora_A:size(1), scaling
   self.lora_A, self.lora_B = LoraWeight(lora_A), LoraWeight(lora_B)
end

function LoraLinear:forward(x)
   local y = self.base_layer(x)
   local delta = self.lora_B(self.lora_A(x)) * self.scaling
   if delta.device ~= y.device then delta = delta:to(y.device) end
   if delta.dtype ~= y.dtype then delta = delta:to(y.dtype) end
   return y + delta
end

--- LoraLinear.merged_weight(w, A, B, scaling, conv1d) -> w + (B A) * scaling in w's dtype and
-- place (a new tensor: w may be a view of a mapped file); conv1d: w is stored (in, out), GPT-2's
-- Conv1D. load_adapter's merge and save_model's merged checkpoint both go through it.
function LoraLinear.merged_weight(w, A, B, scaling, conv1d)
   local delta = (B:to(w.device):to("float32") * scaling):matmul(A:to(w.device):to("float32"))   -- (out, in)
   if conv1d then delta = delta:t() end
   return (w:to("float32") + delta):to(w.dtype)
end

function LoraLinear:extra_repr()
   return string.format("in_features=%d, out_features=%d, r=%d, scaling=%s", self.in_features, self.out_features,
      self.r, tostring(self.scaling))
end

return LoraLinear
