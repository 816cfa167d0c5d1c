// fiber.cc (cudasim): context switching for fiber.h.
#include "fiber.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && !defined(CUDASIM_UCONTEXT)

// cudasim_fiber_switch(void **save_sp, void *load_sp): push the callee-saved registers and the
// MXCSR / x87 control words, save rsp, load the other stack, pop the same frame, return into it.
// cudasim_fiber_start: where a new fiber's first switch returns to; calls entry(arg) (r13, r12).
__asm__(".text\n"
        ".p2align 4\n"
        ".hidden cudasim_fiber_switch\n"
        ".globl cudasim_fiber_switch\n"
        ".type cudasim_fiber_switch,@function\n"
        "cudasim_fiber_switch:\n"
        "  pushq %rbp\n"
        "  pushq %rbx\n"
        "  pushq %r12\n"
        "  pushq %r13\n"
        "  pushq %r14\n"
        "  pushq %r15\n"
        "  subq $8, %rsp\n"
        "  stmxcsr (%rsp)\n"
        "  fnstcw 4(%rsp)\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  ldmxcsr (%rsp)\n"
        "  fldcw 4(%rsp)\n"
        "  addq $8, %rsp\n"
        "  popq %r15\n"
        "  popq %r14\n"
        "  popq %r13\n"
        "  popq %r12\n"
        "  popq %rbx\n"
        "  popq %rbp\n"
        "  ret\n"
        ".size cudasim_fiber_switch,.-cudasim_fiber_switch\n"
        ".p2align 4\n"
        ".hidden cudasim_fiber_start\n"
        ".globl cudasim_fiber_start\n"
        ".type cudasim_fiber_start,@function\n"
        "cudasim_fiber_start:\n"
        "  movq %r12, %rdi\n"
        "  callq *%r13\n"
        "  ud2\n"
        ".size cudasim_fiber_start,.-cudasim_fiber_start\n");

extern "C" void cudasim_fiber_switch(void **save_sp, void *load_sp);
extern "C" void cudasim_fiber_start(void);

namespace cudasim {

void fiber_make(FiberContext *ctx, char *stack, size_t size, void (*entry)(void *), void *arg) {
  // After the first switch pops its frame and returns, rsp must be 16-byte aligned so that the
  // call in cudasim_fiber_start enters entry with the alignment the ABI promises.
  uintptr_t top = ((uintptr_t)(stack + size) & ~(uintptr_t)15) - 16;
  uint64_t *frame = (uint64_t *)(top - 8 * 8);
  uint32_t mxcsr = 0x1f80;                        // defaults: round to nearest, exceptions masked
  uint16_t fpucw = 0x037f;
  memset(frame, 0, 8 * 8);
  memcpy(&frame[0], &mxcsr, sizeof mxcsr);
  memcpy((char *)&frame[0] + 4, &fpucw, sizeof fpucw);
  frame[3] = (uint64_t)(uintptr_t)entry;          // r13
  frame[4] = (uint64_t)(uintptr_t)arg;            // r12
  frame[7] = (uint64_t)(uintptr_t)cudasim_fiber_start;
  ctx->sp = frame;
}

void fiber_switch(FiberContext *from, FiberContext *to) { cudasim_fiber_switch(&from->sp, to->sp); }

}  // namespace cudasim

#else

namespace cudasim {

// makecontext passes only ints: the entry and its argument travel as 32-bit halves.
static void start(unsigned eh, unsigned el, unsigned ah, unsigned al) {
  void (*entry)(void *) = (void (*)(void *))(((uintptr_t)eh << 32) | el);
  entry((void *)(((uintptr_t)ah << 32) | al));
}

void fiber_make(FiberContext *ctx, char *stack, size_t size, void (*entry)(void *), void *arg) {
  uint64_t e = (uint64_t)(uintptr_t)entry, a = (uint64_t)(uintptr_t)arg;
  getcontext(&ctx->uc);
  ctx->uc.uc_stack.ss_sp = stack;
  ctx->uc.uc_stack.ss_size = size;
  ctx->uc.uc_link = NULL;
  makecontext(&ctx->uc, (void (*)())start, 4, (unsigned)(e >> 32), (unsigned)e, (unsigned)(a >> 32), (unsigned)a);
}

void fiber_switch(FiberContext *from, FiberContext *to) { swapcontext(&from->uc, &to->uc); }

}  // namespace cudasim

#endif
