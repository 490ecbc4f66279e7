// ek_math.h -- the per-element / per-row math of the expface_kernels extension,
// shared verbatim by the CPU (csrc/cpu) and CUDA (csrc/cuda) epilogues, so the
// CPU-only build (and CI, which has no GPU) exercises exactly the formulas the
// GPU runs.  Everything here is branch-light scalar code marked EK_HD.
//
// Notation (the backend contract in expface_kernels/contract.py, DESIGN.md section 1):
//   L_ij  = x_hat_i . W_j            (GEMM output, W raw, not normalised)
//   winv_j = 1 / max(||W_j||, 1e-12)
//   z_ij  = s * L_ij * winv_j        (non-target columns)
//   z_iy  = target_logit_i           (target column, substituted inside the tile)
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define EK_HD __host__ __device__ __forceinline__
#else
#define EK_HD inline
#endif

namespace ek {

// Overloads over the C math functions: these names exist both in host code
// (math.h) and in CUDA device code, unlike some std:: overloads.
EK_HD float ek_sqrt(float x) { return sqrtf(x); }
EK_HD double ek_sqrt(double x) { return sqrt(x); }
EK_HD float ek_log(float x) { return logf(x); }
EK_HD double ek_log(double x) { return log(x); }
EK_HD float ek_expm1(float x) { return expm1f(x); }
EK_HD double ek_expm1(double x) { return expm1(x); }
EK_HD float ek_acos(float x) { return acosf(x); }
EK_HD double ek_acos(double x) { return acos(x); }
EK_HD float ek_cos(float x) { return cosf(x); }
EK_HD double ek_cos(double x) { return cos(x); }
EK_HD float ek_sin(float x) { return sinf(x); }
EK_HD double ek_sin(double x) { return sin(x); }
EK_HD float ek_pow(float x, float y) { return powf(x, y); }
EK_HD double ek_pow(double x, double y) { return pow(x, y); }
EK_HD float ek_floor(float x) { return floorf(x); }
EK_HD double ek_floor(double x) { return floor(x); }

// F.normalize's eps: ||v|| is clamped below at 1e-12.
constexpr double kNormEps = 1e-12;
// winv_j above this means ||W_j|| < eps: F.normalize's backward is then a plain scale.
constexpr double kInvNormMax = 1e12;

template <typename acc_t>
EK_HD acc_t inv_norm_from_sumsq(acc_t sumsq) {
  acc_t n = ek_sqrt(sumsq);
  return acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
}

// exp for the epilogues.  Device: the libdevice expf/exp.  Host, float: a
// branch-free Cephes-style polynomial (max rel. error ~2e-7, 1-2 ulp) that GCC
// vectorises at the baseline ISA inside `#pragma omp simd` loops (with
// -fno-trapping-math, see setup.py); glibc's scalar expf cannot be vectorised and made
// the CPU epilogue 2.5x slower (5.5 vs 2.2 ns per logit, 1 core of the CI machine).
// Exact handling: NaN -> NaN, x < -87.3 -> 0, x > 88.3 -> +inf; in (88.3, 88.72] it
// returns exp(88.3) (the epilogues only evaluate exp at arguments <= 0).
EK_HD float ek_exp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  float xc = x < -87.3f ? -87.3f : x;  // NaN passes both compares unchanged
  xc = xc > 88.3f ? 88.3f : xc;       // so that 2^fn below stays a normal float
  const float log2e = 1.44269504088896341f;
  // round-to-nearest by the 1.5*2^23 trick: vectorises at SSE2 (floorf needs SSE4.1)
  const float rnd = 12582912.0f;
  float fn = (xc * log2e + rnd) - rnd;
  float r = xc - fn * 0.693359375f;  // Cody-Waite split of ln2
  r = r - fn * -2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r2 + r + 1.0f;
  // fn in [-126, 127] here (NaN: garbage, replaced below), so the biased exponent is normal
  uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(fn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  y = y * scale;
  y = x < -87.3f ? 0.0f : y;
  y = x > 88.3f ? INFINITY : y;
  return x != x ? x : y;
#endif
}
EK_HD double ek_exp(double x) { return exp(x); }

// Row-wise log-sum-exp from its parts.
template <typename acc_t>
EK_HD acc_t lse_of(acc_t m, acc_t S) { return m + ek_log(S); }

// NaN-propagating max (std::max / fmax drop NaN; a NaN logit must give a NaN loss).
template <typename T>
EK_HD T nan_max(T a, T b) { return (a > b || a != a) ? a : b; }

// Merge two (max, sumexp) partials; -inf maxima (empty blocks) contribute nothing.
template <typename acc_t>
EK_HD void merge_partial(acc_t& m, acc_t& S, acc_t m2, acc_t S2) {
  const acc_t ninf = -acc_t(INFINITY);  // (no std::numeric_limits in device code)
  acc_t M = nan_max(m, m2);
  acc_t a = (m == ninf) ? acc_t(0) : S * ek_exp(m - M);
  acc_t b = (m2 == ninf) ? acc_t(0) : S2 * ek_exp(m2 - M);
  m = M;
  S = a + b;
}

// The non-target logit z = s * c with c = L * winv.
template <typename acc_t>
EK_HD acc_t logit(acc_t L, acc_t winv, acc_t s) { return s * (L * winv); }

// grads (class-chunked path), non-target element, already multiplied by winv_j
// so that both gradient GEMMs consume it directly:
//   G_ij * winv_j = grad_row_i * s * exp(s*c_ij - lse_i) * winv_j
template <typename acc_t>
EK_HD acc_t grad_scaled(acc_t L, acc_t winv, acc_t s, acc_t lse, acc_t grad_row_s) {
  return grad_row_s * ek_exp(logit(L, winv, s) - lse) * winv;
}

// fused path, target column: dL/dc_iy = grad_row * factor * (p_iy - 1), with
// p_iy - 1 = ek_expm1(target_logit - lse) evaluated in acc precision (no cancellation
// as p_iy -> 1, unlike exp(...) - 1 or a rounded p).
template <typename acc_t>
EK_HD acc_t target_grad(acc_t grad_row, acc_t factor, acc_t target_logit, acc_t lse) {
  return grad_row * factor * ek_expm1(target_logit - lse);
}

// The tangent projection of F.normalize's backward, applied row-wise to
// gs_j = winv_j * g_j (what the GEMMs accumulate):
//   grad_w_j = gs_j - w_hat_j (w_hat_j . gs_j)     if winv_j <= 1e12
//            = gs_j                                otherwise
// Returns the coefficient k with grad_w_j = gs_j - k * W_j  (W raw), given
// dot = W_j . gs_j:   k = winv^2 * dot.
template <typename acc_t>
EK_HD acc_t projection_coef(acc_t winv, acc_t dot_w_gs) {
  return winv <= acc_t(kInvNormMax) ? winv * winv * dot_w_gs : acc_t(0);
}

// ---- The prologue's margin math (B numbers per step): expface_kernels/margins.py in C++.
// Codes of the `margin` argument of the margin_terms op (expface_kernels/prologue.py
// maps the names; tests hold both implementations to the float64 formulas).
enum MarginKind : int64_t { kMarginNone = 0, kCosFace = 1, kArcFace = 2, kExpFace = 3, kSphereFace = 4, kCombined = 5 };

constexpr double kPi = 3.14159265358979323846;
// margins.THETA_EPS: the exact derivative is evaluated at the angle clamped into
// [kThetaEps, pi - kThetaEps] (dtheta/dc = -1/sin(theta) is singular at 0 and pi).
constexpr double kThetaEps = 1e-3;

// clamp that lets NaN through (a NaN cosine must give a NaN loss)
template <typename T>
EK_HD T clamp_nan(T v, T lo, T hi) { return v < lo ? lo : (v > hi ? hi : v); }

// SphereFace's piece k = floor(m theta / pi) and (-1)^k.
template <typename T>
EK_HD void sphereface_piece(T th, T m, T& k, T& sign) {
  k = ek_floor(m * th / T(kPi));
  sign = T(1) - T(2) * (k - T(2) * ek_floor(k / T(2)));
}

// psi(theta) and dpsi/dtheta of the angular margins; m1..m3 as margin_terms.
template <typename T>
EK_HD T psi_theta(int64_t kind, T th, T m1, T m2, T m3) {
  switch (kind) {
    case kExpFace: return ek_cos(T(kPi) * ek_pow(th / T(kPi), m1));
    case kArcFace: return ek_cos(th + m1);
    case kSphereFace: {
      T k, sign;
      sphereface_piece(th, m1, k, sign);
      return sign * ek_cos(m1 * th) - T(2) * k;
    }
    default: return ek_cos(m1 * th + m2) - m3;  // kCombined
  }
}

template <typename T>
EK_HD T dpsi_theta(int64_t kind, T th, T m1, T m2) {
  switch (kind) {
    case kExpFace: {
      const T u = th / T(kPi);
      return -ek_sin(T(kPi) * ek_pow(u, m1)) * m1 * ek_pow(u, m1 - T(1));
    }
    case kArcFace: return -ek_sin(th + m1);
    case kSphereFace: {
      T k, sign;
      sphereface_piece(th, m1, k, sign);
      return -sign * m1 * ek_sin(m1 * th);
    }
    default: return -m1 * ek_sin(m1 * th + m2);  // kCombined
  }
}

// target logit s * psi(c) and factor dz/dc (s * psi'(c) when `exact`, else s) of one row.
// Scalar margins pass m in m1; combined passes (m1, m2, m3).
template <typename T>
EK_HD void margin_terms(T c, int64_t kind, T m1, T m2, T m3, T s, bool exact, T& logit_out, T& factor_out) {
  if (kind == kMarginNone || kind == kCosFace) {
    logit_out = s * (kind == kCosFace ? c - m1 : c);
    factor_out = s;
    return;
  }
  const T th = ek_acos(clamp_nan(c, T(-1), T(1)));
  logit_out = s * psi_theta(kind, th, m1, m2, m3);
  if (!exact) {
    factor_out = s;
    return;
  }
  const T tg = clamp_nan(th, T(kThetaEps), T(kPi - kThetaEps));
  factor_out = s * (dpsi_theta(kind, tg, m1, m2) / -ek_sin(tg));
}

}  // namespace ek
