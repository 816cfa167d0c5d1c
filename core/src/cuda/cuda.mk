# CUDA backend: build/libmoonload_cuda.so, opened lazily by core/src/cuda_loader.c, so the same
# libmoonload.so runs on machines without a driver. One object per .cu for incremental builds.
CUDA_SRC  = $(wildcard core/src/cuda/*.cu)
CUDA_OBJ  = $(patsubst core/src/cuda/%.cu,$(BUILD)/cuda/%.o,$(CUDA_SRC))
CUDA_DEPS = core/include/moonload.h core/src/cuda_api.h core/src/cuda/common.cuh core/src/philox.h
NVCC_FLAGS = -O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden -Icore/include -Icore/src \
             -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90

$(BUILD)/cuda/%.o: core/src/cuda/%.cu $(CUDA_DEPS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@

# Linked against libmoonload.so for ml_tensor_* and ml_fail; found beside it at run time ($ORIGIN).
$(BUILD)/libmoonload_cuda.so: $(CUDA_OBJ) | $(LIB)
	$(NVCC) -shared -o $@ $^ -L$(BUILD) -lmoonload -lcublas -lcudart -Xlinker --no-undefined -Xlinker -rpath -Xlinker '$$ORIGIN'
