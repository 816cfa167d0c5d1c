# The CUDA backend built for the CPU emulator (tests/cudasim): the same core/src/cuda/*.cu, their
# launches rewritten by launch.pl, compiled by the host C++ compiler against the emulator's
# cuda_runtime.h / cublas_v2.h into build/cudasim/libmoonload_cuda.so. `make test-cuda-sim` runs
# the #cuda specs against it (MOONLOAD_CUDA_LIB), so the kernels and the streaming code execute
# on machines without a GPU. It says nothing about speed, and is no substitute for a GPU run.
SIM_DIR      = $(BUILD)/cudasim
SIM_CXX     ?= g++
# SIM_SANITIZE: flags that instrument the emulated kernels too (make test-asan sets ASan/UBSan).
SIM_SANITIZE ?=
SIM_CXXFLAGS = $(SIM_SANITIZE) -std=c++17 -O2 -g -fPIC -fvisibility=hidden -mf16c -Wall -Wno-unused-parameter \
               -Wno-unused-variable -Wno-sign-compare -Wno-unknown-pragmas -Itests/cudasim/include -Itests/cudasim -Icore/include -Icore/src -Icore/src/cuda
SIM_HDRS     = $(wildcard tests/cudasim/*.h tests/cudasim/include/*.h) core/include/moonload.h core/src/cuda_api.h \
               core/src/cuda/common.cuh core/src/philox.h
SIM_OWN_OBJ  = $(patsubst tests/cudasim/%.cc,$(SIM_DIR)/%.o,$(wildcard tests/cudasim/*.cc))
SIM_CU_OBJ   = $(patsubst core/src/cuda/%.cu,$(SIM_DIR)/cu/%.o,$(wildcard core/src/cuda/*.cu))

$(SIM_DIR)/cu/%.cc: core/src/cuda/%.cu tests/cudasim/launch.pl
	@mkdir -p $(dir $@)
	perl tests/cudasim/launch.pl $< > $@.tmp && mv $@.tmp $@

$(SIM_DIR)/cu/%.o: $(SIM_DIR)/cu/%.cc $(SIM_HDRS)
	$(SIM_CXX) $(SIM_CXXFLAGS) -c $< -o $@

$(SIM_DIR)/%.o: tests/cudasim/%.cc $(SIM_HDRS)
	@mkdir -p $(dir $@)
	$(SIM_CXX) $(SIM_CXXFLAGS) -c $< -o $@

$(SIM_DIR)/libmoonload_cuda.so: $(SIM_CU_OBJ) $(SIM_OWN_OBJ) | $(LIB)
	$(SIM_CXX) $(SIM_SANITIZE) -shared -o $@ $^ -L$(BUILD) -lmoonload -lpthread -Wl,--no-undefined -Wl,-rpath,'$$ORIGIN/..'

# The emulator's own checks (tests/cudasim/selftest.cu), TAP output.
$(SIM_DIR)/test/selftest.cc: tests/cudasim/selftest.cu tests/cudasim/launch.pl
	@mkdir -p $(dir $@)
	perl tests/cudasim/launch.pl $< > $@.tmp && mv $@.tmp $@

$(SIM_DIR)/test/selftest: $(SIM_DIR)/test/selftest.cc $(SIM_OWN_OBJ) $(SIM_HDRS) | $(LIB)
	$(SIM_CXX) $(SIM_CXXFLAGS) -o $@ $< $(SIM_OWN_OBJ) -L$(BUILD) -lmoonload -lpthread -Wl,-rpath,'$$ORIGIN/../..'

.PRECIOUS: $(SIM_DIR)/cu/%.cc
