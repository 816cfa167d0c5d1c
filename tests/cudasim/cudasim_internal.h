// cudasim_internal.h: what the emulator's own files share (see cudasim.h for the overview).
#pragma once
#include "cudasim.h"

#include <stdarg.h>

namespace cudasim {

constexpr int kMaxDevices = 16;

enum class MemoryKind { pageable, pinned, device, overrun };

// Prints "cudasim: <message>" and aborts: what a GPU would turn into a fault or a hang.
[[noreturn]] void die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
// Remembers e as the calling thread's last error (cudaGetLastError) and returns it.
cudaError_t record_error(cudaError_t e);
int current_device();
// Where [p, p + n) lives; *device is set for device memory.
MemoryKind memory_kind(const void *p, size_t n, int *device);
// Appends op to stream s (NULL: the current device's null stream); returns its ticket.
uint64_t enqueue(cudaStream_t s, std::function<void()> op);

}  // namespace cudasim
