// Torch glue of the fused CUTLASS kernels: the backend contract's two primitives
// (expface_kernels/contract.py) on CUDA tensors, as ops of the library `expface_cutlass`.
//
//   lse_partials(x_hat, w, target_logit, labels, s, offset, o) -> (row_max, row_sumexp, w_inv)
//   grads(x_hat, w, w_inv, labels, lse, target_grad, grad_row, s, offset, chunk) -> (grad_x, grad_w)
//
// `o` is the fixed offset of gemm_floor_model.fixed_offset: the caller passes it only where
// that returns a number, and takes the running-max kernels of `extension` otherwise.
// Inputs: x_hat and w of one 16-bit dtype (bf16 or fp16), contiguous, D a multiple of 8
// (TMA's 16-byte strides); the caller checks and falls back. Extra memory: the C
// inverse norms, a (C/128, B) and a (B/128, chunk) fp32 partial buffer and one (chunk, B)
// 16-bit G'ᵀ buffer -- never B x C.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ek_cutlass.h"

namespace {

using ek_cutlass::ceil_div;
using ek_cutlass::round_up;

ek_cutlass::Element element_of(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "expface_cutlass: x_hat and w must be bfloat16 or float16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16 ? ek_cutlass::Element::kBF16 : ek_cutlass::Element::kF16;
}

void check_operands(const at::Tensor& x_hat, const at::Tensor& w) {
  TORCH_CHECK(x_hat.is_cuda() && w.is_cuda(), "expface_cutlass: CUDA tensors only");
  TORCH_CHECK(x_hat.scalar_type() == w.scalar_type(), "expface_cutlass: x_hat and w must share a dtype, got ",
              x_hat.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x_hat.is_contiguous() && w.is_contiguous(), "expface_cutlass: x_hat and w must be contiguous");
  TORCH_CHECK(x_hat.size(1) == w.size(1) && x_hat.size(1) % 8 == 0,
              "expface_cutlass: D must match and be a multiple of 8, got ", x_hat.size(1), " and ", w.size(1));
  element_of(w);
}

// The epilogue's row and column vector loads (Sm90ColBroadcast, Sm90RowBroadcast) read 16
// bytes at a time, predicated on the first element's coordinate only: a vector of n
// floats is read up to round_up(n, 4). Every such vector is therefore made in a buffer
// padded to a whole tile; the values past n are never used.
at::Tensor padded(const at::Tensor& v, int64_t tile, double fill = 0.0) {
  const int64_t n = v.size(0);
  at::Tensor out = at::full({round_up(std::max<int64_t>(n, 1), tile)}, fill, v.options());
  out.narrow(0, 0, n).copy_(v);
  return out;
}

// y_i − offset as int32 where the label lies in [offset, offset + c_local), else −1;
// padded to whole row tiles.
at::Tensor target_columns(const at::Tensor& labels, int64_t offset, int64_t c_local) {
  at::Tensor col = labels.to(at::kLong) - offset;
  at::Tensor inside = col.ge(0).logical_and(col.lt(c_local));
  return padded(at::where(inside, col, at::full_like(col, -1)).to(at::kInt), ek_cutlass::kTileM, -1);
}

// (C,) fp32 1/max(‖W_j‖, 1e-12): a view of a buffer padded to whole class tiles.
at::Tensor inverse_norms(const at::Tensor& w) {
  const int64_t C = w.size(0);
  at::Tensor buf = at::ones({round_up(std::max<int64_t>(C, 1), ek_cutlass::kTileN)}, w.options().dtype(at::kFloat));
  at::Tensor inv = buf.narrow(0, 0, C);
  at::linalg_vector_norm_out(inv, w, 2, {1}, false, at::kFloat);
  inv.clamp_min_(1e-12).reciprocal_();
  return inv;
}

void check_status(int status, const char* kernel) {
  TORCH_CHECK(status == 0, "expface_cutlass: the ", kernel, " kernel failed (cutlass::Status ", status, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_partials(const at::Tensor& x_hat, const at::Tensor& w,
                                                            const at::Tensor& target_logit,
                                                            const at::Tensor& labels, double s,
                                                            int64_t offset, double o) {
  check_operands(x_hat, w);
  c10::cuda::CUDAGuard guard(x_hat.device());
  const int64_t B = x_hat.size(0), C = w.size(0), D = x_hat.size(1);
  auto f32 = x_hat.options().dtype(at::kFloat);
  at::Tensor w_inv = inverse_norms(w);
  at::Tensor cols = target_columns(labels, offset, C);
  at::Tensor tl = padded(target_logit.to(at::kFloat), ek_cutlass::kTileM);
  at::Tensor partial = at::empty({ceil_div(C, ek_cutlass::kTileN), round_up(B, ek_cutlass::kTileM)}, f32);
  ek_cutlass::ForwardArgs a{B, C, D, x_hat.data_ptr(), w.data_ptr(), w_inv.data_ptr<float>(),
                            cols.data_ptr<int32_t>(), tl.data_ptr<float>(), float(s), float(o),
                            partial.data_ptr<float>()};
  auto e = element_of(w);
  at::Tensor ws = at::empty({int64_t(ek_cutlass::forward_workspace(e, a))}, x_hat.options().dtype(at::kByte));
  check_status(ek_cutlass::forward(e, a, ws.data_ptr(), at::cuda::getCurrentCUDAStream()), "forward");
  at::Tensor row_sumexp = partial.sum(0).narrow(0, 0, B);
  return {at::full({B}, o, f32), row_sumexp, w_inv};
}

std::tuple<at::Tensor, at::Tensor> grads(const at::Tensor& x_hat, const at::Tensor& w, const at::Tensor& w_inv,
                                         const at::Tensor& labels, const at::Tensor& lse,
                                         const at::Tensor& target_grad, const at::Tensor& grad_row, double s,
                                         int64_t offset, int64_t chunk) {
  check_operands(x_hat, w);
  TORCH_CHECK(chunk > 0 && chunk % ek_cutlass::kTileN == 0, "expface_cutlass: chunk must be a positive multiple of ",
              ek_cutlass::kTileN, ", got ", chunk);
  c10::cuda::CUDAGuard guard(x_hat.device());
  const int64_t B = x_hat.size(0), C = w.size(0), D = x_hat.size(1);
  const int64_t step = std::min(chunk, round_up(C, ek_cutlass::kTileN));
  // The batch is the contiguous extent of G'ᵀ and of the dX/dW operands, which CUTLASS's
  // can_implement requires to be a multiple of 8 (16 bytes): a ragged batch gets zero
  // rows with grad_row = 0 and no target, so that their G' is 0 and they add nothing.
  const int64_t Bp = round_up(B, 8);
  at::Tensor xp = Bp == B ? x_hat : at::cat({x_hat, at::zeros({Bp - B, D}, x_hat.options())});
  auto f32 = x_hat.options().dtype(at::kFloat);
  auto e = element_of(w);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor cols = target_columns(labels, offset, C);
  at::Tensor tg = padded(target_grad.to(at::kFloat), ek_cutlass::kTileM);
  at::Tensor lse32 = padded(lse.to(at::kFloat), ek_cutlass::kTileM);
  at::Tensor gr = padded(grad_row.to(at::kFloat).expand({B}), ek_cutlass::kTileM);
  // w_inv comes from lse_partials (a view of a tile-padded buffer); another caller's
  // tensor is copied into one.
  const bool reusable = w_inv.scalar_type() == at::kFloat && w_inv.is_contiguous() &&
                        w_inv.storage().nbytes() >= size_t(w_inv.storage_offset() + round_up(C, ek_cutlass::kTileN)) * 4;
  at::Tensor inv = reusable ? w_inv : padded(w_inv.to(at::kFloat), ek_cutlass::kTileN, 1.0);
  at::Tensor g_prime_t = at::empty({step, Bp}, w.options());
  at::Tensor partial = at::empty({ceil_div(Bp, ek_cutlass::kTileN), step}, f32);
  at::Tensor grad_x = at::zeros({Bp, D}, f32);
  at::Tensor grad_w = at::empty_like(w);
  at::Tensor ws;
  for (int64_t start = 0; start < C; start += step) {
    const int64_t n = std::min(step, C - start);
    at::Tensor classes_here = cols - int32_t(start);  // −1 − start and beyond-chunk values match no class row
    const char* w_chunk = static_cast<const char*>(w.data_ptr()) + start * D * w.element_size();
    const float* inv_chunk = inv.data_ptr<float>() + start;
    ek_cutlass::RecomputeArgs r{Bp, n, D, xp.data_ptr(), w_chunk, inv_chunk, classes_here.data_ptr<int32_t>(),
                                tg.data_ptr<float>(), lse32.data_ptr<float>(), gr.data_ptr<float>(), float(s),
                                g_prime_t.data_ptr(), Bp, partial.data_ptr<float>()};
    ek_cutlass::DxArgs x{Bp, D, n, g_prime_t.data_ptr(), Bp, w_chunk, grad_x.data_ptr<float>()};
    at::Tensor c_prime = at::zeros({round_up(n, ek_cutlass::kTileN)}, f32);
    ek_cutlass::DwArgs d{n, D, Bp, g_prime_t.data_ptr(), Bp, xp.data_ptr(), w_chunk, c_prime.data_ptr<float>(),
                         inv_chunk, static_cast<char*>(grad_w.data_ptr()) + start * D * w.element_size()};
    size_t need = std::max({ek_cutlass::recompute_workspace(e, r), ek_cutlass::dx_workspace(e, x),
                            ek_cutlass::dw_workspace(e, d)});
    if (!ws.defined() || size_t(ws.numel()) < need) ws = at::empty({int64_t(need)}, x_hat.options().dtype(at::kByte));
    check_status(ek_cutlass::recompute(e, r, ws.data_ptr(), stream), "recompute");
    // The partials are compact (B/128, round_up(n, 128)): the last chunk's rows are shorter.
    const int64_t rn = round_up(n, ek_cutlass::kTileM), mt = ceil_div(Bp, ek_cutlass::kTileN);
    at::Tensor c_prime_n = c_prime.narrow(0, 0, n);
    at::sum_out(c_prime_n, partial.view({-1}).narrow(0, 0, mt * rn).view({mt, rn}).narrow(1, 0, n), {0});
    check_status(ek_cutlass::dx(e, x, ws.data_ptr(), stream), "dx");
    check_status(ek_cutlass::dw(e, d, ws.data_ptr(), stream), "dw");
  }
  return {grad_x.narrow(0, 0, B), grad_w};
}

}  // namespace

TORCH_LIBRARY(expface_cutlass, m) {
  m.def("lse_partials(Tensor x_hat, Tensor w, Tensor target_logit, Tensor labels, float s, int offset, float o)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("grads(Tensor x_hat, Tensor w, Tensor w_inv, Tensor labels, Tensor lse, Tensor target_grad, "
        "Tensor grad_row, float s, int offset, int chunk) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(expface_cutlass, CUDA, m) {
  m.impl("lse_partials", &lse_partials);
  m.impl("grads", &grads);
}
