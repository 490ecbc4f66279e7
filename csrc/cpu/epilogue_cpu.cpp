// CPU epilogues of the expface_kernels extension and the CPU registrations of its ops.
// The math is ek_math.h (shared with the CUDA kernels); this file only lays it out
// over rows with at::parallel_for and writes the inner loops so that GCC vectorises
// them (`#pragma omp simd` reductions, target column handled by splitting the row
// into [0, t) and (t, n) instead of a per-element branch).  Built with -fopenmp
// -fno-trapping-math (setup.py): without the first at::parallel_for runs on one
// thread, without the second GCC will not if-convert the compares in ek_exp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <limits>

#include "../ek_driver.h"
#include "../ek_math.h"

namespace ek {
namespace {

using at::Tensor;

template <typename acc_t>
acc_t neg_inf() { return -std::numeric_limits<acc_t>::infinity(); }

// max_j s * L_j * winv_j over j in [a, b).  (NaN need not propagate here: the
// sum-exp pass turns any NaN logit into a NaN sum.)  `omp simd reduction` lets GCC
// vectorise the reduction (it may not reorder FP ops otherwise); measured 2.9 ->
// 0.7 ns per logit.
template <typename scalar_t, typename acc_t>
acc_t max_range(const scalar_t* __restrict__ L, const acc_t* __restrict__ winv, acc_t s, int64_t a, int64_t b) {
  acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t j = a; j < b; ++j) {
    const acc_t z = logit<acc_t>(static_cast<acc_t>(L[j]), winv[j], s);
    m = z > m ? z : m;
  }
  return m;
}

// sum_j exp(z_j - mx) over [a, b); with kStore also L_j <- exp(z_j - mx) * winv_j.
// Summed in pieces of kSumPiece (vector lanes within a piece, pieces added in order):
// one running fp32 sum over 65600 classes lost ~5e-6 of the lse (int64 test).
constexpr int64_t kSumPiece = 512;

template <typename scalar_t, typename acc_t, bool kStore>
acc_t sumexp_piece(scalar_t* __restrict__ L, const acc_t* __restrict__ winv, acc_t s, acc_t mx, int64_t a,
                   int64_t b) {
  acc_t sum = acc_t(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t j = a; j < b; ++j) {
    const acc_t p = ek_exp(logit<acc_t>(static_cast<acc_t>(L[j]), winv[j], s) - mx);
    sum += p;
    if (kStore) L[j] = static_cast<scalar_t>(p * winv[j]);
  }
  return sum;
}

template <typename scalar_t, typename acc_t, bool kStore>
acc_t sumexp_range(scalar_t* L, const acc_t* winv, acc_t s, acc_t mx, int64_t a, int64_t b) {
  acc_t total = acc_t(0);
  for (int64_t p = a; p < b; p += kSumPiece)
    total += sumexp_piece<scalar_t, acc_t, kStore>(L, winv, s, mx, p, std::min(b, p + kSumPiece));
  return total;
}

// L_j <- G_j * winv_j for a row (in place); (a function, not inline in the dispatch
// lambda: a #pragma cannot sit inside a macro argument).
template <typename scalar_t, typename acc_t>
void grads_range(scalar_t* __restrict__ L, const acc_t* __restrict__ winv, acc_t s, acc_t lse, acc_t grad_row_s,
                 int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    L[j] = static_cast<scalar_t>(grad_scaled<acc_t>(static_cast<acc_t>(L[j]), winv[j], s, lse, grad_row_s));
}

// The target column of a row inside this block, or -1.
inline int64_t target_col(int64_t label, int64_t col0, int64_t n) {
  int64_t t = label - col0;
  return (label >= 0 && t >= 0 && t < n) ? t : -1;
}

// Grain: one row is n elements of work; let at::parallel_for split rows only.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n)); }

// ---------------------------------------------------------------- row_inv_norm
template <typename scalar_t, typename acc_t>
void row_inv_norm_kernel(const Tensor& w, const Tensor& winv) {
  const int64_t n = w.size(0), D = w.size(1);
  const scalar_t* W = w.const_data_ptr<scalar_t>();
  acc_t* out = winv.mutable_data_ptr<acc_t>();
  at::parallel_for(0, n, row_grain(D), [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const scalar_t* __restrict__ r = W + j * D;
      acc_t ss = acc_t(0);
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) {
        const acc_t v = static_cast<acc_t>(r[d]);
        ss += v * v;
      }
      out[j] = inv_norm_from_sumsq(ss);
    }
  });
}

void row_inv_norm_cpu(const Tensor& w, const Tensor& winv) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "expface_row_inv_norm_cpu", [&] {
    if (winv.scalar_type() == at::kDouble) {
      row_inv_norm_kernel<scalar_t, double>(w, winv);
    } else {
      row_inv_norm_kernel<scalar_t, float>(w, winv);
    }
  });
}

