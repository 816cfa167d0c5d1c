--- The part of Jinja that Hugging Face chat templates use, rendered the way transformers does
-- (trim_blocks, lstrip_blocks, loop controls, raise_exception, namespace, a tojson that keeps
-- non-ASCII text): text, {{ expressions }}, {% if / elif / else %}, {% for ... in ... [if ...] %}
-- with loop.index/first/last/..., {% set %} (names and namespace attributes), {% break %},
-- {% continue %}, {% generation %}, {% macro %} (defaults, keyword arguments, recursion; gpt-oss's
-- template is built of them), comments, and the whitespace controls - and +.
-- Expressions: literals, lists, dicts, names, attributes, subscripts and slices (0-based,
-- negative from the end), calls, filters, tests (is [not] ...), not/and/or, comparisons, in,
-- + - * / // % ~ and a if c else b.
--
-- Values: Lua strings, numbers and booleans; Lua tables as lists (array part) or dicts; M.none
-- for JSON null/None. A dict's keys iterate in sorted order (Lua tables keep none).
--
--    local tmpl = jinja.compile(source)
--    local text = tmpl({ messages = msgs, add_generation_prompt = true, bos_token = "<s>" })
local cjson = require("cjson")

local M = {}

local NONE = setmetatable({}, { __tostring = function() return "None" end })
local UNDEF = setmetatable({}, { __tostring = function() return "" end })
M.none = NONE

local function fail(fmt, ...) error("chat template: " .. string.format(fmt, ...), 0) end

-- --- lexing the template ---------------------------------------------------------------------------

