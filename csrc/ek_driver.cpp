// ek_driver.cpp -- device-agnostic driver (ATen) of the three ops; see ek_driver.h.
#include "ek_driver.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>

namespace ek {
namespace {

using at::Tensor;

// Default bound of the logits buffer (rows x classes in the compute dtype).
// CPU, 32 MiB: at B=256, C=131072, D=512 fp32 (2-core CI machine) row blocks of 64
// rows; 64 MiB (128 rows) was ~10% faster on the GEMMs alone (0.44 s vs 0.63 s for the
// three) but the acceptance bounds the working memory at 5% of the naive loss's
// (~1 GiB there): 32 MiB measured 3.1%.
// CUDA: class chunks of 24576 columns whatever B (B x 24576 x the element size, kept
// within [24 MiB, 96 MiB]).  On a GPU the training path is the class-chunked one
// (lse_partials + grads, 4 cuBLAS GEMMs), and what a chunk costs is set by its column
// count: per chunk the backward issues ~10 ATen calls (~130 us of host time measured,
// H200, B=512, C=2^20, bf16: 5.5 ms of host for 6.0 ms of GPU time over 43 chunks), and
// cuBLAS is slower on short chunks (one GEMM over all classes 0.83-0.99 ms; in chunks of
// 32768 classes 1.08-1.15 ms, of 8192 classes 1.67-2.24 ms).  A fixed 24 MiB budget
// halved the columns at B=1024 (86 chunks, 15.0 ms a step, 0.54x naive); 24576
// columns took 12.5 ms there (with 512-thread tile epilogues, H200).  Memory: the
// buffer grows with B as the naive loss's B x C logits do, so its share stays put:
// extra memory measured 30 MiB at B=512 and 56 MiB at B=1024 in bf16 (0.73% and 0.68%
// of the naive loss's 4,100 / 8,196 MiB at C=2^20; the bar is 1%).  Override with the
// op's block_bytes argument or EXPFACE_EXT_BLOCK_BYTES.
constexpr int64_t kDefaultBlockBytesCPU = int64_t(32) << 20;
// Terms per partial sum of grad_x's products over classes on the CPU (add_mm_in_k_chunks).
constexpr int64_t kSumChunkCPU = 4096;
constexpr int64_t kChunkColumnsCUDA = 24576;
constexpr int64_t kMinBlockBytesCUDA = int64_t(24) << 20;
constexpr int64_t kMaxBlockBytesCUDA = int64_t(96) << 20;

// rows x esize: the bytes of one logits column (the CUDA default is a column count)
int64_t resolve_block_bytes(int64_t block_bytes, const at::Device& device, int64_t rows, int64_t esize) {
  if (block_bytes > 0) return block_bytes;
  if (const char* env = std::getenv("EXPFACE_EXT_BLOCK_BYTES")) {
    char* end = nullptr;
    long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && v > 0,
                "EXPFACE_EXT_BLOCK_BYTES must be a positive integer (bytes), got '", env, "'");
    return static_cast<int64_t>(v);
  }
  if (!device.is_cuda()) return kDefaultBlockBytesCPU;
  return std::clamp(rows * esize * kChunkColumnsCUDA, kMinBlockBytesCUDA, kMaxBlockBytesCUDA);
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "expface_kernels: ", name, " is an undefined tensor");
  TORCH_CHECK(t.dim() == 2, "expface_kernels: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), "expface_kernels: ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_vector(const Tensor& t, const char* name, int64_t n, const char* n_name, const Tensor& ref,
                  bool is_label = false) {
  TORCH_CHECK(t.defined(), "expface_kernels: ", name, " is an undefined tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "expface_kernels: ", name, " must have shape (", n_name,
              ",) = (", num(n), ",), got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), "expface_kernels: ", name, " is on ", t.device(),
              " but x_hat is on ", ref.device());
  if (is_label) {
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "expface_kernels: ", name,
                " must be int64 or int32, got ", t.scalar_type());
  } else {
    TORCH_CHECK(is_float_dtype(t.scalar_type()), "expface_kernels: ", name, " must be a floating tensor, got ",
                t.scalar_type());
  }
}

// The dtype of the GEMMs and of the logits buffer.  Equal dtypes: that dtype.  On CUDA
// a 16-bit x with an fp32 W (the usual mixed-precision face-recognition set-up) runs
// in the 16-bit dtype: each W chunk is cast on the way (a (chunk, D) copy) so that
// cuBLAS uses the tensor cores at full rate with fp32 accumulation -- what autocast and
// the Triton backend do; in fp32 the step took 55 ms against 10 ms for bf16 (H200,
// B=512, C=2^20, D=512).  On CPU (no fast 16-bit GEMM) and for fp16 + bf16: the
// promoted dtype.
at::ScalarType compute_dtype(const Tensor& x_hat, const Tensor& w) {
  const auto a = x_hat.scalar_type(), b = w.scalar_type();
  if (a == b) return a;
  const bool a16 = a == at::kHalf || a == at::kBFloat16, b16 = b == at::kHalf || b == at::kBFloat16;
  if (x_hat.is_cuda() && a16 != b16 && (a == at::kFloat || b == at::kFloat)) return a16 ? a : b;
  return at::promote_types(a, b);
}

struct Common {
  int64_t B, D, n;
  at::ScalarType cd;   // compute dtype of the GEMMs and of the logits buffer
  at::ScalarType acc;  // accumulation dtype (row statistics, gradients)
};

Common check_common(const EpilogueOps& ops, const Tensor& x_hat, const Tensor& w, double s) {
  check_matrix(x_hat, "x_hat");
  check_matrix(w, "w");
  TORCH_CHECK(w.device() == x_hat.device(), "expface_kernels: w is on ", w.device(), " but x_hat is on ",
              x_hat.device());
  TORCH_CHECK(w.size(1) == x_hat.size(1), "expface_kernels: w must have shape (C_local, D) with D = x_hat.size(1) = ",
              num(x_hat.size(1)), ", got w of shape ", w.sizes());
  TORCH_CHECK(std::isfinite(s) && s > 0, "expface_kernels: s must be a finite positive scale, got ", num(s));
  Common c;
  c.B = x_hat.size(0);
  c.D = x_hat.size(1);
  c.n = w.size(0);
  c.cd = compute_dtype(x_hat, w);
  c.acc = c.cd == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(c.cd != at::kDouble || x_hat.device().is_cpu(), "expface_kernels: float64 inputs are supported by "
              "the extension on CPU only (got x_hat ", x_hat.scalar_type(), ", w ", w.scalar_type(), " on ",
              ops.device_name, ")");
  return c;
}

// Labels: lse_partials and grads only compare them with column indices inside the
// epilogues (a label outside [0, C) -- or below -1 -- matches no column), so they take
// them as they are: no check, hence no device sync in the training path (the Python API
// validates labels once per call).  The fused op gathers W[labels] and checks them here,
// before any kernel is launched (a device sync on CUDA), so that bad input raises
// instead of reaching a device-side assert or an out-of-bounds read.
Tensor checked_labels(const Tensor& labels, int64_t upper /* exclusive */) {
  Tensor lab = labels.to(at::kLong).contiguous();
  if (lab.numel() == 0) return lab;
  // min and max in one copy to the host
  const Tensor mm = at::stack({lab.min(), lab.max()}).cpu();
  const int64_t mn = mm[0].item<int64_t>(), mx = mm[1].item<int64_t>();
  TORCH_CHECK(mn >= -1, "expface_kernels: labels must be >= -1 (ignored rows are passed as -1), got ", num(mn));
  TORCH_CHECK(mx < upper, "expface_kernels: labels must be < C = ", num(upper), " (or -1 for ignored rows), got ", num(mx));
  return lab;
}

Tensor acc_vec(const Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// An ATen overload looked up by name, or nullopt where this torch lacks it (or gives it
// another signature): the extension then still builds and runs, on a fallback.
template <typename Fn>
std::optional<c10::TypedOperatorHandle<Fn>> find_aten_op(const char* name, const char* overload) {
  try {
    auto h = c10::Dispatcher::singleton().findSchema({name, overload});
    if (h.has_value()) return h->typed<Fn>();
  } catch (const c10::Error&) {
    // a schema of another signature
  }
  return std::nullopt;
}

// a @ b with an fp32 result for 16-bit a, b (grad_x's per-chunk part, summed over all
// chunks): cuBLAS accumulates in fp32 and, through aten::mm.dtype (CUDA; in torch 2.11
// and 2.14 -- the H200 profile of 2026-12-04 shows cuBLAS's fp16-in / fp32-out kernel),
// writes fp32 without rounding to 16 bits first. Elsewhere (CPU, or no such overload)
// the product is rounded to a/b's dtype, then widened.
Tensor mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
  if (a.is_cuda() && acc == at::kFloat) {
    static const auto op = find_aten_op<Tensor(const Tensor&, const Tensor&, at::ScalarType)>("aten::mm", "dtype");
    if (op.has_value()) return op->call(a, b, acc);
  }
  return at::mm(a, b).to(acc);
}

// out = a @ b for 16-bit a, b and an fp32 out (a slice of grad_w), with no temporary:
// aten::mm.dtype_out where this torch has it (CUDA), else mm_acc's product copied in.
void mm_acc_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.is_cuda() && out.scalar_type() == at::kFloat && a.scalar_type() != at::kFloat) {
    using Fn = Tensor&(const Tensor&, const Tensor&, at::ScalarType, Tensor&);
    static const auto op = find_aten_op<Fn>("aten::mm", "dtype_out");
    if (op.has_value()) {
      Tensor o = out;
      op->call(a, b, at::kFloat, o);
      return;
    }
  }
  out.copy_(mm_acc(a, b, out.scalar_type()));
}

