// ek_driver.h -- the device-agnostic driver of the expface_kernels extension.
//
// The three ops are written once, in ATen: a loop over blocks, one GEMM per block
// (at::mm -> MKL/oneDNN on CPU, cuBLAS on CUDA) into a bounded logits buffer, ONE
// fused epilogue per block (a device-specific kernel behind the EpilogueOps table
// below), then the gradient GEMMs.  csrc/cpu/ and csrc/cuda/ only provide the
// epilogues and register the driver under their dispatch key.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdio>
#include <string>
#include <tuple>

namespace ek {

// Numbers for error messages, formatted with snprintf rather than std::ostream: on the
// H200 machine's image (torch 2.11, 2026-11-28) ostream's integer insertion called from
// this library crashed inside the locale's num_put facet (cuda-gdb backtrace through
// c10::str in a TORCH_CHECK); const char* insertion worked. Root cause not found.
inline std::string num(long long v) {
  char b[32];
  std::snprintf(b, sizeof b, "%lld", v);
  return b;
}
inline std::string num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}
inline std::string num(int64_t v) { return num(static_cast<long long>(v)); }

// Device-specific epilogues.  Conventions for all of them:
//   L        (rows, n) contiguous logits x_hat @ W_blk^T in the compute dtype
//            (float/double/half/bfloat16); row stride n.
//   winv     (n,) acc dtype (float, or double when computing in double).
//   labels   (rows,) int64 GLOBAL labels; the target column of row i inside this
//            block is labels[i] - col0, used only when it lies in [0, n).
//   per-row vectors (rows,) acc dtype.
struct EpilogueOps {
  // winv[j] = 1 / max(||w[j]||, 1e-12) for w (n, D) in any float dtype; fp32 (acc) sums.
  void (*row_inv_norm)(const at::Tensor& w, const at::Tensor& winv);
  // Online (max, sumexp) of the block's logits z (target substituted), merged into
  // the running row_max / row_sumexp.
  void (*lse_block)(const at::Tensor& L, const at::Tensor& winv, const at::Tensor& target_logit,
                    const at::Tensor& labels, double s, int64_t col0, const at::Tensor& row_max,
                    const at::Tensor& row_sumexp);
  // In place: L_ij <- G_ij * winv_j (target column: target_grad_i * winv_j; rows with
  // grad_row == 0: zeros).
  void (*grads_block)(const at::Tensor& L, const at::Tensor& winv, const at::Tensor& labels,
                      const at::Tensor& lse, const at::Tensor& target_grad, const at::Tensor& grad_row,
                      double s, int64_t col0);
  // Fused (rows against ALL classes, col0 = 0), in place, exp evaluated once per logit:
  //   lse_i = m_i + log S_i;  row_scale_i = grad_row_i * s / S_i;
  //   tgrad_i = grad_row_i * target_factor_i * expm1(target_logit_i - lse_i)  (0 if no target),
  //   L_ij <- exp(z_ij - m_i) * winv_j   off the target column,
  //   L_iy <- tgrad_i * winv_y / row_scale_i   at the target column,
  //   rows with grad_row == 0: all zeros (row_scale = tgrad = 0).
  // So G_ij * winv_j = row_scale_i * L_ij everywhere: both gradient GEMMs take L as is,
  // the row scale goes onto the (r, D) operand/result.  The target value is formed in acc
  // precision from expm1 (no cancellation) and rounded once, like every other operand.
  void (*fused_rows)(const at::Tensor& L, const at::Tensor& winv, const at::Tensor& target_logit,
                     const at::Tensor& target_factor, const at::Tensor& labels, const at::Tensor& grad_row,
                     double s, const at::Tensor& lse, const at::Tensor& row_scale, const at::Tensor& tgrad);
  // gs (n, D) holding gs_j = winv_j * g_j (scale_rows false) or g_j (true: the product of
  // normalised rows, G without winv), in the acc dtype or the GEMMs' 16-bit dtype;
  // out (n, D) in the acc dtype or w's (may be gs itself: in place); fp32/fp64 math,
  // rounded once into out:
  //   out_j <- a_j (gs_j - w_hat_j (w_hat_j . gs_j)),  a_j = winv_j if scale_rows else 1,
  // the projection where winv_j <= 1e12 (F.normalize's backward).
  void (*project_rows)(const at::Tensor& gs, const at::Tensor& w, const at::Tensor& winv, const at::Tensor& out,
                       bool scale_rows);
  // out_j <- w_j * winv_j (n, D), product in fp32 rounded once into out's dtype (fp16):
  // the normalised rows the fp16 GEMMs take (ek_driver.cpp gemm_operand).
  void (*normalize_rows)(const at::Tensor& w, const at::Tensor& winv, const at::Tensor& out);
  // Device name for messages ("CPU" / "CUDA").
  const char* device_name;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_partials_impl(
    const EpilogueOps& ops, const at::Tensor& x_hat, const at::Tensor& w, const at::Tensor& target_logit,
    const at::Tensor& labels, double s, int64_t offset, int64_t block_bytes);

std::tuple<at::Tensor, at::Tensor> grads_impl(
    const EpilogueOps& ops, const at::Tensor& x_hat, const at::Tensor& w, const at::Tensor& w_inv_norm,
    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& target_grad, const at::Tensor& grad_row,
    double s, int64_t offset, int64_t block_bytes);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_forward_grads_impl(
    const EpilogueOps& ops, const at::Tensor& x_hat, const at::Tensor& w, const at::Tensor& target_logit,
    const at::Tensor& target_factor, const at::Tensor& labels, const at::Tensor& grad_row, double s,
    int64_t block_bytes);

}  // namespace ek
