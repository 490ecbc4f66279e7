// Epilogue pieces of the fused CUTLASS kernels (sm_90a): the per-element functors of the
// four kernels' epilogue visitor trees and the one custom visitor node they need.
//
// The arithmetic is that of expface_kernels/gemm_floor_model.py (its docstring derives
// it); the names below follow it. Every functor works on one fragment of fp32 values
// (cutlass::Array<float, N>) and takes its scalars through an `Arguments` struct, which
// Sm90Compute passes as the last argument.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/array.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_store_tma_warpspecialized.hpp"

namespace ek_cutlass {

// exp(v) as exp2(v·log2 e): one MUFU.EX2 per element instead of expf's range reduction.
constexpr float kLog2e = 1.4426950408889634f;

// --- Kernel 1 (forward): exp(z − o) with the target logit put in at column y_i --------

struct ForwardTermArgs {
  float s = 64.f;  // the scale
  float o = 0.f;   // the fixed offset of fact (a) (gemm_floor_model.fixed_offset)
};

template <class T>
struct ForwardTerm {
  using Arguments = ForwardTermArgs;
  // acc = x̂_i·W_j; w_inv = 1/max(‖W_j‖, 1e-12); is_target = 1 at column y_i;
  // target = s·ψ(c_iy), precomputed by the prologue.
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& w_inv, T const& is_target,
                                   T const& target, Arguments const& a) const {
    T out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) {
      float z = is_target[i] != 0.f ? target[i] : a.s * acc[i] * w_inv[i];
      out[i] = ::exp2f((z - a.o) * kLog2e);
    }
    return out;
  }
};

// --- Kernel 2 (backward recompute): G' and the summand of c' ---------------------------

struct GPrimeArgs {
  float s = 64.f;
};

// G'_ij = w_inv_j·(y_i == j ? target_grad_i : grad_row_i·s·exp(s·c_ij − lse_i)), rounded
// through Stored (the 16-bit type the dX and dW GEMMs read) so that c' is reduced from
// the very values those GEMMs see.
template <class Stored>
struct GPrime {
  template <class T>
  struct Fn {
    using Arguments = GPrimeArgs;
    CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& w_inv, T const& is_target,
                                     T const& target_grad, T const& lse, T const& grad_row,
                                     Arguments const& a) const {
      cutlass::NumericConverter<Stored, float> to_stored;
      cutlass::NumericConverter<float, Stored> to_float;
      T out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < T::kElements; ++i) {
        float c = acc[i] * w_inv[i];
        float g = is_target[i] != 0.f
                      ? target_grad[i]
                      : grad_row[i] * a.s * ::exp2f((a.s * c - lse[i]) * kLog2e);
        out[i] = to_float(to_stored(g * w_inv[i]));
      }
      return out;
    }
  };
};

// The first input, unchanged: the root of kernel 2's graph stores G' while the row
// reduction of G'·c (its second input) runs for its side effect.
template <class T>
struct FirstOf {
  CUTLASS_HOST_DEVICE T operator()(T const& a, T const&) const { return a; }
};

// --- Kernel 4 (dW): the normalisation projection as the epilogue -----------------------

// grad_W_ij = acc_ij − (c'_i·w_inv_i)·W_ij, without the projection where ‖W_i‖ < 1e-12
// (F.normalize's backward; w_inv is 1e12 there). Rows i are classes here.
template <class T>
struct Project {
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& w, T const& c_prime,
                                   T const& w_inv) const {
    T out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) {
      float scale = w_inv[i] < 1e12f ? c_prime[i] * w_inv[i] : 0.f;
      out[i] = acc[i] - scale * w[i];
    }
    return out;
  }
};

// --- The custom nodes: 1 where an element is its row's (or column's) target -----------

