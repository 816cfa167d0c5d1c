--- ml.nn: modules and layers (API.md "Modules"). `local nn = require("moonload").nn`.
--    nn.Module, nn.Parameter, nn.Linear, nn.Conv1D, nn.QuantizedLinear, nn.Fp8Linear, nn.LoraLinear, nn.Embedding,
--    nn.QuantizedEmbedding, nn.LayerNorm, nn.RMSNorm,
--    nn.BatchNorm1d, nn.Dropout, nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
--    nn.Softmax, nn.Sequential, nn.ModuleList, nn.functional (= nn.F), nn.init,
--    nn.init_context (the meta-initialisation seam used by init_empty_weights).
local Module = require("moonload.nn.module")
local parameter = require("moonload.nn.parameter")
local activation = require("moonload.nn.activation")

local nn = {}

nn.Module = Module
nn.Parameter = parameter.Parameter
nn.is_parameter = parameter.is_parameter
nn.is_module = Module.is_module
nn.OrderedDict = require("moonload.nn.ordered_dict")
nn.Linear = require("moonload.nn.linear")
nn.Conv1D = require("moonload.nn.conv1d")
nn.QuantizedLinear = require("moonload.nn.quantized_linear")
nn.Fp8Linear = require("moonload.nn.fp8_linear")
nn.LoraLinear = require("moonload.nn.lora_linear")
nn.QuantizedEmbedding = require("moonload.nn.quantized_embedding")
nn.Embedding = require("moonload.nn.embedding")
nn.LayerNorm = require("moonload.nn.layernorm")
nn.RMSNorm = require("moonload.nn.rmsnorm")
nn.BatchNorm1d = require("moonload.nn.batchnorm")
nn.Dropout = require("moonload.nn.dropout")
nn.Sequential = require("moonload.nn.sequential")
nn.ModuleList = require("moonload.nn.module_list")
for name, cls in pairs(activation) do nn[name] = cls end
nn.functional = require("moonload.nn.functional")
nn.F = nn.functional
nn.init = require("moonload.nn.weight_init")
nn.init_context = require("moonload.nn.init_context")

return nn
