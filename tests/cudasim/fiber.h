// fiber.h (cudasim): the stackful coroutines that carry the emulator's CUDA threads. On x86-64
// a switch saves the callee-saved registers and the SSE/x87 control words and swaps stacks, with
// no system call (glibc's swapcontext saves the signal mask with one, which made barrier-heavy
// kernels spend most of their time in the kernel); elsewhere ucontext does the same job.
#pragma once
#include <stddef.h>

#if !defined(__x86_64__) || defined(CUDASIM_UCONTEXT)
#include <ucontext.h>
#endif

namespace cudasim {

struct FiberContext {
#if defined(__x86_64__) && !defined(CUDASIM_UCONTEXT)
  void *sp;
#else
  ucontext_t uc;
#endif
};

// Prepares ctx so that the first switch into it runs entry(arg) on [stack, stack + size).
// entry never returns: it ends by switching away for good.
void fiber_make(FiberContext *ctx, char *stack, size_t size, void (*entry)(void *), void *arg);
// Saves the running context into from and resumes to.
void fiber_switch(FiberContext *from, FiberContext *to);

}  // namespace cudasim
