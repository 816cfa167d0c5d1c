--- nn.BatchNorm1d(num_features[, {eps = 1e-5, momentum = 0.1, affine = true, bias = true,
-- track_running_stats = true}]) (momentum = false means PyTorch's None: a cumulative average) over (N, C) or (N, C, L) inputs.
-- Buffers running_mean (0), running_var (1), num_batches_tracked (int64 0); weight 1, bias 0.
-- In eval mode (the default) it normalises with the running statistics. In training mode it
-- uses the batch statistics and updates the running ones as PyTorch does (unbiased variance,
-- momentum nil = cumulative average).
local Module = require("moonload.nn.module")
local init = require("moonload.nn.weight_init")

local BatchNorm1d = Module:extend("BatchNorm1d")

function BatchNorm1d:__init(num_features, opts)
   if type(num_features) ~= "number" or num_features % 1 ~= 0 or num_features <= 0 then
      error("BatchNorm1d: num_features must be a positive integer, got " .. tostring(num_features), 3)
   end
   opts = opts or {}
   self.num_features = num_features
   self.eps = opts.eps or 1e-5
   if opts.momentum == nil then self.momentum = 0.1 elseif opts.momentum == false then self.momentum = nil
   else self.momentum = opts.momentum end
   self.affine = opts.affine ~= false
   self.track_running_stats = opts.track_running_stats ~= false
   if self.affine then
      self.weight = Module.new_parameter({ num_features }, opts)
      init.ones_(self.weight)
      if opts.bias ~= false then
         self.bias = Module.new_parameter({ num_features }, opts)
         init.zeros_(self.bias)
      else
         self:register_parameter("bias", nil)
      end
   else
      self:register_parameter("weight", nil)
      self:register_parameter("bias", nil)
   end
   if self.track_running_stats then
      local bopts = { dtype = opts.dtype, device = opts.device }
      self:register_buffer("running_mean", Module.new_buffer({ num_features }, 0, bopts))
      self:register_buffer("running_var", Module.new_buffer({ num_features }, 1, bopts))
      self:register_buffer("num_batches_tracked", Module.new_buffer({}, 0, { dtype = "int64", device = opts.device }))
   else
      self:register_buffer("running_mean", nil)
      self:register_buffer("running_var", nil)
      self:register_buffer("num_batches_tracked", nil)
   end
end

function BatchNorm1d:forward(x)
   local shape = x.shape
   local nd = #shape
   if nd ~= 2 and nd ~= 3 then
      error(string.format("BatchNorm1d: expected 2D or 3D input (got %dD input)", nd), 2)
   end
   local c = self.num_features
   if shape[2] ~= c then
      error(string.format("BatchNorm1d: input of shape [%s] has %d channels in dim 2, expected %d",
         table.concat(shape, ", "), shape[2], c), 2)
   end
   local stat_shape = nd == 3 and { c, 1 } or { c }
   local mean, var
   local use_batch = self.training or not self.track_running_stats
   if use_batch then
      local dims = nd == 3 and { 1, 3 } or { 1 }
      local n = x:numel() / c
      mean = x:mean(dims)
      local centered = x - mean:view(stat_shape)
      var = (centered * centered):mean(dims)
      if self.training and self.track_running_stats then
         local nbt = self.num_batches_tracked
         nbt:fill_(nbt:item() + 1)
         local m = self.momentum or (1 / nbt:item())
         local unbiased = n > 1 and var * (n / (n - 1)) or var
         self.running_mean:copy_(self.running_mean * (1 - m) + mean * m)
         self.running_var:copy_(self.running_var * (1 - m) + unbiased * m)
      end
   else
      mean, var = self.running_mean, self.running_var
   end
   local y = (x - mean:view(stat_shape)) * (var + self.eps):rsqrt():view(stat_shape)
   if self.weight ~= nil then y = y * self.weight:view(stat_shape) end
   if self.bias ~= nil then y = y + self.bias:view(stat_shape) end
   return y
end

function BatchNorm1d:extra_repr()
   local mom = self.momentum == nil and "None" or Module.py_float(self.momentum)
   return string.format("%d, eps=%s, momentum=%s, affine=%s, bias=%s, track_running_stats=%s", self.num_features,
      Module.py_float(self.eps), mom, Module.py_repr(self.affine), Module.py_repr(self.bias ~= nil),
      Module.py_repr(self.track_running_stats))
end

return BatchNorm1d
