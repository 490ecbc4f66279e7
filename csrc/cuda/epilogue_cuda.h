// Host launchers of the CUDA epilogues (epilogue_cuda.cu); semantics: EpilogueOps in ek_driver.h.
#pragma once

#include <ATen/core/Tensor.h>

namespace ek {

void row_inv_norm_cuda(const at::Tensor& w, const at::Tensor& winv);
void lse_block_cuda(const at::Tensor& L, const at::Tensor& winv, const at::Tensor& target_logit,
                    const at::Tensor& labels, double s, int64_t col0, const at::Tensor& row_max,
                    const at::Tensor& row_sumexp);
void grads_block_cuda(const at::Tensor& L, const at::Tensor& winv, const at::Tensor& labels, const at::Tensor& lse,
                      const at::Tensor& target_grad, const at::Tensor& grad_row, double s, int64_t col0);
void fused_rows_cuda(const at::Tensor& L, const at::Tensor& winv, const at::Tensor& target_logit,
                     const at::Tensor& target_factor, const at::Tensor& labels, const at::Tensor& grad_row, double s,
                     const at::Tensor& lse, const at::Tensor& row_scale, const at::Tensor& tgrad);
void normalize_rows_cuda(const at::Tensor& w, const at::Tensor& winv, const at::Tensor& out);
void project_rows_cuda(const at::Tensor& gs, const at::Tensor& w, const at::Tensor& winv, const at::Tensor& out,
                       bool scale_rows);

}  // namespace ek
