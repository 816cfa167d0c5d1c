--- ml.gguf: llama.cpp's GGUF files (versions 2 and 3), read from a mapping of the file.
--
--    local f = ml.gguf.open("model.Q4_0.gguf")
--    f.metadata["general.architecture"]      --> "llama"
--    for _, t in ipairs(f.tensors) do print(t.name, t.type_name, table.concat(t.shape, "x")) end
--    local w = f:tensor("token_embd.weight")  -- F32 / F16 / BF16: a view of the mapped file
--    local q, scales = f:quantized("blk.0.attn_q.weight")   -- Q8_0 / Q4_0: moonload's int8 / int4
--    local blocks, scales = f:mxfp4("blk.0.ffn_up_exps.weight")   -- MXFP4: views of the file
--
-- Shapes are PyTorch's order (rows first): GGUF lists the fastest dim first, so a (out, in)
-- weight is stored with dims {in, out}. Every offset and size is checked against the file, so a
-- truncated or malformed file is an error that names it and what is wrong.
local C = require("moonload.C")
local Tensor = require("moonload.tensor")

local ffi, lib = C.ffi, C.lib
local M = {}

-- ggml types: name, values per block, bytes per block (gguf-py's GGML_QUANT_SIZES).
M.TYPES = {
   [0] = { "F32", 1, 4 }, [1] = { "F16", 1, 2 }, [2] = { "Q4_0", 32, 18 }, [3] = { "Q4_1", 32, 20 },
   [6] = { "Q5_0", 32, 22 }, [7] = { "Q5_1", 32, 24 }, [8] = { "Q8_0", 32, 34 }, [9] = { "Q8_1", 32, 40 },
   [10] = { "Q2_K", 256, 84 }, [11] = { "Q3_K", 256, 110 }, [12] = { "Q4_K", 256, 144 }, [13] = { "Q5_K", 256, 176 },
   [14] = { "Q6_K", 256, 210 }, [15] = { "Q8_K", 256, 292 }, [16] = { "IQ2_XXS", 256, 66 }, [17] = { "IQ2_XS", 256, 74 },
   [18] = { "IQ3_XXS", 256, 98 }, [19] = { "IQ1_S", 256, 50 }, [20] = { "IQ4_NL", 32, 18 }, [21] = { "IQ3_S", 256, 110 },
   [22] = { "IQ2_S", 256, 82 }, [23] = { "IQ4_XS", 256, 136 }, [24] = { "I8", 1, 1 }, [25] = { "I16", 1, 2 },
   [26] = { "I32", 1, 4 }, [27] = { "I64", 1, 8 }, [28] = { "F64", 1, 8 }, [29] = { "IQ1_M", 256, 56 },
   [30] = { "BF16", 1, 2 }, [34] = { "TQ1_0", 256, 54 }, [35] = { "TQ2_0", 256, 66 }, [39] = { "MXFP4", 32, 17 },
}
-- the ones viewed as moonload tensors as they are
local VIEWED = { [0] = "float32", [1] = "float16", [30] = "bfloat16", [24] = "int8", [25] = "int16", [26] = "int32",
                 [27] = "int64", [28] = "float64" }
local UNPACKED = { [8] = "int8", [2] = "int4" }      -- Q8_0, Q4_0 -> cpu/ggml_blocks.c
-- widened to float32 (cpu/ggml_blocks.c): Q4_1, Q5_0, Q5_1, Q2_K ... Q6_K
local WIDENED = { [3] = true, [6] = true, [7] = true, [10] = true, [11] = true, [12] = true, [13] = true, [14] = true }
local MXFP4 = 39                                    -- gpt-oss's experts: read as they are
M.READ = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K to Q6_K and MXFP4"

-- A bounds-checked reader over the mapped bytes.
local Reader = {}
Reader.__index = Reader

function Reader:fail(what)
   error(string.format("gguf: %s is not a valid GGUF file: %s (at byte %d of %d)", self.path, what, self.pos, self.size), 0)
end

function Reader:need(n, what)
   if n < 0 or self.pos + n > self.size then self:fail("it ends inside " .. what) end
end

local SCALARS = {
   u8 = { "uint8_t", 1 }, i8 = { "int8_t", 1 }, u16 = { "uint16_t", 2 }, i16 = { "int16_t", 2 },
   u32 = { "uint32_t", 4 }, i32 = { "int32_t", 4 }, f32 = { "float", 4 }, u64 = { "uint64_t", 8 },
   i64 = { "int64_t", 8 }, f64 = { "double", 8 },
}
for name, s in pairs(SCALARS) do
   local ptr = ffi.typeof(s[1] .. " *")
   Reader[name] = function(self, what)
      self:need(s[2], what or name)
      local v = ffi.cast(ptr, self.base + self.pos)[0]         -- (x86: unaligned loads are fine)
      self.pos = self.pos + s[2]
      return tonumber(v)
   end
end

function Reader:str(what)
   local n = self:u64(what)
   self:need(n, what)
   local s = ffi.string(self.base + self.pos, n)
   self.pos = self.pos + n
   return s
end

-- metadata value types
local VALUE = { [0] = "u8", [1] = "i8", [2] = "u16", [3] = "i16", [4] = "u32", [5] = "i32", [6] = "f32", [10] = "u64",
                [11] = "i64", [12] = "f64" }

function Reader:value(vtype, what)
   if VALUE[vtype] then return self[VALUE[vtype]](self, what) end
   if vtype == 7 then return self:u8(what) ~= 0 end
   if vtype == 8 then return self:str(what) end
   if vtype == 9 then
      local etype, n = self:u32(what), self:u64(what)
      if n > self.size then self:fail(string.format("%s claims %d elements", what, n)) end
      local out = {}
      for i = 1, n do out[i] = self:value(etype, what) end
      return out
   end
   self:fail(string.format("%s has value type %d", what, vtype))
end

local File = {}
File.__index = File

--- open(path) -> a GGUF file: .version, .metadata {key = value}, .tensors (in file order:
-- {name, type, type_name, shape, offset, nbytes}), .by_name, and the methods below.
function M.open(path)
   if type(path) ~= "string" then error("gguf.open: expected a file path, got " .. type(path), 2) end
   local map = ffi.new("ml_mapping*[1]")
   C.check(lib.ml_mapping_open(path, map), 2)
   local mapping = ffi.gc(map[0], lib.ml_mapping_release)
   local r = setmetatable({ base = lib.ml_mapping_data(mapping), size = tonumber(lib.ml_mapping_size(mapping)), pos = 0,
                            path = path }, Reader)
   r:need(4, "the magic")
   if ffi.string(r.base, 4) ~= "GGUF" then r:fail("it does not start with GGUF") end
   r.pos = 4
   local version = r:u32("the version")
   if version ~= 2 and version ~= 3 then r:fail(string.format("version %d (2 and 3 are read)", version)) end
   local ntensors, nkv = r:u64("the tensor count"), r:u64("the metadata count")
   if ntensors > r.size or nkv > r.size then r:fail("its counts are larger than the file") end
   local metadata = {}
   for _ = 1, nkv do
      local key = r:str("a metadata key")
      metadata[key] = r:value(r:u32("the type of " .. key), key)
   end
   local tensors, by_name = {}, {}
   for _ = 1, ntensors do
      local name = r:str("a tensor name")
      local ndim = r:u32("the dims of " .. name)
      if ndim < 1 or ndim > 8 then r:fail(string.format("%s has %d dims", name, ndim)) end
      local dims = {}
      for i = 1, ndim do dims[i] = r:u64("the dims of " .. name) end
      local ttype, offset = r:u32("the type of " .. name), r:u64("the offset of " .. name)
      local shape, n = {}, 1
      for i = ndim, 1, -1 do shape[#shape + 1] = dims[i]; n = n * dims[i] end
      local info = M.TYPES[ttype]
      if not info then r:fail(string.format("%s has ggml type %d, which is not known", name, ttype)) end
      if dims[1] % info[2] ~= 0 then
         r:fail(string.format("%s: %d values a row are not whole %s blocks of %d", name, dims[1], info[1], info[2]))
      end
      local t = { name = name, type = ttype, type_name = info[1], shape = shape, offset = offset,
                  nbytes = n / info[2] * info[3] }
      tensors[#tensors + 1] = t
      by_name[name] = t
   end
   local align = metadata["general.alignment"] or 32
   if type(align) ~= "number" or align < 1 then r:fail("general.alignment is " .. tostring(align)) end
   local data = math.ceil(r.pos / align) * align
   for _, t in ipairs(tensors) do
      t.offset = data + t.offset
      if t.offset + t.nbytes > r.size then
         r:fail(string.format("%s (%d bytes at %d) lies past its end", t.name, t.nbytes, t.offset))
      end
   end
   return setmetatable({ path = path, version = version, metadata = metadata, tensors = tensors, by_name = by_name,
                         _mapping = mapping, _base = r.base }, File)
end

-- The rows of a tensor read as a matrix: every dim but the last (the blocks run along it).
local function rows_of(t)
   local rows = 1
   for i = 1, #t.shape - 1 do rows = rows * t.shape[i] end
   return rows
end

function File:_info(name, who)
   local t = self.by_name[name]
   if not t then error(string.format('%s: %s has no tensor "%s"', who, self.path, name), 3) end
   return t
end

--- f:tensor(name) -> a float (or integer) tensor: F32, F16, BF16 (and I8 ... F64) as views of the
-- mapped file; the block types moonload reads (M.READ) widened to float32. Others are an error.
function File:tensor(name)
   local t = self:_info(name, "gguf")
   local dtype = VIEWED[t.type]
   if dtype then
      local st = ffi.new("ml_storage*[1]")
      C.check(lib.ml_storage_from_mapping(self._mapping, t.offset, t.nbytes, st), 2)
      local storage = st[0]
      local shape = ffi.new("int64_t[?]", #t.shape, t.shape)
      local out = ffi.new("ml_tensor*[1]")
      local status = lib.ml_tensor_from_storage(storage, 0, require("moonload.dtypes").by_name[dtype], #t.shape, shape,
         nil, out)
      lib.ml_storage_release(storage)
      C.check(status, 2)
      return Tensor.wrap(out[0])
   end
   if UNPACKED[t.type] then
      local q, scales = self:quantized(name)
      local F = require("moonload.nn.functional")
      local w = UNPACKED[t.type] == "int8" and F.dequantize_q8(q, scales) or F.dequantize_q4(q, scales)
      return #t.shape == 2 and w or w:view(t.shape)
   end
   if t.type == MXFP4 then
      local blocks, scales = self:mxfp4(name)
      local w = require("moonload.nn.functional").dequantize_mxfp4(blocks, scales, "float32", "ggml")
      return w:view(t.shape)
   end
   if WIDENED[t.type] then
      local out = ffi.new("ml_tensor*[1]")
      C.check(lib.ml_dequantize_ggml(self._base + t.offset, t.nbytes, t.type, rows_of(t), t.shape[#t.shape], out), 2)
      local w = Tensor.wrap(out[0])
      return #t.shape == 2 and w or w:view(t.shape)
   end
   error(string.format("gguf: %s in %s is %s; moonload reads %s", name, self.path, t.type_name, M.READ), 2)
end

--- f:quantized(name) -> q, scales, bits: a Q8_0 or Q4_0 tensor (rows, cols) in moonload's int8 or
-- int4 layout (nn.QuantizedLinear's weight and weight_scale); nil for other types.
--- f:is_block_quantized(name): stored in blocks that f:tensor widens (Q4_1, Q5_x, K-quants).
function File:is_block_quantized(name)
   return WIDENED[self:_info(name, "gguf").type] == true
end

--- f:mxfp4(name) -> blocks, scales: an MXFP4 tensor (..., rows, cols) as F.mxfp4_linear reads it
-- (order "ggml"), views of the mapped file: ggml's 17-byte blocks are a scale byte then 16 bytes
-- of values, so blocks (..., rows, cols / 32, 16) and scales (..., rows, cols / 32) are strided
-- views 17 bytes a group apart. nil for other types.
function File:mxfp4(name)
   local t = self:_info(name, "gguf")
   if t.type ~= MXFP4 then return nil end
   local st = ffi.new("ml_storage*[1]")
   C.check(lib.ml_storage_from_mapping(self._mapping, t.offset, t.nbytes, st), 2)
   local storage = st[0]
   local n = #t.shape
   local groups = t.shape[n] / 32
   local function view(offset, ndim, last)
      local shape, strides = ffi.new("int64_t[?]", ndim), ffi.new("int64_t[?]", ndim)
      local stride = groups * 17
      for i = n - 1, 1, -1 do shape[i - 1], strides[i - 1] = t.shape[i], stride; stride = stride * t.shape[i] end
      shape[n - 1], strides[n - 1] = groups, 17
      if last then shape[n], strides[n] = 16, 1 end
      local out = ffi.new("ml_tensor*[1]")
      local status = lib.ml_tensor_from_storage(storage, offset, require("moonload.dtypes").by_name.uint8, ndim, shape,
         strides, out)
      if status ~= 0 then lib.ml_storage_release(storage); C.check(status, 3) end
      return Tensor.wrap(out[0])
   end
   local blocks, scales = view(1, n + 1, true), view(0, n, false)
   lib.ml_storage_release(storage)
   return blocks, scales
end

function File:quantized(name)
   local t = self:_info(name, "gguf")
   if not UNPACKED[t.type] then return nil end
   local q, s = ffi.new("ml_tensor*[1]"), ffi.new("ml_tensor*[1]")
   C.check(lib.ml_unpack_ggml_blocks(self._base + t.offset, t.nbytes, t.type, rows_of(t), t.shape[#t.shape], q, s), 2)
   return Tensor.wrap(q[0]), Tensor.wrap(s[0]), UNPACKED[t.type] == "int8" and 8 or 4
end

return M
