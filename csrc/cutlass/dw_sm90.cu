// Kernel 4, the dW GEMM of one class chunk with the normalisation projection as its
// epilogue (sm_90a): grad_W_j = (G'ᵀx̂)_j − (c'_j·w_inv_j)·W_j, W the C operand.
// GEMM: M = the chunk's classes, N = D, K = B (G'ᵀ K-major, x̂ N-major).
#include "cutlass/util/packed_stride.hpp"

#include "ek_cutlass_gemm.cuh"

namespace ek_cutlass {
namespace {

using namespace cutlass::epilogue::fusion;
using cute::_0;
using cute::_1;

template <class T>
using DwFusion = Sm90EVT<Sm90Compute<Project, T, float, kRound>,
                         Sm90AccFetch,                                                                 // (G'ᵀx̂)_jd
                         Sm90SrcFetch<T>,                                                              // W_jd
                         Sm90ColBroadcast<0, TileShape, float, float, cute::Stride<_1, _0, int64_t>>,  // c'_j
                         Sm90ColBroadcast<0, TileShape, float, float, cute::Stride<_1, _0, int64_t>>>; // w_inv_j

// A = G'ᵀ (N, ld_g) row-major: K-major; B = x̂ read as (D x B): N-major (RowMajor).
template <class T>
using DwGemm = GemmOf<T, cutlass::layout::RowMajor, cutlass::layout::RowMajor, T,
                      cutlass::layout::RowMajor, T, cutlass::layout::RowMajor, DwFusion<T>>;

template <class T>
int dw_impl(const DwArgs& a, bool run, size_t* bytes, void* workspace, cudaStream_t stream) {
  using G = DwGemm<T>;
  int M = int(a.N), N = int(a.D), K = int(a.B);
  auto sA = cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(M, K, 1));
  cute::get<0>(sA) = a.ld_g;
  auto sB = cutlass::make_cute_packed_stride(typename G::StrideB{}, cute::make_shape(N, K, 1));
  auto sC = cutlass::make_cute_packed_stride(typename G::StrideC{}, cute::make_shape(M, N, 1));
  auto sD = cutlass::make_cute_packed_stride(typename G::StrideD{}, cute::make_shape(M, N, 1));
  typename DwFusion<T>::Arguments fusion{{}, {}, {a.c_prime, 0.f, {}}, {a.w_inv_chunk, 0.f, {}}, {}};
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const T*>(a.g_prime_t), sA, static_cast<const T*>(a.x_hat), sB},
      {fusion, static_cast<const T*>(a.w_chunk), sC, static_cast<T*>(a.grad_w_chunk), sD}};
  return run_or_size<typename G::Gemm>(args, run, bytes, workspace, stream);
}

}  // namespace

EK_CUTLASS_ENTRY_POINTS(dw, DwArgs, dw_impl)

}  // namespace ek_cutlass
