// ek_prologue.h -- the per-row ops around the class loop, device-agnostic part.
//
// The class loop (ek_driver) is B x C work; around it the loss does B x D and B-sized
// work that, written as PyTorch ops, was ~50 small ops per forward (normalise x, clean
// the labels, gather the target centre, the margin's acos/pow/cos/sin, ...) and ~10
// per backward.  On a GPU each costs its launch and dispatch on the host, and the GPU
// idled through them: ~1.7 ms before the first GEMM of a 9 ms step (H200, B=512,
// C=2^20, bf16; bench/RESULTS.md).  These three ops do that work in one kernel each:
//
//   prologue(x, w, labels, offset, ignore_index, x_hat_dtype = x.dtype)
//       -> x_hat (B, D)           x / max(||x||, 1e-12), rounded to x_hat_dtype (the class
//                                 loop's operand: x's dtype, or autocast's, see
//                                 expface_kernels/function.py autocast_operand_dtype)
//          x_inv (B,) acc         1 / max(||x||, 1e-12)
//          labels_out (B,) int64  labels, -1 where labels == ignore_index
//          kept (B,) acc          0 where labels == ignore_index, else 1
//          c_t (B,) acc           x_hat_i . W_col / max(||W_col||, 1e-12) with
//                                 col = labels_out_i - offset when it lies in [0, C_local),
//                                 else 0 (another rank's class, or an ignored row)
//   margin_terms(c_t, margin, m1, m2, m3, s, exact) -> target_logit, target_factor (B,)
//       s * psi(c_t) and dz/dc (ek_math.h margin_terms; margin codes: MarginKind)
//   normalize_backward(x, x_inv, grad_x_hat) -> grad_x (B, D) x.dtype
//       (g - x_hat (x_hat . g)) * x_inv, or g * x_inv where x_inv >= 1e12 (F.normalize's
//       backward; x_hat = x * x_inv unrounded, in acc)
//
// "acc" is float64 when x or w (c_t, grad_x_hat) is float64, else float32.  Every
// dtype on both devices (these are memory-light: B x D).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace ek {

struct PrologueOps {
  // Outputs allocated by the caller with the shapes / dtypes above; inputs contiguous.
  void (*prologue)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t offset,
                   int64_t ignore_index, const at::Tensor& x_hat, const at::Tensor& x_inv,
                   const at::Tensor& labels_out, const at::Tensor& kept, const at::Tensor& c_t);
  void (*margin_terms)(const at::Tensor& c, int64_t kind, double m1, double m2, double m3, double s, bool exact,
                       const at::Tensor& logit, const at::Tensor& factor);
  void (*normalize_backward)(const at::Tensor& x, const at::Tensor& x_inv, const at::Tensor& g,
                             const at::Tensor& out);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prologue_impl(
    const PrologueOps& ops, const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t offset,
    int64_t ignore_index, std::optional<at::ScalarType> x_hat_dtype);

std::tuple<at::Tensor, at::Tensor> margin_terms_impl(const PrologueOps& ops, const at::Tensor& c_t, int64_t margin,
                                                     double m1, double m2, double m3, double s, bool exact);

at::Tensor normalize_backward_impl(const PrologueOps& ops, const at::Tensor& x, const at::Tensor& x_inv,
                                   const at::Tensor& grad_x_hat);

}  // namespace ek
