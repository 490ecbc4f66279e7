// Kernel 3, dX of one class chunk (sm_90a): grad_x̂ += G'·W_chunk, accumulated in fp32
// across chunks (beta = 1 on the fp32 output; cuBLAS through torch would round each
// chunk's product to the 16-bit operand type first). GEMM: M = B, N = D, K = the chunk.
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "ek_cutlass_gemm.cuh"

namespace ek_cutlass {
namespace {

using DxFusion = cutlass::epilogue::fusion::LinearCombination<float, float, float, float, kRound>;

// A = G', read from G'ᵀ (N, ld_g) row-major: M-major (ColumnMajor); B = W_chunk read as
// (D x N): N-major (RowMajor).
template <class T>
using DxGemm = GemmOf<T, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, float,
                      cutlass::layout::RowMajor, float, cutlass::layout::RowMajor, DxFusion>;

template <class T>
int dx_impl(const DxArgs& a, bool run, size_t* bytes, void* workspace, cudaStream_t stream) {
  using G = DxGemm<T>;
  int M = int(a.B), N = int(a.D), K = int(a.N);
  auto sA = cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(M, K, 1));
  cute::get<1>(sA) = a.ld_g;
  auto sB = cutlass::make_cute_packed_stride(typename G::StrideB{}, cute::make_shape(N, K, 1));
  auto sC = cutlass::make_cute_packed_stride(typename G::StrideC{}, cute::make_shape(M, N, 1));
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const T*>(a.g_prime_t), sA, static_cast<const T*>(a.w_chunk), sB},
      {{1.f, 1.f}, a.grad_x, sC, a.grad_x, sC}};
  return run_or_size<typename G::Gemm>(args, run, bytes, workspace, stream);
}

}  // namespace

EK_CUTLASS_ENTRY_POINTS(dx, DxArgs, dx_impl)

}  // namespace ek_cutlass
