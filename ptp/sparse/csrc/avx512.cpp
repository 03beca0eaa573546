// AVX-512 (F/BW/VL/VBMI2) kernels: one mask word = one 512-bit register of 32 expanded
// 16-bit values (16 rows x 2 inputs) — the SparAMX tile. The word's values are read with a
// plain unaligned load and expanded with the *register* form of vpexpandw/vpexpandd (the
// memory forms are slow on Zen 4), merging into a register zeroed by an idiom just before, so
// the expand carries no dependency on an older value of its destination.
//   bf16: lane r of the expanded register holds (W[r, 2p], W[r, 2p+1]) as two bf16 halves;
//         `<< 16` and `& 0xFFFF0000` turn them into two exact fp32 vectors, one per column,
//         each FMA'd with a broadcast activation: lane r accumulates row r directly.
//   fp16: expand 32 halves, vcvtph2ps each 256-bit half: (row, column) pairs in 2 registers.
//   fp32: two vpexpandd of 16 lanes (rows 0-7 and 8-15, column pairs interleaved).
// Paired lanes are summed once per tile.
#include <immintrin.h>

#include "sparse.h"

namespace ptp {
extern "C" void ptp_tune_pf(int a, int b);
namespace {

// Inline asm pins the register forms: left to itself gcc folds the preceding load into
// `vpexpandw zmm{k}{z}, [mem]`, and zero-masking carries a false dependency on the old value
// of the destination; a vpxord zeroing idiom followed by a merge-masked expand has neither.
inline __m512i expand16(uint32_t m, __m512i src) {
  __m512i dst;
  asm("vpxord %0, %0, %0\n\tvpexpandw %2, %0%{%1%}" : "=&v"(dst) : "Yk"(__mmask32(m)), "v"(src));
  return dst;
}

inline __m512 expand32(uint32_t m16, __m512 src) {
  __m512 dst;
  asm("vpxord %0, %0, %0\n\tvexpandps %2, %0%{%1%}" : "=&v"(dst) : "Yk"(__mmask16(m16)), "v"(src));
  return dst;
}

// Accumulates one word into acc[k][0..1] for NT tokens (bf16: column 0 and column 1 of rows
// 0-15; others: (row, column) pairs of rows 0-7 and of rows 8-15).
template <int V, int NT, bool DENSE>
inline void word(const Job& j, int64_t p, uint32_t m, int64_t s, int64_t k0, __m512 (&acc)[NT][2]) {
  const float* x = j.x + k0 * j.ldx + 2 * p;
  if constexpr (V == BF16) {
    __m512i src = _mm512_loadu_si512((const uint16_t*)j.values + s);
    __m512i e = DENSE ? src : expand16(m, src);
    __m512 c0 = _mm512_castsi512_ps(_mm512_slli_epi32(e, 16));
    __m512 c1 = _mm512_castsi512_ps(_mm512_and_si512(e, _mm512_set1_epi32(int(0xFFFF0000u))));
    for (int k = 0; k < NT; ++k) {
      acc[k][0] = _mm512_fmadd_ps(c0, _mm512_set1_ps(x[k * j.ldx]), acc[k][0]);
      acc[k][1] = _mm512_fmadd_ps(c1, _mm512_set1_ps(x[k * j.ldx + 1]), acc[k][1]);
    }
  } else {
    __m512 lo, hi;
    if constexpr (V == F16) {
      __m512i e = expand16(m, _mm512_loadu_si512((const uint16_t*)j.values + s));
      lo = _mm512_cvtph_ps(_mm512_castsi512_si256(e));
      hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(e, 1));
    } else {
      const float* v = (const float*)j.values + s;
      lo = expand32(m & 0xFFFFu, _mm512_loadu_ps(v));
      hi = expand32(m >> 16, _mm512_loadu_ps(v + __builtin_popcount(m & 0xFFFFu)));
    }
    for (int k = 0; k < NT; ++k) {
      __m512 xp = _mm512_castpd_ps(_mm512_set1_pd(*(const double*)(x + k * j.ldx)));
      acc[k][0] = _mm512_fmadd_ps(lo, xp, acc[k][0]);
      acc[k][1] = _mm512_fmadd_ps(hi, xp, acc[k][1]);
    }
  }
}

// Software prefetch, bytes ahead in the value and the mask streams. A value load's address
// depends on the popcounts of the masks before it, so a mask line that misses stalls every
// later load of its group: the hardware prefetcher alone leaves bf16 at half of the DRAM
// bandwidth the dense loop reaches.
int PREFETCH = 1024, PREFETCH_MASKS = 512;

template <int V, int NT, bool DENSE>
void tiles(const Job& j, int64_t t0, int64_t t1, int64_t k0) {
  const int64_t groups = j.words / GROUP;
  for (int64_t t = t0; t < t1; ++t) {
    __m512 acc[NT][2];
    for (int k = 0; k < NT; ++k) acc[k][0] = acc[k][1] = _mm512_setzero_ps();
    const int32_t* masks = j.masks + t * j.words;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t s = DENSE ? (t * j.words + g * GROUP) * 32 : j.offsets[t * groups + g];
      if constexpr (!DENSE) _mm_prefetch((const char*)(masks + g * GROUP) + PREFETCH_MASKS, _MM_HINT_T0);
      for (int w = 0; w < GROUP; ++w) {
        const int64_t p = g * GROUP + w;
        const uint32_t m = DENSE ? 0xFFFFFFFFu : uint32_t(masks[p]);
        if constexpr (!DENSE) _mm_prefetch((const char*)j.values + s * (V == F32 ? 4 : 2) + PREFETCH, _MM_HINT_T0);
        word<V, NT, DENSE>(j, p, m, s, k0, acc);
        s += DENSE ? 32 : __builtin_popcount(m);
      }
    }
    for (int k = 0; k < NT; ++k) {
      alignas(64) float a[32];
      _mm512_store_ps(a, acc[k][0]);
      _mm512_store_ps(a + 16, acc[k][1]);
      for (int r = 0; r < ROWS && t * ROWS + r < j.out; ++r) {
        int64_t row = t * ROWS + r;
        // bf16: a[r] is column 0, a[16 + r] column 1; others: (row, column) pairs in order.
        float sum = V == BF16 ? a[r] + a[16 + r] : a[2 * r] + a[2 * r + 1];
        j.y[(k0 + k) * j.ldy + row] = sum + (j.bias ? j.bias[row] : 0.0f);
      }
    }
  }
}

