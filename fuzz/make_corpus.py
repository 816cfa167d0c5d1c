#!/usr/bin/env python3
"""Writes the small valid seed files in fuzz/corpus (plain Python, no packages). Rerunnable."""
import json
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(name, header, data=b"", pad=True):
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def e(dtype, shape, b, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, end]}


os.makedirs(HERE, exist_ok=True)
write("empty.safetensors", {})
write("meta_only.safetensors", {"__metadata__": {"format": "pt", "k\u00e9y": "v\"al\n"}})
write("zero_size.safetensors", {"a": e("F32", [2], 0, 8), "z": e("I64", [0, 3], 8, 8), "y": e("U8", [0], 0, 0)},
      struct.pack("<2f", 1.0, 2.0))
write("unaligned.safetensors", {"a": e("U8", [3], 0, 3), "b": e("F32", [2], 3, 11)}, bytes([1, 2, 3]) +
      struct.pack("<2f", 1.5, -2.0), pad=False)
write("all_dtypes.safetensors", {
    "f64": e("F64", [1], 0, 8), "i64": e("I64", [1], 8, 16), "f32": e("F32", [2], 16, 24),
    "i32": e("I32", [1], 24, 28), "bf16": e("BF16", [1], 28, 30), "f16": e("F16", [1], 30, 32),
    "i16": e("I16", [1], 32, 34), "u16": e("U16", [1], 34, 36), "i8": e("I8", [1], 36, 37),
    "u8": e("U8", [1], 37, 38), "b": e("BOOL", [1], 38, 39), "f8": e("F8_E4M3", [1], 39, 40),
    "f4": e("F4", [2], 40, 41)}, bytes(range(41)))
write("scalar_nd.safetensors", {"s": e("F32", [], 0, 4), "m": e("U8", [1, 1, 1, 1, 1, 1, 1, 1, 1], 4, 5),
                               "\u00e9\U0001F600": e("I8", [1], 5, 6)}, bytes(6))
print("wrote", sorted(os.listdir(HERE)))
