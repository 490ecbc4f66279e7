// Device code of the CUDA epilogues (kernels and their helpers), apart from the
// launchers in epilogue_cuda.cu so that tests/cuda_emulation compiles the same source
// for the CPU (a thread per CUDA thread, barriers for __syncthreads and the warp
// shuffles) and runs it against the float64 contract without a GPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../ek_math.h"
#include "ek_cuda_common.cuh"

namespace ek {

// The fused row kernel: one block of kThreads per logits row.  1024 so that few rows (a
// fused row block can be 64 rows of 2^20 classes) still keep many loads in flight per
// SM.  Per-row-of-W kernels (norms, projection): a warp per row, kWRows warps per block.
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kWRows = 8;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide reductions over kThreads threads; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = 0.f;
  for (int k = 0; k < kWarps; ++k) r += smem[k];
  __syncthreads();
  return r;
}
__device__ __forceinline__ float block_max(float v, float* smem) {
  v = warp_max(v);
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = -INFINITY;
  for (int k = 0; k < kWarps; ++k) r = nan_max(r, smem[k]);
  __syncthreads();
  return r;
}

__device__ __forceinline__ int64_t target_col(int64_t label, int64_t col0, int64_t n) {
  int64_t t = label - col0;
  return (label >= 0 && t >= 0 && t < n) ? t : -1;
}

// Row max of z over the row (target substituted) and the sum of exp(z - max).
template <typename scalar_t>
__device__ __forceinline__ float row_max_z(const scalar_t* Li, const float* winv, float s, int64_t n, int64_t t,
                                           float tl, float* smem) {
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += kThreads)
    if (j != t) mx = nan_max(mx, logit<float>(static_cast<float>(Li[j]), winv[j], s));
  mx = block_max(mx, smem);
  return t >= 0 ? nan_max(mx, tl) : mx;
}

template <typename scalar_t>
__global__ void row_inv_norm_kernel(const scalar_t* __restrict__ W, float* __restrict__ out, int64_t n, int64_t D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWRows + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return;
  const scalar_t* r = W + row * D;
  float ss = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    float v = static_cast<float>(r[d]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) out[row] = inv_norm_from_sumsq(ss);
}

// ---- Class-chunk epilogues (the training path on CUDA): tiles of R rows x the chunk.
// One block of kTileThreads owns R consecutive rows and walks the chunk's columns in
// 16-byte vectors (V = 8 half/bfloat16 or 4 float logits per load); each thread loads
// the V inverse norms of its columns once and uses them for all R rows.  With one row
// per 1024-thread block and 2-byte loads (the kernels before this layout), lse_block
// read the logits twice (max, then sum) and winv once per row -- for bfloat16 logits
// winv's reads were twice the logits' bytes -- and took 1.20 ms of a 9.1 ms step (H200,
// B=512, C=2^20, D=512, bf16, 43 chunks of 24576 classes); grads_block 0.76 ms.
// Single pass here: each thread keeps an online (max, sumexp) per row, merged across
// the block at the end (merge_partial).  512 threads: with 256 the two kernels took
// 1.06 and 0.98 ms of that step (2 blocks of 8 warps per SM at B = 512, ~1 TB/s on
// logits that sit in L2) -- bound by issue and latency, not bytes; 512 doubles the
// warps in flight (<= 64 registers a thread: 2 blocks a SM still fit).  The common
// path of the loops is branch-free; the target column and ignored rows take rare,
// block- or vector-uniform branches (the 256-thread loops had ~5 branches a logit).
// With the log2 form below: 0.53 and 0.49 ms (H200, same step).
constexpr int kTileThreads = 512;
constexpr int kTileWarps = kTileThreads / 32;

// Where the row's target column falls in the V columns from j: its index, else -1.
template <int V>
__device__ __forceinline__ int target_in_vec(int64_t t, int64_t j) {
  const int64_t k = t - j;
  return (t >= 0 && k >= 0 && k < V) ? static_cast<int>(k) : -1;
}

// 2^x in the tile loops, which work in log2 units (s * log2(e) * winv folded into one
// factor per column): one MUFU.EX2 on the GPU (ex2.approx.ftz: relative error ~2^-22;
// results under 2^-126, i.e. terms 38 decades below the row's largest, flush to 0).
// The loops spent ~25 instructions a logit with expf and NaN-aware maxima (sm_90 SASS
// of lse_tile_kernel<bf16, 8, 4>'s column loop: 1,613 for 64 logits; 1.66 ms for
// B=1024, C=2^20 on an H200, ~17 us of issue per 48 MiB chunk); this form ~13 (824).
// On the host (the CUDA emulation of tests/) it is ek_exp.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.69314718055994531f;
__device__ __forceinline__ float exp2_tile(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return ek_exp(x * kLn2);
#endif
}