// out (+)= a @ b with the K products summed in chunks of at most kSumChunkCPU terms,
// each chunk's product formed from zero in `part` (>= out's size) and then added (CPU).
// MKL (torch 2.14.1 on a 2-core AMD EPYC, AVX2) runs a product with 1-2 rows, or with
// <= 4 columns, as one sequential fp32 chain over K -- through addmm's beta = 1 too.
// grad_x of test_int64_indexing_b_times_c_over_2_31 (65600 classes, D = 4) then had a
// relative error of 6.8e-4 (3.4e-4 at D = 16, from its 2-row last row block), and random
// data at K = 2^17 1.7e-5 with 1 or 2 rows, where its blocked kernels give 1.4e-6.
// Chunks of 4096: 3.9e-5 on that test, 5.8e-7 on the random data; the extra adds are
// B x D per 4096 classes (< 0.1% of the GEMM's flops at D = 512).
void add_mm_in_k_chunks(Tensor out, const Tensor& a, const Tensor& b, const Tensor& part,
                        bool accumulate) {
  const int64_t K = a.size(1);
  if (K == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kSumChunkCPU) {
    const int64_t len = std::min(kSumChunkCPU, K - k0);
    if (k0 == 0 && !accumulate) {
      at::mm_out(out, a.narrow(1, 0, len), b.narrow(0, 0, len));
    } else {
      Tensor p = part.view(-1).narrow(0, 0, out.numel()).view(out.sizes());
      at::mm_out(p, a.narrow(1, k0, len), b.narrow(0, k0, len));
      out.add_(p);
    }
  }
}