// A column-vector load (one int32 per row: the row's target column relative to this
// GEMM's first column, −1 or out of range when it is not in this GEMM) that outputs, per
// element, 1.f where the element's global column equals it and 0.f elsewhere. The stock
// nodes cannot express this: Sm90Compute sees values, never coordinates. The epilogue's
// coordinate tensor tCcD is relative to the CTA tile (sm90_epilogue_tma_warpspecialized.hpp),
// so the tile's first column is added here.
template <class CtaTileShapeMNK>
struct Sm90TargetColumnMask
    : cutlass::epilogue::fusion::Sm90ColBroadcast<0, CtaTileShapeMNK, int32_t, int32_t,
                                                  cute::Stride<cute::_1, cute::_0, int64_t>> {
  using Base = cutlass::epilogue::fusion::Sm90ColBroadcast<0, CtaTileShapeMNK, int32_t, int32_t,
                                                           cute::Stride<cute::_1, cute::_0, int64_t>>;
  using Base::Base;

  template <class BaseCallbacks>
  struct Callbacks : BaseCallbacks {
    CUTLASS_DEVICE Callbacks(BaseCallbacks&& base, int n_first)
        : BaseCallbacks(static_cast<BaseCallbacks&&>(base)), n_first(n_first) {}

    int n_first;  // global column of the tile's column 0

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize>
    visit(cutlass::Array<ElementAccumulator, FragmentSize> const& frg_acc, int epi_v, int epi_m,
          int epi_n) {
      cutlass::Array<int32_t, FragmentSize> label = BaseCallbacks::visit(frg_acc, epi_v, epi_m, epi_n);
      auto coords = this->tCcCol(cute::_, cute::_, cute::_, epi_m, epi_n);
      cutlass::Array<float, FragmentSize> out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        int col = n_first + int(cute::get<1>(coords(epi_v * FragmentSize + i)));
        out[i] = label[i] == col ? 1.f : 0.f;
      }
      return out;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto
  get_consumer_store_callbacks(cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto base = Base::template get_consumer_store_callbacks<ReferenceSrc>(args);
    int n_first = int(cute::get<1>(args.tile_coord_mnkl)) * int(cute::size<1>(CtaTileShapeMNK{}));
    return Callbacks<decltype(base)>(static_cast<decltype(base)&&>(base), n_first);
  }
};

// The transposed case (classes as GEMM rows, batch rows as GEMM columns): a row-vector
// load (one int32 per GEMM column: that batch row's target class relative to this GEMM's
// first row) that outputs 1.f where the element's global row equals it. Sm90RowBroadcast
// stages the vector in shared memory and keeps no coordinates, so this node keeps the
// epilogue's (tile-relative) tCcD and the tile's first row.
template <class CtaTileShapeMNK>
struct Sm90TargetRowMask
    : cutlass::epilogue::fusion::Sm90RowBroadcast<0, CtaTileShapeMNK, int32_t, int32_t,
                                                  cute::Stride<cute::_0, cute::_1, int64_t>> {
  using Base = cutlass::epilogue::fusion::Sm90RowBroadcast<0, CtaTileShapeMNK, int32_t, int32_t,
                                                           cute::Stride<cute::_0, cute::_1, int64_t>>;
  using Base::Base;

  template <class BaseCallbacks, class CoordTensor>
  struct Callbacks : BaseCallbacks {
    CUTLASS_DEVICE Callbacks(BaseCallbacks&& base, CoordTensor tCcD, int m_first)
        : BaseCallbacks(static_cast<BaseCallbacks&&>(base)), tCcD(tCcD), m_first(m_first) {}

    CoordTensor tCcD;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) tile-relative (m, n)
    int m_first;       // global row of the tile's row 0

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize>
    visit(cutlass::Array<ElementAccumulator, FragmentSize> const& frg_acc, int epi_v, int epi_m,
          int epi_n) {
      cutlass::Array<int32_t, FragmentSize> label = BaseCallbacks::visit(frg_acc, epi_v, epi_m, epi_n);
      auto coords = tCcD(cute::_, cute::_, cute::_, epi_m, epi_n);
      cutlass::Array<float, FragmentSize> out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        int row = m_first + int(cute::get<0>(coords(epi_v * FragmentSize + i)));
        out[i] = label[i] == row ? 1.f : 0.f;
      }
      return out;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto
  get_consumer_store_callbacks(cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto base = Base::template get_consumer_store_callbacks<ReferenceSrc>(args);
    int m_first = int(cute::get<0>(args.tile_coord_mnkl)) * int(cute::size<0>(CtaTileShapeMNK{}));
    return Callbacks<decltype(base), decltype(args.tCcD)>(static_cast<decltype(base)&&>(base), args.tCcD, m_first);
  }
};

}  // namespace ek_cutlass
