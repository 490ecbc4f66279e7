// One place that assembles a Hopper warp-specialised GEMM with a custom epilogue visitor
// tree (CUTLASS 3.x CollectiveBuilder API) and runs it; the three kernel files only
// choose layouts, element types and the tree.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"

#include "ek_cutlass.h"
#include "ek_cutlass_evt.cuh"

namespace ek_cutlass {

using TileShape = cute::Shape<cute::Int<kTileM>, cute::Int<kTileN>, cute::_64>;
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
// Ping-pong: two consumer warp groups take alternate tiles, so one tile's epilogue (exp,
// reductions) runs while the other's mainloop keeps the tensor cores busy -- at K = 512
// the epilogue is too long to hide inside one tile's mainloop.
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

template <class E> struct ElementOf;
template <> struct ElementOf<cutlass::bfloat16_t> { static constexpr Element value = Element::kBF16; };
template <> struct ElementOf<cutlass::half_t> { static constexpr Element value = Element::kF16; };

// 16 bytes for TMA; for a void operand any value (it is not loaded or stored).
template <class T> constexpr int alignment() {
  if constexpr (cute::is_void_v<T>) { return 8; } else { return 16 / int(sizeof(T)); }
}

template <class ElementAB, class LayoutA, class LayoutB, class ElementC, class LayoutC,
          class ElementD, class LayoutD, class Fusion>
struct GemmOf {
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      ElementC, LayoutC, alignment<ElementC>(), ElementD, LayoutD, alignment<ElementD>(),
      EpilogueSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, alignment<ElementAB>(),
      ElementAB, LayoutB, alignment<ElementAB>(), float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>,
                                                      CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
};

// Workspace bytes, or (with run = true) can_implement + initialize + run.
template <class Gemm>
int run_or_size(typename Gemm::Arguments const& args, bool run, size_t* bytes, void* workspace,
                cudaStream_t stream) {
  if (!run) {
    *bytes = Gemm::get_workspace_size(args);
    return 0;
  }
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess) return int(st);
  st = gemm.initialize(args, workspace, stream);
  if (st != cutlass::Status::kSuccess) return int(st);
  return int(gemm.run(stream));
}

// A kernel file's two entry points (ek_cutlass.h) over its impl<T>(args, run, bytes,
// workspace, stream): NAME_workspace(e, args) -> bytes and NAME(e, args, workspace,
// stream) -> status, T the 16-bit element type e names.
#define EK_CUTLASS_ENTRY_POINTS(NAME, ARGS, IMPL)                                              \
  size_t NAME##_workspace(Element e, const ARGS& a) {                                          \
    size_t bytes = 0;                                                                          \
    if (e == Element::kBF16) IMPL<cutlass::bfloat16_t>(a, false, &bytes, nullptr, nullptr);    \
    else IMPL<cutlass::half_t>(a, false, &bytes, nullptr, nullptr);                            \
    return bytes;                                                                              \
  }                                                                                            \
  int NAME(Element e, const ARGS& a, void* workspace, cudaStream_t stream) {                  \
    if (e == Element::kBF16) return IMPL<cutlass::bfloat16_t>(a, true, nullptr, workspace, stream); \
    return IMPL<cutlass::half_t>(a, true, nullptr, workspace, stream);                         \
  }

}  // namespace ek_cutlass
