--- ml.utils: Accelerate's utilities in Lua (API.md "Utilities"). A facade over
-- utils/log.lua (warning channel), utils/sizes.lua, utils/device_map.lua, utils/modeling.lua,
-- utils/offload.lua and utils/runtime_memory.lua (beyond Accelerate: the memory a model needs
-- while it runs); every name is also reachable from its own module.
local log = require("moonload.utils.log")
local sizes = require("moonload.utils.sizes")
local device_map = require("moonload.utils.device_map")
local modeling = require("moonload.utils.modeling")
local offload = require("moonload.utils.offload")
local runtime_memory = require("moonload.utils.runtime_memory")

local M = {}

M.set_warning_handler, M.warn, M.info = log.set_warning_handler, log.warn, log.info

for _, name in ipairs({ "convert_file_size_to_int", "dtype_byte_size", "compute_module_sizes",
                        "compute_module_total_buffer_size", "get_max_layer_size" }) do
   M[name] = sizes[name]
end
for _, name in ipairs({ "get_max_memory", "get_balanced_memory", "infer_auto_device_map", "clean_device_map",
                        "check_device_map", "fallback_allocate", "device_map_keys" }) do
   M[name] = device_map[name]
end
for _, name in ipairs({ "named_module_tensors", "get_non_persistent_buffers", "set_module_tensor_to_device",
                        "find_tied_parameters", "retie_parameters", "check_tied_parameters_on_same_device",
                        "has_offloaded_params", "align_module_device", "get_state_dict_offloaded_model",
                        "load_state_dict", "load_checkpoint_in_model", "load_offloaded_weights" }) do
   M[name] = modeling[name]
end
for _, name in ipairs({ "offload_weight", "load_offloaded_weight", "offload_state_dict", "save_offload_index",
                        "OffloadedWeightsLoader", "PrefixedDataset", "extract_submodules_state_dict" }) do
   M[name] = offload[name]
end
for _, name in ipairs({ "runtime_memory_sizes", "kv_cache_sizes", "activation_size" }) do
   M[name] = runtime_memory[name]
end

return M