// ---------------------------------------------------------------- lse_block
void lse_block_cpu(const Tensor& L, const Tensor& winv, const Tensor& target_logit, const Tensor& labels, double s,
                   int64_t col0, const Tensor& row_max, const Tensor& row_sumexp) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.scalar_type(), "expface_lse_block_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = L.size(0), n = L.size(1);
    scalar_t* Lp = L.mutable_data_ptr<scalar_t>();
    const acc_t* wv = winv.const_data_ptr<acc_t>();
    const acc_t* tl = target_logit.const_data_ptr<acc_t>();
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    acc_t* M = row_max.mutable_data_ptr<acc_t>();
    acc_t* S = row_sumexp.mutable_data_ptr<acc_t>();
    const acc_t sc = static_cast<acc_t>(s);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        scalar_t* Li = Lp + i * n;
        const int64_t t = target_col(lab[i], col0, n);
        const int64_t a_end = t >= 0 ? t : n;
        acc_t mx = max_range<scalar_t, acc_t>(Li, wv, sc, 0, a_end);
        if (t >= 0) mx = nan_max(nan_max(mx, max_range<scalar_t, acc_t>(Li, wv, sc, t + 1, n)), tl[i]);
        acc_t sum = sumexp_range<scalar_t, acc_t, false>(Li, wv, sc, mx, 0, a_end);
        if (t >= 0) sum += sumexp_range<scalar_t, acc_t, false>(Li, wv, sc, mx, t + 1, n) + ek_exp(tl[i] - mx);
        merge_partial(M[i], S[i], mx, sum);
      }
    });
  });
}

// ---------------------------------------------------------------- grads_block
void grads_block_cpu(const Tensor& L, const Tensor& winv, const Tensor& labels, const Tensor& lse,
                     const Tensor& target_grad, const Tensor& grad_row, double s, int64_t col0) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.scalar_type(), "expface_grads_block_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = L.size(0), n = L.size(1);
    scalar_t* Lp = L.mutable_data_ptr<scalar_t>();
    const acc_t* wv = winv.const_data_ptr<acc_t>();
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const acc_t* ls = lse.const_data_ptr<acc_t>();
    const acc_t* tg = target_grad.const_data_ptr<acc_t>();
    const acc_t* gr = grad_row.const_data_ptr<acc_t>();
    const acc_t sc = static_cast<acc_t>(s);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        scalar_t* Li = Lp + i * n;
        if (gr[i] == acc_t(0)) {  // ignored row: exact zeros (no NaN * 0 leaking in)
          for (int64_t j = 0; j < n; ++j) Li[j] = scalar_t(0);
          continue;
        }
        grads_range<scalar_t, acc_t>(Li, wv, sc, ls[i], gr[i] * sc, n);
        const int64_t t = target_col(lab[i], col0, n);
        if (t >= 0) Li[t] = static_cast<scalar_t>(tg[i] * wv[t]);
      }
    });
  });
}

// ---------------------------------------------------------------- fused_rows
void fused_rows_cpu(const Tensor& L, const Tensor& winv, const Tensor& target_logit, const Tensor& target_factor,
                    const Tensor& labels, const Tensor& grad_row, double s, const Tensor& lse, const Tensor& row_scale,
                    const Tensor& tgrad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.scalar_type(), "expface_fused_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = L.size(0), n = L.size(1);
    scalar_t* Lp = L.mutable_data_ptr<scalar_t>();
    const acc_t* wv = winv.const_data_ptr<acc_t>();
    const acc_t* tl = target_logit.const_data_ptr<acc_t>();
    const acc_t* tf = target_factor.const_data_ptr<acc_t>();
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const acc_t* gr = grad_row.const_data_ptr<acc_t>();
    acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
    acc_t* rs = row_scale.mutable_data_ptr<acc_t>();
    acc_t* tgp = tgrad.mutable_data_ptr<acc_t>();
    const acc_t sc = static_cast<acc_t>(s);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        scalar_t* Li = Lp + i * n;
        const int64_t t = target_col(lab[i], 0, n);
        const int64_t a_end = t >= 0 ? t : n;
        // pass 1 (read only): the row max, target substituted
        acc_t mx = max_range<scalar_t, acc_t>(Li, wv, sc, 0, a_end);
        if (t >= 0) mx = nan_max(nan_max(mx, max_range<scalar_t, acc_t>(Li, wv, sc, t + 1, n)), tl[i]);
        // pass 2: exp once per logit, sum, keep p * winv in place (row is L2-resident)
        acc_t sum = sumexp_range<scalar_t, acc_t, true>(Li, wv, sc, mx, 0, a_end);
        if (t >= 0) sum += sumexp_range<scalar_t, acc_t, true>(Li, wv, sc, mx, t + 1, n) + ek_exp(tl[i] - mx);
        const acc_t l = lse_of(mx, sum);
        lse_p[i] = l;
        if (gr[i] == acc_t(0)) {
          for (int64_t j = 0; j < n; ++j) Li[j] = scalar_t(0);
          rs[i] = acc_t(0);
          tgp[i] = acc_t(0);
        } else {
          const acc_t r = gr[i] * sc / sum;
          rs[i] = r;
          tgp[i] = t >= 0 ? target_grad(gr[i], tf[i], tl[i], l) : acc_t(0);
          if (t >= 0) Li[t] = static_cast<scalar_t>(tgp[i] * wv[t] / r);
        }
      }
    });
  });
}

