// Device helpers shared by the CUDA files of the extension (epilogue_cuda.cu,
// prologue_cuda.cu): warp reductions and dtype tags.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace ek {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Operands whose dtype varies within one kernel (the projection's (rows, D) operands in
// float / half / bfloat16; the prologue's x and W in any of the four) are read through a
// tag, uniform per launch, so that the branch costs nothing and one instantiation per
// accumulation type serves every dtype combination.
enum FloatTag : int { kTagFloat = 0, kTagHalf = 1, kTagBFloat16 = 2, kTagDouble = 3 };

inline FloatTag float_tag(at::ScalarType t) {
  return t == at::kFloat ? kTagFloat : t == at::kHalf ? kTagHalf : t == at::kBFloat16 ? kTagBFloat16 : kTagDouble;
}

template <typename acc_t = float>
__device__ __forceinline__ acc_t load_tagged(const void* p, int64_t i, int tag) {
  if (tag == kTagFloat) return static_cast<acc_t>(static_cast<const float*>(p)[i]);
  if (tag == kTagHalf) return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
  if (tag == kTagBFloat16) return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
  return static_cast<acc_t>(static_cast<const double*>(p)[i]);
}

// Stores v rounded to the tag's dtype and returns the stored value.
template <typename acc_t>
__device__ __forceinline__ acc_t store_tagged(void* p, int64_t i, int tag, acc_t v) {
  if (tag == kTagFloat) {
    const float r = static_cast<float>(v);
    static_cast<float*>(p)[i] = r;
    return static_cast<acc_t>(r);
  }
  if (tag == kTagHalf) {
    const c10::Half r = static_cast<c10::Half>(static_cast<float>(v));
    static_cast<c10::Half*>(p)[i] = r;
    return static_cast<acc_t>(static_cast<float>(r));
  }
  if (tag == kTagBFloat16) {
    const c10::BFloat16 r = static_cast<c10::BFloat16>(static_cast<float>(v));
    static_cast<c10::BFloat16*>(p)[i] = r;
    return static_cast<acc_t>(static_cast<float>(r));
  }
  static_cast<double*>(p)[i] = static_cast<double>(v);
  return v;
}

}  // namespace ek