// The W rows as the GEMMs take them (compute dtype) and the inverse norms the epilogues
// scale the GEMM output by.  fp16 (max 65504, smallest normal 6.1e-5) takes the
// normalised rows W_j * winv_j, with epilogue scales of 1: from raw rows the logits
// buffer holds x_hat . W_j, of size ||W_j||, and the gradient GEMMs take G_ij * winv_j,
// up to s * grad_row / ||W_j||.  An fp16 W with row norms 3.4e-4 (B = 8, D = 128,
// s = 64, reduction none, CPU) gave NaN gradients where the reference's fp16 gradients
// were finite (4e-4 from float64).  The rows are written by one pass (the normalize_rows
// op), as the plain cast of an fp32 W they replace on the mixed CUDA path (for an fp16
// W: one more pass over the chunk); grad_W's projection puts back the winv_j that G
// then lacks (project_rows' scale_rows, see grads_impl).
// bf16 and the wider dtypes have fp32's range: raw rows, no copy.
bool takes_unit_rows(at::ScalarType cd) { return cd == at::kHalf; }

struct GemmOperand {
  Tensor w;         // (len, D) in the compute dtype
  Tensor epi_winv;  // (len,) acc: winv, or ones for normalised rows
  bool unit_rows;
};

GemmOperand gemm_operand(const EpilogueOps& ops, const Tensor& w_rows, const Tensor& winv_rows, at::ScalarType cd,
                         const Tensor& ones) {
  if (!takes_unit_rows(cd)) return {w_rows.to(cd), winv_rows, false};
  Tensor w_hat = at::empty(w_rows.sizes(), w_rows.options().dtype(cd));
  ops.normalize_rows(w_rows, winv_rows, w_hat);
  return {w_hat, ones.narrow(0, 0, w_rows.size(0)), true};
}

