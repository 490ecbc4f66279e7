// CUDA kernels of the per-row ops (ek_prologue.h): a warp per row for the B x D work,
// a thread per row for the margin.  x and W are read through dtype tags (any of the four
// float dtypes, in any combination), so one instantiation per accumulation type serves
// all; the margin math is ek_math.h, shared with the CPU kernels.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../ek_driver.h"  // ek::num
#include "../ek_math.h"
#include "ek_cuda_common.cuh"
#include "prologue_cuda.h"

namespace ek {
namespace {

using at::Tensor;

constexpr int kRowWarps = 8;  // rows (warps) per block of the B x D kernels

template <typename acc_t>
__global__ void prologue_kernel(const void* x, int x_tag, const void* w, int w_tag, const void* labels, bool labels64,
                                int64_t offset, int64_t ignore_index, int64_t B, int64_t D, int64_t n, void* x_hat,
                                acc_t* __restrict__ x_inv, int64_t* __restrict__ labels_out, acc_t* __restrict__ kept,
                                acc_t* __restrict__ c_t) {
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
    const acc_t xh = store_tagged<acc_t>(x_hat, base + d, x_tag, load_tagged<acc_t>(x, base + d, x_tag) * inv);
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

unsigned int grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "expface_kernels: too many rows for one launch: ",
              num(items));
  return static_cast<unsigned int>(blocks);
}

}  // namespace

void prologue_cuda_kernel(const Tensor& x, const Tensor& w, const Tensor& labels, int64_t offset, int64_t ignore_index,
                          const Tensor& x_hat, const Tensor& x_inv, const Tensor& labels_out, const Tensor& kept,
                          const Tensor& c_t) {
  const int64_t B = x.size(0), D = x.size(1), n = w.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool labels64 = labels.scalar_type() == at::kLong;
  const unsigned int grid = grid_for(B, kRowWarps);
  if (x_inv.scalar_type() == at::kDouble) {
    prologue_kernel<double><<<grid, kRowWarps * 32, 0, stream>>>(
        x.const_data_ptr(), float_tag(x.scalar_type()), w.const_data_ptr(), float_tag(w.scalar_type()),
        labels.const_data_ptr(), labels64, offset, ignore_index, B, D, n, x_hat.mutable_data_ptr(),
        x_inv.mutable_data_ptr<double>(), labels_out.mutable_data_ptr<int64_t>(), kept.mutable_data_ptr<double>(),
        c_t.mutable_data_ptr<double>());
  } else {
    prologue_kernel<float><<<grid, kRowWarps * 32, 0, stream>>>(
        x.const_data_ptr(), float_tag(x.scalar_type()), w.const_data_ptr(), float_tag(w.scalar_type()),
        labels.const_data_ptr(), labels64, offset, ignore_index, B, D, n, x_hat.mutable_data_ptr(),
        x_inv.mutable_data_ptr<float>(), labels_out.mutable_data_ptr<int64_t>(), kept.mutable_data_ptr<float>(),
        c_t.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void margin_terms_cuda_kernel(const Tensor& c, int64_t kind, double m1, double m2, double m3, double s, bool exact,
                              const Tensor& logit, const Tensor& factor) {
  const int64_t n = c.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreadsPerBlock = 256;
  const unsigned int grid = grid_for(n, kThreadsPerBlock);
  if (c.scalar_type() == at::kDouble) {
    margin_terms_kernel<double><<<grid, kThreadsPerBlock, 0, stream>>>(
        c.const_data_ptr<double>(), n, kind, m1, m2, m3, s, exact, logit.mutable_data_ptr<double>(),
        factor.mutable_data_ptr<double>());
  } else {
    margin_terms_kernel<float><<<grid, kThreadsPerBlock, 0, stream>>>(
        c.const_data_ptr<float>(), n, kind, static_cast<float>(m1), static_cast<float>(m2), static_cast<float>(m3),
        static_cast<float>(s), exact, logit.mutable_data_ptr<float>(), factor.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void normalize_backward_cuda_kernel(const Tensor& x, const Tensor& x_inv, const Tensor& g, const Tensor& out) {
  const int64_t B = x.size(0), D = x.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int grid = grid_for(B, kRowWarps);
  if (g.scalar_type() == at::kDouble) {
    normalize_backward_kernel<double><<<grid, kRowWarps * 32, 0, stream>>>(
        x.const_data_ptr(), float_tag(x.scalar_type()), x_inv.const_data_ptr<double>(), g.const_data_ptr<double>(),
        out.mutable_data_ptr(), B, D);
  } else {
    normalize_backward_kernel<float><<<grid, kRowWarps * 32, 0, stream>>>(
        x.const_data_ptr(), float_tag(x.scalar_type()), x_inv.const_data_ptr<float>(), g.const_data_ptr<float>(),
        out.mutable_data_ptr(), B, D);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ek
