// An XLA FFI handler: a float32 matrix product by OpenBLAS (scipy-openblas32), for
// benchmarks/cpu_blas.py. C = op(A) op(B), row-major, op = transpose where asked.
//
// OpenBLAS runs single-threaded here; a product big enough to split is cut into row blocks of C
// run on XLA's own intra-op threads (the handler's ThreadPool) and the calling thread. OpenBLAS's
// own threads made the MLP's step 1.8x slower (they and XLA's threads share 2 cores). A block is
// claimed from a counter, so the caller computes whatever no pool thread has started: a product
// never waits for a thread that is busy elsewhere (two products at once cannot deadlock).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Product {
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, blocks;
  const float *a, *b;
  float* c;
  std::atomic<int64_t> next{0}, done{0};

  void Block(int64_t i) {  // rows [m0, m1) of C
    int64_t m0 = m * i / blocks, m1 = m * (i + 1) / blocks;
    const float* a0 = trans_a ? a + m0 : a + m0 * lda;
    scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                      trans_b ? CblasTrans : CblasNoTrans, m1 - m0, n, k, 1.0f, a0, lda, b, ldb,
                      0.0f, c + m0 * n, n);
  }
  void Claim() {
    for (int64_t i; (i = next.fetch_add(1)) < blocks; done.fetch_add(1)) Block(i);
  }
};

ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  static const bool single = (scipy_openblas_set_num_threads(1), true);
  (void)single;
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("2-D operands only");
  auto p = std::make_shared<Product>();  // shared: a pool thread may start after we return
  p->trans_a = trans_a, p->trans_b = trans_b;
  p->m = trans_a ? ad[1] : ad[0], p->k = trans_a ? ad[0] : ad[1], p->n = trans_b ? bd[0] : bd[1];
  p->lda = ad[1], p->ldb = bd[1], p->a = a.typed_data(), p->b = b.typed_data();
  p->c = c->typed_data();
  bool small = p->m * p->n * p->k < (int64_t{1} << 21);  // below ~4 MFLOP one thread is faster
  p->blocks = small ? 1 : std::clamp<int64_t>(p->m / 32, 1, pool.num_threads());
  for (int64_t i = 1; i < p->blocks; ++i) pool.Schedule([p] { p->Claim(); });
  p->Claim();
  while (p->done.load() < p->blocks) std::this_thread::yield();  // blocks others are running
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OpenblasGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