-- Splits source into text and tags, applying the whitespace rules: "-" strips all whitespace on
-- that side; lstrip_blocks removes the spaces and tabs before a block or comment tag that starts
-- its line (unless "{%+"), trim_blocks one newline after it (unless "+%}").
-- Where the tag whose inside starts at i closes: the first close string outside strings and
-- brackets (Jinja's lexer balances them, so {{ {'a': {'b': 1}} }} ends at the last "}}").
local function tag_end(src, i, close)
   local depth, quote = 0, nil
   while i <= #src do
      local c = src:sub(i, i)
      if quote then
         if c == "\\" then i = i + 1 elseif c == quote then quote = nil end
      elseif c == "'" or c == '"' then quote = c
      elseif c == "(" or c == "[" or c == "{" then depth = depth + 1
      elseif depth > 0 and (c == ")" or c == "]" or c == "}") then depth = depth - 1
      elseif depth == 0 and src:sub(i, i + 1) == close then return i, i + 1
      end
      i = i + 1
   end
end

local function lex(src)
   local parts, pos, line = {}, 1, 1
   while true do
      local a, b, kind = src:find("{([{%%#])", pos)
      if not a then
         parts[#parts + 1] = { type = "text", value = src:sub(pos) }
         break
      end
      parts[#parts + 1] = { type = "text", value = src:sub(pos, a - 1) }
      local close = kind == "{" and "}}" or kind == "%" and "%}" or "#}"
      local c1, c2
      if kind == "#" then c1, c2 = src:find(close, b + 1, true) else c1, c2 = tag_end(src, b + 1, close) end
      if not c1 then fail("a tag opened at line %d is not closed", line) end
      local inner = src:sub(b + 1, c1 - 1)
      local tag = { type = kind == "{" and "var" or kind == "%" and "block" or "comment", line = line }
      if inner:sub(1, 1) == "-" then tag.strip_before = true; inner = inner:sub(2)
      elseif inner:sub(1, 1) == "+" then tag.keep_before = true; inner = inner:sub(2) end
      if inner:sub(-1) == "-" then tag.strip_after = true; inner = inner:sub(1, -2)
      elseif inner:sub(-1) == "+" then tag.keep_after = true; inner = inner:sub(1, -2) end
      tag.src = inner
      parts[#parts + 1] = tag
      for _ in src:sub(pos, c2):gmatch("\n") do line = line + 1 end
      pos = c2 + 1
   end
   -- whitespace control on the text around each tag; whether a tag starts its line is judged on
   -- the source as written (before the newline trims of the tags around it), as Jinja does
   for i, p in ipairs(parts) do
      if p.type ~= "text" then
         local before = parts[i - 1]
         local head = before.value:match("^(.-)[ \t]*$")
         p.line_start = (head == "" and i == 2) or head:sub(-1) == "\n"
      end
   end
   for i, p in ipairs(parts) do
      if p.type ~= "text" then
         local before, after = parts[i - 1], parts[i + 1]
         local is_block = p.type ~= "var"
         if before and before.type == "text" then
            if p.strip_before then
               before.value = before.value:gsub("%s+$", "")
            elseif is_block and not p.keep_before and p.line_start then
               before.value = before.value:gsub("[ \t]*$", "")
            end
         end
         if after and after.type == "text" then
            if p.strip_after then after.value = after.value:gsub("^%s+", "")
            elseif is_block and not p.keep_after then after.value = after.value:gsub("^\r?\n", "", 1) end
         end
      end
   end
   return parts
end

-- --- lexing expressions ------------------------------------------------------------------------------

local KEYWORDS = { ["and"] = true, ["or"] = true, ["not"] = true, ["in"] = true, ["is"] = true, ["if"] = true,
   ["else"] = true }
local OPS = { "//", "==", "!=", "<=", ">=", "**", "+", "-", "*", "/", "%", "~", "<", ">", "(", ")", "[", "]", "{", "}",
   ",", ".", ":", "|", "=" }

local ESCAPES = { n = "\n", t = "\t", r = "\r", ["\\"] = "\\", ["'"] = "'", ['"'] = '"', ["0"] = "\0" }

local function tokenize(s, line)
   local toks, i, n = {}, 1, #s
   while i <= n do
      local c = s:sub(i, i)
      if c:match("%s") then
         i = i + 1
      elseif c:match("[%a_]") then
         local w = s:match("^[%w_]+", i)
         toks[#toks + 1] = { t = KEYWORDS[w] and "kw" or "name", v = w }
         i = i + #w
      elseif c:match("%d") then
         local num = s:match("^%d+%.%d+", i) or s:match("^%d+", i)
         toks[#toks + 1] = { t = "num", v = tonumber(num), int = not num:find(".", 1, true) }
         i = i + #num
      elseif c == "'" or c == '"' then
         local out, j = {}, i + 1
         while true do
            local ch = s:sub(j, j)
            if ch == "" then fail("unterminated string at line %d", line) end
            if ch == c then break end
            if ch == "\\" then
               local e = s:sub(j + 1, j + 1)
               out[#out + 1] = ESCAPES[e] or ("\\" .. e)
               j = j + 2
            else
               out[#out + 1] = ch
               j = j + 1
            end
         end
         toks[#toks + 1] = { t = "str", v = table.concat(out) }
         i = j + 1
      else
         local op
         for _, o in ipairs(OPS) do if s:sub(i, i + #o - 1) == o then op = o break end end
         if not op then fail("unexpected character %q at line %d", c, line) end
         toks[#toks + 1] = { t = "op", v = op }
         i = i + #op
      end
   end
   toks[#toks + 1] = { t = "eof" }
   return toks
end

-- --- parsing expressions -------------------------------------------------------------------------------

local Parser = {}
Parser.__index = Parser

local function parser(src, line)
   return setmetatable({ toks = tokenize(src, line), i = 1, line = line }, Parser)
end

function Parser:peek(k) return self.toks[self.i + (k or 0)] end
function Parser:next() local t = self.toks[self.i]; self.i = self.i + 1; return t end
function Parser:is(t, v) local tok = self:peek(); return tok.t == t and (v == nil or tok.v == v) end
function Parser:accept(t, v) if self:is(t, v) then return self:next() end end
function Parser:expect(t, v)
   local tok = self:next()
   if tok.t ~= t or (v ~= nil and tok.v ~= v) then
      fail("expected %s at line %d, found %s", tostring(v or t), self.line, tostring(tok.v or tok.t))
   end
   return tok
end
function Parser:done() if not self:is("eof") then fail("unexpected %s at line %d", tostring(self:peek().v), self.line) end end

function Parser:expr()
   local e = self:or_()
   if self:accept("kw", "if") then
      local cond = self:or_()
      local other = self:accept("kw", "else") and self:expr() or { "lit", UNDEF }
      return { "cond", cond, e, other }
   end
   return e
end

function Parser:or_()
   local e = self:and_()
   while self:accept("kw", "or") do e = { "or", e, self:and_() } end
   return e
end

function Parser:and_()
   local e = self:not_()
   while self:accept("kw", "and") do e = { "and", e, self:not_() } end
   return e
end

function Parser:not_()
   if self:accept("kw", "not") then return { "not", self:not_() } end
   return self:compare()
end

local CMP = { ["=="] = true, ["!="] = true, ["<"] = true, [">"] = true, ["<="] = true, [">="] = true }

function Parser:compare()
   local e = self:math1()
   while true do
      local t = self:peek()
      if t.t == "op" and CMP[t.v] then
         self:next()
         e = { "cmp", t.v, e, self:math1() }
      elseif self:accept("kw", "in") then
         e = { "in", e, self:math1() }
      elseif t.t == "kw" and t.v == "not" and self:peek(1).t == "kw" and self:peek(1).v == "in" then
         self:next(); self:next()
         e = { "not", { "in", e, self:math1() } }
      elseif self:accept("kw", "is") then
         local negate = self:accept("kw", "not") ~= nil
         local name = self:next()
         if name.t ~= "name" and not (name.t == "kw" and name.v == "in") then
            fail("expected a test name after 'is' at line %d", self.line)
         end
         local args = {}
         if self:is("op", "(") then args = self:call_args()
         elseif self:is("str") or self:is("num") or self:is("name") then args = { self:primary() } end
         e = { "test", name.v, e, args, negate }
      else
         return e
      end
   end
end

function Parser:math1()
   local e = self:concat()
   while self:is("op", "+") or self:is("op", "-") do e = { "arith", self:next().v, e, self:concat() } end
   return e
end

function Parser:concat()
   local e = self:math2()
   while self:accept("op", "~") do e = { "concat", e, self:math2() } end
   return e
end

function Parser:math2()
   local e = self:unary()
   while self:is("op", "*") or self:is("op", "/") or self:is("op", "//") or self:is("op", "%") do
      e = { "arith", self:next().v, e, self:unary() }
   end
   return e
end

function Parser:unary()
   if self:accept("op", "-") then return { "neg", self:unary() } end
   if self:accept("op", "+") then return self:unary() end
   return self:filters(self:postfix(self:primary()))
end

-- (args...) with name=value keywords: a list {pos = {...}, kw = {...}}.
function Parser:call_args()
   self:expect("op", "(")
   local args = { pos = {}, kw = {} }
   while not self:accept("op", ")") do
      if self:is("name") and self:peek(1).t == "op" and self:peek(1).v == "=" then
         local k = self:next().v
         self:next()
         args.kw[k] = self:expr()
      else
         args.pos[#args.pos + 1] = self:expr()
      end
      if not self:accept("op", ",") then self:expect("op", ")") break end
   end
   return args
end

function Parser:primary()
   local t = self:next()
   if t.t == "str" then
      local s = t.v
      while self:is("str") do s = s .. self:next().v end          -- adjacent literals join
      return { "lit", s }
   end
   if t.t == "num" then return { "lit", t.v } end
   if t.t == "name" then
      local v = t.v
      if v == "true" or v == "True" then return { "lit", true } end
      if v == "false" or v == "False" then return { "lit", false } end
      if v == "none" or v == "None" then return { "lit", NONE } end
      return { "name", v }
   end
   if t.t == "op" and t.v == "(" then
      local e = self:expr()
      if self:accept("op", ",") then
         local items = { e }
         while not self:is("op", ")") do
            items[#items + 1] = self:expr()
            if not self:accept("op", ",") then break end
         end
         e = { "list", items }
      end
      self:expect("op", ")")
      return e
   end
   if t.t == "op" and t.v == "[" then
      local items = {}
      while not self:accept("op", "]") do
         items[#items + 1] = self:expr()
         if not self:accept("op", ",") then self:expect("op", "]") break end
      end
      return { "list", items }
   end
   if t.t == "op" and t.v == "{" then
      local pairs_ = {}
      while not self:accept("op", "}") do
         local k = self:expr()
         self:expect("op", ":")
         pairs_[#pairs_ + 1] = { k, self:expr() }
         if not self:accept("op", ",") then self:expect("op", "}") break end
      end
      return { "dict", pairs_ }
   end
   fail("unexpected %s at line %d", tostring(t.v or t.t), self.line)
end

function Parser:postfix(e)
   while true do
      if self:accept("op", ".") then
         e = { "getattr", e, self:expect("name").v }
      elseif self:accept("op", "[") then
         local a, b, step, is_slice
         if not self:is("op", ":") then a = self:expr() end
         if self:accept("op", ":") then
            is_slice = true
            if not self:is("op", "]") and not self:is("op", ":") then b = self:expr() end
            if self:accept("op", ":") and not self:is("op", "]") then step = self:expr() end
         end
         self:expect("op", "]")
         e = is_slice and { "slice", e, a, b, step } or { "getitem", e, a }
      elseif self:is("op", "(") then
         e = { "call", e, self:call_args() }
      else
         return e
      end
   end
end

function Parser:filters(e)
   while self:accept("op", "|") do
      local name = self:expect("name").v
      local args = self:is("op", "(") and self:call_args() or { pos = {}, kw = {} }
      e = { "filter", name, e, args }
   end
   return e
end

-- --- values --------------------------------------------------------------------------------------------

local function is_list(v) return type(v) == "table" and v ~= NONE and v ~= UNDEF and (v[1] ~= nil or next(v) == nil) and not v.__namespace end
local function is_dict(v) return type(v) == "table" and v ~= NONE and v ~= UNDEF and not is_list(v) end

local function truthy(v)
   if v == nil or v == NONE or v == UNDEF or v == false or v == 0 or v == "" then return false end
   if type(v) == "table" and not v.__namespace and next(v) == nil then return false end
   return true
end

local function sorted_keys(d)
   local keys = {}
   for k in pairs(d) do if k ~= "__namespace" then keys[#keys + 1] = k end end
   table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
   return keys
end

local function num_str(x)
   if x == math.floor(x) and math.abs(x) < 2 ^ 53 then return string.format("%d", x) end
   local s = string.format("%.15g", x)
   if tonumber(s) ~= x then s = string.format("%.17g", x) end
   return s
end

local repr
local function str(v)
   if v == nil or v == UNDEF then return "" end
   if v == NONE then return "None" end
   if v == true then return "True" end
   if v == false then return "False" end
   if type(v) == "number" then return num_str(v) end
   if type(v) == "string" then return v end
   return repr(v)
end

-- Python's repr of lists and dicts (what {{ some_list }} prints).
function repr(v)
   if type(v) == "string" then
      return "'" .. v:gsub("\\", "\\\\"):gsub("'", "\\'"):gsub("\n", "\\n") .. "'"
   end
   if type(v) ~= "table" or v == NONE or v == UNDEF then return str(v) end
   local parts = {}
   if is_list(v) then
      for _, x in ipairs(v) do parts[#parts + 1] = repr(x) end
      return "[" .. table.concat(parts, ", ") .. "]"
   end
   for _, k in ipairs(sorted_keys(v)) do parts[#parts + 1] = repr(k) .. ": " .. repr(v[k]) end
   return "{" .. table.concat(parts, ", ") .. "}"
end

local function to_json(v, indent, level)
   level = level or 0
   if v == nil or v == NONE or v == UNDEF then return "null" end
   if type(v) == "boolean" then return v and "true" or "false" end
   if type(v) == "number" then
      if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return string.format("%d", v) end
      return num_str(v)
   end
   if type(v) == "string" then
      return '"' .. v:gsub('[%c"\\]', function(c)
         local map = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\t"] = "\\t", ["\r"] = "\\r", ["\b"] = "\\b", ["\f"] = "\\f" }
         return map[c] or string.format("\\u%04x", c:byte())
      end) .. '"'
   end
   local items = {}
   local list = is_list(v)
   local keys = list and nil or sorted_keys(v)
   local n = list and #v or #keys
   for i = 1, n do
      local k = list and i or keys[i]
      local val = to_json(v[k], indent, level + 1)
      items[i] = list and val or (to_json(tostring(k)) .. ": " .. val)
   end
   local open, close = list and "[" or "{", list and "]" or "}"
   if n == 0 then return open .. close end
   if indent then
      local pad, pad0 = "\n" .. string.rep(" ", indent * (level + 1)), "\n" .. string.rep(" ", indent * level)
      return open .. pad .. table.concat(items, "," .. pad) .. pad0 .. close
   end
   return open .. table.concat(items, ", ") .. close
end
M.to_json = to_json

local function length(v)
   if type(v) == "string" then return utf8 and utf8.len(v) or #v:gsub("[\128-\191]", "") end
   if type(v) == "table" and v ~= NONE and v ~= UNDEF then
      if is_list(v) then return #v end
      return #sorted_keys(v)
   end
   fail("length of %s", str(v))
end

-- Jinja's == on our values.
local function equal(a, b)
   if a == UNDEF then a = nil end
   if b == UNDEF then b = nil end
   if a == b then return true end
   if type(a) == "table" and type(b) == "table" and a ~= NONE and b ~= NONE then
      return to_json(a) == to_json(b)
   end
   return false
end

local function index_of(list, i, who)
   if type(i) ~= "number" then fail("%s: list index must be a number, got %s", who, str(i)) end
   if i < 0 then i = #list + i end
   return list[i + 1]
end

local STRING_METHODS = {}
local function strip_chars(chars) return chars and ("[" .. chars:gsub("[%]%^%-%%]", "%%%0") .. "]") or "%s" end
function STRING_METHODS.strip(s, chars) local c = strip_chars(chars); return (s:gsub("^" .. c .. "+", ""):gsub(c .. "+$", "")) end
function STRING_METHODS.lstrip(s, chars) return (s:gsub("^" .. strip_chars(chars) .. "+", "")) end
function STRING_METHODS.rstrip(s, chars) return (s:gsub(strip_chars(chars) .. "+$", "")) end
function STRING_METHODS.upper(s) return s:upper() end
function STRING_METHODS.lower(s) return s:lower() end
function STRING_METHODS.title(s) return (s:gsub("(%a)([%w]*)", function(a, b) return a:upper() .. b:lower() end)) end
function STRING_METHODS.capitalize(s) return s:sub(1, 1):upper() .. s:sub(2):lower() end
function STRING_METHODS.startswith(s, p) return s:sub(1, #p) == p end
function STRING_METHODS.endswith(s, p) return p == "" or s:sub(-#p) == p end
function STRING_METHODS.replace(s, a, b)
   local out, i = {}, 1
   while true do
      local x, y = s:find(a, i, true)
      if not x or a == "" then break end
      out[#out + 1] = s:sub(i, x - 1); out[#out + 1] = b; i = y + 1
   end
   out[#out + 1] = s:sub(i)
   return table.concat(out)
end
function STRING_METHODS.split(s, sep)
   local out = {}
   if sep == nil or sep == NONE then
      for w in s:gmatch("%S+") do out[#out + 1] = w end
      return out
   end
   local i = 1
   while true do
      local x, y = s:find(sep, i, true)
      if not x then break end
      out[#out + 1] = s:sub(i, x - 1); i = y + 1
   end
   out[#out + 1] = s:sub(i)
   return out
end
function STRING_METHODS.count(s, p) local n = 0; for _ in s:gmatch(p:gsub("%p", "%%%0")) do n = n + 1 end; return n end
function STRING_METHODS.find(s, p) local x = s:find(p, 1, true); return x and x - 1 or -1 end

local DICT_METHODS = {}
function DICT_METHODS.items(d)
   local out = {}
   for _, k in ipairs(sorted_keys(d)) do out[#out + 1] = { k, d[k] } end
   return out
end
function DICT_METHODS.keys(d) return sorted_keys(d) end
function DICT_METHODS.values(d)
   local out = {}
   for _, k in ipairs(sorted_keys(d)) do out[#out + 1] = d[k] end
   return out
end
function DICT_METHODS.get(d, k, default)
   local v = d[k]
   if v == nil then return default == nil and NONE or default end
   return v
end

local TESTS = {
   defined = function(v) return v ~= UNDEF and v ~= nil end,
   undefined = function(v) return v == UNDEF or v == nil end,
   none = function(v) return v == NONE end,
   string = function(v) return type(v) == "string" end,
   number = function(v) return type(v) == "number" end,
   integer = function(v) return type(v) == "number" and v == math.floor(v) end,
   float = function(v) return type(v) == "number" and v ~= math.floor(v) end,
   boolean = function(v) return type(v) == "boolean" end,
   ["true"] = function(v) return v == true end,
   ["false"] = function(v) return v == false end,
   mapping = function(v) return is_dict(v) end,
   sequence = function(v) return is_list(v) or type(v) == "string" end,
   iterable = function(v) return is_list(v) or is_dict(v) or type(v) == "string" end,
   even = function(v) return v % 2 == 0 end,
   odd = function(v) return v % 2 == 1 end,
   divisibleby = function(v, n) return v % n == 0 end,
   equalto = function(v, x) return equal(v, x) end,
   eq = function(v, x) return equal(v, x) end,
   ne = function(v, x) return not equal(v, x) end,
   sameas = function(v, x) return v == x end,
   lower = function(v) return type(v) == "string" and v:lower() == v end,
   upper = function(v) return type(v) == "string" and v:upper() == v end,
   ["in"] = function(v, seq)
      if type(seq) == "string" then return type(v) == "string" and seq:find(v, 1, true) ~= nil end
      for _, x in ipairs(seq) do if equal(x, v) then return true end end
      return false
   end,
}

local FILTERS = {}
function FILTERS.trim(v, chars) return STRING_METHODS.strip(str(v), chars) end
FILTERS.length = function(v) return length(v) end
FILTERS.count = FILTERS.length
function FILTERS.string(v) return str(v) end
function FILTERS.upper(v) return str(v):upper() end
function FILTERS.lower(v) return str(v):lower() end
function FILTERS.title(v) return STRING_METHODS.title(str(v)) end
function FILTERS.capitalize(v) return STRING_METHODS.capitalize(str(v)) end
function FILTERS.first(v) if type(v) == "string" then return v:sub(1, 1) end return v[1] == nil and UNDEF or v[1] end
function FILTERS.last(v) if type(v) == "string" then return v:sub(-1) end return v[#v] == nil and UNDEF or v[#v] end
function FILTERS.default(v, d, boolean)
   if v == UNDEF or v == nil or (boolean == true and not truthy(v)) then return d == nil and "" or d end
   return v
end
FILTERS.d = FILTERS.default
function FILTERS.join(v, sep, attribute)
   local parts = {}
   for i, x in ipairs(v) do parts[i] = str(attribute and x[attribute] or x) end
   return table.concat(parts, sep or "")
end
function FILTERS.list(v)
   if type(v) == "string" then local out = {}; for ch in v:gmatch("[%z\1-\127\194-\244][\128-\191]*") do out[#out + 1] = ch end return out end
   if is_dict(v) then return sorted_keys(v) end
   return v
end
function FILTERS.replace(v, a, b) return STRING_METHODS.replace(str(v), a, b) end
function FILTERS.items(v) return DICT_METHODS.items(v) end
function FILTERS.reverse(v)
   if type(v) == "string" then return v:reverse() end
   local out = {}
   for i = #v, 1, -1 do out[#out + 1] = v[i] end
   return out
end
function FILTERS.int(v) return math.floor(tonumber(v) or 0) end
function FILTERS.float(v) return tonumber(v) or 0 end
function FILTERS.abs(v) return math.abs(v) end
function FILTERS.round(v, p) local m = 10 ^ (p or 0); return math.floor(v * m + 0.5) / m end
function FILTERS.tojson(v, indent) return to_json(v, indent ~= NONE and indent or nil) end
function FILTERS.unique(v)
   local out, seen = {}, {}
   for _, x in ipairs(v) do local k = to_json(x); if not seen[k] then seen[k] = true; out[#out + 1] = x end end
   return out
end
local function select_by(v, keep, attr, test, ...)
   local out = {}
   for _, x in ipairs(v) do
      local val = attr and (type(x) == "table" and x[attr]) or (not attr and x)
      if val == nil then val = UNDEF end
      local ok
      if test then
         local t = TESTS[test] or fail("unsupported test %q", test)
         ok = t(val, ...)
      else
         ok = truthy(val)
      end
      if ok == keep then out[#out + 1] = x end
   end
   return out
end
function FILTERS.selectattr(v, attr, test, ...) return select_by(v, true, attr, test, ...) end
function FILTERS.rejectattr(v, attr, test, ...) return select_by(v, false, attr, test, ...) end
function FILTERS.select(v, test, ...) return select_by(v, true, nil, test, ...) end
function FILTERS.reject(v, test, ...) return select_by(v, false, nil, test, ...) end
function FILTERS.map(v, name, kw)
   local out = {}
   for i, x in ipairs(v) do
      if kw and kw.attribute then out[i] = x[kw.attribute] == nil and UNDEF or x[kw.attribute]
      else
         local f = FILTERS[name] or fail("unsupported filter %q", tostring(name))
         out[i] = f(x)
      end
   end
   return out
end

-- --- evaluation -------------------------------------------------------------------------------------

local function lookup(scope, name)
   while scope do
      local v = rawget(scope.vars, name)
      if v ~= nil then return v end
      scope = scope.parent
   end
   return UNDEF
end

local eval

local function eval_args(args, scope)
   local pos, kw = {}, {}
   for i, a in ipairs(args.pos) do pos[i] = eval(a, scope) end
   for k, a in pairs(args.kw) do kw[k] = eval(a, scope) end
   return pos, kw
end

local call_macro

local function getattr(obj, key)
   if type(obj) == "string" then
      local m = STRING_METHODS[key]
      if m then return function(...) return m(obj, ...) end end
      return UNDEF
   end
   if type(obj) ~= "table" or obj == NONE or obj == UNDEF then
      if obj == UNDEF then fail("%q of an undefined value", tostring(key)) end
      return UNDEF
   end
   local v = obj[key]
   if v ~= nil then return v end
   if is_dict(obj) or next(obj) == nil then
      local m = DICT_METHODS[key]
      if m then return function(...) return m(obj, ...) end end
   end
   return UNDEF
end

local function arith(op, a, b)
   if op == "+" then
      if type(a) == "string" and type(b) == "string" then return a .. b end
      if is_list(a) and is_list(b) then
         local out = {}
         for _, x in ipairs(a) do out[#out + 1] = x end
         for _, x in ipairs(b) do out[#out + 1] = x end
         return out
      end
      if type(a) ~= "number" or type(b) ~= "number" then fail("cannot add %s and %s", repr(a), repr(b)) end
      return a + b
   end
   if type(a) ~= "number" or type(b) ~= "number" then
      if op == "*" and type(a) == "string" and type(b) == "number" then return a:rep(b) end
      fail("cannot apply %s to %s and %s", op, repr(a), repr(b))
   end
   if op == "-" then return a - b end
   if op == "*" then return a * b end
   if op == "/" then return a / b end
   if op == "//" then return math.floor(a / b) end
   if op == "%" then return a % b end
end

local function compare(op, a, b)
   if op == "==" then return equal(a, b) end
   if op == "!=" then return not equal(a, b) end
   if type(a) ~= type(b) or (type(a) ~= "number" and type(a) ~= "string") then
      fail("cannot compare %s %s %s", repr(a), op, repr(b))
   end
   if op == "<" then return a < b end
   if op == ">" then return a > b end
   if op == "<=" then return a <= b end
   return a >= b
end

function eval(e, scope)
   local k = e[1]
   if k == "lit" then return e[2] end
   if k == "name" then return lookup(scope, e[2]) end
   if k == "list" then
      local out = {}
      for i, x in ipairs(e[2]) do out[i] = eval(x, scope) end
      return out
   end
   if k == "dict" then
      local out = {}
      for _, p in ipairs(e[2]) do out[eval(p[1], scope)] = eval(p[2], scope) end
      return out
   end
   if k == "getattr" then return getattr(eval(e[2], scope), e[3]) end
   if k == "getitem" then
      local obj, key = eval(e[2], scope), eval(e[3], scope)
      if obj == UNDEF then fail("[%s] of an undefined value", repr(key)) end
      if type(key) == "number" and (is_list(obj) or type(obj) == "string") then
         if type(obj) == "string" then                        -- a character, as Python indexes
            local chars = FILTERS.list(obj)
            return chars[key < 0 and #chars + key + 1 or key + 1] or UNDEF
         end
         local v = index_of(obj, key, "[]")
         return v == nil and UNDEF or v
      end
      return getattr(obj, key)
   end
   if k == "slice" then                          -- Python's obj[a:b:step], 0-based, ends excluded
      local obj = eval(e[2], scope)
      local chars = type(obj) == "string" and FILTERS.list(obj) or obj
      local n = #chars
      local step = e[5] and eval(e[5], scope) or 1
      if step == 0 then fail("slice step cannot be zero") end
      local a, b
      if step > 0 then
         a = e[3] and eval(e[3], scope) or 0
         b = e[4] and eval(e[4], scope) or n
         if a < 0 then a = math.max(0, n + a) end
         if b < 0 then b = math.max(0, n + b) end
         a, b = math.min(a, n), math.min(b, n)
      else
         a = e[3] and eval(e[3], scope) or n - 1
         b = e[4] and eval(e[4], scope) or -n - 1          -- past the start
         if a < 0 then a = n + a end
         if e[4] and b < 0 then b = n + b end
         a = math.min(a, n - 1)
      end
      local out, i = {}, a
      while (step > 0 and i < b) or (step < 0 and i > b and i >= 0) do
         out[#out + 1] = chars[i + 1]
         i = i + step
      end
      if type(obj) == "string" then return table.concat(out) end
      return out
   end
   if k == "call" then
      local f = eval(e[2], scope)
      local pos, kw = eval_args(e[3], scope)
      if type(f) == "table" and f.__macro then return call_macro(f, pos, kw) end
      if type(f) ~= "function" then fail("%s is not callable", e[2][1] == "name" and e[2][2] or "a value") end
      if next(kw) then pos[#pos + 1] = kw end
      return f(unpack(pos, 1, #pos))
   end
   if k == "filter" then
      local f = FILTERS[e[2]]
      if not f then fail("unsupported filter %q", e[2]) end
      local pos, kw = eval_args(e[4], scope)
      local v = eval(e[3], scope)
      if e[2] == "tojson" and kw.indent then pos[1] = kw.indent end
      if e[2] == "map" then return f(v, pos[1], kw) end
      if e[2] == "default" or e[2] == "d" then pos[2] = pos[2] or kw.boolean end
      return f(v, unpack(pos, 1, #pos))
   end
   if k == "test" then
      local t = TESTS[e[2]]
      if not t then fail("unsupported test %q", e[2]) end
      local args = {}
      for i, a in ipairs(e[4].pos or e[4]) do args[i] = eval(a, scope) end
      local r = t(eval(e[3], scope), unpack(args))
      if e[5] then return not r end
      return r
   end
   if k == "not" then return not truthy(eval(e[2], scope)) end
   if k == "and" then local a = eval(e[2], scope); if not truthy(a) then return a end return eval(e[3], scope) end
   if k == "or" then local a = eval(e[2], scope); if truthy(a) then return a end return eval(e[3], scope) end
   if k == "cond" then if truthy(eval(e[2], scope)) then return eval(e[3], scope) end return eval(e[4], scope) end
   if k == "cmp" then return compare(e[2], eval(e[3], scope), eval(e[4], scope)) end
   if k == "in" then
      local v, seq = eval(e[2], scope), eval(e[3], scope)
      if type(seq) == "string" then return seq:find(str(v), 1, true) ~= nil end
      if is_dict(seq) then return seq[v] ~= nil end
      if type(seq) ~= "table" then return false end
      for _, x in ipairs(seq) do if equal(x, v) then return true end end
      return false
   end
   if k == "concat" then return str(eval(e[2], scope)) .. str(eval(e[3], scope)) end
   if k == "arith" then return arith(e[2], eval(e[3], scope), eval(e[4], scope)) end
   if k == "neg" then return -eval(e[2], scope) end
   fail("internal: unknown node %s", tostring(k))
end

-- --- statements -------------------------------------------------------------------------------------

local BREAK, CONTINUE = {}, {}

-- Parses parts[i..] into a body until one of the `stop` block keywords; returns body, stopper, i.
local function parse_body(parts, i, stop)
   local body = {}
   while i <= #parts do
      local p = parts[i]
      if p.type == "text" then
         if p.value ~= "" then body[#body + 1] = { "text", p.value } end
         i = i + 1
      elseif p.type == "comment" then
         i = i + 1
      elseif p.type == "var" then
         local ps = parser(p.src, p.line)
         local e = ps:expr()
         ps:done()
         body[#body + 1] = { "out", e }
         i = i + 1
      else
         local word = p.src:match("^%s*([%a_]+)")
         if stop and stop[word] then return body, p, i end
         local rest = p.src:match("^%s*[%a_]+(.*)$") or ""
         if word == "if" then
            local node = { "if", branches = {} }
            local cond = rest
            while true do
               local ps = parser(cond, p.line)
               local c = ps:expr(); ps:done()
               local b, stopper, j = parse_body(parts, i + 1, { elif = true, ["else"] = true, endif = true })
               if not stopper then fail("{%% if %%} at line %d is not closed", p.line) end
               node.branches[#node.branches + 1] = { c, b }
               i = j
               local sw = stopper.src:match("^%s*([%a_]+)")
               if sw == "elif" then
                  cond = stopper.src:match("^%s*elif(.*)$")
                  p = stopper
               elseif sw == "else" then
                  local eb, s2, j2 = parse_body(parts, i + 1, { endif = true })
                  if not s2 then fail("{%% if %%} at line %d is not closed", p.line) end
                  node.else_body = eb
                  i = j2
                  break
               else
                  break
               end
            end
            body[#body + 1] = node
            i = i + 1
         elseif word == "for" then
            local targets, iter = rest:match("^%s*(.-)%s+in%s+(.+)$")
            if not targets then fail("cannot read {%% for %%} at line %d", p.line) end
            local names = {}
            for nm in targets:gmatch("[%a_][%w_]*") do names[#names + 1] = nm end
            local ps = parser(iter, p.line)
            local it = ps:or_()
            local cond
            if ps:accept("kw", "if") then cond = ps:expr() end
            ps:done()
            local b, stopper, j = parse_body(parts, i + 1, { ["else"] = true, endfor = true })
            if not stopper then fail("{%% for %%} at line %d is not closed", p.line) end
            local node = { "for", names = names, iter = it, cond = cond, body = b }
            i = j
            if stopper.src:match("^%s*else") then
               local eb, s2, j2 = parse_body(parts, i + 1, { endfor = true })
               if not s2 then fail("{%% for %%} at line %d is not closed", p.line) end
               node.else_body = eb
               i = j2
            end
            body[#body + 1] = node
            i = i + 1
         elseif word == "set" then
            local target, value = rest:match("^%s*([%a_][%w_%.]*)%s*=%s*(.+)$")
            if target then
               local ps = parser(value, p.line)
               local e = ps:expr(); ps:done()
               body[#body + 1] = { "set", target, e }
               i = i + 1
            else
               local name = rest:match("^%s*([%a_][%w_]*)%s*$")
               if not name then fail("cannot read {%% set %%} at line %d", p.line) end
               local b, stopper, j = parse_body(parts, i + 1, { endset = true })
               if not stopper then fail("{%% set %%} at line %d is not closed", p.line) end
               body[#body + 1] = { "setblock", name, b }
               i = j + 1
            end
         elseif word == "macro" then
            -- {% macro name(a, b=default, ...) %}: its parameters, defaults as expressions
            local ps = parser(rest, p.line)
            local name = ps:expect("name").v
            local params = {}
            ps:expect("op", "(")
            while not ps:accept("op", ")") do
               local pn = ps:expect("name").v
               params[#params + 1] = { pn, ps:accept("op", "=") and ps:expr() or nil }
               if not ps:accept("op", ",") then ps:expect("op", ")") break end
            end
            ps:done()
            local b, stopper, j = parse_body(parts, i + 1, { endmacro = true })
            if not stopper then fail("{%% macro %%} at line %d is not closed", p.line) end
            body[#body + 1] = { "macro", name, params, b }
            i = j + 1
         elseif word == "break" then
            body[#body + 1] = { "break" }; i = i + 1
         elseif word == "continue" then
            body[#body + 1] = { "continue" }; i = i + 1
         elseif word == "generation" then
            local b, stopper, j = parse_body(parts, i + 1, { endgeneration = true })
            if not stopper then fail("{%% generation %%} at line %d is not closed", p.line) end
            body[#body + 1] = { "block", b }
            i = j + 1
         else
            fail("unsupported statement {%% %s %%} at line %d", tostring(word), p.line)
         end
      end
   end
   return body, nil, i
end

local exec

local function exec_body(body, scope, out)
   for _, node in ipairs(body) do
      local r = exec(node, scope, out)
      if r then return r end
   end
end

function exec(node, scope, out)
   local k = node[1]
   if k == "text" then out[#out + 1] = node[2]
   elseif k == "out" then out[#out + 1] = str(eval(node[2], scope))
   elseif k == "if" then
      for _, br in ipairs(node.branches) do
         if truthy(eval(br[1], scope)) then return exec_body(br[2], scope, out) end
      end
      if node.else_body then return exec_body(node.else_body, scope, out) end
   elseif k == "for" then
      local seq = eval(node.iter, scope)
      if seq == UNDEF or seq == NONE then seq = {} end
      if is_dict(seq) then seq = sorted_keys(seq) end
      if type(seq) == "string" then seq = FILTERS.list(seq) end
      local items = {}
      for _, x in ipairs(seq) do
         if node.cond then
            local s = { vars = {}, parent = scope }
            if #node.names == 1 then s.vars[node.names[1]] = x else for j, nm in ipairs(node.names) do s.vars[nm] = x[j] end end
            if truthy(eval(node.cond, s)) then items[#items + 1] = x end
         else
            items[#items + 1] = x
         end
      end
      if #items == 0 then
         if node.else_body then return exec_body(node.else_body, scope, out) end
         return
      end
      local n = #items
      for i, x in ipairs(items) do
         local loop = { index = i, index0 = i - 1, revindex = n - i + 1, revindex0 = n - i, first = i == 1,
            last = i == n, length = n, previtem = items[i - 1] or UNDEF, nextitem = items[i + 1] or UNDEF }
         local s = { vars = { loop = loop }, parent = scope }
         if #node.names == 1 then s.vars[node.names[1]] = x
         else for j, nm in ipairs(node.names) do s.vars[nm] = x[j] == nil and UNDEF or x[j] end end
         local r = exec_body(node.body, s, out)
         if r == BREAK then break end
      end
   elseif k == "set" then
      local target, value = node[2], eval(node[3], scope)
      local obj, attr = target:match("^([%a_][%w_]*)%.([%a_][%w_]*)$")
      if obj then
         local ns = lookup(scope, obj)
         if type(ns) ~= "table" or not ns.__namespace then fail("cannot set %s: %s is not a namespace", target, obj) end
         ns[attr] = value
      else
         scope.vars[target] = value
      end
   elseif k == "setblock" then
      local buf = {}
      exec_body(node[3], scope, buf)
      scope.vars[node[2]] = table.concat(buf)
   elseif k == "macro" then
      -- a callable value; its body sees its arguments over the scope it was defined in (the
      -- template's variables and the other macros, itself included)
      scope.vars[node[2]] = { __macro = node, scope = scope }
   elseif k == "block" then return exec_body(node[2], scope, out)
   elseif k == "break" then return BREAK
   elseif k == "continue" then return CONTINUE
   end
end

-- A macro called with positional and keyword arguments: the text its body renders. Missing
-- arguments take their defaults (evaluated at the call), else are undefined.
function call_macro(m, pos, kw)
   local node = m.__macro
   local s = { vars = {}, parent = m.scope }
   for i, p in ipairs(node[3]) do
      local v = pos[i]
      if v == nil then v = kw[p[1]] end
      if v == nil and p[2] then v = eval(p[2], s) end
      s.vars[p[1]] = v == nil and UNDEF or v
   end
   if #pos > #node[3] then fail("macro %s takes %d arguments, got %d", node[2], #node[3], #pos) end
   for k in pairs(kw) do
      local known = false
      for _, p in ipairs(node[3]) do known = known or p[1] == k end
      if not known then fail("macro %s has no argument %q", node[2], k) end
   end
   local out = {}
   exec_body(node[4], s, out)
   return table.concat(out)
end

-- --- globals and the public API --------------------------------------------------------------------------

local GLOBALS = {
   raise_exception = function(msg) error("chat template: " .. str(msg), 0) end,
   strftime_now = function(fmt) return os.date(fmt) end,
   namespace = function(kw)
      local ns = { __namespace = true }
      for k, v in pairs(kw or {}) do ns[k] = v end
      return ns
   end,
   range = function(a, b, step)
      if b == nil then a, b = 0, a end
      local out = {}
      for i = a, b - 1, step or 1 do out[#out + 1] = i end
      return out
   end,
   dict = function(kw) local d = {}; for k, v in pairs(kw or {}) do d[k] = v end return d end,
}

-- Lua values in (JSON null from cjson as none).
local function from_lua(v)
   if v == cjson.null then return NONE end
   if type(v) == "table" and v ~= NONE and v ~= UNDEF and not v.__namespace then
      local out = {}
      for k, x in pairs(v) do out[k] = from_lua(x) end
      return out
   end
   return v
end

--- compile(source) -> render function(vars) -> string.
function M.compile(source)
   if type(source) ~= "string" then fail("the template must be a string, got %s", type(source)) end
   local body, stopper = parse_body(lex(source), 1, nil)
   if stopper then fail("unexpected {%% %s %%}", stopper.src) end
   return function(vars)
      local root = { vars = {} }
      for k, v in pairs(GLOBALS) do root.vars[k] = v end
      for k, v in pairs(vars or {}) do root.vars[k] = from_lua(v) end
      local out = {}
      exec_body(body, { vars = {}, parent = root }, out)
      return table.concat(out)
   end
end

return M
