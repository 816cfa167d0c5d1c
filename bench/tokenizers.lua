--- ml.tokenizers' encode over ~90 KB of mixed text (English, code, accents, CJK, emoji, digits;
-- the fixtures' texts repeated) with the tokenizer.json layouts of Llama 3 (byte-level BPE),
-- Llama 2 (SentencePiece-style BPE) and all-MiniLM-L6-v2 (BERT WordPiece), next to Hugging Face
-- tokenizers (Rust, bench/tokenizers_peer.py) in the same run; then SentencePiece model files read
-- by ml.tokenizers.from_sentencepiece (Unigram with nmt_nfkc, BPE with byte fallback) next to the
-- sentencepiece library (C++), and a Marian folder next to transformers' MarianTokenizer
-- (bench/sentencepiece_peer.py). Each the best of 5 calls on the same text after a warm-up, and
-- the ids checked equal. JSON lines on stdout.
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local tokenizers = require("moonload.tokenizers")
local cjson = require("cjson")
local B = require("benchutil")

local FIX = "tests/fixtures/tokenizers"
local CASES = {
   { "llama3_bpe", "bench/tokenizers_peer.py" }, { "llama2_spm", "bench/tokenizers_peer.py" },
   { "minilm_wordpiece", "bench/tokenizers_peer.py" },
   { "spm_unigram", "bench/sentencepiece_peer.py", "tokenizer.model" },
   { "spm_bpe_bytes", "bench/sentencepiece_peer.py", "tokenizer.model" },
   { "marian_spm", "bench/sentencepiece_peer.py" },
}
for _, case in ipairs(CASES) do
   local name, peer_script, model_file = case[1], case[2], case[3]
   local tok = model_file and tokenizers.from_sentencepiece(FIX .. "/" .. name .. "/" .. model_file)
      or tokenizers.from_pretrained(FIX .. "/" .. name)
   local exp = cjson.decode(assert(io.open(FIX .. "/" .. name .. "/expected.json")):read("*a"))
   local parts = {}
   for _ = 1, 200 do for _, c in ipairs(exp.cases) do parts[#parts + 1] = c.text end end
   local text = table.concat(parts, " ")
   local ids
   local best = B.best(5, function() ids = tok:encode(text) end)
   local peer, err = B.run_peer(peer_script .. " " .. FIX .. "/" .. name)
   local rec = { bench = "tokenizer_encode", tokenizer = name, bytes = #text, ids = #ids,
      moonload_mb_per_s = #text / best * 1e-6 }
   if peer then
      rec.peer_mb_per_s = peer.bytes / peer.best_s * 1e-6
      rec.ratio = peer.best_s / best
      rec.same_ids = peer.ids_hash == tostring(#ids) .. ":" .. tostring(ids[#ids]) .. ":" .. tostring(ids[math.floor(#ids / 2)])
      rec.peer = peer.peer or "tokenizers " .. peer.tokenizers
   else
      rec.peer_error = err
   end
   B.emit({ "bench", "tokenizer", "bytes", "ids", "moonload_mb_per_s", "peer_mb_per_s", "ratio", "same_ids", "peer", "peer_error" }, rec)
end