// V consecutive elements at p as floats: 16-byte loads when V * sizeof(T) is a multiple
// of 16 (the caller guarantees the alignment), else scalar loads.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
  constexpr int kBytes = V * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    alignas(16) T tmp[V];
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) reinterpret_cast<uint4*>(tmp)[q] = reinterpret_cast<const uint4*>(p)[q];
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = static_cast<float>(tmp[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = static_cast<float>(p[k]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[V]) {
  constexpr int kBytes = V * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    alignas(16) T tmp[V];
#pragma unroll
    for (int k = 0; k < V; ++k) tmp[k] = static_cast<T>(v[k]);
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) reinterpret_cast<uint4*>(p)[q] = reinterpret_cast<const uint4*>(tmp)[q];
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = static_cast<T>(v[k]);
  }
}

// merge_partial across the 32 lanes of a warp (every lane ends with the merge of all).
__device__ __forceinline__ void warp_merge(float& m, float& S) {
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float S2 = __shfl_xor_sync(0xffffffffu, S, o);
    merge_partial(m, S, m2, S2);
  }
}

// Rows [R*blockIdx.x, +R) of L (rows x n): online (max, sumexp) of z over the chunk,
// the target column excluded in the loop and merged once at the end, then merged into
// the running M, S.  n % V == 0 and 16-byte aligned rows when V > 1 (lse_block_cuda).
template <typename scalar_t, int V, int R>
__global__ void __launch_bounds__(kTileThreads)
    lse_tile_kernel(const scalar_t* __restrict__ L, const float* __restrict__ winv, const float* __restrict__ tl,
                    const int64_t* __restrict__ labels, float s, int64_t col0, int64_t rows, int64_t n,
                    float* __restrict__ M, float* __restrict__ S) {
  __shared__ float sm_m[R][kTileWarps], sm_s[R][kTileWarps];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * R;
  int64_t t[R];
  const scalar_t* Lr[R];
  float m[R], sum[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool ok = i0 + r < rows;  // rows past the end: read row i0 again, result dropped
    t[r] = ok ? target_col(labels[i0 + r], col0, n) : -1;
    Lr[r] = L + (ok ? i0 + r : i0) * n;
    m[r] = -INFINITY;
    sum[r] = 0.f;
  }
  // m and sum in log2 units: sum = sum_j 2^(u_j - m), u_j = log2(e) * z_j.  The max
  // ignores NaN (fmaxf); a NaN logit still reaches the sum, and from it m.
  const float sl2 = s * kLog2e;
  const int64_t nv = n / V;
#pragma unroll 2
  for (int64_t v = threadIdx.x; v < nv; v += kTileThreads) {
    const int64_t j = v * V;
    float sw[V];
    load_vec<float, V>(winv + j, sw);
#pragma unroll
    for (int k = 0; k < V; ++k) sw[k] *= sl2;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float u[V];
      load_vec<scalar_t, V>(Lr[r] + j, u);
      float mv = -INFINITY;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        u[k] *= sw[k];
        mv = fmaxf(mv, u[k]);
      }
      const int tk = target_in_vec<V>(t[r], j);
      if (tk >= 0) {  // one vector in V/n of a row: mask the target column, redo the max
        mv = -INFINITY;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          u[k] = k == tk ? -INFINITY : u[k];
          mv = fmaxf(mv, u[k]);
        }
      }
      const float mn = fmaxf(m[r], mv);
      const float ms = mn == -INFINITY ? 0.f : mn;  // nothing but -inf yet: 2^(-inf - 0) = 0, not NaN
      float acc = sum[r] * exp2_tile(m[r] - ms);
#pragma unroll
      for (int k = 0; k < V; ++k) acc += exp2_tile(u[k] - ms);
      sum[r] = acc;
      m[r] = acc != acc ? acc : mn;  // a NaN sum into m too: merge_partial drops S where m = -inf
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) m[r] *= kLn2;  // back to natural units for the merges
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    warp_merge(m[r], sum[r]);
    if (lane == 0) {
      sm_m[r][warp] = m[r];
      sm_s[r][warp] = sum[r];
    }
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float mm = lane < kTileWarps ? sm_m[r][lane] : -INFINITY;
    float ss = lane < kTileWarps ? sm_s[r][lane] : 0.f;
    warp_merge(mm, ss);
    const int64_t i = i0 + r;
    if (lane == 0 && i < rows) {
      if (t[r] >= 0) merge_partial(mm, ss, tl[i], 1.f);  // exp(tl - max) at the target column
      float Mi = M[i], Si = S[i];
      merge_partial(Mi, Si, mm, ss);
      M[i] = Mi;
      S[i] = Si;
    }
  }
}

