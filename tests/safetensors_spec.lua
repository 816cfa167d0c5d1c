-- ml.safetensors: validation (one crafted file per check, exact messages), zero-copy loading,
-- interop with PyPI safetensors (fixtures from tests/fixtures/gen_safetensors.py), round trips,
-- atomic writes, and a short deterministic mutation fuzz over valid files.
local ml = require("moonload")
local st = require("moonload.safetensors")
local C = require("moonload.C")
local cjson = require("cjson")
local bit = require("bit")

local ffi, lib = C.ffi, C.lib

local FIX = "tests/fixtures/safetensors/"

local tmpdir
do
   tmpdir = os.tmpname()
   os.remove(tmpdir)
   assert(os.execute("mkdir -p '" .. tmpdir .. "'") == 0 or true)
end

local counter = 0
local function tmp_path(name)
   counter = counter + 1
   return string.format("%s/%s%d.safetensors", tmpdir, name or "t", counter)
end

local function read_all(path)
   local f = assert(io.open(path, "rb"))
   local s = f:read("*a")
   f:close()
   return s
end

local function write_all(path, bytes)
   local f = assert(io.open(path, "wb"))
   f:write(bytes)
   f:close()
end

local function u64le(n)
   local b = {}
   for i = 1, 8 do
      b[i] = string.char(n % 256)
      n = math.floor(n / 256)
   end
   return table.concat(b)
end

