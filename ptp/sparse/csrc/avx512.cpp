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
//   bf16 values with bf16 activations (AVX512_BF16): lane r of the expanded register is already
//         the (W[r, 2p], W[r, 2p+1]) pair that vdpbf16ps multiplies with a broadcast
//         (x[2p], x[2p+1]) pair and adds into lane r: one instruction per word and token.
#include <immintrin.h>

#include <algorithm>

#include "expand512.h"
#include "sparse.h"

namespace ptp {
namespace {

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
constexpr int PREFETCH = 2048, PREFETCH_MASKS = 512;

// Few tokens: CHAINS accumulator sets (word w adds into set w % CHAINS), so that no FMA waits
// on the one before it (4 cycles) while the packed words stream faster than that at 70%.
template <int V, int NT, bool DENSE>
void tiles(const Job& j, int64_t t0, int64_t t1, int64_t k0) {
  constexpr int CHAINS = NT >= 4 ? 1 : 4 / NT;
  const int64_t groups = j.words / GROUP;
  for (int64_t t = t0; t < t1; ++t) {
    __m512 acc[CHAINS][NT][2];
    for (int c = 0; c < CHAINS; ++c)
      for (int k = 0; k < NT; ++k) acc[c][k][0] = acc[c][k][1] = _mm512_setzero_ps();
    const int32_t* masks = j.masks + t * j.words;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t s = DENSE ? (t * j.words + g * GROUP) * 32 : j.offsets[t * groups + g];
      if constexpr (!DENSE) _mm_prefetch((const char*)(masks + g * GROUP) + PREFETCH_MASKS, _MM_HINT_T0);
#pragma GCC unroll 16
      for (int w = 0; w < GROUP; ++w) {
        const int64_t p = g * GROUP + w;
        const uint32_t m = DENSE ? 0xFFFFFFFFu : uint32_t(masks[p]);
        if constexpr (!DENSE) _mm_prefetch((const char*)j.values + s * (V == F32 ? 4 : 2) + PREFETCH, _MM_HINT_T0);
        word<V, NT, DENSE>(j, p, m, s, k0, acc[w % CHAINS]);
        s += DENSE ? 32 : __builtin_popcount(m);
      }
    }
    for (int k = 0; k < NT; ++k) {
      for (int c = 1; c < CHAINS; ++c)
        for (int h = 0; h < 2; ++h) acc[0][k][h] = _mm512_add_ps(acc[0][k][h], acc[c][k][h]);
      alignas(64) float a[32];
      _mm512_store_ps(a, acc[0][k][0]);
      _mm512_store_ps(a + 16, acc[0][k][1]);
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

// bf16 values x bf16 activations: one accumulator per token, so up to 16 tokens in registers.
// A vdpbf16ps waits ~6 cycles for the one before it on the same accumulator, longer than a
// word takes to stream at 70%: few tokens get CHAINS independent accumulators per token
// (word w adds into chain w % CHAINS), summed once per tile.
template <int NT, bool DENSE>
__attribute__((target("avx512bf16"))) void tiles_dpbf16(const Job& j, int64_t t0, int64_t t1, int64_t k0) {
  constexpr int CHAINS = NT >= 8 ? 1 : 8 / NT;
  const int64_t groups = j.words / GROUP, ldp = j.ldx / 2;
  for (int64_t t = t0; t < t1; ++t) {
    __m512 acc[CHAINS][NT];
    for (int c = 0; c < CHAINS; ++c)
      for (int k = 0; k < NT; ++k) acc[c][k] = _mm512_setzero_ps();
    const int32_t* masks = j.masks + t * j.words;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t s = DENSE ? (t * j.words + g * GROUP) * 32 : j.offsets[t * groups + g];
      if constexpr (!DENSE) _mm_prefetch((const char*)(masks + g * GROUP) + PREFETCH_MASKS, _MM_HINT_T0);
#pragma GCC unroll 16
      for (int w = 0; w < GROUP; ++w) {
        const int64_t p = g * GROUP + w;
        const uint32_t m = DENSE ? 0xFFFFFFFFu : uint32_t(masks[p]);
        if constexpr (!DENSE) _mm_prefetch((const char*)j.values + 2 * s + PREFETCH, _MM_HINT_T0);
        __m512i src = _mm512_loadu_si512((const uint16_t*)j.values + s);
        __m512bh e = (__m512bh)(DENSE ? src : expand16(m, src));
        __m512* a = acc[w % CHAINS];
        for (int k = 0; k < NT; ++k)
          a[k] = _mm512_dpbf16_ps(a[k], e, (__m512bh)_mm512_set1_epi32(int(j.xpairs[(k0 + k) * ldp + p])));
        s += DENSE ? 32 : __builtin_popcount(m);
      }
    }
    for (int k = 0; k < NT; ++k) {
      for (int c = 1; c < CHAINS; ++c) acc[0][k] = _mm512_add_ps(acc[0][k], acc[c][k]);
      alignas(64) float a[16];
      _mm512_store_ps(a, acc[0][k]);
      for (int r = 0; r < ROWS && t * ROWS + r < j.out; ++r) {
        int64_t row = t * ROWS + r;
        j.y[(k0 + k) * j.ldy + row] = a[r] + (j.bias ? j.bias[row] : 0.0f);
      }
    }
  }
}

template <bool DENSE>
void run_dpbf16(const Job& j, int64_t t0, int64_t t1) {
  int64_t k = 0;
  for (; k + 16 <= j.ntok; k += 16) tiles_dpbf16<16, DENSE>(j, t0, t1, k);
  for (; k + 8 <= j.ntok; k += 8) tiles_dpbf16<8, DENSE>(j, t0, t1, k);
  for (; k + 4 <= j.ntok; k += 4) tiles_dpbf16<4, DENSE>(j, t0, t1, k);
  for (; k + 2 <= j.ntok; k += 2) tiles_dpbf16<2, DENSE>(j, t0, t1, k);
  if (k < j.ntok) tiles_dpbf16<1, DENSE>(j, t0, t1, k);
}

// 4x4 transpose of 128-bit lanes: out[k * stride] lane q = in[q] lane k.
inline void lanes4x4(__m512i a, __m512i b, __m512i c, __m512i d, __m512i* out, int stride) {
  __m512i s0 = _mm512_shuffle_i32x4(a, b, 0x44), s1 = _mm512_shuffle_i32x4(a, b, 0xEE);
  __m512i s2 = _mm512_shuffle_i32x4(c, d, 0x44), s3 = _mm512_shuffle_i32x4(c, d, 0xEE);
  out[0] = _mm512_shuffle_i32x4(s0, s2, 0x88);
  out[stride] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
  out[2 * stride] = _mm512_shuffle_i32x4(s1, s3, 0x88);
  out[3 * stride] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
}

// r[i] dword k -> r[k] dword i (16 x 16 dwords).
inline void transpose_dwords(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // u[4q + j] lane L: dword 4L + j of rows 4q..4q+3
  for (int j = 0; j < 4; ++j) lanes4x4(u[j], u[4 + j], u[8 + j], u[12 + j], &r[j], 4);
}

// r[i] qword k -> r[k] qword i (8 x 8 qwords).
inline void transpose_qwords(__m512i (&r)[8]) {
  __m512i t[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm512_unpacklo_epi64(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi64(r[i], r[i + 1]);
  // t[2k + j] lane L: qword 2L + j of rows 2k, 2k+1
  for (int j = 0; j < 2; ++j) lanes4x4(t[j], t[2 + j], t[4 + j], t[6 + j], &r[j], 2);
}

// Row-major rows. A group of 16 words is 32 columns of 16 rows: its 16 expanded registers
// (lane r = row r's pair of word w) are transposed in registers, so that each row's 32
// columns leave in full 64-byte stores (the pairs one by one, or the transposed [in, rows]
// layout, cost a TLB miss per store on a 4096-wide layer). fp32 values: 8 words of (row,
// column) pairs of 8 rows are an 8 x 8 transpose of 64-bit pairs.
template <int V, typename T>
void unpack_rows(const Job& j, int64_t t0, int64_t t1, int64_t tbase, T* dst, int64_t ld) {
  const int64_t groups = j.words / GROUP;
  // Non-temporal stores (no read-for-ownership of lines that are overwritten whole) where
  // every row's groups are 64-byte aligned.
  const bool stream = (uintptr_t(dst) % 64 == 0) && (ld * sizeof(T)) % 64 == 0;
  for (int64_t t = t0; t < t1; ++t) {
    T* base = dst + (t - tbase) * ROWS * ld;
    for (int64_t g = 0; g < groups && 32 * g < j.in; ++g) {
      int64_t s = j.dense ? (t * j.words + g * GROUP) * 32 : j.offsets[t * groups + g];
      const int64_t col0 = 32 * g, left = j.in - col0;
      const __mmask32 keep32 = left >= 32 ? ~__mmask32(0) : __mmask32((1u << left) - 1);
      const __mmask16 lo16 = __mmask16(keep32), hi16 = __mmask16(keep32 >> 16);
      if constexpr (V == F32) {
        for (int half = 0; half < 2; ++half) {
          __m512i lo[8], hi[8];
          for (int w = 0; w < 8; ++w) {
            const uint32_t m = j.dense ? 0xFFFFFFFFu : uint32_t(j.masks[t * j.words + g * GROUP + 8 * half + w]);
            const float* v = (const float*)j.values + s;
            lo[w] = _mm512_castps_si512(expand32(m & 0xFFFFu, _mm512_loadu_ps(v)));
            hi[w] = _mm512_castps_si512(expand32(m >> 16, _mm512_loadu_ps(v + __builtin_popcount(m & 0xFFFFu))));
            s += j.dense ? 32 : __builtin_popcount(m);
          }
          transpose_qwords(lo);  // lo[r]: row r's columns 16*half .. 16*half + 15 of the group
          transpose_qwords(hi);  // hi[r]: row 8 + r's
          const __mmask16 keep = half ? hi16 : lo16;
          for (int r = 0; r < 8; ++r) {
            float* a = base + r * ld + col0 + 16 * half;
            float* b = base + (8 + r) * ld + col0 + 16 * half;
            if (stream && left >= 32) {
              _mm512_stream_ps(a, _mm512_castsi512_ps(lo[r]));
              _mm512_stream_ps(b, _mm512_castsi512_ps(hi[r]));
            } else {
              _mm512_mask_storeu_ps(a, keep, _mm512_castsi512_ps(lo[r]));
              _mm512_mask_storeu_ps(b, keep, _mm512_castsi512_ps(hi[r]));
            }
          }
        }
      } else {
        __m512i e[16];
        for (int w = 0; w < GROUP; ++w) {
          const uint32_t m = j.dense ? 0xFFFFFFFFu : uint32_t(j.masks[t * j.words + g * GROUP + w]);
          __m512i src = _mm512_loadu_si512((const uint16_t*)j.values + s);
          e[w] = j.dense ? src : expand16(m, src);
          s += j.dense ? 32 : __builtin_popcount(m);
        }
        transpose_dwords(e);  // e[r]: row r's 32 columns of the group, as 16-bit values
        for (int r = 0; r < ROWS; ++r) {
          T* row = base + r * ld + col0;
          if constexpr (sizeof(T) == 2) {
            if (stream && left >= 32) _mm512_stream_si512((__m512i*)row, e[r]);
            else _mm512_mask_storeu_epi16(row, keep32, e[r]);
          } else {
            __m256i a = _mm512_castsi512_si256(e[r]), b = _mm512_extracti64x4_epi64(e[r], 1);
            __m512 fa, fb;
            if constexpr (V == BF16) {
              fa = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
              fb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
            } else {
              fa = _mm512_cvtph_ps(a);
              fb = _mm512_cvtph_ps(b);
            }
            if (stream && left >= 32) {
              _mm512_stream_ps(row, fa);
              _mm512_stream_ps(row + 16, fb);
            } else {
              _mm512_mask_storeu_ps(row, lo16, fa);
              _mm512_mask_storeu_ps(row + 16, hi16, fb);
            }
          }
        }
      }
    }
  }
}

}  // namespace

void unpack_bf16_avx512(const Job& j, int64_t t0, int64_t t1, int64_t tbase, uint16_t* dst, int64_t ld) {
  unpack_rows<BF16>(j, t0, t1, tbase, dst, ld);
  _mm_sfence();  // the streamed rows are visible before the pool reports the piece done
}

void matmul_avx512(const Job& j, int64_t t0, int64_t t1) {
  if (j.xpairs) return j.dense ? run_dpbf16<true>(j, t0, t1) : run_dpbf16<false>(j, t0, t1);
  if (j.dense) return run<BF16, true>(j, t0, t1);
  switch (j.vtype) {
    case F32: return run<F32, false>(j, t0, t1);
    case BF16: return run<BF16, false>(j, t0, t1);
    default: return run<F16, false>(j, t0, t1);
  }
}

void unpack_avx512(const Job& j, int64_t t0, int64_t t1, int64_t tbase, float* dst, int64_t ld) {
  switch (j.vtype) {
    case F32: unpack_rows<F32>(j, t0, t1, tbase, dst, ld); break;
    case BF16: unpack_rows<BF16>(j, t0, t1, tbase, dst, ld); break;
    default: unpack_rows<F16>(j, t0, t1, tbase, dst, ld);
  }
  _mm_sfence();
}

// Four rows at a time, each token in turn: the four rows stay in L1/L2 between tokens, so at
// batch 1 the weight streams from memory once, in four sequential streams the hardware
// prefetcher follows; four independent FMA chains per token. A row's tail is a masked load.
void gemv_avx512(const DenseJob& d, int64_t r0, int64_t r1) {
  const int64_t full = d.in / 16 * 16;
  const __mmask16 tail = __mmask16((1u << (d.in - full)) - 1);
  constexpr int R = 4;
  for (int64_t r = r0; r < r1; r += R) {
    const int rows = int(std::min<int64_t>(R, r1 - r));
    const float* w[R];
    for (int q = 0; q < R; ++q) w[q] = d.w + (r + std::min(q, rows - 1)) * d.in;  // a short block repeats its last row
    for (int64_t k = 0; k < d.ntok; ++k) {
      const float* x = d.x + k * d.in;
      __m512 acc[R];
      for (int q = 0; q < R; ++q) acc[q] = _mm512_setzero_ps();
      for (int64_t i = 0; i < full; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        for (int q = 0; q < R; ++q) acc[q] = _mm512_fmadd_ps(_mm512_loadu_ps(w[q] + i), xv, acc[q]);
      }
      if (tail) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
        for (int q = 0; q < R; ++q) acc[q] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w[q] + full), xv, acc[q]);
      }
      for (int q = 0; q < rows; ++q)
        d.y[k * d.out + r + q] = _mm512_reduce_add_ps(acc[q]) + (d.bias ? d.bias[r + q] : 0.0f);
    }
  }
}

}  // namespace ptp
