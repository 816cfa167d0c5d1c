package = "moonload"
version = "scm-1"
source = {
   url = "git+file:///moonload",   -- installed from a checkout: luarocks make rockspec/moonload-scm-1.rockspec
}
description = {
   summary = "Big-model inference for LuaJIT: meta skeletons, device maps, CPU/disk offload, zero-copy safetensors",
   detailed = [[
moonload runs neural networks bigger than the memory you have, from Lua. It brings Hugging Face
Accelerate's big-model inference API (init_empty_weights, infer_auto_device_map,
load_checkpoint_and_dispatch, offload hooks) to LuaJIT, over a C core with OpenBLAS GEMM,
memory-mapped safetensors and a weight-prefetching hook runtime.
]],
   license = "MIT",
}
dependencies = {
   "lua == 5.1",   -- LuaJIT
}
build = {
   type = "make",
   build_target = "all",
   build_variables = {
      CFLAGS = "-O3 -g",
      LUAJIT = "luajit",
   },
   install_target = "install",
   install_variables = {
      PREFIX = "$(PREFIX)",
      LIBDIR = "$(LIBDIR)",
      LUADIR = "$(LUADIR)",
   },
   install = {
      bin = { moonload = "bin/moonload" },   -- the REPL / script runner
   },
}
