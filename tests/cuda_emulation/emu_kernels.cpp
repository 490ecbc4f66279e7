// The extension's CUDA kernels (csrc/cuda/*_kernels.cuh, unchanged source) run on the CPU
// under cuda_emu.h, one entry point per kernel with its template parameters chosen at run
// time; tests/test_emulated_kernels.py builds this with torch.utils.cpp_extension.load and
// holds each kernel to the float64 contract. Arguments are contiguous CPU tensors of the
// dtypes the CUDA launchers pass (no checks here: the tests own the inputs).
#include <torch/extension.h>

#include "cuda_emu.h"
// clang-format off: the emulation must come first
#include "epilogue_kernels.cuh"
#include "prologue_kernels.cuh"
// clang-format on

using at::Tensor;

namespace {

template <typename F>
void with_dtype(at::ScalarType t, F&& f) {
  if (t == at::kFloat) {
    f(float{});
  } else if (t == at::kHalf) {
    f(c10::Half{});
  } else {
    TORCH_CHECK(t == at::kBFloat16, "emulated kernels take float32 / float16 / bfloat16, got ", t);
    f(c10::BFloat16{});
  }
}

unsigned int blocks(int64_t items, int64_t per_block) { return static_cast<unsigned int>((items + per_block - 1) / per_block); }

void lse_tile(Tensor L, Tensor winv, Tensor tl, Tensor labels, double s, int64_t col0, Tensor M, Tensor S, bool vec,
              int64_t R) {
  const int64_t rows = L.size(0), n = L.size(1);
  with_dtype(L.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    ek::dispatch_tile<scalar_t>(vec, static_cast<int>(R), [&](auto v, auto r) {
      constexpr int kV = decltype(v)::value, kR = decltype(r)::value;
      cuda_emu::launch(blocks(rows, kR), ek::kTileThreads, [&] {
        ek::lse_tile_kernel<scalar_t, kV, kR>(L.data_ptr<scalar_t>(), winv.data_ptr<float>(), tl.data_ptr<float>(),
                                              labels.data_ptr<int64_t>(), static_cast<float>(s), col0, rows, n,
                                              M.data_ptr<float>(), S.data_ptr<float>());
      });
    });
  });
}

void grads_tile(Tensor L, Tensor winv, Tensor labels, Tensor lse, Tensor tg, Tensor gr, double s, int64_t col0,
                bool vec, int64_t R) {
  const int64_t rows = L.size(0), n = L.size(1);
  with_dtype(L.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    ek::dispatch_tile<scalar_t>(vec, static_cast<int>(R), [&](auto v, auto r) {
      constexpr int kV = decltype(v)::value, kR = decltype(r)::value;
      cuda_emu::launch(blocks(rows, kR), ek::kTileThreads, [&] {
        ek::grads_tile_kernel<scalar_t, kV, kR>(L.data_ptr<scalar_t>(), winv.data_ptr<float>(),
                                                labels.data_ptr<int64_t>(), lse.data_ptr<float>(), tg.data_ptr<float>(),
                                                gr.data_ptr<float>(), static_cast<float>(s), col0, rows, n);
      });
    });
  });
}

void fused_rows(Tensor L, Tensor winv, Tensor tl, Tensor tf, Tensor labels, Tensor gr, double s, Tensor lse, Tensor rs,
                Tensor tg) {
  const int64_t rows = L.size(0), n = L.size(1);
  with_dtype(L.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    cuda_emu::launch(static_cast<unsigned int>(rows), ek::kThreads, [&] {
      ek::fused_rows_kernel<scalar_t>(L.data_ptr<scalar_t>(), winv.data_ptr<float>(), tl.data_ptr<float>(),
                                      tf.data_ptr<float>(), labels.data_ptr<int64_t>(), gr.data_ptr<float>(),
                                      static_cast<float>(s), n, lse.data_ptr<float>(), rs.data_ptr<float>(),
                                      tg.data_ptr<float>());
    });
  });
}

void row_inv_norm(Tensor w, Tensor winv) {
  const int64_t n = w.size(0), D = w.size(1);
  with_dtype(w.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    cuda_emu::launch(blocks(n, ek::kWRows), ek::kWRows * 32, [&] {
      ek::row_inv_norm_kernel<scalar_t>(w.data_ptr<scalar_t>(), winv.data_ptr<float>(), n, D);
    });
  });
}

