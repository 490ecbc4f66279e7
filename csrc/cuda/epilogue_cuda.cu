// CUDA epilogues of the expface_kernels extension and the CUDA registrations of its ops.
// The math is ek_math.h (shared with the CPU epilogues); the GEMMs are cuBLAS via
// at::mm in the device-agnostic driver (ek_driver.cpp).  Layout: one thread block
// per logits row (rows x n row-major), 256 threads striding over the row, block
// reductions for the row max / sum; int64 offsets throughout.  fp32 accumulation;
// logits dtypes float/half/bfloat16 (float64 is CPU-only, rejected by the driver).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cusparse.h / cublas_v2.h,
// which minimal toolkits (CI's) do not ship; the GEMMs go through at::mm anyway.
// Kept light for nvcc (CI compiles it for two architectures on 2 cores): ATen core
// Tensor + Dispatch only; the EpilogueOps table, device guard and registrations are
// host C++ in ops_cuda.cpp.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../ek_math.h"
#include "../ek_driver.h"
#include "epilogue_cuda.h"

#define EK_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace ek {
namespace {

using at::Tensor;
// Row kernels (lse / grads / fused): one block of kThreads per logits row.  1024 so
// that few rows (a fused row block can be 64 rows of 2^20 classes) still keep many
// loads in flight per SM.  Per-row-of-W kernels (norms, projection): a warp per row,
// kWRows warps per block.
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kWRows = 8;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
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

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) lse_block_kernel(const scalar_t* __restrict__ L, const float* __restrict__ winv,
                                 const float* __restrict__ tl, const int64_t* __restrict__ labels, float s,
                                 int64_t col0, int64_t n, float* __restrict__ M, float* __restrict__ S) {
  __shared__ float smem[kWarps];
  const int64_t i = blockIdx.x;
  const scalar_t* Li = L + i * n;
  const int64_t t = target_col(labels[i], col0, n);
  const float mx = row_max_z(Li, winv, s, n, t, tl[i], smem);
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += kThreads)
    if (j != t) sum += ek_exp(logit<float>(static_cast<float>(Li[j]), winv[j], s) - mx);
  sum = block_sum(sum, smem);
  if (threadIdx.x == 0) {
    if (t >= 0) sum += ek_exp(tl[i] - mx);
    float m = M[i], sm = S[i];
    merge_partial(m, sm, mx, sum);
    M[i] = m;
    S[i] = sm;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grads_block_kernel(scalar_t* __restrict__ L, const float* __restrict__ winv,
                                   const int64_t* __restrict__ labels, const float* __restrict__ lse,
                                   const float* __restrict__ tg, const float* __restrict__ gr, float s, int64_t col0,
                                   int64_t n) {
  const int64_t i = blockIdx.x;
  scalar_t* Li = L + i * n;
  const float g = gr[i];
  const int64_t t = target_col(labels[i], col0, n);
  const float grs = g * s, l = lse[i];
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    float v;
    if (g == 0.f) {
      v = 0.f;  // ignored row: exact zeros
    } else if (j == t) {
      v = tg[i] * winv[j];
    } else {
      v = grad_scaled<float>(static_cast<float>(Li[j]), winv[j], s, l, grs);
    }
    Li[j] = static_cast<scalar_t>(v);
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

// The (rows, D) operands of the projection come in float, half or bfloat16 (the
// grad_W GEMM's dtype in, w's or fp32 out): one kernel per W dtype, the other two
// dtypes read through a tag (uniform per launch, so the branch costs nothing).
enum FloatTag : int { kTagFloat = 0, kTagHalf = 1, kTagBFloat16 = 2 };

inline FloatTag float_tag(at::ScalarType t) {
  return t == at::kFloat ? kTagFloat : t == at::kHalf ? kTagHalf : kTagBFloat16;
}

__device__ __forceinline__ float load_tagged(const void* p, int64_t i, int tag) {
  if (tag == kTagFloat) return static_cast<const float*>(p)[i];
  if (tag == kTagHalf) return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
  return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
}

__device__ __forceinline__ void store_tagged(void* p, int64_t i, int tag, float v) {
  if (tag == kTagFloat) {
    static_cast<float*>(p)[i] = v;
  } else if (tag == kTagHalf) {
    static_cast<c10::Half*>(p)[i] = static_cast<c10::Half>(v);
  } else {
    static_cast<c10::BFloat16*>(p)[i] = static_cast<c10::BFloat16>(v);
  }
}

template <typename scalar_t>
__global__ void project_rows_kernel(const void* G, int g_tag, const scalar_t* __restrict__ W,
                                    const float* __restrict__ winv, void* O, int o_tag, int64_t n, int64_t D) {
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
  for (int64_t d = lane; d < D; d += 32)
    store_tagged(O, base + d, o_tag, load_tagged(G, base + d, g_tag) - k * static_cast<float>(r[d]));
}

inline unsigned int rows_grid(int64_t rows) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "expface_kernels: too many rows for one launch: ", num(rows));
  return static_cast<unsigned int>(rows);
}

}  // namespace

