// grid.cc (cudasim): runs a kernel grid on the CPU. Blocks run one after another on the stream's
// worker thread; inside a block every CUDA thread is a fiber (fiber.h) that runs until it ends
// or reaches a barrier: __syncthreads waits for every live thread of the block, a shuffle for
// every live lane of its warp. The scheduler releases a barrier once all its threads are at it
// and reports what a GPU would turn into a hang or garbage: divergent barriers, and shuffles
// whose mask names lanes that exited or do not exist.
#include "cudasim_internal.h"
#include "fiber.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <vector>

namespace cudasim {

thread_local ThreadCtx *tls_ctx;

namespace {

enum class State { runnable, at_block_barrier, at_warp_barrier, done };

struct Fiber {
  FiberContext fc;
  ThreadCtx ctx;
  State state;
  int warp, lane;
  unsigned mask;   // of the shuffle it waits in
};

struct Block {
  const char *kernel;
  const std::function<void()> *body;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> slots;   // 32 exchange slots per warp
  int nwarps;
  FiberContext sched;
};

constexpr size_t kStackBytes = 256 << 10;

thread_local Block *tls_block;
thread_local Fiber *tls_fiber;
thread_local char *tls_stacks;       // kStackBytes per thread of the largest block so far
thread_local size_t tls_nstacks;

void fiber_main(void *arg) {
  Fiber *f = (Fiber *)arg;
  (*tls_block->body)();
  f->state = State::done;
  fiber_switch(&f->fc, &tls_block->sched);   // never resumed
}

void yield_to_scheduler() { fiber_switch(&tls_fiber->fc, &tls_block->sched); }

char *stack_of(size_t i) {
  if (i >= tls_nstacks) {
    if (tls_stacks) munmap(tls_stacks, tls_nstacks * kStackBytes);
    tls_nstacks = 1024;
    void *p = mmap(NULL, tls_nstacks * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) die("cannot map fiber stacks");
    tls_stacks = (char *)p;
  }
  return tls_stacks + i * kStackBytes;
}

const char *state_name(State s) {
  switch (s) {
  case State::runnable: return "running";
  case State::at_block_barrier: return "in __syncthreads";
  case State::at_warp_barrier: return "in a warp shuffle";
  case State::done: return "exited";
  }
  return "?";
}

// Releases warp w when all its live lanes wait in a shuffle; checks the masks they passed.
bool release_warp(Block &b, int w) {
  int first = w * 32, last = std::min<int>(first + 32, (int)b.fibers.size());
  int live = 0, waiting = 0;
  for (int i = first; i < last; i++) {
    if (b.fibers[i].state != State::done) live++;
    if (b.fibers[i].state == State::at_warp_barrier) waiting++;
  }
  if (waiting == 0 || waiting != live) return false;
  for (int i = first; i < last; i++) {
    const Fiber &f = b.fibers[i];
    if (f.state != State::at_warp_barrier) continue;
    for (int lane = 0; lane < 32; lane++) {
      if (!(f.mask >> lane & 1u)) continue;
      if (first + lane >= last)
        die("%s: block (%u,%u,%u) thread %d shuffles with mask 0x%08x, but lane %d does not exist (block of %zu threads)",
            b.kernel, f.ctx.block_idx.x, f.ctx.block_idx.y, f.ctx.block_idx.z, i, f.mask, lane, b.fibers.size());
      if (b.fibers[first + lane].state != State::at_warp_barrier)
        die("%s: block (%u,%u,%u) thread %d shuffles with mask 0x%08x, but lane %d has exited", b.kernel,
            f.ctx.block_idx.x, f.ctx.block_idx.y, f.ctx.block_idx.z, i, f.mask, lane);
    }
  }
  for (int i = first; i < last; i++)
    if (b.fibers[i].state == State::at_warp_barrier) b.fibers[i].state = State::runnable;
  return true;
}

// The order runnable threads run in between two barriers (MOONLOAD_CUDASIM_THREAD_ORDER):
// forward (thread 0 first), reverse, or random (a fixed-seed shuffle each time). A GPU promises
// none, so a kernel that reads shared memory another thread writes without a barrier between
// gives a different result in one of them.
enum class Order { forward, reverse, random };

Order thread_order() {   // read per block, so a test can change it between launches
  const char *v = getenv("MOONLOAD_CUDASIM_THREAD_ORDER");
  if (!v || !*v || !strcmp(v, "forward")) return Order::forward;
  if (!strcmp(v, "reverse")) return Order::reverse;
  if (!strcmp(v, "random")) return Order::random;
  die("MOONLOAD_CUDASIM_THREAD_ORDER must be forward, reverse or random, got \"%s\"", v);
}

// Fills order with 0..n-1 in thread order o.
void phase_order(std::vector<size_t> &order, size_t n, Order o) {
  thread_local uint64_t rng = 0x9E3779B97F4A7C15ull;
  order.resize(n);
  for (size_t i = 0; i < n; i++) order[i] = o == Order::reverse ? n - 1 - i : i;
  if (o == Order::random)
    for (size_t i = n; i > 1; i--) {   // Fisher-Yates with xorshift64
      rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
      std::swap(order[i - 1], order[rng % i]);
    }
}

void run_block(Block &b) {
  for (size_t i = 0; i < b.fibers.size(); i++) {
    Fiber &f = b.fibers[i];
    f.state = State::runnable;
    fiber_make(&f.fc, stack_of(i), kStackBytes, fiber_main, &f);
  }
  thread_local std::vector<size_t> order;
  Order o = thread_order();
  for (;;) {
    phase_order(order, b.fibers.size(), o);
    for (size_t i : order) {
      Fiber &f = b.fibers[i];
      if (f.state != State::runnable) continue;
      tls_fiber = &f;
      tls_ctx = &f.ctx;
      fiber_switch(&b.sched, &f.fc);
    }
    // Every thread has exited or waits at a barrier.
    bool released = false;
    for (int w = 0; w < b.nwarps; w++) released |= release_warp(b, w);
    if (released) continue;
    int live = 0, at_block = 0;
    for (const Fiber &f : b.fibers) {
      live += f.state != State::done;
      at_block += f.state == State::at_block_barrier;
    }
    if (live == 0) return;
    if (at_block != live) {
      const Fiber &f0 = b.fibers[0];
      for (size_t i = 0; i < b.fibers.size(); i++)
        if (b.fibers[i].state != b.fibers[0].state)
          die("%s: block (%u,%u,%u) deadlocks: thread 0 is %s while thread %zu is %s", b.kernel, f0.ctx.block_idx.x,
              f0.ctx.block_idx.y, f0.ctx.block_idx.z, state_name(f0.state), i, state_name(b.fibers[i].state));
      die("%s: block deadlocks", b.kernel);
    }
    for (Fiber &f : b.fibers)
      if (f.state == State::at_block_barrier) f.state = State::runnable;
  }
}

void run_grid(const char *kernel, dim3 grid, dim3 block, const std::function<void()> &body) {
  Block b;
  b.kernel = kernel;
  b.body = &body;
  size_t n = (size_t)block.x * block.y * block.z;
  b.fibers.resize(n);
  b.nwarps = (int)((n + 31) / 32);
  b.slots.assign((size_t)b.nwarps * 32, 0);
  for (size_t i = 0; i < n; i++) {
    Fiber &f = b.fibers[i];
    f.ctx.thread_idx = uint3{(unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                             (unsigned)(i / ((size_t)block.x * block.y))};
    f.ctx.block_dim = block;
    f.ctx.grid_dim = grid;
    f.warp = (int)(i / 32);
    f.lane = (int)(i % 32);
  }
  Block *outer = tls_block;
  tls_block = &b;
  for (unsigned z = 0; z < grid.z; z++)
    for (unsigned y = 0; y < grid.y; y++)
      for (unsigned x = 0; x < grid.x; x++) {
        for (Fiber &f : b.fibers) f.ctx.block_idx = uint3{x, y, z};
        run_block(b);
      }
  tls_block = outer;
  tls_ctx = NULL;
}

}  // namespace

void syncthreads() {
  tls_fiber->state = State::at_block_barrier;
  yield_to_scheduler();
}

int lane_id() { return tls_fiber->lane; }

void warp_exchange(const void *in, void *out, size_t n, int src_lane, unsigned mask) {
  Block &b = *tls_block;
  Fiber &f = *tls_fiber;
  if (!(mask >> f.lane & 1u))
    die("%s: lane %d shuffles with mask 0x%08x, which leaves the lane itself out", b.kernel, f.lane, mask);
  if (src_lane != f.lane && !(mask >> src_lane & 1u))
    die("%s: lane %d reads lane %d, outside the shuffle mask 0x%08x", b.kernel, f.lane, src_lane, mask);
  uint64_t *slots = &b.slots[(size_t)f.warp * 32];
  memcpy(&slots[f.lane], in, n);
  f.mask = mask;
  f.state = State::at_warp_barrier;   // every lane has written its slot ...
  yield_to_scheduler();
  memcpy(out, &slots[src_lane], n);
  f.state = State::at_warp_barrier;   // ... and read before any slot is written again
  yield_to_scheduler();
}

void launch_grid(const char *kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t s, std::function<void()> body) {
  unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  bool ok = threads >= 1 && threads <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 && grid.x >= 1 &&
            grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535 &&
            smem <= 48 * 1024;
  if (!ok) {
    record_error(cudaErrorInvalidConfiguration);
    return;
  }
  enqueue(s, [kernel, grid, block, body] { run_grid(kernel, grid, block, body); });
}

}  // namespace cudasim