// Tokens in chunks of up to 8: 2 accumulators per token leave room in the 32 zmm registers.
template <int V, bool DENSE>
void run(const Job& j, int64_t t0, int64_t t1) {
  int64_t k = 0;
  for (; k + 8 <= j.ntok; k += 8) tiles<V, 8, DENSE>(j, t0, t1, k);
  for (; k + 4 <= j.ntok; k += 4) tiles<V, 4, DENSE>(j, t0, t1, k);
  for (; k + 2 <= j.ntok; k += 2) tiles<V, 2, DENSE>(j, t0, t1, k);
  if (k < j.ntok) tiles<V, 1, DENSE>(j, t0, t1, k);
}

template <int V>
void unpack(const Job& j, int64_t t0, int64_t t1, int64_t tbase, float* dst, int64_t ld) {
  const int64_t groups = j.words / GROUP;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t t = t0; t < t1; ++t) {
    float* base = dst + (t - tbase) * ROWS;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t s = j.dense ? (t * j.words + g * GROUP) * 32 : j.offsets[t * groups + g];
      for (int w = 0; w < GROUP; ++w) {
        const int64_t p = g * GROUP + w;
        if (2 * p >= j.in) break;
        const uint32_t m = j.dense ? 0xFFFFFFFFu : uint32_t(j.masks[t * j.words + p]);
        __m512 c0, c1;
        if constexpr (V == BF16) {
          __m512i src = _mm512_loadu_si512((const uint16_t*)j.values + s);
          __m512i e = j.dense ? src : expand16(m, src);
          c0 = _mm512_castsi512_ps(_mm512_slli_epi32(e, 16));
          c1 = _mm512_castsi512_ps(_mm512_and_si512(e, _mm512_set1_epi32(int(0xFFFF0000u))));
        } else {
          __m512 lo, hi;
          if constexpr (V == F16) {
            __m512i e = expand16(m, _mm512_loadu_si512((const uint16_t*)j.values + s));
            lo = _mm512_cvtph_ps(_mm512_castsi512_si256(e));
            hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(e, 1));
          } else {
            const float* v = (const float*)j.values + s;
            lo = expand32(m & 0xFFFFu, _mm512_loadu_ps(v));
            hi = expand32(m >> 16, _mm512_loadu_ps(v + __builtin_popcount(m & 0xFFFFu)));
          }
          c0 = _mm512_permutex2var_ps(lo, even, hi);
          c1 = _mm512_permutex2var_ps(lo, odd, hi);
        }
        _mm512_storeu_ps(base + 2 * p * ld, c0);
        if (2 * p + 1 < j.in) _mm512_storeu_ps(base + (2 * p + 1) * ld, c1);
        s += j.dense ? 32 : __builtin_popcount(m);
      }
    }
  }
}

}  // namespace
extern "C" void ptp_tune_pf(int a, int b) { PREFETCH = a; PREFETCH_MASKS = b; }

void matmul_avx512(const Job& j, int64_t t0, int64_t t1) {
  if (j.dense) return run<BF16, true>(j, t0, t1);
  switch (j.vtype) {
    case F32: return run<F32, false>(j, t0, t1);
    case BF16: return run<BF16, false>(j, t0, t1);
    default: return run<F16, false>(j, t0, t1);
  }
}

void unpack_avx512(const Job& j, int64_t t0, int64_t t1, int64_t tbase, float* dst, int64_t ld) {
  switch (j.vtype) {
    case F32: return unpack<F32>(j, t0, t1, tbase, dst, ld);
    case BF16: return unpack<BF16>(j, t0, t1, tbase, dst, ld);
    default: return unpack<F16>(j, t0, t1, tbase, dst, ld);
  }
}

}  // namespace ptp
