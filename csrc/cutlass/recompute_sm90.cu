// Kernel 2, the backward recompute over one class chunk (sm_90a), transposed: classes
// are the GEMM's rows. It forms the chunk's cosines again, stores G'ᵀ in 16 bits as the
// GEMM's D, and reduces c'_j = Σ_i G'_ij·c_ij along each GEMM row into per (batch tile,
// class) partials. GEMM: M = the chunk's classes, N = B, K = D.
//
// Why transposed: c' reduces over the batch. With batch rows as GEMM rows that is a
// Sm90RowReduction, and its per-thread accumulators indexed by the epilogue subtile
// went to local memory (nvcc 13.0, CUTLASS 4.2: 976 bytes of stack frame per kernel as a
// graph, 1712 bytes and spills as a tree); the column reduction of the forward kernel
// compiles to registers only. The dX and dW GEMMs read G'ᵀ in either orientation.
#include "cutlass/util/packed_stride.hpp"

#include "ek_cutlass_gemm.cuh"

namespace ek_cutlass {
namespace {

using namespace cutlass::epilogue::fusion;
using cute::_0;
using cute::_1;

// A graph, not a tree: G' (node 6) feeds both the stored output and the reduction, and
// w_inv (node 1) both G' and c; a tree would evaluate the exp twice.
template <class T>
using RecomputeFusion = Sm90TopologicalVisitor<
    float,
    cute::tuple<cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<>,
                cute::seq<0, 1, 2, 3, 4, 5>, cute::seq<0, 1>, cute::seq<6, 7>, cute::seq<8>,
                cute::seq<6, 9>>,
    Sm90AccFetch,                                                                 // 0: W_j·x̂_i
    Sm90ColBroadcast<0, TileShape, float, float, cute::Stride<_1, _0, int64_t>>,  // 1: w_inv_j
    Sm90TargetRowMask<TileShape>,                                                 // 2: j == y_i
    Sm90RowBroadcast<0, TileShape, float, float, cute::Stride<_0, _1, int64_t>>,  // 3: target_grad_i
    Sm90RowBroadcast<0, TileShape, float, float, cute::Stride<_0, _1, int64_t>>,  // 4: lse_i
    Sm90RowBroadcast<0, TileShape, float, float, cute::Stride<_0, _1, int64_t>>,  // 5: grad_row_i
    Sm90Compute<GPrime<T>::template Fn, float, float, kRound>,                    // 6: G' (rounded)
    Sm90Compute<cutlass::multiplies, float, float, kRound>,                       // 7: c_ij
    Sm90Compute<cutlass::multiplies, float, float, kRound>,                       // 8: G'_ij·c_ij
    // 9: Σ over the tile's batch columns; FinalReduction = false: one partial per
    // (batch tile, class), summed by the caller.
    Sm90ColReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, TileShape, float, float, kRound,
                     cute::Stride<_1, _0, int64_t>, 4, true, /*FinalReduction=*/false>,
    Sm90Compute<FirstOf, T, float, kRound>>;                                      // 10: D = G'ᵀ

// A = W_chunk (N, D) row-major: K-major; B = x̂ (B, D): K-major (ColumnMajor as N x K).
template <class T>
using RecomputeGemm = GemmOf<T, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, void,
                             cutlass::layout::RowMajor, T, cutlass::layout::RowMajor, RecomputeFusion<T>>;

template <class T>
int recompute_impl(const RecomputeArgs& a, bool run, size_t* bytes, void* workspace, cudaStream_t stream) {
  using G = RecomputeGemm<T>;
  int M = int(a.N), N = int(a.B), K = int(a.D);
  auto sA = cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(M, K, 1));
  auto sB = cutlass::make_cute_packed_stride(typename G::StrideB{}, cute::make_shape(N, K, 1));
  auto sD = cutlass::make_cute_packed_stride(typename G::StrideD{}, cute::make_shape(M, N, 1));
  cute::get<0>(sD) = a.ld_g;  // G'ᵀ rows are ld_g apart (B rounded up to 16 bytes)
  typename RecomputeFusion<T>::Arguments fusion{
      {}, {a.w_inv_chunk, 0.f, {}}, {a.target_class, -1, {}}, {a.target_grad, 0.f, {}},
      {a.lse, 0.f, {}}, {a.grad_row, 0.f, {}}, {a.s}, {}, {}, {a.partial_c_prime, 0.f, {}}, {}};
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const T*>(a.w_chunk), sA, static_cast<const T*>(a.x_hat), sB},
      {fusion, nullptr, typename G::StrideC{}, static_cast<T*>(a.g_prime_t), sD}};
  return run_or_size<typename G::Gemm>(args, run, bytes, workspace, stream);
}

}  // namespace

EK_CUTLASS_ENTRY_POINTS(recompute, RecomputeArgs, recompute_impl)

}  // namespace ek_cutlass
