// Host interface of the fused CUTLASS kernels (sm_90a only): plain C++, no CUTLASS or
// torch types, so that the extension's glue includes it without CUTLASS's headers.
//
// Kernels (expface_kernels/gemm_floor_model.py is their executable specification):
//   1. forward(...):   per (class tile, row) partial Σ_j exp(z_ij − o); no logits stored.
//   2. recompute(...): one class chunk, transposed (classes are the GEMM rows): G'ᵀ
//                      (16-bit, chunk x B) and per (batch tile, class) partials of
//                      c'_j = Σ_i G'_ij·c_ij.
//   3. dx(...):        grad_x̂ += G'·W_chunk, fp32 accumulation across chunks.
//   4. dw(...):        grad_W_chunk = G'ᵀ·x̂ − (c'_j·w_inv_j)·W_j.
// The partial buffers are summed by the glue (a C- or B-sized reduction, no atomics).
//
// Layouts (row-major, int64 leading dimensions): x̂ (B, D); W (C, D); G'ᵀ (chunk, ld_g)
// with ld_g >= B. TMA needs 16-byte aligned base pointers and leading dimensions, and
// CUTLASS's can_implement a contiguous extent that is a multiple of 8 elements: D always,
// and B for the recompute, dX and dW kernels (the glue pads the batch). Every float/int32 vector the epilogues read must lie in a
// buffer padded to a whole tile (kTileM or kTileN elements): the column-vector loads read
// 16 bytes at a time past the last element. Every entry point returns 0 on success, else a
// cutlass::Status code (can_implement refused the shapes, or a launch failed).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace ek_cutlass {

enum class Element : int { kBF16 = 0, kF16 = 1 };

// The CTA tile (M, N) of every kernel; the partial buffers' shapes derive from it.
constexpr int kTileM = 128;
constexpr int kTileN = 128;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t v, int64_t m) { return (v + m - 1) / m; }

struct ForwardArgs {
  int64_t B, C, D;
  const void* x_hat;            // (B, D) Element
  const void* w;                // (C, D) Element
  const float* w_inv;           // (C,)
  const int32_t* target_col;    // (B,) y_i − offset, −1 when not in this block
  const float* target_logit;    // (B,)
  float s, o;
  float* partial_sumexp;        // (ceil_div(C, kTileN), round_up(B, kTileM)): [tile][row]
};

struct RecomputeArgs {
  int64_t B, N, D;              // N: classes in this chunk
  const void* x_hat;            // (B, D) Element
  const void* w_chunk;          // (N, D) Element
  const float* w_inv_chunk;     // (N,)
  const int32_t* target_class;  // (B,) y_i − offset − chunk start
  const float* target_grad;     // (B,)
  const float* lse;             // (B,)
  const float* grad_row;        // (B,)
  float s;
  void* g_prime_t;              // (N, ld_g) Element: G'ᵀ
  int64_t ld_g;
  float* partial_c_prime;       // (ceil_div(B, kTileN), round_up(N, kTileM)): [batch tile][class]
};

struct DxArgs {
  int64_t B, D, N;              // GEMM M = B, N = D, K = N classes
  const void* g_prime_t;        // (N, ld_g) Element: G'ᵀ
  int64_t ld_g;
  const void* w_chunk;          // (N, D) Element
  float* grad_x;                // (B, D) fp32, read and written (beta = 1)
};

struct DwArgs {
  int64_t N, D, B;              // GEMM M = N classes, N = D, K = B
  const void* g_prime_t;        // (N, ld_g) Element: G'ᵀ
  int64_t ld_g;
  const void* x_hat;            // (B, D) Element
  const void* w_chunk;          // (N, D) Element: the epilogue's C operand
  const float* c_prime;         // (N,) summed partials
  const float* w_inv_chunk;     // (N,)
  void* grad_w_chunk;           // (N, D) Element
};

// Workspace bytes each kernel needs (the persistent tile scheduler's), for these shapes.
size_t forward_workspace(Element e, const ForwardArgs& a);
size_t recompute_workspace(Element e, const RecomputeArgs& a);
size_t dx_workspace(Element e, const DxArgs& a);
size_t dw_workspace(Element e, const DwArgs& a);

int forward(Element e, const ForwardArgs& a, void* workspace, cudaStream_t stream);
int recompute(Element e, const RecomputeArgs& a, void* workspace, cudaStream_t stream);
int dx(Element e, const DxArgs& a, void* workspace, cudaStream_t stream);
int dw(Element e, const DwArgs& a, void* workspace, cudaStream_t stream);

}  // namespace ek_cutlass
