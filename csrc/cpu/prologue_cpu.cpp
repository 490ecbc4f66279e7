// CPU kernels of the per-row ops (ek_prologue.h) and their CPU registrations: one
// at::parallel_for over rows; the margin math is ek_math.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "../ek_math.h"
#include "../ek_prologue.h"

namespace ek {
namespace {

using at::Tensor;

// Rows per parallel_for grain: the work per row is O(D), tiny next to a task's overhead.
constexpr int64_t kRowGrain = 64;

template <typename x_t, typename xh_t, typename w_t, typename label_t>
void prologue_rows(const Tensor& x, const Tensor& w, const Tensor& labels, int64_t offset, int64_t ignore_index,
                   const Tensor& x_hat, const Tensor& x_inv, const Tensor& labels_out, const Tensor& kept,
                   const Tensor& c_t) {
  using acc_t = std::conditional_t<std::is_same_v<x_t, double> || std::is_same_v<w_t, double>, double, float>;
  const int64_t B = x.size(0), D = x.size(1), n = w.size(0);
  const x_t* X = x.const_data_ptr<x_t>();
  const w_t* W = w.const_data_ptr<w_t>();
  const label_t* Y = labels.const_data_ptr<label_t>();
  xh_t* XH = x_hat.mutable_data_ptr<xh_t>();
  acc_t* XI = x_inv.mutable_data_ptr<acc_t>();
  int64_t* YO = labels_out.mutable_data_ptr<int64_t>();
  acc_t* K = kept.mutable_data_ptr<acc_t>();
  acc_t* CT = c_t.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const x_t* xi = X + i * D;
      acc_t ss = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t v = static_cast<acc_t>(xi[d]);
        ss += v * v;
      }
      const acc_t inv = inv_norm_from_sumsq(ss);
      const int64_t lab = static_cast<int64_t>(Y[i]);
      const bool ignored = lab == ignore_index;
      const int64_t lab_c = ignored ? -1 : lab;
      const int64_t col = lab_c - offset;
      const bool in_block = col >= 0 && col < n;
      const w_t* wc = W + (in_block ? col : 0) * D;
      acc_t dot = 0, ww = 0;
      xh_t* xh = XH + i * D;
      for (int64_t d = 0; d < D; ++d) {
        xh[d] = static_cast<xh_t>(static_cast<acc_t>(xi[d]) * inv);
        if (in_block) {
          const acc_t wv = static_cast<acc_t>(wc[d]);
          dot += static_cast<acc_t>(xh[d]) * wv;  // the rounded x_hat, as the class loop sees it
          ww += wv * wv;
        }
      }
      XI[i] = inv;
      YO[i] = lab_c;
      K[i] = ignored ? acc_t(0) : acc_t(1);
      CT[i] = in_block ? dot * inv_norm_from_sumsq(ww) : acc_t(0);
    }
  });
}

void prologue_cpu_kernel(const Tensor& x, const Tensor& w, const Tensor& labels, int64_t offset, int64_t ignore_index,
                         const Tensor& x_hat, const Tensor& x_inv, const Tensor& labels_out, const Tensor& kept,
                         const Tensor& c_t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expface_prologue_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_hat.scalar_type(), "expface_prologue_x_hat", [&] {
      using xh_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "expface_prologue_w", [&] {
        using w_t = scalar_t;
        AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "expface_prologue_labels", [&] {
          prologue_rows<x_t, xh_t, w_t, index_t>(x, w, labels, offset, ignore_index, x_hat, x_inv, labels_out, kept,
                                                 c_t);
        });
      });
    });
  });
}

void margin_terms_cpu_kernel(const Tensor& c, int64_t kind, double m1, double m2, double m3, double s, bool exact,
                             const Tensor& logit, const Tensor& factor) {
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "expface_margin_terms", [&] {
    const scalar_t* C = c.const_data_ptr<scalar_t>();
    scalar_t* Lo = logit.mutable_data_ptr<scalar_t>();
    scalar_t* F = factor.mutable_data_ptr<scalar_t>();
    const auto a = static_cast<scalar_t>(m1), b = static_cast<scalar_t>(m2), e = static_cast<scalar_t>(m3);
    const auto sc = static_cast<scalar_t>(s);
    at::parallel_for(0, c.numel(), 1024, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) margin_terms<scalar_t>(C[i], kind, a, b, e, sc, exact, Lo[i], F[i]);
    });
  });
}

template <typename x_t, typename acc_t>
void normalize_backward_rows(const Tensor& x, const Tensor& x_inv, const Tensor& g, const Tensor& out) {
  const int64_t B = x.size(0), D = x.size(1);
  const x_t* X = x.const_data_ptr<x_t>();
  const acc_t* XI = x_inv.const_data_ptr<acc_t>();
  const acc_t* G = g.const_data_ptr<acc_t>();
  x_t* O = out.mutable_data_ptr<x_t>();
  at::parallel_for(0, B, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const x_t* xi = X + i * D;
      const acc_t* gi = G + i * D;
      const acc_t inv = XI[i];
      acc_t radial = 0;
      for (int64_t d = 0; d < D; ++d) radial += static_cast<acc_t>(xi[d]) * inv * gi[d];
      if (!(inv < acc_t(kInvNormMax))) radial = 0;  // ||x|| below the floor: a plain scale
      for (int64_t d = 0; d < D; ++d) {
        const acc_t xh = static_cast<acc_t>(xi[d]) * inv;
        O[i * D + d] = static_cast<x_t>((gi[d] - xh * radial) * inv);
      }
    }
  });
}

void normalize_backward_cpu_kernel(const Tensor& x, const Tensor& x_inv, const Tensor& g, const Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expface_normalize_backward", [&] {
    if (g.scalar_type() == at::kDouble) {
      normalize_backward_rows<scalar_t, double>(x, x_inv, g, out);
    } else {
      normalize_backward_rows<scalar_t, float>(x, x_inv, g, out);
    }
  });
}

const PrologueOps kCpuPrologueOps{prologue_cpu_kernel, margin_terms_cpu_kernel, normalize_backward_cpu_kernel};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prologue_cpu(const Tensor& x, const Tensor& w, const Tensor& labels,
                                                                int64_t offset, int64_t ignore_index,
                                                                std::optional<at::ScalarType> x_hat_dtype) {
  return prologue_impl(kCpuPrologueOps, x, w, labels, offset, ignore_index, x_hat_dtype);
}

std::tuple<Tensor, Tensor> margin_terms_cpu(const Tensor& c_t, int64_t margin, double m1, double m2, double m3,
                                            double s, bool exact) {
  return margin_terms_impl(kCpuPrologueOps, c_t, margin, m1, m2, m3, s, exact);
}

Tensor normalize_backward_cpu(const Tensor& x, const Tensor& x_inv, const Tensor& grad_x_hat) {
  return normalize_backward_impl(kCpuPrologueOps, x, x_inv, grad_x_hat);
}

}  // namespace
}  // namespace ek

TORCH_LIBRARY_IMPL(expface_kernels, CPU, m) {
  m.impl("prologue", &ek::prologue_cpu);
  m.impl("margin_terms", &ek::margin_terms_cpu);
  m.impl("normalize_backward", &ek::normalize_backward_cpu);
}
