// The plain C ABI loaded by ptp/sparse/kernels.py through ctypes, the CPU-feature dispatch, and
// a small persistent thread pool (threads split the row tiles into contiguous ranges).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <immintrin.h>
#include <mutex>
#include <thread>
#include <vector>

#include "sparse.h"

namespace ptp {
namespace {

enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };  // the last: a feature of AVX512

bool supported(int isa) {
  __builtin_cpu_init();
  switch (isa) {
    case SCALAR: return true;
#ifndef PTP_NO_AVX2
    case AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#ifndef PTP_NO_AVX512
    case AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2");
    case AVX512_BF16: return supported(AVX512) && __builtin_cpu_supports("avx512bf16");
#endif
    default: return false;
  }
}

}  // namespace

// A variant the build left out (its flags do not compile here) is never selected — supported()
// says no — but the dispatch below still names it, and a library with an undefined symbol would
// not load at all, taking the variants that did compile down with it.
#ifdef PTP_NO_AVX2
void gemv_avx2(const DenseJob&, int64_t, int64_t) { __builtin_trap(); }
void matmul_avx2(const Job&, int64_t, int64_t) { __builtin_trap(); }
void unpack_avx2(const Job&, int64_t, int64_t, int64_t, float*, int64_t) { __builtin_trap(); }
#endif
#ifdef PTP_NO_AVX512
void gemv_avx512(const DenseJob&, int64_t, int64_t) { __builtin_trap(); }
void matmul_avx512(const Job&, int64_t, int64_t) { __builtin_trap(); }
void unpack_avx512(const Job&, int64_t, int64_t, int64_t, float*, int64_t) { __builtin_trap(); }
void unpack_bf16_avx512(const Job&, int64_t, int64_t, int64_t, uint16_t*, int64_t) { __builtin_trap(); }
#endif

namespace {

// A persistent pool. A job is `chunks` pieces of work claimed one at a time from one atomic
// ticket (generation: 24 bits | chunks: 20 bits | next chunk: 20 bits — one word, so a late
// thread can never pair one job's count with another's ticket), so a thread that the OS keeps off a busy core simply
// claims fewer pieces instead of holding everyone up; run() returns once every piece is done.
// Workers spin for a while after a job (during decode the next linear layer follows within
// microseconds), then sleep on a condition variable so an idle process costs nothing.
class Pool {
 public:
  void run(int threads, int64_t chunks, const std::function<void(int64_t)>& fn) {
    if (threads <= 1 || chunks <= 1 || chunks >= (1 << 20)) {
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    while (int(threads_.size()) < threads - 1) threads_.emplace_back([this] { loop(); });
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      done_.store(0, std::memory_order_relaxed);
      gen_ = (gen_ + 1) & 0xFFFFFFu;
      ticket_.store(gen_ << 40 | uint64_t(chunks) << 20, std::memory_order_release);
    }
    cv_.notify_all();
    work(gen_);
    while (done_.load(std::memory_order_acquire) != chunks) _mm_pause();
  }
  void set_spin_us(int us) { spin_us_ = us; }

 private:
  // Claims and runs pieces of generation `gen` until none is left.
  void work(uint64_t gen) {
    for (;;) {
      uint64_t v = ticket_.load(std::memory_order_acquire);
      if (v >> 40 != gen) return;
      int64_t next = int64_t(v & 0xFFFFFu), chunks = int64_t(v >> 20 & 0xFFFFFu);
      if (next >= chunks) return;
      if (!ticket_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      (*fn_)(next);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
      int tries = 0;
      while (ticket_.load(std::memory_order_acquire) >> 40 == seen) {
        _mm_pause();
        if (++tries % 256 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return ticket_.load(std::memory_order_acquire) >> 40 != seen; });
        }
      }
      seen = ticket_.load(std::memory_order_acquire) >> 40;
      work(seen);
    }
  }
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  uint64_t gen_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int spin_us_ = 50;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads may still wait at exit
  return *p;
}

// Pieces of about 4 per thread (at least 2 tiles each): small enough to even out a thread
// that loses its core for a while, large enough that claiming one costs nothing.
int64_t piece(int64_t tiles, int threads) {
  return std::max<int64_t>(2, (tiles + 4 * threads - 1) / (4 * threads));
}

}  // namespace
}  // namespace ptp

using namespace ptp;