// In place over rows [R*blockIdx.x, +R): L_ij <- G_ij * winv_j (see EpilogueOps).
template <typename scalar_t, int V, int R>
__global__ void __launch_bounds__(kTileThreads)
    grads_tile_kernel(scalar_t* __restrict__ L, const float* __restrict__ winv, const int64_t* __restrict__ labels,
                      const float* __restrict__ lse, const float* __restrict__ tg, const float* __restrict__ gr,
                      float s, int64_t col0, int64_t rows, int64_t n) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * R;
  int64_t t[R];
  float g[R], grs[R], l[R], tgv[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool ok = i0 + r < rows;
    t[r] = ok ? target_col(labels[i0 + r], col0, n) : -1;
    g[r] = ok ? gr[i0 + r] : 0.f;
    grs[r] = g[r] * s;
    l[r] = ok ? lse[i0 + r] : 0.f;
    tgv[r] = ok ? tg[i0 + r] : 0.f;
  }
  // G_ij * winv_j = g s 2^(log2(e) s L_ij winv_j - log2(e) lse_i) winv_j (grad_scaled
  // in log2 units), the target column tg_i * winv_j, ignored rows exact zeros.
  const float sl2 = s * kLog2e;
#pragma unroll
  for (int r = 0; r < R; ++r) l[r] *= kLog2e;
  const int64_t nv = n / V;
#pragma unroll 2
  for (int64_t v = threadIdx.x; v < nv; v += kTileThreads) {
    const int64_t j = v * V;
    float wv[V], sw[V];
    load_vec<float, V>(winv + j, wv);
#pragma unroll
    for (int k = 0; k < V; ++k) sw[k] = wv[k] * sl2;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (i0 + r >= rows) continue;  // uniform across the block
      scalar_t* p = L + (i0 + r) * n + j;
      float z[V];
      if (g[r] == 0.f) {  // ignored row (uniform across the block): exact zeros
#pragma unroll
        for (int k = 0; k < V; ++k) z[k] = 0.f;
      } else {
        load_vec<scalar_t, V>(p, z);
#pragma unroll
        for (int k = 0; k < V; ++k) z[k] = grs[r] * exp2_tile(z[k] * sw[k] - l[r]) * wv[k];
        const int tk = target_in_vec<V>(t[r], j);
        if (tk >= 0) {
#pragma unroll
          for (int k = 0; k < V; ++k) z[k] = k == tk ? tgv[r] * wv[k] : z[k];
        }
      }
      store_vec<scalar_t, V>(p, z);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fused_rows_kernel(scalar_t* __restrict__ L, const float* __restrict__ winv,
                                  const float* __restrict__ tl, const float* __restrict__ tf,
                                  const int64_t* __restrict__ labels, const float* __restrict__ gr, float s,
                                  int64_t n, float* __restrict__ lse, float* __restrict__ rs,
                                  float* __restrict__ tgrad) {
  __shared__ float smem[kWarps];
  const int64_t i = blockIdx.x;
  scalar_t* Li = L + i * n;
  const int64_t t = target_col(labels[i], 0, n);
  const float g = gr[i];
  const float mx = row_max_z(Li, winv, s, n, t, tl[i], smem);
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    float out = 0.f;
    if (j != t) {
      const float p = ek_exp(logit<float>(static_cast<float>(Li[j]), winv[j], s) - mx);
      sum += p;
      out = p * winv[j];
    }
    Li[j] = static_cast<scalar_t>(g == 0.f ? 0.f : out);  // target column: written below
  }
  sum = block_sum(sum, smem);  // ends with __syncthreads: the row's stores are done
  if (threadIdx.x == 0) {
    if (t >= 0) sum += ek_exp(tl[i] - mx);
    const float l = lse_of(mx, sum);
    lse[i] = l;
    const float r = g == 0.f ? 0.f : g * s / sum;
    const float tgv = (g == 0.f || t < 0) ? 0.f : target_grad(g, tf[i], tl[i], l);
    rs[i] = r;
    tgrad[i] = tgv;
    if (t >= 0 && g != 0.f) Li[t] = static_cast<scalar_t>(tgv * winv[t] / r);
  }
}

