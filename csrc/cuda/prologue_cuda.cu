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
#include "prologue_kernels.cuh"

namespace ek {
namespace {

using at::Tensor;

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
        float_tag(x_hat.scalar_type()), x_inv.mutable_data_ptr<double>(), labels_out.mutable_data_ptr<int64_t>(),
        kept.mutable_data_ptr<double>(), c_t.mutable_data_ptr<double>());
  } else {
    prologue_kernel<float><<<grid, kRowWarps * 32, 0, stream>>>(
        x.const_data_ptr(), float_tag(x.scalar_type()), w.const_data_ptr(), float_tag(w.scalar_type()),
        labels.const_data_ptr(), labels64, offset, ignore_index, B, D, n, x_hat.mutable_data_ptr(),
        float_tag(x_hat.scalar_type()), x_inv.mutable_data_ptr<float>(), labels_out.mutable_data_ptr<int64_t>(),
        kept.mutable_data_ptr<float>(), c_t.mutable_data_ptr<float>());
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
