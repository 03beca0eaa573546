// The plain C ABI loaded by ptp/sparse/kernels.py through ctypes, the CPU-feature dispatch, and
// the threading (OpenMP pieces of row tiles).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <vector>

#include "sparse.h"
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ptp {
namespace {

// AVX512_BF16 is a feature of AVX512 (its vdpbf16ps loop), not a variant; AMX is the AVX512
// variant with AMX tiles for bf16 x bf16 at 2 or more tokens.
enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3, AMX = 4 };

// Linux hands out the AMX tile state only to a process that asks (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction faults.
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
#else
  return false;
#endif
}

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
#if !defined(PTP_NO_AVX512) && !defined(PTP_NO_AMX)
    case AMX:
      return supported(AVX512_BF16) && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
             amx_permitted();
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
#ifdef PTP_NO_AMX
void matmul_amx(const Job&, int64_t, int64_t) { __builtin_trap(); }
#endif

namespace {

// Runs fn(0..chunks-1) on `threads` threads of OpenMP — torch's own libgomp, which the process
// has loaded before this library (glibc binds our libgomp.so.1 to it by soname), so the kernels
// share torch's threads instead of fighting them: on 2 cores a private pool's spinning workers
// and torch's took turns on the cores between every op of a decode step (SmolLM2 2:4 decode
// 1.11-1.17x -> 1.42-1.45x the faster dense model, scripts/bench_sparse.py smollm2, 3 runs
// each, alternated). Pieces are claimed from one atomic counter, so a thread the OS keeps off
// a busy core simply takes fewer. Only GOMP_parallel is used (OpenMP 4.0), which every libgomp
// torch ships has. Built without OpenMP (a compiler without it), the pieces run serially.
void run(int threads, int64_t chunks, const std::function<void(int64_t)>& fn) {
#ifdef _OPENMP
  if (threads > 1 && chunks > 1) {
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) fn(c);
    return;
  }
#endif
  for (int64_t c = 0; c < chunks; ++c) fn(c);
}

// Pieces of about 4 per thread (at least 2 tiles each): small enough to even out a thread
// that loses its core for a while, large enough that claiming one costs nothing.
int64_t piece(int64_t tiles, int threads) {
  return std::max<int64_t>(2, (tiles + 4 * threads - 1) / (4 * threads));
}

// At one token the avx512 loop's single vdpbf16ps per word costs less than storing the word
// for a tile load.
constexpr int64_t AMX_MIN_TOKENS = 2;

}  // namespace
}  // namespace ptp

using namespace ptp;

