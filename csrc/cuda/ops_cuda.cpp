// CUDA registrations of the expface_kernels ops: the device-agnostic driver
// (ek_driver.cpp) with the CUDA epilogues of epilogue_cuda.cu.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ek_driver.h"
#include "../ek_prologue.h"
#include "epilogue_cuda.h"
#include "prologue_cuda.h"

namespace ek {
namespace {

using at::Tensor;

// The dispatcher picks this kernel when ANY argument is a CUDA tensor; guard the
// device of a CUDA one and let the driver report a device mismatch by name.
inline c10::Device cuda_device(const Tensor& x_hat, const Tensor& w) {
  return x_hat.is_cuda() ? x_hat.device() : w.is_cuda() ? w.device() : c10::Device(c10::kCUDA, 0);
}

const EpilogueOps kCudaOps{row_inv_norm_cuda, lse_block_cuda,    grads_block_cuda,   fused_rows_cuda,
                           project_rows_cuda, normalize_rows_cuda, "CUDA"};

std::tuple<Tensor, Tensor, Tensor> lse_partials_cuda(const Tensor& x_hat, const Tensor& w, const Tensor& target_logit,
                                                     const Tensor& labels, double s, int64_t offset,
                                                     int64_t block_bytes) {
  const c10::cuda::CUDAGuard guard(cuda_device(x_hat, w));
  return lse_partials_impl(kCudaOps, x_hat, w, target_logit, labels, s, offset, block_bytes);
}

std::tuple<Tensor, Tensor> grads_cuda(const Tensor& x_hat, const Tensor& w, const Tensor& w_inv_norm,
                                      const Tensor& labels, const Tensor& lse, const Tensor& target_grad,
                                      const Tensor& grad_row, double s, int64_t offset, int64_t block_bytes) {
  const c10::cuda::CUDAGuard guard(cuda_device(x_hat, w));
  return grads_impl(kCudaOps, x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row, s, offset, block_bytes);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_forward_grads_cuda(const Tensor& x_hat, const Tensor& w,
                                                                    const Tensor& target_logit,
                                                                    const Tensor& target_factor, const Tensor& labels,
                                                                    const Tensor& grad_row, double s,
                                                                    int64_t block_bytes) {
  const c10::cuda::CUDAGuard guard(cuda_device(x_hat, w));
  return fused_forward_grads_impl(kCudaOps, x_hat, w, target_logit, target_factor, labels, grad_row, s, block_bytes);
}

const PrologueOps kCudaPrologueOps{prologue_cuda_kernel, margin_terms_cuda_kernel, normalize_backward_cuda_kernel};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prologue_cuda(const Tensor& x, const Tensor& w,
                                                                 const Tensor& labels, int64_t offset,
                                                                 int64_t ignore_index,
                                                                 std::optional<at::ScalarType> x_hat_dtype) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, w));
  return prologue_impl(kCudaPrologueOps, x, w, labels, offset, ignore_index, x_hat_dtype);
}

std::tuple<Tensor, Tensor> margin_terms_cuda(const Tensor& c_t, int64_t margin, double m1, double m2, double m3,
                                             double s, bool exact) {
  const c10::cuda::CUDAGuard guard(c_t.device());
  return margin_terms_impl(kCudaPrologueOps, c_t, margin, m1, m2, m3, s, exact);
}

Tensor normalize_backward_cuda(const Tensor& x, const Tensor& x_inv, const Tensor& grad_x_hat) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, grad_x_hat));
  return normalize_backward_impl(kCudaPrologueOps, x, x_inv, grad_x_hat);
}

}  // namespace
}  // namespace ek

TORCH_LIBRARY_IMPL(expface_kernels, CUDA, m) {
  m.impl("prologue", &ek::prologue_cuda);
  m.impl("margin_terms", &ek::margin_terms_cuda);
  m.impl("normalize_backward", &ek::normalize_backward_cuda);
  m.impl("lse_partials", &ek::lse_partials_cuda);
  m.impl("grads", &ek::grads_cuda);
  m.impl("fused_forward_grads", &ek::fused_forward_grads_cuda);
}
