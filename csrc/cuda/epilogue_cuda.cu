// CUDA epilogues of the expface_kernels extension.
// The math is ek_math.h (shared with the CPU epilogues); the GEMMs are cuBLAS via
// at::mm in the device-agnostic driver (ek_driver.cpp).  Layouts: the class-chunk
// epilogues of the training path (lse_block, grads_block) take tiles of R rows x the
// chunk with 16-byte loads; the fused row-block epilogue (CPU's training path, kept
// correct on CUDA) one 1024-thread block per row; the per-row-of-W kernels (norms,
// projection) a warp per row.  int64 offsets throughout, fp32 accumulation; logits
// dtypes float/half/bfloat16 (float64 is CPU-only, rejected by the driver).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cusparse.h / cublas_v2.h,
// which minimal toolkits (CI's) do not ship; the GEMMs go through at::mm anyway.
// Kept light for nvcc (CI compiles it for two architectures on 2 cores): ATen core
// Tensor + Dispatch only; the EpilogueOps table, device guard and registrations are
// host C++ in ops_cuda.cpp.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../ek_math.h"
#include "../ek_driver.h"
#include "ek_cuda_common.cuh"
#include "epilogue_cuda.h"
#include "epilogue_kernels.cuh"

#define EK_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace ek {
namespace {

using at::Tensor;

inline unsigned int rows_grid(int64_t rows) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "expface_kernels: too many rows for one launch: ", num(rows));
  return static_cast<unsigned int>(rows);
}

// Rows per tile of the chunk epilogues: the largest R in {4, 2, 1} that still gives
// every SM a tile (winv is read rows/R times per chunk).  B=512 on an H200 (132 SMs):
// R = 2, 256 tiles; B = 1024: R = 4.
int tile_rows(int64_t rows) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if ((rows + 3) / 4 >= sms) return 4;
  if ((rows + 1) / 2 >= sms) return 2;
  return 1;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The vector path needs every row of L and winv's start on a 16-byte boundary.
template <typename scalar_t>
bool tile_vectorizable(const Tensor& L, const Tensor& winv) {
  constexpr int kV = 16 / static_cast<int>(sizeof(scalar_t));
  return L.size(1) % kV == 0 && aligned16(L.const_data_ptr()) && aligned16(winv.const_data_ptr());
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
  if (rows == 0 || n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int R = tile_rows(rows);
  EK_DISPATCH_CUDA_TYPES(L.scalar_type(), "expface_lse_block_cuda", [&] {
    dispatch_tile<scalar_t>(tile_vectorizable<scalar_t>(L, winv), R, [&](auto v, auto r) {
      constexpr int kV = decltype(v)::value, kR = decltype(r)::value;
      lse_tile_kernel<scalar_t, kV, kR><<<rows_grid((rows + kR - 1) / kR), kTileThreads, 0, stream>>>(
          L.const_data_ptr<scalar_t>(), winv.const_data_ptr<float>(), target_logit.const_data_ptr<float>(),
          labels.const_data_ptr<int64_t>(), static_cast<float>(s), col0, rows, n, row_max.mutable_data_ptr<float>(),
          row_sumexp.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void grads_block_cuda(const Tensor& L, const Tensor& winv, const Tensor& labels, const Tensor& lse,
                      const Tensor& target_grad, const Tensor& grad_row, double s, int64_t col0) {
  const int64_t rows = L.size(0), n = L.size(1);
  if (rows == 0 || n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int R = tile_rows(rows);
  EK_DISPATCH_CUDA_TYPES(L.scalar_type(), "expface_grads_block_cuda", [&] {
    dispatch_tile<scalar_t>(tile_vectorizable<scalar_t>(L, winv), R, [&](auto v, auto r) {
      constexpr int kV = decltype(v)::value, kR = decltype(r)::value;
      grads_tile_kernel<scalar_t, kV, kR><<<rows_grid((rows + kR - 1) / kR), kTileThreads, 0, stream>>>(
          L.mutable_data_ptr<scalar_t>(), winv.const_data_ptr<float>(), labels.const_data_ptr<int64_t>(),
          lse.const_data_ptr<float>(), target_grad.const_data_ptr<float>(), grad_row.const_data_ptr<float>(),
          static_cast<float>(s), col0, rows, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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

void normalize_rows_cuda(const Tensor& w, const Tensor& winv, const Tensor& out) {
  const int64_t n = w.size(0), D = w.size(1);
  TORCH_CHECK(out.scalar_type() == at::kHalf && w.is_contiguous() && out.is_contiguous(),
              "expface_kernels: internal: normalize_rows writes contiguous float16 rows");
  if (n == 0 || D == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int grid = rows_grid((n + kWRows - 1) / kWRows);
  constexpr int kV = 8;  // 16 bytes of fp16 out
  const bool vec = D % kV == 0 && aligned16(w.const_data_ptr()) && aligned16(out.const_data_ptr());
  EK_DISPATCH_CUDA_TYPES(w.scalar_type(), "expface_normalize_rows_cuda", [&] {
    const auto* W = w.const_data_ptr<scalar_t>();
    auto* O = out.mutable_data_ptr<at::Half>();
    if (vec) {
      normalize_rows_kernel<scalar_t, at::Half, kV><<<grid, kWRows * 32, 0, stream>>>(
          W, winv.const_data_ptr<float>(), O, n, D);
    } else {
      normalize_rows_kernel<scalar_t, at::Half, 1><<<grid, kWRows * 32, 0, stream>>>(
          W, winv.const_data_ptr<float>(), O, n, D);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void project_rows_cuda(const Tensor& gs, const Tensor& w, const Tensor& winv, const Tensor& out, bool scale_rows) {
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
  const auto gt = gs.scalar_type(), wt = w.scalar_type();
  const bool one_dtype = gt == wt && out.scalar_type() == wt;
  const bool low_g_fp32_w = wt == at::kFloat && out.scalar_type() == at::kFloat && gt != at::kFloat;
  const int64_t vec = 16 / static_cast<int64_t>(gs.element_size());  // G elements per 16-byte load
  if ((one_dtype || low_g_fp32_w) && D % vec == 0 && aligned16(gs.const_data_ptr()) &&
      aligned16(w.const_data_ptr()) && aligned16(out.const_data_ptr())) {
    EK_DISPATCH_CUDA_TYPES(gt, "expface_project_rows_cuda", [&] {
      using g_t = scalar_t;
      constexpr int kV = 16 / static_cast<int>(sizeof(g_t));
      if (one_dtype) {
        project_rows_vec_kernel<g_t, g_t, kV><<<grid, kWRows * 32, 0, stream>>>(
            gs.const_data_ptr<g_t>(), w.const_data_ptr<g_t>(), winv.const_data_ptr<float>(),
            out.mutable_data_ptr<g_t>(), n, D, scale_rows);
      } else {
        project_rows_vec_kernel<g_t, float, kV><<<grid, kWRows * 32, 0, stream>>>(
            gs.const_data_ptr<g_t>(), w.const_data_ptr<float>(), winv.const_data_ptr<float>(),
            out.mutable_data_ptr<float>(), n, D, scale_rows);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  EK_DISPATCH_CUDA_TYPES(w.scalar_type(), "expface_project_rows_cuda", [&] {
    project_rows_kernel<scalar_t><<<grid, kWRows * 32, 0, stream>>>(
        gs.const_data_ptr(), float_tag(gs.scalar_type()), w.const_data_ptr<scalar_t>(), winv.const_data_ptr<float>(),
        out.mutable_data_ptr(), float_tag(out.scalar_type()), n, D, scale_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ek