extern "C" {

int ptp_sparse_supported(int isa) { return supported(isa) ? 1 : 0; }

// y[ntok, out] = x[ntok, in] @ W.T (+ bias). x: contiguous fp32, or bf16 when xbf16 != 0; y:
// contiguous fp32, or bf16 (rounded to nearest even) when ybf16 != 0; bias: contiguous fp32.
// dense != 0: values hold every cell in full (32 per word; `format.pack_dense`), masks and
// offsets are ignored. bf16 activations with bf16 values run the vdpbf16ps kernel where the CPU
// has AVX512_BF16 (isa 2), AMX tiles at 2 or more tokens (isa 4); elsewhere they are widened to
// fp32 (exact). Returns 0, or -1 for an ISA this CPU (or this build) lacks.
int ptp_sparse_matmul(int isa, int vtype, int dense, const int32_t* masks, const int64_t* offsets,
                      const void* values, int64_t out, int64_t in, int64_t words, const void* x, int xbf16,
                      int64_t ntok, void* y, int ybf16, const float* bias, int nthreads) {
  if (!supported(isa)) return -1;
  // The kernels read whole column pairs up to ldx = 2*words: x is used in place when its rows
  // are that long, else they get a zero-padded copy.
  const int64_t ldx = 2 * words;
  const bool pairs = xbf16 && vtype == BF16 && (isa == AVX512 || isa == AMX) && supported(AVX512_BF16);
  const bool tiles_amx = isa == AMX && pairs && ntok >= AMX_MIN_TOKENS;
  const bool amx_prefill = tiles_amx && ntok > 16;
  if (isa == AMX) isa = AVX512;  // every other case runs the AVX-512 kernels
  const bool in_place = in == ldx && (pairs || !xbf16);
  std::vector<float> xp(pairs || in_place ? 0 : size_t(ntok * ldx), 0.0f);
  std::vector<uint32_t> xq(pairs && !in_place ? size_t(ntok * words) : 0, 0u);
  for (int64_t k = 0; k < ntok && !in_place; ++k) {
    if (pairs) {
      std::memcpy(&xq[k * words], static_cast<const uint16_t*>(x) + k * in, in * sizeof(uint16_t));
    } else if (xbf16) {
      const uint16_t* row = static_cast<const uint16_t*>(x) + k * in;
      for (int64_t i = 0; i < in; ++i) xp[k * ldx + i] = bf16_to_f32(row[i]);
    } else {
      std::memcpy(&xp[k * ldx], static_cast<const float*>(x) + k * in, in * sizeof(float));
    }
  }
  const float* x32 = pairs ? nullptr : (in_place ? static_cast<const float*>(x) : xp.data());
  const uint32_t* xpairs = pairs ? (in_place ? static_cast<const uint32_t*>(x) : xq.data()) : nullptr;
  // AMX prefill reads whole blocks of 32 tokens: the last, partial block from a padded copy.
  const int64_t tail0 = ntok / 32 * 32;
  std::vector<uint32_t> xtail(amx_prefill && tail0 < ntok ? size_t(32 * words) : 0, 0u);
  if (!xtail.empty()) std::memcpy(xtail.data(), xpairs + tail0 * words, (ntok - tail0) * words * sizeof(uint32_t));
  // The kernels write fp32; only AMX prefill writes bf16 itself, the others' sums are rounded after.
  std::vector<float> y32(ybf16 && !amx_prefill ? size_t(ntok * out) : 0);
  Job j{masks, offsets, values, out, in, words, vtype, dense != 0, x32, ntok, ldx,
        xpairs, xtail.empty() ? nullptr : xtail.data(), y32.empty() ? static_cast<float*>(y) : y32.data(),
        ybf16 && amx_prefill ? static_cast<uint16_t*>(y) : nullptr, out, bias};
  // Below ~128K multiply-adds, waking a second thread costs more than it saves.
  if (out * in * ntok < (int64_t(1) << 17)) nthreads = 1;
  const int64_t tiles = (out + ROWS - 1) / ROWS, step = piece(tiles, nthreads);
  run(nthreads, (tiles + step - 1) / step, [&](int64_t c) {
    int64_t t0 = c * step, t1 = std::min(tiles, t0 + step);
    if (tiles_amx) return matmul_amx(j, t0, t1);
    if (isa == AVX512) return matmul_avx512(j, t0, t1);
    if (isa == AVX2) return matmul_avx2(j, t0, t1);
    matmul_scalar(j, t0, t1);
  });
  uint16_t* yb = static_cast<uint16_t*>(y);
  for (size_t i = 0; i < y32.size(); ++i) yb[i] = f32_to_bf16(y32[i]);
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
  if (isa == AMX) isa = AVX512;
  if (bf16_out && (vtype != BF16 || isa == AVX2)) return -2;
  Job j{masks, offsets, values, out, in, words, vtype, dense != 0, nullptr, 0, 0, nullptr, nullptr, nullptr, nullptr, 0,
        nullptr};
  const int64_t tiles = t1 - t0, step = piece(tiles, nthreads);
  float* d32 = static_cast<float*>(dst);
  uint16_t* d16 = static_cast<uint16_t*>(dst);
  run(nthreads, (tiles + step - 1) / step, [&](int64_t c) {
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
  if (isa == AMX) isa = AVX512;
  DenseJob d{w, out, in, x, ntok, y, bias};
  if (out * in * ntok < (int64_t(1) << 17)) nthreads = 1;
  const int64_t blocks = (out + 3) / 4, step = 4 * piece(blocks, nthreads);  // rows per piece, whole blocks of 4
  run(nthreads, (out + step - 1) / step, [&](int64_t c) {
    int64_t r0 = c * step, r1 = std::min(out, r0 + step);
    if (isa == AVX512) return gemv_avx512(d, r0, r1);
    if (isa == AVX2) return gemv_avx2(d, r0, r1);
    gemv_scalar(d, r0, r1);
  });
  return 0;
}

}  // extern "C"
