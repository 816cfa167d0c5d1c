--- tostring(tensor) in PyTorch's style: aligned values, "..." summaries for big tensors,
-- then dtype and, when not cpu, the device. A meta tensor prints its shape only.
local SUMMARY_THRESHOLD, EDGE = 1000, 3

local function fmt_shape(shape)
   return "[" .. table.concat(shape, ", ") .. "]"
end

--- Chooses one number format for all shown values, as PyTorch's _Formatter does.
local function formatter(values, floating, is_bool)
   if is_bool then return function(v) return v ~= 0 and "True" or "False" end end
   if not floating then
      return function(v) return string.format("%d", v) end
   end
   local finite, all_int = {}, true
   for _, v in ipairs(values) do
      if v == v and v ~= math.huge and v ~= -math.huge then
         finite[#finite + 1] = math.abs(v)
         if v % 1 ~= 0 then all_int = false end
      end
   end
   local function special(v)
      if v ~= v then return "nan" end
      if v == math.huge then return "inf" end
      if v == -math.huge then return "-inf" end
   end
   if #finite == 0 then return function(v) return special(v) or tostring(v) end end
   local maxv, minv = math.max(unpack(finite)), math.huge
   for _, a in ipairs(finite) do if a ~= 0 and a < minv then minv = a end end
   if minv == math.huge then minv = 0 end
   local sci = maxv > 1e8 or (minv ~= 0 and (maxv / minv > 1000 or minv < 1e-4))
   if all_int and not sci then
      return function(v) return special(v) or string.format("%.0f.", v) end
   end
   if sci then return function(v) return special(v) or string.format("%.4e", v) end end
   return function(v) return special(v) or string.format("%.4f", v) end
end

return function(t)
   local dtype, device, shape = t.dtype, t.device, t.shape
   local suffix = ", dtype=" .. dtype .. (device ~= "cpu" and (", device=" .. device) or "")
   if device == "meta" then
      return "tensor(..., size=" .. fmt_shape(shape) .. suffix .. ")"
   end
   local numel = t:numel()
   if numel == 0 then return "tensor([], size=" .. fmt_shape(shape) .. suffix .. ")" end
   local summarize = numel > SUMMARY_THRESHOLD
   local host = t:to("cpu", dtype == "bool" and "bool" or (t.dtype:match("int") and "int64" or "float64"))
   -- Collect shown values (summarised per dim) to pick one format and width.
   local shown = {}
   local function collect(x, d)
      if d > #shape then return end
      local n = shape[d]
      local idx = {}
      if summarize and n > 2 * EDGE then
         for i = 1, EDGE do idx[#idx + 1] = i end
         for i = n - EDGE + 1, n do idx[#idx + 1] = i end
      else
         for i = 1, n do idx[#idx + 1] = i end
      end
      if d == #shape then
         for _, i in ipairs(idx) do
            local v = x:select(1, i):item()
            shown[#shown + 1] = type(v) == "boolean" and (v and 1 or 0) or v
         end
      else
         for _, i in ipairs(idx) do collect(x:select(1, i), d + 1) end
      end
   end
   if #shape == 0 then
      local v = host:item()
      shown[1] = type(v) == "boolean" and (v and 1 or 0) or v
   else
      collect(host, 1)
   end
   local fmt = formatter(shown, dtype:match("float") ~= nil, dtype == "bool")
   local width = 0
   for _, v in ipairs(shown) do width = math.max(width, #fmt(v)) end
   local k = 0
   local function nextval()
      k = k + 1
      local s = fmt(shown[k])
      return string.rep(" ", width - #s) .. s
   end
   if #shape == 0 then return "tensor(" .. nextval() .. suffix .. ")" end
   local indent0 = #"tensor("
   local function render(d)
      local n = shape[d]
      local elided = summarize and n > 2 * EDGE
      local items = {}
      local count = elided and 2 * EDGE or n
      for j = 1, count do
         if elided and j == EDGE + 1 then items[#items + 1] = "..." end
         if d == #shape then items[#items + 1] = nextval() else items[#items + 1] = render(d + 1) end
      end
      if d == #shape then return "[" .. table.concat(items, ", ") .. "]" end
      local sep = "," .. string.rep("\n", #shape - d) .. string.rep(" ", indent0 + d)
      return "[" .. table.concat(items, sep) .. "]"
   end
   return "tensor(" .. render(1) .. suffix .. ")"
end
