# CUDA backend: build/libmoonload_cuda.so, opened lazily by core/src/cuda_loader.c.
CUDA_SRC = $(wildcard core/src/cuda/*.cu)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVCC_FLAGS = -O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden -Icore/include -Icore/src \
             -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90

$(BUILD)/libmoonload_cuda.so: $(CUDA_SRC) core/include/moonload.h core/src/internal.h $(LIB)
	$(NVCC) $(NVCC_FLAGS) -shared -o $@ $(CUDA_SRC) -L$(BUILD) -lmoonload -lcublas -lcudart \
	  -Xlinker -rpath -Xlinker '$$ORIGIN'