// The projection's (rows, D) operands come in float, half or bfloat16 (the grad_W GEMM's
// dtype in, w's or fp32 out): one kernel per W dtype, the others read through a tag.
template <typename scalar_t>
__global__ void project_rows_kernel(const void* G, int g_tag, const scalar_t* __restrict__ W,
                                    const float* __restrict__ winv, void* O, int o_tag, int64_t n, int64_t D,
                                    bool scale_rows) {
  // O may be G itself (in place): each element is read, then written, by one thread.
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWRows + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return;
  const int64_t base = row * D;
  const scalar_t* r = W + base;
  float dot = 0.f;
  for (int64_t d = lane; d < D; d += 32) dot += static_cast<float>(r[d]) * load_tagged(G, base + d, g_tag);
  dot = warp_sum(dot);
  const float k = projection_coef(winv[row], dot);
  const float a = scale_rows ? winv[row] : 1.f;
  for (int64_t d = lane; d < D; d += 32)
    store_tagged(O, base + d, o_tag, a * (load_tagged(G, base + d, g_tag) - k * static_cast<float>(r[d])));
}

// The two layouts of the training path, with 16-byte aligned rows: G, W and out of one
// dtype (grad_W's GEMM writes grad_w in w's dtype, projected in place), and a 16-bit G
// with an fp32 W and out (fp16/bf16 x with an fp32 W).  The same warp-per-row
// projection as the tagged kernel above, with 16-byte loads of G (V elements) and V
// elements of W and out per step (the tagged kernel: 2-byte loads, 1.18 ms of a 9.1 ms
// step on an H200 at C=2^20, D=512, bf16, for ~3 GiB of traffic).
template <typename g_t, typename w_t, int V>
__global__ void project_rows_vec_kernel(const g_t* G, const w_t* __restrict__ W, const float* __restrict__ winv,
                                        w_t* O, int64_t n, int64_t D, bool scale_rows) {
  // O may be G itself (same dtype): each element is read, then written, by one thread.
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWRows + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return;
  const int64_t base = row * D;
  float dot = 0.f;
  for (int64_t d = static_cast<int64_t>(lane) * V; d < D; d += 32 * V) {
    float g[V], w[V];
    load_vec<g_t, V>(G + base + d, g);
    load_vec<w_t, V>(W + base + d, w);
#pragma unroll
    for (int k = 0; k < V; ++k) dot += w[k] * g[k];
  }
  dot = warp_sum(dot);
  const float coef = projection_coef(winv[row], dot);
  const float a = scale_rows ? winv[row] : 1.f;
  for (int64_t d = static_cast<int64_t>(lane) * V; d < D; d += 32 * V) {
    float g[V], w[V];
    load_vec<g_t, V>(G + base + d, g);
    load_vec<w_t, V>(W + base + d, w);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = a * (g[k] - coef * w[k]);
    store_vec<w_t, V>(O + base + d, g);
  }
}

// out_j = W_j * winv_j, the fp16 GEMMs' normalised W rows: a warp per row, V elements a
// lane step (V = 8: two 16-byte loads of fp32, one 16-byte store of fp16; V = 1 for rows
// off 16-byte boundaries).  at::mul_out with winv broadcast over the row ran as ATen's
// strided (non-vector) kernel: 49 us per 24576 x 512 fp32 chunk, 1.5 TB/s, 4.25 ms of a
// 13.2 ms step (86 calls; H200, B = 512, C = 2^20, fp16 x / fp32 W, 2026-12-04), where a
// plain vector cast of the same chunk took 22 us.
template <typename in_t, typename out_t, int V>
__global__ void normalize_rows_kernel(const in_t* __restrict__ W, const float* __restrict__ winv,
                                      out_t* __restrict__ O, int64_t n, int64_t D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWRows + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return;
  const int64_t base = row * D;
  const float a = winv[row];
  for (int64_t d = static_cast<int64_t>(lane) * V; d < D; d += 32 * V) {
    float v[V];
    load_vec<in_t, V>(W + base + d, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] *= a;
    store_vec<out_t, V>(O + base + d, v);
  }
}

// Host side: calls f(V, R) with compile-time V and R of the tile kernels: V = 16 /
// sizeof(scalar_t) (16-byte loads) when `vec`, else V = R = 1 (rows not 16-byte aligned:
// an odd chunk width, the last chunk).
template <typename scalar_t, typename F>
void dispatch_tile(bool vec, int R, F&& f) {
  constexpr int kV = 16 / static_cast<int>(sizeof(scalar_t));
  if (!vec) {
    f(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{});
  } else if (R == 4) {
    f(std::integral_constant<int, kV>{}, std::integral_constant<int, 4>{});
  } else if (R == 2) {
    f(std::integral_constant<int, kV>{}, std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, kV>{}, std::integral_constant<int, 1>{});
  }
}

}  // namespace ek
