// cuda_emu.h -- a CPU stand-in for the part of the CUDA execution model the extension's
// kernels use, so that tests run their unchanged source (csrc/cuda/*_kernels.cuh) on a
// machine without a GPU (CI): one std::thread per CUDA thread of a block, the blocks of
// a grid one after another; __syncthreads is a barrier of the block's threads; a warp
// shuffle writes the lane's value to a per-warp buffer, waits for the warp, reads its
// partner's, and waits again. Include before the kernel headers. Not a simulator of
// timing, memory spaces or divergence: a kernel whose threads leave a barrier's group
// early (other than whole warps after the last block barrier) would hang here.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared by every thread of the block: a function-local static (blocks run one at a time).
#define __shared__ static

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

namespace cuda_emu {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

struct Block {
  explicit Block(int threads) : barrier(threads), xbuf((threads + 31) / 32) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new Barrier(32));
  }
  ~Block() {
    for (Barrier* b : warps) delete b;
  }
  Barrier barrier;
  std::vector<Barrier*> warps;
  std::vector<std::array<double, 32>> xbuf;  // float and double values are exact in a double
};

struct Dim {
  unsigned int x;
};

inline thread_local Dim thread_idx{0}, block_idx{0}, block_dim{0};
inline thread_local Block* block = nullptr;

// Runs call() as every thread of every block of a 1-D grid.
template <typename F>
void launch(unsigned int grid, unsigned int threads, F&& call) {
  for (unsigned int b = 0; b < grid; ++b) {
    Block blk(static_cast<int>(threads));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_idx.x = t;
        block_idx.x = b;
        block_dim.x = threads;
        block = &blk;
        call();
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace cuda_emu

#define threadIdx (cuda_emu::thread_idx)
#define blockIdx (cuda_emu::block_idx)
#define blockDim (cuda_emu::block_dim)

inline void __syncthreads() { cuda_emu::block->barrier.wait(); }

template <typename T>
T __shfl_xor_sync(unsigned int /*mask: every lane takes part in these kernels*/, T v, int lane_mask) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto& buf = cuda_emu::block->xbuf[warp];
  buf[lane] = static_cast<double>(v);
  cuda_emu::block->warps[warp]->wait();
  const T r = static_cast<T>(buf[lane ^ lane_mask]);
  cuda_emu::block->warps[warp]->wait();
  return r;
}