// vec: the 16-byte kernel (gs, w, out of one dtype, or 16-bit gs with float w and out);
// else the dtype-tagged one.
void project_rows(Tensor gs, Tensor w, Tensor winv, Tensor out, bool vec, bool scale_rows) {
  const int64_t n = gs.size(0), D = gs.size(1);
  const unsigned int grid = blocks(n, ek::kWRows);
  if (!vec) {
    with_dtype(w.scalar_type(), [&](auto tag) {
      using w_t = decltype(tag);
      cuda_emu::launch(grid, ek::kWRows * 32, [&] {
        ek::project_rows_kernel<w_t>(gs.data_ptr(), ek::float_tag(gs.scalar_type()), w.data_ptr<w_t>(),
                                     winv.data_ptr<float>(), out.data_ptr(), ek::float_tag(out.scalar_type()), n, D,
                                     scale_rows);
      });
    });
    return;
  }
  with_dtype(gs.scalar_type(), [&](auto tag) {
    using g_t = decltype(tag);
    constexpr int kV = 16 / static_cast<int>(sizeof(g_t));
    if (w.scalar_type() == gs.scalar_type()) {
      cuda_emu::launch(grid, ek::kWRows * 32, [&] {
        ek::project_rows_vec_kernel<g_t, g_t, kV>(gs.data_ptr<g_t>(), w.data_ptr<g_t>(), winv.data_ptr<float>(),
                                                  out.data_ptr<g_t>(), n, D, scale_rows);
      });
    } else {
      cuda_emu::launch(grid, ek::kWRows * 32, [&] {
        ek::project_rows_vec_kernel<g_t, float, kV>(gs.data_ptr<g_t>(), w.data_ptr<float>(), winv.data_ptr<float>(),
                                                    out.data_ptr<float>(), n, D, scale_rows);
      });
    }
  });
}

void normalize_rows(Tensor w, Tensor winv, Tensor out, bool vec) {
  const int64_t n = w.size(0), D = w.size(1);
  with_dtype(w.scalar_type(), [&](auto tag) {
    using w_t = decltype(tag);
    cuda_emu::launch(blocks(n, ek::kWRows), ek::kWRows * 32, [&] {
      if (vec) {
        ek::normalize_rows_kernel<w_t, at::Half, 8>(w.data_ptr<w_t>(), winv.data_ptr<float>(), out.data_ptr<at::Half>(),
                                                    n, D);
      } else {
        ek::normalize_rows_kernel<w_t, at::Half, 1>(w.data_ptr<w_t>(), winv.data_ptr<float>(), out.data_ptr<at::Half>(),
                                                    n, D);
      }
    });
  });
}

void prologue(Tensor x, Tensor w, Tensor labels, int64_t offset, int64_t ignore_index, Tensor x_hat, Tensor x_inv,
              Tensor labels_out, Tensor kept, Tensor c_t) {
  const int64_t B = x.size(0), D = x.size(1), n = w.size(0);
  const bool labels64 = labels.scalar_type() == at::kLong;
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    cuda_emu::launch(blocks(B, ek::kRowWarps), ek::kRowWarps * 32, [&] {
      ek::prologue_kernel<acc_t>(x.data_ptr(), ek::float_tag(x.scalar_type()), w.data_ptr(),
                                 ek::float_tag(w.scalar_type()), labels.data_ptr(), labels64, offset, ignore_index, B, D,
                                 n, x_hat.data_ptr(), ek::float_tag(x_hat.scalar_type()), x_inv.data_ptr<acc_t>(),
                                 labels_out.data_ptr<int64_t>(), kept.data_ptr<acc_t>(), c_t.data_ptr<acc_t>());
    });
  };
  if (x_inv.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
}

void margin_terms(Tensor c, int64_t kind, double m1, double m2, double m3, double s, bool exact, Tensor logit,
                  Tensor factor) {
  const int64_t n = c.numel();
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    cuda_emu::launch(blocks(n, 64), 64, [&] {
      ek::margin_terms_kernel<acc_t>(c.data_ptr<acc_t>(), n, kind, static_cast<acc_t>(m1), static_cast<acc_t>(m2),
                                     static_cast<acc_t>(m3), static_cast<acc_t>(s), exact, logit.data_ptr<acc_t>(),
                                     factor.data_ptr<acc_t>());
    });
  };
  if (c.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
}

void normalize_backward(Tensor x, Tensor x_inv, Tensor g, Tensor out) {
  const int64_t B = x.size(0), D = x.size(1);
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    cuda_emu::launch(blocks(B, ek::kRowWarps), ek::kRowWarps * 32, [&] {
      ek::normalize_backward_kernel<acc_t>(x.data_ptr(), ek::float_tag(x.scalar_type()), x_inv.data_ptr<acc_t>(),
                                           g.data_ptr<acc_t>(), out.data_ptr(), B, D);
    });
  };
  if (g.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lse_tile", &lse_tile);
  m.def("grads_tile", &grads_tile);
  m.def("fused_rows", &fused_rows);
  m.def("row_inv_norm", &row_inv_norm);
  m.def("project_rows", &project_rows);
  m.def("normalize_rows", &normalize_rows);
  m.def("prologue", &prologue);
  m.def("margin_terms", &margin_terms);
  m.def("normalize_backward", &normalize_backward);
}