void row_inv_norm_cuda(const Tensor& w, const Tensor& winv) {
  const int64_t n = w.size(0), D = w.size(1);
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  EK_DISPATCH_CUDA_TYPES(w.scalar_type(), "expface_row_inv_norm_cuda", [&] {
    row_inv_norm_kernel<scalar_t><<<rows_grid((n + kWRows - 1) / kWRows), kWRows * 32, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), winv.mutable_data_ptr<float>(), n, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void lse_block_cuda(const Tensor& L, const Tensor& winv, const Tensor& target_logit, const Tensor& labels, double s,
                    int64_t col0, const Tensor& row_max, const Tensor& row_sumexp) {
  const int64_t rows = L.size(0), n = L.size(1);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  EK_DISPATCH_CUDA_TYPES(L.scalar_type(), "expface_lse_block_cuda", [&] {
    lse_block_kernel<scalar_t><<<rows_grid(rows), kThreads, 0, stream>>>(
        L.const_data_ptr<scalar_t>(), winv.const_data_ptr<float>(), target_logit.const_data_ptr<float>(),
        labels.const_data_ptr<int64_t>(), static_cast<float>(s), col0, n, row_max.mutable_data_ptr<float>(),
        row_sumexp.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void grads_block_cuda(const Tensor& L, const Tensor& winv, const Tensor& labels, const Tensor& lse,
                      const Tensor& target_grad, const Tensor& grad_row, double s, int64_t col0) {
  const int64_t rows = L.size(0), n = L.size(1);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  EK_DISPATCH_CUDA_TYPES(L.scalar_type(), "expface_grads_block_cuda", [&] {
    grads_block_kernel<scalar_t><<<rows_grid(rows), kThreads, 0, stream>>>(
        L.mutable_data_ptr<scalar_t>(), winv.const_data_ptr<float>(), labels.const_data_ptr<int64_t>(),
        lse.const_data_ptr<float>(), target_grad.const_data_ptr<float>(), grad_row.const_data_ptr<float>(),
        static_cast<float>(s), col0, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fused_rows_cuda(const Tensor& L, const Tensor& winv, const Tensor& target_logit, const Tensor& target_factor,
                     const Tensor& labels, const Tensor& grad_row, double s, const Tensor& lse, const Tensor& row_scale,
                     const Tensor& tgrad) {
  const int64_t rows = L.size(0), n = L.size(1);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  EK_DISPATCH_CUDA_TYPES(L.scalar_type(), "expface_fused_rows_cuda", [&] {
    fused_rows_kernel<scalar_t><<<rows_grid(rows), kThreads, 0, stream>>>(
        L.mutable_data_ptr<scalar_t>(), winv.const_data_ptr<float>(), target_logit.const_data_ptr<float>(),
        target_factor.const_data_ptr<float>(), labels.const_data_ptr<int64_t>(), grad_row.const_data_ptr<float>(),
        static_cast<float>(s), n, lse.mutable_data_ptr<float>(), row_scale.mutable_data_ptr<float>(),
        tgrad.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void project_rows_cuda(const Tensor& gs, const Tensor& w, const Tensor& winv, const Tensor& out) {
  const int64_t n = gs.size(0), D = gs.size(1);
  if (n == 0) return;
  for (const Tensor* t : {&gs, &out}) {
    const auto st = t->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                "expface_kernels: internal: project_rows takes float32/float16/bfloat16 on CUDA");
    TORCH_CHECK(t->is_contiguous(), "expface_kernels: internal: project_rows needs contiguous rows");
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int grid = rows_grid((n + kWRows - 1) / kWRows);
  EK_DISPATCH_CUDA_TYPES(w.scalar_type(), "expface_project_rows_cuda", [&] {
    project_rows_kernel<scalar_t><<<grid, kWRows * 32, 0, stream>>>(
        gs.const_data_ptr(), float_tag(gs.scalar_type()), w.const_data_ptr<scalar_t>(), winv.const_data_ptr<float>(),
        out.mutable_data_ptr(), float_tag(out.scalar_type()), n, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ek