--- A file from a header string and data bytes; returns its path.
local function craft(header, data, len_override)
   local path = tmp_path("crafted")
   write_all(path, (len_override or u64le(#header)) .. header .. (data or ""))
   return path
end

local function zeros(n) return string.rep("\0", n) end

--- Asserts that opening the crafted file fails with exactly "safetensors: <path>: <msg>".
local function rejects(path, msg)
   assert.has_error(function() st.safe_open(path) end, "safetensors: " .. path .. ": " .. msg)
   assert.has_error(function() st.load_file(path) end, "safetensors: " .. path .. ": " .. msg)
end

local function ls(dir)
   local p = io.popen("ls -A '" .. dir .. "'")
   local out = {}
   for line in p:lines() do out[#out + 1] = line end
   p:close()
   table.sort(out)
   return out
end

-- Element values of a tensor, exact: integers through int64, floats through double.
local function values(t)
   local n = t:numel()
   if n == 0 then return {} end
   local dt = t.dtype
   local out = {}
   if dt == "float32" or dt == "float64" or dt == "float16" or dt == "bfloat16" then
      local buf = ffi.new("double[?]", n)
      C.check(lib.ml_tensor_read_f64(t._c, buf, n))
      -- A NaN with the sign bit and a full payload (bfloat16 0xFFFF widened) reads back from a
      -- double array as a LuaJIT tag (nil): test the bits, give Lua a canonical NaN.
      local bits = ffi.cast("uint64_t*", buf)
      for i = 0, n - 1 do
         local b = bits[i]
         if bit.band(tonumber(bit.rshift(b, 52)), 0x7ff) == 0x7ff and b % 4503599627370496ULL ~= 0 then
            out[i + 1] = 0 / 0
         else
            out[i + 1] = buf[i]
         end
      end
   else
      local buf = ffi.new("int64_t[?]", n)
      C.check(lib.ml_tensor_read_i64(t._c, buf, n))
      for i = 0, n - 1 do out[i + 1] = tonumber(buf[i]) end
   end
   return out
end

local function decode_expected(v)
   if v == "inf" then return math.huge end
   if v == "-inf" then return -math.huge end
   if v == "nan" then return 0 / 0 end
   return v
end

local function same_value(a, b)
   if a ~= a then return b ~= b end
   return a == b and (a ~= 0 or 1 / a == 1 / b)     -- keeps -0.0 apart from 0.0
end

local function is_borrowed(t)
   return lib.ml_storage_is_borrowed(lib.ml_tensor_storage(t._c))
end

local expected = cjson.decode(read_all(FIX .. "reference.json"))

local function entry(dtype, shape, b, e)
   return string.format('{"dtype":"%s","shape":[%s],"data_offsets":[%d,%d]}', dtype, table.concat(shape, ","), b, e)
end

describe("safetensors", function()
   teardown(function() os.execute("rm -rf '" .. tmpdir .. "'") end)

   describe("files written by PyPI safetensors", function()
      it("list their keys sorted, with the metadata", function()
         local f = st.safe_open(FIX .. "reference.safetensors")
         assert.same(expected.keys, f:keys())
         assert.same({ format = "pt" }, f:metadata())
         f:close()
      end)

      it("load with the reference's values for every dtype, 0-d and empty tensors included", function()
         local all = st.load_file(FIX .. "reference.safetensors")
         local n = 0
         for name, want in pairs(expected.tensors) do
            local t = all[name]
            assert.is_not_nil(t, name)
            assert.equal(want.dtype, t.dtype, name)
            assert.same(want.shape, t.shape, name)
            local got = values(t)
            assert.equal(#want.values, #got, name)
            for i, v in ipairs(want.values) do
               local w = decode_expected(v)
               assert.is_true(same_value(got[i], w), string.format("%s[%d]: %s vs %s", name, i, tostring(got[i]), tostring(w)))
            end
            n = n + 1
         end
         assert.equal(16, n)
      end)

      it("list dtypes moonload lacks, and refuse them only when asked for", function()
         local f = st.safe_open(FIX .. "unsupported.safetensors")
         assert.same({ "c64", "f8e4m3", "f8e5m2", "ok", "u16", "u32", "u64" }, f:keys())
         assert.same({ 1, 2 }, values(f:get_tensor("ok")))
         local info = f:tensor_info("u16")
         assert.is_nil(info.dtype)
         assert.equal("U16", info.st_dtype)
         -- (float8 is read: FP8 checkpoints' weights)
         assert.equal("float8_e4m3fn", f:get_tensor("f8e4m3").dtype)
         assert.same({ 1 }, f:get_tensor("f8e4m3"):to("float32"):tolist())
         assert.same({ 1 }, f:get_tensor("f8e5m2"):to("float32"):tolist())
         for name, dt in pairs({ u16 = "U16", u32 = "U32", u64 = "U64", c64 = "C64" }) do
            assert.has_error(function() f:get_tensor(name) end, "safetensors: " .. FIX .. "unsupported.safetensors: tensor \""
               .. name .. "\": dtype " .. dt .. " is not supported by moonload")
         end
         assert.has_error(function() st.load_file(FIX .. "unsupported.safetensors") end)
      end)

      it("copy tensors whose offset is not aligned to the element size (old writers)", function()
         local all = st.load_file(FIX .. "unaligned.safetensors")
         assert.same({ 1, 2, 3 }, values(all.a))
         assert.same({ 1.5, -2 }, values(all.b))
         assert.is_true(is_borrowed(all.a))        -- u8 is always aligned
         assert.is_false(is_borrowed(all.b))       -- f32 at file offset 8 + N + 3
      end)
   end)

   describe("zero-copy", function()
      it("views the mapping for aligned tensors", function()
         local f = st.safe_open(FIX .. "reference.safetensors")
         for _, name in ipairs(f:keys()) do
            local t = f:get_tensor(name)
            assert.is_true(is_borrowed(t), name)
            local info = f:tensor_info(name)
            if info.nbytes > 0 then
               local es = ({ F64 = 8, I64 = 8, F32 = 4, I32 = 4, F16 = 2, BF16 = 2, I16 = 2 })[info.st_dtype] or 1
               assert.equal(0, info.file_offset % es, name)
               assert.equal(0, tonumber(ffi.cast("uintptr_t", t:data_ptr())) % es, name)
            end
         end
         f:close()
      end)

      it("lets an in-place op write into a viewed tensor (copy on write) and leaves the file as it was", function()
         local path = tmp_path("cow.safetensors")
         st.save_file({ w = ml.arange(0, 4096, { dtype = "float32" }) }, path)
         local before = read_all(path)
         local w = st.load_file(path).w
         assert.is_true(is_borrowed(w))
         w:fill_(7)                                   -- (a read-only mapping would end the process here)
         w:narrow(1, 1, 2):copy_(ml.full({ 2 }, 8))
         assert.same({ 8, 8, 7 }, values(w:narrow(1, 1, 3)))
         assert.are.equal(before, read_all(path))
         assert.same({ 0, 1, 2 }, values(st.load_file(path).w:narrow(1, 1, 3)))
      end)

      it("keeps tensors valid after close and after the handle is collected", function()
         local f = st.safe_open(FIX .. "reference.safetensors")
         local t = f:get_tensor("i64.big")
         f:close()
         f = nil
         collectgarbage(); collectgarbage()
         assert.same(expected.tensors["i64.big"].values, values(t))
      end)

      it("reports where a tensor's bytes are without reading them", function()
         local f = st.safe_open(FIX .. "reference.safetensors")
         local info = f:tensor_info("f32.matrix")
         assert.equal("float32", info.dtype)
         assert.equal("F32", info.st_dtype)
         assert.same({ 3, 4 }, info.shape)
         assert.equal(48, info.nbytes)
         assert.equal(48, info.data_offsets[2] - info.data_offsets[1])
         local raw = read_all(FIX .. "reference.safetensors")
         local n = 0
         for i = 8, 1, -1 do n = n * 256 + raw:byte(i) end
         assert.equal(8 + n + info.data_offsets[1], info.file_offset)
         -- the bytes at file_offset are the tensor's
         local bytes = raw:sub(info.file_offset + 1, info.file_offset + 4)
         local fl = ffi.new("float[1]")
         ffi.copy(fl, bytes, 4)
         assert.equal(values(f:get_tensor("f32.matrix"))[1], fl[0])
         f:close()
      end)

      it("takes page-cache hints per tensor, and the data survives dropping its pages", function()
         local f = st.safe_open(FIX .. "reference.safetensors")
         local t = f:get_tensor("i64.big")
         f:advise("i64.big", "willneed")
         f:advise("i64.big", "dontneed")
         assert.same(expected.tensors["i64.big"].values, values(t))
         assert.has_error(function() f:advise("i64.big", "later") end,
            'advise: expected "willneed" or "dontneed", got later')
         f:close()
      end)

      it("gives meta tensors without data on the meta device", function()
         local all = st.load_file(FIX .. "reference.safetensors", { device = "meta" })
         assert.equal("meta", all["f32.matrix"].device)
         assert.same({ 3, 4 }, all["f32.matrix"].shape)
      end)
   end)

   describe("safe_open handles", function()
      it("close twice safely and refuse use after close", function()
         local path = FIX .. "reference.safetensors"
         local f = st.safe_open(path)
         f:close()
         f:close()
         local msg = "the safe_open handle for " .. path .. " is closed"
         assert.has_error(function() f:keys() end, "keys: " .. msg)
         assert.has_error(function() f:get_tensor("f32.matrix") end, "get_tensor: " .. msg)
         assert.has_error(function() f:metadata() end, "metadata: " .. msg)
         assert.has_error(function() f:tensor_info("f32.matrix") end, "tensor_info: " .. msg)
         assert.equal('safe_open("' .. path .. '", closed)', tostring(f))
      end)

      it("name the file and the missing tensor", function()
         local f = st.safe_open(FIX .. "reference.safetensors")
         assert.has_error(function() f:get_tensor("nope") end,
            "safetensors: " .. FIX .. "reference.safetensors: no tensor named \"nope\"")
         assert.equal('safe_open("' .. FIX .. 'reference.safetensors", 16 tensors, device=cpu)', tostring(f))
      end)

      it("return nil metadata when the file has none, and open an empty file", function()
         local f = st.safe_open(craft("{}      "))
         assert.same({}, f:keys())
         assert.is_nil(f:metadata())
         f:close()
      end)

      it("report a missing file", function()
         assert.has_error(function() st.safe_open(tmpdir .. "/missing.safetensors") end,
            "cannot open " .. tmpdir .. "/missing.safetensors: No such file or directory")
      end)

      it("fail cleanly when the file is truncated after open", function()
         local path = tmp_path("trunc")
         write_all(path, read_all(FIX .. "reference.safetensors"))
         local f = st.safe_open(path)
         local size = #read_all(path)
         write_all(path, "")                        -- truncate to 0 under the mapping
         assert.has_error(function() f:get_tensor("f32.matrix") end,
            path .. " shrank from " .. size .. " to 0 bytes while mapped")
         f:close()
      end)
   end)

   describe("rejects", function()
      local E8 = entry("F32", { 2 }, 0, 8)

      it("a file shorter than the header length", function()
         rejects(craft("", nil, "abcde"), "file is 5 bytes, too small to hold the 8-byte header length")
      end)

      it("a header length over 100,000,000", function()
         rejects(craft("{}", nil, u64le(100000001)), "header length 100000001 exceeds the limit of 100000000 bytes")
         rejects(craft("{}", nil, string.rep("\255", 8)),
            "header length 18446744073709551615 exceeds the limit of 100000000 bytes")
      end)

      it("a header length past the end of the file", function()
         rejects(craft("{}", nil, u64le(50)), "header length 50 runs past the end of the file (10 bytes)")
      end)

      it("headers that are not valid UTF-8", function()
         rejects(craft('{"a\255":' .. E8 .. '}', zeros(8)), "header is not valid UTF-8 (byte 0xff at header offset 3)")
         rejects(craft('{"\192\175":' .. E8 .. '}', zeros(8)), "header is not valid UTF-8 (byte 0xc0 at header offset 2)")
         rejects(craft('{"\237\160\128":' .. E8 .. '}', zeros(8)), "header is not valid UTF-8 (byte 0xed at header offset 2)")
      end)

      it("headers that are not JSON objects", function()
         rejects(craft(""), "header is not a JSON object (it must start with '{')")
         rejects(craft("[]"), "header is not a JSON object (it must start with '{')")
      end)

      it("invalid JSON, naming the byte", function()
         rejects(craft('{"a":' .. E8 .. ',}', zeros(8)),
            "header is not valid JSON: expected a string key, found '}' at byte 54")
         rejects(craft('{"a":' .. E8, zeros(8)),
            "header is not valid JSON: expected ',' or '}' after a header entry, found the end of the header (byte 53)")
         rejects(craft('{"a":' .. E8 .. '}x', zeros(8)),
            "header is not valid JSON: expected only whitespace after the header object, found 'x' at byte 54")
         rejects(craft('{"a\\q":' .. E8 .. '}', zeros(8)),
            "header is not valid JSON: invalid escape in a string, found 'q' at byte 4")
         rejects(craft('{"a\n":' .. E8 .. '}', zeros(8)),
            "header is not valid JSON: control character in a string, found byte 0x0a at byte 3")
         rejects(craft('{"\\ud800":' .. E8 .. '}', zeros(8)),
            "header is not valid JSON: high surrogate escape not followed by a low surrogate, found '\"' at byte 8")
         rejects(craft('{"\\u0000":' .. E8 .. '}', zeros(8)),
            "header is not valid JSON: \\u0000 (a NUL character) is not allowed in names or metadata, found '\\' at byte 2")
      end)

      it("__metadata__ that is not an object of strings", function()
         rejects(craft('{"__metadata__":[]}      '), "__metadata__ must be an object mapping strings to strings")
         rejects(craft('{"__metadata__":{"a":1}}'), "__metadata__ value for \"a\" is not a string")
         rejects(craft('{"__metadata__":{"a":"x","a":"y"}}'), "__metadata__ key \"a\" appears twice")
         rejects(craft('{"__metadata__":{},"__metadata__":{}}'), "__metadata__ appears twice")
      end)

      it("unknown dtypes", function()
         rejects(craft('{"a":' .. entry("F17", { 2 }, 0, 8) .. '}', zeros(8)), 'tensor "a": unknown dtype "F17"')
         rejects(craft('{"a":{"dtype":3,"shape":[2],"data_offsets":[0,8]}}', zeros(8)), 'tensor "a": dtype must be a string')
      end)

      it("malformed entries", function()
         rejects(craft('{"a":[]}'), 'tensor "a": entry must be an object with dtype, shape and data_offsets')
         rejects(craft('{"a":{"dtype":"F32","shape":[2]}}', zeros(8)), 'tensor "a": missing data_offsets')
         rejects(craft('{"a":{"shape":[2],"data_offsets":[0,8]}}', zeros(8)), 'tensor "a": missing dtype')
         rejects(craft('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}', zeros(8)),
            'tensor "a": unknown field "x" (expected dtype, shape, data_offsets)')
         rejects(craft('{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', zeros(8)),
            'tensor "a": dtype appears twice')
      end)

      it("shapes and offsets that are not non-negative integers", function()
         rejects(craft('{"a":' .. entry("F32", { -2 }, 0, 8) .. '}', zeros(8)), 'tensor "a": shape holds a negative number')
         rejects(craft('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', zeros(8)),
            'tensor "a": shape must be a list of non-negative integers (found "2.")')
         rejects(craft('{"a":{"dtype":"F32","shape":[02],"data_offsets":[0,8]}}', zeros(8)),
            'tensor "a": shape must be a list of non-negative integers (found "02")')
         rejects(craft('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}}', zeros(8)),
            'tensor "a": data_offsets must be a list of non-negative integers (found "8e")')
         rejects(craft('{"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}}', zeros(8)),
            'tensor "a": shape must be a list of non-negative integers')
         rejects(craft('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}}', zeros(8)),
            'tensor "a": data_offsets must be a list of two non-negative integers')
         rejects(craft('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}', zeros(8)),
            'tensor "a": data_offsets must be a list of two non-negative integers')
         rejects(craft('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,99999999999999999999]}}', zeros(8)),
            'tensor "a": data_offsets value 99999999999999999999 does not fit in 63 bits')
      end)

      it("duplicate tensor names (the reference silently keeps the last)", function()
         rejects(craft('{"a":' .. E8 .. ',"a":' .. entry("F32", { 2 }, 8, 16) .. '}', zeros(16)),
            'duplicate tensor name "a"')
      end)

      it("a first tensor that does not start at 0", function()
         rejects(craft('{"a":' .. entry("F32", { 2 }, 8, 16) .. '}', zeros(16)),
            'tensor "a" starts at byte 8 of the data section; the first tensor must start at 0')
      end)

      it("gaps and overlaps between tensors", function()
         rejects(craft('{"a":' .. E8 .. ',"b":' .. entry("F32", { 2 }, 12, 20) .. '}', zeros(20)),
            'tensor "b" starts at byte 12 but "a" ends at 8 (gap between tensors)')
         rejects(craft('{"a":' .. E8 .. ',"b":' .. entry("F32", { 2 }, 4, 12) .. '}', zeros(12)),
            'tensor "b" starts at byte 4 but "a" ends at 8 (tensors overlap)')
      end)

      it("end before begin", function()
         rejects(craft('{"a":' .. E8 .. ',"b":' .. entry("F32", { 0 }, 8, 4) .. '}', zeros(8)),
            'tensor "b": data_offsets [8, 4] end before begin')
      end)

      it("element counts that overflow", function()
         rejects(craft('{"a":' .. entry("F32", { 4294967296, 4294967296 }, 0, 8) .. '}', zeros(8)),
            'tensor "a": shape [4294967296, 4294967296] has too many elements (overflow)')
         rejects(craft('{"a":' .. entry("F64", { 4294967296, 1073741824 }, 0, 8) .. '}', zeros(8)),
            'tensor "a": shape [4294967296, 1073741824] has too many elements (overflow)')
      end)

      it("sub-byte tensors that are not a whole number of bytes", function()
         rejects(craft('{"a":' .. entry("F4", { 3 }, 0, 2) .. '}', zeros(2)),
            'tensor "a": F4 shape [3] is 12 bits, not a whole number of bytes')
      end)

      it("byte counts that differ from end - begin", function()
         rejects(craft('{"a":' .. entry("F32", { 2, 3 }, 0, 20) .. '}', zeros(20)),
            'tensor "a": F32 shape [2, 3] needs 24 bytes but data_offsets [0, 20] hold 20')
      end)

      it("trailing bytes after the last tensor (polyglots)", function()
         rejects(craft('{"a":' .. E8 .. '}', zeros(12)),
            "tensors end at byte 8 of the data section but the file has 4 more bytes after it (trailing data)")
      end)

      it("data sections shorter than the tensors", function()
         rejects(craft('{"a":' .. E8 .. '}', zeros(6)),
            "tensors need 8 bytes of data but the file holds 6 after the header (truncated)")
      end)

      it("zero-size tensors inside another tensor or past the end", function()
         rejects(craft('{"a":' .. E8 .. ',"z":' .. entry("F32", { 0 }, 4, 4) .. '}', zeros(8)),
            'tensor "z" starts at byte 4 but "a" ends at 8 (tensors overlap)')
         rejects(craft('{"a":' .. E8 .. ',"z":' .. entry("F32", { 0 }, 12, 12) .. '}', zeros(8)),
            'tensor "z" starts at byte 12 but "a" ends at 8 (gap between tensors)')
      end)

      it("tensors with more dimensions than moonload holds, when asked for", function()
         local path = craft('{"a":' .. entry("U8", { 1, 1, 1, 1, 1, 1, 1, 1, 1 }, 0, 1) .. '}', zeros(1))
         local f = st.safe_open(path)
         assert.has_error(function() f:get_tensor("a") end,
            "safetensors: " .. path .. ': tensor "a" has 9 dimensions; moonload supports at most 8')
         f:close()
      end)
   end)

   describe("accepts", function()
      it("zero-size tensors sharing offsets with each other and with neighbours", function()
         local header = '{"a":' .. entry("F32", { 2 }, 0, 8) .. ',"z1":' .. entry("F32", { 0 }, 0, 0)
            .. ',"z2":' .. entry("I64", { 0, 5 }, 8, 8) .. ',"z3":' .. entry("U8", { 0 }, 8, 8) .. '}'
         local all = st.load_file(craft(header, zeros(8)))
         assert.same({ 0 }, all.z1.shape)
         assert.same({ 0, 5 }, all.z2.shape)
         assert.same({ 0, 0 }, values(all.a))
      end)

      it("escaped names and whitespace anywhere JSON allows it", function()
         local header = ' { "a\\"\\u00e9\\ud83d\\ude00" : { "dtype" : "U8" , "shape" : [ 1 ] , "data_offsets" : [ 0 , 1 ] } }  '
         local f = st.safe_open(craft(header, "\7"))
         assert.same({ 'a"é😀' }, f:keys())
         assert.same({ 7 }, values(f:get_tensor('a"é😀')))
         f:close()
      end)
   end)

   describe("save_file", function()
      it("writes every dtype and reads it back exactly", function()
         local tensors = {
            f32 = ml.tensor({ { 1.5, -2 }, { 3.25, 1e-3 } }),
            f64 = ml.tensor({ 1 / 3, -1e300 }, { dtype = "float64" }),
            f16 = ml.tensor({ 0.5, -65504, 1 / 1024 }, { dtype = "float16" }),
            bf16 = ml.tensor({ 1.5, -3e38, 1 / 256 }, { dtype = "bfloat16" }),
            i64 = ml.tensor({ -5, 2 ^ 40 }, { dtype = "int64" }),
            i32 = ml.tensor({ -2147483648, 2147483647 }, { dtype = "int32" }),
            i16 = ml.tensor({ -32768, 5 }, { dtype = "int16" }),
            i8 = ml.tensor({ -128, 127 }, { dtype = "int8" }),
            u8 = ml.tensor({ 0, 255 }, { dtype = "uint8" }),
            b = ml.tensor({ true, false, true }),
            scalar = ml.tensor(2.5),
            empty = ml.zeros(0, 4),
         }
         local path = tmp_path("rt")
         st.save_file(tensors, path, { note = 'quote " newline \n tab \t ctl \1 é' })
         local back = st.load_file(path)
         for name, t in pairs(tensors) do
            assert.equal(t.dtype, back[name].dtype, name)
            assert.same(t.shape, back[name].shape, name)
            assert.same(values(t), values(back[name]), name)
            assert.is_true(is_borrowed(back[name]), name)
         end
         local f = st.safe_open(path)
         assert.same({ note = 'quote " newline \n tab \t ctl \1 é' }, f:metadata())
         f:close()
      end)

      it("writes the reference layout byte for byte", function()
         local path = tmp_path("same")
         st.save_file(st.load_file(FIX .. "reference.safetensors"), path, { format = "pt" })
         assert.equal(read_all(FIX .. "reference.safetensors"), read_all(path))
      end)

      it("writes an empty __metadata__ for an empty table and none for nil, like the reference", function()
         local p1, p2 = tmp_path("m"), tmp_path("m")
         st.save_file({ x = ml.zeros(1) }, p1, {})
         st.save_file({ x = ml.zeros(1) }, p2)
         assert.equal('{"__metadata__":{},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            read_all(p1):sub(9, 80))
         assert.same({}, st.safe_open(p1):metadata())
         assert.is_nil(st.safe_open(p2):metadata())
      end)

      it("writes non-contiguous tensors contiguous", function()
         local t = ml.tensor({ { 1, 2, 3 }, { 4, 5, 6 } }):t()
         assert.is_false(t:is_contiguous())
         local path = tmp_path("nc")
         st.save_file({ t = t }, path)
         local back = st.load_file(path).t
         assert.same({ 3, 2 }, back.shape)
         assert.same({ 1, 4, 2, 5, 3, 6 }, values(back))
      end)

      it("writes views with an offset and expanded views as their own data", function()
         local base = ml.tensor({ { 1, 2, 3 }, { 4, 5, 6 }, { 7, 8, 9 } }, { dtype = "int32" })
         local path = tmp_path("views")
         st.save_file({ row = base:select(1, 2), col = base:select(2, 3), ex = ml.tensor({ 5 }):expand(2, 3) }, path)
         local back = st.load_file(path)
         assert.same({ 4, 5, 6 }, values(back.row))
         assert.same({ 3, 6, 9 }, values(back.col))
         assert.same({ 2, 3 }, back.ex.shape)
         assert.same({ 5, 5, 5, 5, 5, 5 }, values(back.ex))
         local f = st.safe_open(path)
         assert.equal(12, f:tensor_info("row").nbytes)     -- 3 int32, not the whole base
         assert.equal(24, f:tensor_info("ex").nbytes)      -- 6 float32, not 1
         f:close()
      end)

      it("writes files PyPI safetensors loads (when /opt/ref/bin/python is there)", function()
         local py = "/opt/ref/bin/python"
         local fh = io.open(py, "rb")
         if not fh then return end
         fh:close()
         local path = tmp_path("py")
         local all = st.load_file(FIX .. "reference.safetensors")
         all["t.matrix"] = all["f32.matrix"]:t()            -- non-contiguous: written contiguous
         st.save_file(all, path, { format = "pt" })
         local m = expected.tensors["f32.matrix"]
         local tv = {}
         for j = 1, 4 do for i = 1, 3 do tv[#tv + 1] = m.values[(i - 1) * 4 + j] end end
         local extra = cjson.encode({ dtype = "float32", shape = { 4, 3 }, values = tv })
         local text = read_all(FIX .. "reference.json")
         local jtext, nsub = text:gsub('"tensors": {', '"tensors": {"t.matrix": ' .. extra:gsub("%%", "%%%%") .. ",", 1)
         assert.equal(1, nsub)
         local jpath = tmp_path("expected") .. ".json"
         write_all(jpath, jtext)
         local p = io.popen(py .. " tests/fixtures/gen_safetensors.py --check '" .. path .. "' '" .. jpath .. "' 2>&1")
         local out = p:read("*a")
         p:close()
         assert.matches("^ok: ", out)
      end)

      it("refuses meta tensors, reserved and duplicate names, bad metadata", function()
         local path = tmp_path("bad")
         assert.has_error(function() st.save_file({ w = ml.empty(2, { device = "meta" }) }, path) end,
            'save_file: tensor "w" is on the meta device and has no data to save')
         assert.has_error(function() st.save_file({ __metadata__ = ml.zeros(1) }, path) end,
            'save_file: "__metadata__" is reserved and cannot name a tensor')
         assert.has_error(function() st.save_file({ w = 3 }, path) end, 'save_file: value for "w" is not a tensor (number)')
         assert.has_error(function() st.save_file({ w = ml.zeros(1) }, path, { a = 1 }) end,
            "save_file: metadata must map strings to strings (string a -> number)")
         assert.has_error(function() st.save_file({ ["\255"] = ml.zeros(1) }, path) end,
            "save_file: tensor name \255 is not valid UTF-8 (writing " .. path .. ")")
         assert.is_nil(io.open(path, "rb"))
      end)

      it("leaves an existing file untouched and no temporary file when a write fails", function()
         local dir = tmpdir .. "/atomic"
         os.execute("mkdir -p '" .. dir .. "'")
         local path = dir .. "/model.safetensors"
         write_all(path, "previous contents")
         lib.ml_safetensors_debug_fail_after(100)
         local ok, err = pcall(st.save_file, { w = ml.zeros(64) }, path)
         lib.ml_safetensors_debug_fail_after(-1)
         assert.is_false(ok)
         assert.matches("save_file: cannot write " .. path:gsub("%p", "%%%0") .. ": No space left on device %(simulated%)$", err)
         assert.equal("previous contents", read_all(path))
         assert.same({ "model.safetensors" }, ls(dir))
         -- and the same call succeeds once the fault is gone
         st.save_file({ w = ml.zeros(64) }, path)
         assert.same({ 0 }, { values(st.load_file(path).w)[64] })
         assert.same({ "model.safetensors" }, ls(dir))
      end)

      it("names a directory it cannot write into", function()
         local path = tmpdir .. "/no/such/dir/x.safetensors"
         assert.has_error(function() st.save_file({ w = ml.zeros(1) }, path) end,
            "save_file: cannot create a temporary file in " .. tmpdir .. "/no/such/dir to write " .. path
            .. ": No such file or directory")
      end)

      it("replaces a file that tensors are still mapped from", function()
         local path = tmp_path("replace")
         st.save_file({ w = ml.tensor({ 1, 2 }) }, path)
         local old = st.load_file(path).w
         st.save_file({ w = ml.tensor({ 3, 4, 5 }) }, path)
         assert.same({ 1, 2 }, values(old))          -- the old inode stays mapped
         assert.same({ 3, 4, 5 }, values(st.load_file(path).w))
      end)
   end)

   describe("mutation fuzz (short, deterministic)", function()
      it("either loads or fails with a clean error for 3000 mutated files", function()
         local seeds = { read_all(FIX .. "reference.safetensors"), read_all(FIX .. "unaligned.safetensors"),
            read_all(FIX .. "unsupported.safetensors") }
         local state = 12345
         local function rand(n)                        -- LCG, deterministic across runs
            state = (state * 1103515245 + 12345) % 2147483648
            return state % n
         end
         local path = tmp_path("fuzz")
         local loaded, failed = 0, 0
         for iter = 1, 3000 do
            local s = seeds[rand(#seeds) + 1]
            local nmut = 1 + rand(4)
            for _ = 1, nmut do
               local kind = rand(6)
               local pos = 1 + (rand(3) == 0 and rand(#s) or rand(math.min(#s, 200)))
               if kind == 0 then        -- random byte
                  s = s:sub(1, pos - 1) .. string.char(rand(256)) .. s:sub(pos + 1)
               elseif kind == 1 then    -- digit or JSON punctuation
                  local c = ("0123456789,:[]{}\"-. "):sub(rand(20) + 1, nil)
                  s = s:sub(1, pos - 1) .. c:sub(1, 1) .. s:sub(pos + 1)
               elseif kind == 2 then    -- truncate
                  s = s:sub(1, pos)
               elseif kind == 3 then    -- insert
                  s = s:sub(1, pos - 1) .. string.char(rand(256)) .. s:sub(pos)
               elseif kind == 4 then    -- delete
                  s = s:sub(1, pos - 1) .. s:sub(pos + 1)
               else                     -- header length byte
                  local i = 1 + rand(8)
                  s = s:sub(1, i - 1) .. string.char(rand(256)) .. s:sub(i + 1)
               end
            end
            write_all(path, s)
            local ok, res = pcall(st.load_file, path)
            if ok then
               loaded = loaded + 1
               for _, t in pairs(res) do assert.is_true(ml.is_tensor(t)) end
            else
               failed = failed + 1
               assert.equal("string", type(res))
               assert.is_truthy(res:find("safetensors: " .. path, 1, true) == 1 or res:find("cannot open", 1, true),
                  "iteration " .. iter .. ": " .. res)
            end
         end
         assert.is_true(loaded > 0 and failed > 0)
      end)
   end)
end)
