// ek_prologue.cpp -- argument checks and outputs of the per-row ops; see ek_prologue.h.
#include "ek_prologue.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "ek_driver.h"  // ek::num
#include "ek_math.h"    // MarginKind

namespace ek {
namespace {

using at::Tensor;

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_float_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.dim() == 2, "expface_kernels: ", name, " must be a 2-D tensor, got ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(is_float(t.scalar_type()), "expface_kernels: ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "expface_kernels: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

at::ScalarType acc_of(const Tensor& a, const Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prologue_impl(const PrologueOps& ops, const Tensor& x,
                                                                 const Tensor& w, const Tensor& labels,
                                                                 int64_t offset, int64_t ignore_index,
                                                                 std::optional<at::ScalarType> x_hat_dtype) {
  check_float_matrix(x, "x");
  check_float_matrix(w, "w");
  check_same_device(w, "w", x, "x");
  check_same_device(labels, "labels", x, "x");
  TORCH_CHECK(w.size(1) == x.size(1), "expface_kernels: w must have shape (C_local, D) with D = x.size(1) = ",
              num(x.size(1)), ", got w of shape ", w.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "expface_kernels: labels must have shape (B,) = (",
              num(x.size(0)), ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "expface_kernels: labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(offset >= 0, "expface_kernels: offset must be >= 0, got ", num(offset));
  const at::ScalarType xh_dtype = x_hat_dtype.value_or(x.scalar_type());
  TORCH_CHECK(is_float(xh_dtype), "expface_kernels: x_hat_dtype must be float16, bfloat16, float32 or float64, got ",
              xh_dtype);
  const int64_t B = x.size(0), D = x.size(1);
  const auto acc = x.options().dtype(acc_of(x, w));
  Tensor x_hat = at::empty({B, D}, x.options().dtype(xh_dtype));
  Tensor x_inv = at::empty({B}, acc);
  Tensor labels_out = at::empty({B}, x.options().dtype(at::kLong));
  Tensor kept = at::empty({B}, acc);
  Tensor c_t = at::empty({B}, acc);
  if (B > 0) {
    ops.prologue(x.contiguous(), w.contiguous(), labels.contiguous(), offset, ignore_index, x_hat, x_inv, labels_out,
                 kept, c_t);
  }
  return {x_hat, x_inv, labels_out, kept, c_t};
}

std::tuple<Tensor, Tensor> margin_terms_impl(const PrologueOps& ops, const Tensor& c_t, int64_t margin, double m1,
                                             double m2, double m3, double s, bool exact) {
  TORCH_CHECK(c_t.defined() && c_t.dim() == 1, "expface_kernels: c_t must be 1-D (B,)");
  TORCH_CHECK(c_t.scalar_type() == at::kFloat || c_t.scalar_type() == at::kDouble,
              "expface_kernels: c_t must be float32 or float64, got ", c_t.scalar_type());
  TORCH_CHECK(margin >= kMarginNone && margin <= kCombined, "expface_kernels: margin must be a code in [0, 5] "
              "(none, cosface, arcface, expface, sphereface, combined), got ", num(margin));
  TORCH_CHECK(std::isfinite(s) && s > 0, "expface_kernels: s must be a finite positive scale, got ", num(s));
  TORCH_CHECK(std::isfinite(m1) && std::isfinite(m2) && std::isfinite(m3),
              "expface_kernels: the margin parameters must be finite, got (", num(m1), ", ", num(m2), ", ", num(m3),
              ")");
  Tensor c = c_t.contiguous();
  Tensor logit = at::empty_like(c);
  Tensor factor = at::empty_like(c);
  if (c.numel() > 0) ops.margin_terms(c, margin, m1, m2, m3, s, exact, logit, factor);
  return {logit, factor};
}

Tensor normalize_backward_impl(const PrologueOps& ops, const Tensor& x, const Tensor& x_inv,
                               const Tensor& grad_x_hat) {
  check_float_matrix(x, "x");
  check_float_matrix(grad_x_hat, "grad_x_hat");
  check_same_device(x_inv, "x_inv", x, "x");
  check_same_device(grad_x_hat, "grad_x_hat", x, "x");
  TORCH_CHECK(grad_x_hat.sizes() == x.sizes(), "expface_kernels: grad_x_hat must have x's shape ", x.sizes(),
              ", got ", grad_x_hat.sizes());
  const auto acc = grad_x_hat.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "expface_kernels: grad_x_hat must be float32 or float64, got ",
              acc);
  TORCH_CHECK(x_inv.dim() == 1 && x_inv.size(0) == x.size(0) && x_inv.scalar_type() == acc,
              "expface_kernels: x_inv must have shape (B,) = (", num(x.size(0)), ",) and grad_x_hat's dtype ", acc,
              ", got ", x_inv.sizes(), " ", x_inv.scalar_type());
  Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() > 0) ops.normalize_backward(x.contiguous(), x_inv.contiguous(), grad_x_hat.contiguous(), out);
  return out;
}

}  // namespace ek