// ---------------------------------------------------------------- project_rows
template <typename scalar_t, typename acc_t, typename out_t>
void project_rows_kernel(const Tensor& gs, const Tensor& w, const Tensor& winv, const Tensor& out, bool scale_rows) {
  const int64_t n = gs.size(0), D = gs.size(1);
  const acc_t* G = gs.const_data_ptr<acc_t>();
  out_t* O = out.mutable_data_ptr<out_t>();  // may be G itself (in place)
  const scalar_t* W = w.const_data_ptr<scalar_t>();
  const acc_t* wv = winv.const_data_ptr<acc_t>();
  at::parallel_for(0, n, row_grain(2 * D), [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const acc_t* g = G + j * D;
      out_t* o = O + j * D;
      const scalar_t* r = W + j * D;
      acc_t dot = acc_t(0);
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(r[d]) * g[d];
      const acc_t k = projection_coef(wv[j], dot);
      const acc_t a = scale_rows ? wv[j] : acc_t(1);
      // element-wise (o[d] depends on g[d] only): vectorisable also when o aliases g
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<out_t>(a * (g[d] - k * static_cast<acc_t>(r[d])));
    }
  });
}

void project_rows_cpu(const Tensor& gs_in, const Tensor& w, const Tensor& winv, const Tensor& out, bool scale_rows) {
  // The projection runs in the acc dtype (winv's); a 16-bit grad_W product is widened
  // first (a (rows, D) copy: the CPU path forms its 16-bit products this way anyway).
  const Tensor gs = gs_in.scalar_type() == winv.scalar_type() ? gs_in : gs_in.to(winv.scalar_type());
  TORCH_CHECK(out.scalar_type() == gs.scalar_type() || out.scalar_type() == w.scalar_type(),
              "expface_kernels: internal: project_rows writes the acc dtype or w's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "expface_project_rows_cpu", [&] {
    const bool same = out.scalar_type() == gs.scalar_type();
    if (gs.scalar_type() == at::kDouble) {
      if (same) project_rows_kernel<scalar_t, double, double>(gs, w, winv, out, scale_rows);
      else project_rows_kernel<scalar_t, double, scalar_t>(gs, w, winv, out, scale_rows);
    } else {
      if (same) project_rows_kernel<scalar_t, float, float>(gs, w, winv, out, scale_rows);
      else project_rows_kernel<scalar_t, float, scalar_t>(gs, w, winv, out, scale_rows);
    }
  });
}

// ATen's broadcast multiply, computed in winv's (acc) dtype and rounded once into out.
void normalize_rows_cpu(const Tensor& w, const Tensor& winv, const Tensor& out) {
  Tensor o = out;  // (a handle: mul_out takes a mutable one)
  at::mul_out(o, w, winv.unsqueeze(1));
}

const EpilogueOps kCpuOps{row_inv_norm_cpu, lse_block_cpu,    grads_block_cpu,    fused_rows_cpu,
                          project_rows_cpu, normalize_rows_cpu, "CPU"};

std::tuple<Tensor, Tensor, Tensor> lse_partials_cpu(const Tensor& x_hat, const Tensor& w, const Tensor& target_logit,
                                                    const Tensor& labels, double s, int64_t offset,
                                                    int64_t block_bytes) {
  return lse_partials_impl(kCpuOps, x_hat, w, target_logit, labels, s, offset, block_bytes);
}

std::tuple<Tensor, Tensor> grads_cpu(const Tensor& x_hat, const Tensor& w, const Tensor& w_inv_norm,
                                     const Tensor& labels, const Tensor& lse, const Tensor& target_grad,
                                     const Tensor& grad_row, double s, int64_t offset, int64_t block_bytes) {
  return grads_impl(kCpuOps, x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row, s, offset, block_bytes);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_forward_grads_cpu(const Tensor& x_hat, const Tensor& w,
                                                                   const Tensor& target_logit,
                                                                   const Tensor& target_factor, const Tensor& labels,
                                                                   const Tensor& grad_row, double s,
                                                                   int64_t block_bytes) {
  return fused_forward_grads_impl(kCpuOps, x_hat, w, target_logit, target_factor, labels, grad_row, s, block_bytes);
}

}  // namespace
}  // namespace ek

TORCH_LIBRARY_IMPL(expface_kernels, CPU, m) {
  m.impl("lse_partials", &ek::lse_partials_cpu);
  m.impl("grads", &ek::grads_cpu);
  m.impl("fused_forward_grads", &ek::fused_forward_grads_cpu);
}
