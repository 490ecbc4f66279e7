// Device code of the per-row CUDA kernels (prologue_cuda.cu has the launchers), apart so
// that tests/cuda_emulation runs the same source on the CPU (see epilogue_kernels.cuh).
#pragma once

#include <cstdint>

#include "../ek_math.h"
#include "ek_cuda_common.cuh"

namespace ek {

constexpr int kRowWarps = 8;  // rows (warps) per block of the B x D kernels

template <typename acc_t>
__global__ void prologue_kernel(const void* x, int x_tag, const void* w, int w_tag, const void* labels, bool labels64,
                                int64_t offset, int64_t ignore_index, int64_t B, int64_t D, int64_t n, void* x_hat,
                                int xh_tag, acc_t* __restrict__ x_inv, int64_t* __restrict__ labels_out,
                                acc_t* __restrict__ kept, acc_t* __restrict__ c_t) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= B) return;  // whole warps leave together
  const int64_t base = i * D;
  acc_t ss = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t v = load_tagged<acc_t>(x, base + d, x_tag);
    ss += v * v;
  }
  const acc_t inv = inv_norm_from_sumsq(warp_sum(ss));
  const int64_t lab = labels64 ? static_cast<const int64_t*>(labels)[i]
                               : static_cast<int64_t>(static_cast<const int32_t*>(labels)[i]);
  const bool ignored = lab == ignore_index;
  const int64_t lab_c = ignored ? -1 : lab;
  const int64_t col = lab_c - offset;
  const bool in_block = col >= 0 && col < n;  // uniform across the warp
  const int64_t wbase = (in_block ? col : 0) * D;
  acc_t dot = 0, ww = 0;
  for (int64_t d = lane; d < D; d += 32) {
    // the rounded x_hat, as the class loop sees it
    const acc_t xh = store_tagged<acc_t>(x_hat, base + d, xh_tag, load_tagged<acc_t>(x, base + d, x_tag) * inv);
    if (in_block) {
      const acc_t wv = load_tagged<acc_t>(w, wbase + d, w_tag);
      dot += xh * wv;
      ww += wv * wv;
    }
  }
  dot = warp_sum(dot);
  ww = warp_sum(ww);
  if (lane == 0) {
    x_inv[i] = inv;
    labels_out[i] = lab_c;
    kept[i] = ignored ? acc_t(0) : acc_t(1);
    c_t[i] = in_block ? dot * inv_norm_from_sumsq(ww) : acc_t(0);
  }
}

template <typename acc_t>
__global__ void margin_terms_kernel(const acc_t* __restrict__ c, int64_t n, int64_t kind, acc_t m1, acc_t m2, acc_t m3,
                                    acc_t s, bool exact, acc_t* __restrict__ logit, acc_t* __restrict__ factor) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) margin_terms<acc_t>(c[i], kind, m1, m2, m3, s, exact, logit[i], factor[i]);
}

template <typename acc_t>
__global__ void normalize_backward_kernel(const void* x, int x_tag, const acc_t* __restrict__ x_inv,
                                          const acc_t* __restrict__ g, void* out, int64_t B, int64_t D) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= B) return;
  const int64_t base = i * D;
  const acc_t inv = x_inv[i];
  acc_t radial = 0;
  for (int64_t d = lane; d < D; d += 32) radial += load_tagged<acc_t>(x, base + d, x_tag) * inv * g[base + d];
  radial = warp_sum(radial);
  if (!(inv < acc_t(kInvNormMax))) radial = 0;  // ||x|| below the floor: a plain scale
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t xh = load_tagged<acc_t>(x, base + d, x_tag) * inv;
    store_tagged<acc_t>(out, base + d, x_tag, (g[base + d] - xh * radial) * inv);
  }
}

}  // namespace ek