extern "C" {

int ptp_sparse_supported(int isa) { return supported(isa) ? 1 : 0; }

void ptp_sparse_set_spin_us(int us) { pool().set_spin_us(us); }

// y[ntok, out] = x[ntok, in] @ W.T (+ bias). x: contiguous fp32, or bf16 when xbf16 != 0; y,
// bias: contiguous fp32. dense != 0: values hold every cell in full (32 per word;
// `format.pack_dense`), masks and offsets are ignored. bf16 activations with bf16 values run the
// vdpbf16ps kernel where the CPU has AVX512_BF16 (isa 2); elsewhere they are widened to fp32
// (exact). Returns 0, or -1 for an ISA this CPU (or this build) lacks.
int ptp_sparse_matmul(int isa, int vtype, int dense, const int32_t* masks, const int64_t* offsets,
                      const void* values, int64_t out, int64_t in, int64_t words, const void* x, int xbf16,
                      int64_t ntok, float* y, const float* bias, int nthreads) {
  if (!supported(isa)) return -1;
  // The kernels read whole column pairs up to 2*words: give them a zero-padded copy of x.
  const int64_t ldx = 2 * words;
  const bool pairs = xbf16 && vtype == BF16 && isa == AVX512 && supported(AVX512_BF16);
  std::vector<float> xp(pairs ? 0 : size_t(ntok * ldx), 0.0f);
  std::vector<uint32_t> xq(pairs ? size_t(ntok * words) : 0, 0u);
  for (int64_t k = 0; k < ntok; ++k) {
    if (pairs) {
      std::memcpy(&xq[k * words], static_cast<const uint16_t*>(x) + k * in, in * sizeof(uint16_t));
    } else if (xbf16) {
      const uint16_t* row = static_cast<const uint16_t*>(x) + k * in;
      for (int64_t i = 0; i < in; ++i) xp[k * ldx + i] = bf16_to_f32(row[i]);
    } else {
      std::memcpy(&xp[k * ldx], static_cast<const float*>(x) + k * in, in * sizeof(float));
    }
  }
  Job j{masks, offsets, values, out, in, words, vtype, dense != 0, pairs ? nullptr : xp.data(), ntok, ldx,
        pairs ? xq.data() : nullptr, y, out, bias};
  // Below ~128K multiply-adds, waking a second thread costs more than it saves.
  if (out * in * ntok < (int64_t(1) << 17)) nthreads = 1;
  const int64_t tiles = (out + ROWS - 1) / ROWS, step = piece(tiles, nthreads);
  pool().run(nthreads, (tiles + step - 1) / step, [&](int64_t c) {
    int64_t t0 = c * step, t1 = std::min(tiles, t0 + step);
    if (isa == AVX512) return matmul_avx512(j, t0, t1);
    if (isa == AVX2) return matmul_avx2(j, t0, t1);
    matmul_scalar(j, t0, t1);
  });
  return 0;
}

// The dense rows of row tiles [t0, t1), row-major: dst[(16*(t - t0) + r) * ld + col] =
// W[16t + r, col] for col < in (ld >= in); rows past `out` come out 0. dst: fp32, or with
// bf16_out != 0 (bf16 values only; isa 0 or 2) the bf16 bits. Returns 0, -1 for an ISA this
// CPU lacks, -2 for a bf16 block it cannot make.
int ptp_sparse_unpack(int isa, int vtype, int dense, const int32_t* masks, const int64_t* offsets,
                      const void* values, int64_t out, int64_t in, int64_t words, int64_t t0,
                      int64_t t1, void* dst, int bf16_out, int64_t ld, int nthreads) {
  if (!supported(isa)) return -1;
  if (bf16_out && (vtype != BF16 || isa == AVX2)) return -2;
  Job j{masks, offsets, values, out, in, words, vtype, dense != 0, nullptr, 0, 0, nullptr, nullptr, 0, nullptr};
  const int64_t tiles = t1 - t0, step = piece(tiles, nthreads);
  float* d32 = static_cast<float*>(dst);
  uint16_t* d16 = static_cast<uint16_t*>(dst);
  pool().run(nthreads, (tiles + step - 1) / step, [&](int64_t c) {
    int64_t a = t0 + c * step, b = std::min(t1, a + step);
    if (bf16_out) return isa == AVX512 ? unpack_bf16_avx512(j, a, b, t0, d16, ld) : unpack_bf16_scalar(j, a, b, t0, d16, ld);
    if (isa == AVX512) return unpack_avx512(j, a, b, t0, d32, ld);
    if (isa == AVX2) return unpack_avx2(j, a, b, t0, d32, ld);
    unpack_scalar(j, a, b, t0, d32, ld);
  });
  return 0;
}

// y[ntok, out] = x[ntok, in] @ W.T (+ bias) for a dense row-major fp32 W [out, in] (all
// contiguous fp32). Returns 0, or -1 for an ISA this CPU (or this build) lacks.
int ptp_dense_matmul(int isa, const float* w, int64_t out, int64_t in, const float* x, int64_t ntok, float* y,
                     const float* bias, int nthreads) {
  if (!supported(isa)) return -1;
  DenseJob d{w, out, in, x, ntok, y, bias};
  if (out * in * ntok < (int64_t(1) << 17)) nthreads = 1;
  const int64_t blocks = (out + 3) / 4, step = 4 * piece(blocks, nthreads);  // rows per piece, whole blocks of 4
  pool().run(nthreads, (out + step - 1) / step, [&](int64_t c) {
    int64_t r0 = c * step, r1 = std::min(out, r0 + step);
    if (isa == AVX512) return gemv_avx512(d, r0, r1);
    if (isa == AVX2) return gemv_avx2(d, r0, r1);
    gemv_scalar(d, r0, r1);
  });
  return 0;
}

}  // extern "C"
