// Host launchers of the per-row CUDA kernels (prologue_cuda.cu); semantics: PrologueOps in ek_prologue.h.
#pragma once

#include <ATen/core/Tensor.h>

namespace ek {

void prologue_cuda_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t offset,
                          int64_t ignore_index, const at::Tensor& x_hat, const at::Tensor& x_inv,
                          const at::Tensor& labels_out, const at::Tensor& kept, const at::Tensor& c_t);
void margin_terms_cuda_kernel(const at::Tensor& c, int64_t kind, double m1, double m2, double m3, double s, bool exact,
                              const at::Tensor& logit, const at::Tensor& factor);
void normalize_backward_cuda_kernel(const at::Tensor& x, const at::Tensor& x_inv, const at::Tensor& g,
                                    const at::Tensor& out);

}  // namespace ek