// Epilogue scales for gemm_operand's normalised rows: (n,) ones in acc, or undefined
// when the compute dtype keeps raw rows.
Tensor unit_scales(at::ScalarType cd, int64_t n, const at::TensorOptions& acc_opts) {
  return takes_unit_rows(cd) ? at::ones({n}, acc_opts) : Tensor();
}

// Columns per class chunk: as many as the block budget holds for B rows, rounded down to
// a multiple of 64 when that is possible, so that every chunk but the last starts its
// winv slice and its logits rows on a 16-byte boundary (the CUDA epilogues' vector path).
int64_t chunk_columns(int64_t budget_bytes, int64_t B, int64_t esize, int64_t n) {
  int64_t nc = std::max<int64_t>(1, budget_bytes / (B * esize));
  if (nc >= 128) nc -= nc % 64;
  return std::min(n, nc);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> lse_partials_impl(const EpilogueOps& ops, const Tensor& x_hat, const Tensor& w,
                                                     const Tensor& target_logit, const Tensor& labels, double s,
                                                     int64_t offset, int64_t block_bytes) {
  Common c = check_common(ops, x_hat, w, s);
  check_vector(target_logit, "target_logit", c.B, "B", x_hat);
  check_vector(labels, "labels", c.B, "B", x_hat, /*is_label=*/true);
  TORCH_CHECK(offset >= 0, "expface_kernels: offset must be >= 0, got ", num(offset));
  const auto acc_opts = x_hat.options().dtype(c.acc);
  Tensor row_max = at::full({c.B}, -std::numeric_limits<double>::infinity(), acc_opts);
  Tensor row_sumexp = at::zeros({c.B}, acc_opts);
  Tensor winv = at::empty({c.n}, acc_opts);
  if (c.n == 0) return {row_max, row_sumexp, winv};
  Tensor wr = w.contiguous();
  ops.row_inv_norm(wr, winv);
  if (c.B == 0) return {row_max, row_sumexp, winv};
  Tensor lab = labels.to(at::kLong).contiguous();
  Tensor tl = acc_vec(target_logit, c.acc);
  Tensor xc = x_hat.to(c.cd).contiguous();

  const int64_t esize = c10::elementSize(c.cd);
  const int64_t nc = chunk_columns(resolve_block_bytes(block_bytes, x_hat.device(), c.B, esize), c.B, esize, c.n);
  Tensor buf = at::empty({c.B * nc}, x_hat.options().dtype(c.cd));
  const Tensor ones = unit_scales(c.cd, nc, acc_opts);
  for (int64_t j0 = 0; j0 < c.n; j0 += nc) {
    const int64_t len = std::min(nc, c.n - j0);
    const GemmOperand op = gemm_operand(ops, wr.narrow(0, j0, len), winv.narrow(0, j0, len), c.cd, ones);
    Tensor L = buf.narrow(0, 0, c.B * len).view({c.B, len});
    at::mm_out(L, xc, op.w.t());
    ops.lse_block(L, op.epi_winv, tl, lab, s, offset + j0, row_max, row_sumexp);
  }
  return {row_max, row_sumexp, winv};
}

std::tuple<Tensor, Tensor> grads_impl(const EpilogueOps& ops, const Tensor& x_hat, const Tensor& w,
                                      const Tensor& w_inv_norm, const Tensor& labels, const Tensor& lse,
                                      const Tensor& target_grad, const Tensor& grad_row, double s, int64_t offset,
                                      int64_t block_bytes) {
  Common c = check_common(ops, x_hat, w, s);
  check_vector(w_inv_norm, "w_inv_norm", c.n, "C_local", x_hat);
  check_vector(labels, "labels", c.B, "B", x_hat, /*is_label=*/true);
  check_vector(lse, "lse", c.B, "B", x_hat);
  check_vector(target_grad, "target_grad", c.B, "B", x_hat);
  check_vector(grad_row, "grad_row", c.B, "B", x_hat);
  TORCH_CHECK(offset >= 0, "expface_kernels: offset must be >= 0, got ", num(offset));
  Tensor gx = at::zeros({c.B, c.D}, x_hat.options().dtype(c.acc));
  if (c.n == 0 || c.B == 0 || c.D == 0) return {gx, at::zeros({c.n, c.D}, w.options())};
  // Every row of grad_w is written by its chunk's GEMM or projection: no zero fill (a
  // C x D memset, 0.32 ms of a 9 ms step on an H200 at C=2^20, D=512, bf16).
  Tensor gw = at::empty({c.n, c.D}, w.options());
  Tensor lab = labels.to(at::kLong).contiguous();
  Tensor winv = acc_vec(w_inv_norm, c.acc);
  Tensor lse_a = acc_vec(lse, c.acc), tg = acc_vec(target_grad, c.acc), gr = acc_vec(grad_row, c.acc);
  Tensor xc = x_hat.to(c.cd).contiguous();
  Tensor wr = w.contiguous();

  const int64_t esize = c10::elementSize(c.cd);
  const int64_t nc = chunk_columns(resolve_block_bytes(block_bytes, x_hat.device(), c.B, esize), c.B, esize, c.n);
  Tensor buf = at::empty({c.B * nc}, x_hat.options().dtype(c.cd));
  Tensor gx_part = (c.cd == c.acc && !gx.is_cuda()) ? at::empty_like(gx) : Tensor();
  const Tensor ones = unit_scales(c.cd, nc, x_hat.options().dtype(c.acc));
  for (int64_t j0 = 0; j0 < c.n; j0 += nc) {
    const int64_t len = std::min(nc, c.n - j0);
    Tensor w_raw = wr.narrow(0, j0, len);
    Tensor winv_c = winv.narrow(0, j0, len);
    const GemmOperand op = gemm_operand(ops, w_raw, winv_c, c.cd, ones);
    const Tensor& wc = op.w;
    Tensor L = buf.narrow(0, 0, c.B * len).view({c.B, len});
    at::mm_out(L, xc, wc.t());
    ops.grads_block(L, op.epi_winv, lab, lse_a, tg, gr, s, offset + j0);  // L <- G * winv (G: unit rows)
    if (c.cd == c.acc && gx.is_cuda()) {
      gx.addmm_(L, wc);  // cuBLAS sums K in blocks; one call a chunk (host time, see above)
    } else if (c.cd == c.acc) {
      add_mm_in_k_chunks(gx, L, wc, gx_part, /*accumulate=*/true);
    } else {
      gx.add_(mm_acc(L, wc, c.acc));
    }
    // grad_W: ONE GEMM per chunk, in the compute dtype, straight into grad_w when it has
    // that dtype (else into a (chunk, D) temporary), then the projection in fp32 (acc),
    // rounded once into grad_w.  For 16-bit inputs the product is thus rounded before
    // the projection; a fp32 product through sub-chunks of a bounded temporary cost
    // 6 more ATen calls per chunk and made the backward host-bound (13.1 ms of host time
    // against 7.1 ms without it; H200, B=512, C=2^20, bf16).
    Tensor gwc = gw.narrow(0, j0, len);
    if (op.unit_rows && gw.scalar_type() == c.acc) {
      // G carried no winv: (G^T x_hat)_j in fp32 straight into grad_w (an fp32 W: the
      // mixed fp16 x / fp32 W case), the projection scales the rows by winv_j in place.
      // Through an fp32 (chunk, D) temporary and a separate winv pass the step took
      // 14.87 ms and 101 MiB; this way (and with normalize_rows) 10.95 ms / 54 MiB,
      // against 9.81 ms / 77 MiB with raw rows and an fp16 product (H200, B = 512,
      // C = 2^20, D = 512, 2026-12-04 / 11-28; bench/RESULTS.md).
      mm_acc_out(gwc, L.t(), xc);
      ops.project_rows(gwc, w_raw, winv_c, gwc, /*scale_rows=*/true);
    } else if (op.unit_rows) {
      // an fp16 W: the product in fp32 (G^T x_hat can pass 65504 under reduction="sum"),
      // projected and scaled into grad_w's fp16 rows
      ops.project_rows(mm_acc(L.t(), xc, c.acc), w_raw, winv_c, gwc, /*scale_rows=*/true);
    } else if (w.scalar_type() == c.cd) {
      at::mm_out(gwc, L.t(), xc);
      ops.project_rows(gwc, w_raw, winv_c, gwc, /*scale_rows=*/false);
    } else {
      ops.project_rows(at::mm(L.t(), xc), w_raw, winv_c, gwc, /*scale_rows=*/false);
    }
  }
  return {gx, gw};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_forward_grads_impl(
    const EpilogueOps& ops, const Tensor& x_hat, const Tensor& w, const Tensor& target_logit,
    const Tensor& target_factor, const Tensor& labels, const Tensor& grad_row, double s, int64_t block_bytes) {
  Common c = check_common(ops, x_hat, w, s);
  check_vector(target_logit, "target_logit", c.B, "B", x_hat);
  check_vector(target_factor, "target_factor", c.B, "B", x_hat);
  check_vector(labels, "labels", c.B, "B", x_hat, /*is_label=*/true);
  check_vector(grad_row, "grad_row", c.B, "B", x_hat);
  const auto acc_opts = x_hat.options().dtype(c.acc);
  Tensor winv = at::empty({c.n}, acc_opts);
  Tensor wr = w.contiguous();
  if (c.n > 0) ops.row_inv_norm(wr, winv);
  if (c.B == 0 || c.n == 0) {
    Tensor lse = at::full({c.B}, c.n == 0 ? -std::numeric_limits<double>::infinity() : 0.0, acc_opts);
    return {lse, at::zeros({c.B, c.D}, acc_opts), at::zeros({c.n, c.D}, w.options()), winv};
  }
  Tensor lab = checked_labels(labels, c.n);
  Tensor tl = acc_vec(target_logit, c.acc), tf = acc_vec(target_factor, c.acc), gr = acc_vec(grad_row, c.acc);
  Tensor xc = x_hat.to(c.cd).contiguous();
  // A C x D copy for a mixed low-precision W, or for fp16 (docs/backends.md, "fp16 GEMMs").
  const GemmOperand op = gemm_operand(ops, wr, winv, c.cd, unit_scales(c.cd, c.n, acc_opts));
  const Tensor& wc = op.w;

  Tensor lse = at::empty({c.B}, acc_opts);
  Tensor row_scale = at::empty({c.B}, acc_opts);
  Tensor tgrad = at::empty({c.B}, acc_opts);
  Tensor gx = at::empty({c.B, c.D}, acc_opts);
  // grad_w accumulates in acc precision; for an fp32 W that is the output itself.
  const bool direct = (c.cd == c.acc) && (w.scalar_type() == c.acc);
  // (fp32: the first row block's GEMM writes it, no zero fill of C x D -- 50 ms at C=2^17, D=512)
  Tensor gw_acc = (c.cd == c.acc) ? at::empty({c.n, c.D}, w.options().dtype(c.acc))
                                  : at::zeros({c.n, c.D}, w.options().dtype(c.acc));

  const int64_t esize = c10::elementSize(c.cd);
  const int64_t bb = resolve_block_bytes(block_bytes, x_hat.device(), c.B, esize);
  const int64_t R = std::min<int64_t>(c.B, std::max<int64_t>(1, bb / (c.n * esize)));
  Tensor buf = at::empty({R * c.n}, x_hat.options().dtype(c.cd));
  Tensor gx_part = at::empty({c.n > kSumChunkCPU ? R * c.D : 0}, acc_opts);
  // class chunk of the low-precision grad_w accumulation (temporary len x D in cd)
  const int64_t gw_chunk = std::min<int64_t>(c.n, std::max<int64_t>(1, bb / std::max<int64_t>(1, c.D * esize)));
  for (int64_t r0 = 0; r0 < c.B; r0 += R) {
    const int64_t r = std::min(R, c.B - r0);
    Tensor xb = xc.narrow(0, r0, r);
    Tensor L = buf.narrow(0, 0, r * c.n).view({r, c.n});
    at::mm_out(L, xb, wc.t());  // GEMM 1: logits of r rows against all classes
    Tensor lse_b = lse.narrow(0, r0, r), rs_b = row_scale.narrow(0, r0, r), tg_b = tgrad.narrow(0, r0, r);
    Tensor lab_b = lab.narrow(0, r0, r);
    ops.fused_rows(L, op.epi_winv, tl.narrow(0, r0, r), tf.narrow(0, r0, r), lab_b, gr.narrow(0, r0, r), s, lse_b, rs_b,
                   tg_b);  // L <- G * winv / row_scale (no winv: unit rows), lse final
    Tensor gxb = gx.narrow(0, r0, r);
    if (c.cd == c.acc) {
      add_mm_in_k_chunks(gxb, L, wc, gx_part, /*accumulate=*/false);  // GEMM 2
    } else {
      gxb.copy_(at::mm(L, wc));
    }
    gxb.mul_(rs_b.unsqueeze(1));
    Tensor xa = xb * rs_b.to(c.cd).unsqueeze(1);
    if (c.cd == c.acc && r0 == 0) {
      at::mm_out(gw_acc, L.t(), xa);  // GEMM 3 (first row block)
    } else if (c.cd == c.acc) {
      gw_acc.addmm_(L.t(), xa);  // GEMM 3, accumulated in acc precision
    } else {
      for (int64_t c0 = 0; c0 < c.n; c0 += gw_chunk) {
        const int64_t len = std::min(gw_chunk, c.n - c0);
        gw_acc.narrow(0, c0, len).add_(at::mm(L.narrow(1, c0, len).t(), xa).to(c.acc));
      }
    }
  }
  ops.project_rows(gw_acc, wr, winv, gw_acc, /*scale_rows=*/op.unit_rows);  // unit rows: the winv G lacked
  Tensor gw = direct ? gw_acc : gw_acc.to(w.scalar_type());
  return {lse, gx, gw, winv};
}

}  // namespace ek
