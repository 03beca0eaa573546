// AVX2 + FMA + F16C kernels. One byte of a mask word covers 4 rows x 2 inputs = one 8-lane
// fp32 register in (row, column) order; the byte indexes a table that expands the byte's kept
// values (loaded with one plain vector load) into those lanes, zeros elsewhere:
//   bf16: vpshufb of the 16 loaded bytes (broadcast to both halves) puts value k into the high
//         half of its lane — that *is* the fp32 value, and the 0x80 entries zero the rest;
//   fp16: vpshufb into 8 halfwords, then vcvtph2ps;
//   fp32: vpermps by the table's indices, then an AND with the table's lane mask.
// Each lane accumulates row r's products of one column parity against a broadcast pair
// (x[2p], x[2p+1]); the two parities are summed once per tile. Tokens share every expansion.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "sparse.h"

namespace ptp {
namespace {

struct Tables {
  alignas(32) uint8_t bf16[256][32];
  alignas(16) uint8_t f16[256][16];
  alignas(32) int32_t perm[256][8];
  alignas(32) int32_t keep[256][8];
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        bool set = m >> lane & 1;
        // Lanes 4..7 live in the upper 128-bit half; the source is broadcast to both halves,
        // so the byte indices are the same.
        bf16[m][4 * lane + 0] = bf16[m][4 * lane + 1] = 0x80;
        bf16[m][4 * lane + 2] = set ? uint8_t(2 * k) : 0x80;
        bf16[m][4 * lane + 3] = set ? uint8_t(2 * k + 1) : 0x80;
        f16[m][2 * lane] = set ? uint8_t(2 * k) : 0x80;
        f16[m][2 * lane + 1] = set ? uint8_t(2 * k + 1) : 0x80;
        perm[m][lane] = set ? k : 0;
        keep[m][lane] = set ? -1 : 0;
        k += set;
      }
    }
  }
};
const Tables T;

// The 8 fp32 weights of mask byte `byte` whose first stored value is values[start].
template <int V>
inline __m256 expand8(const void* values, int64_t start, unsigned byte) {
  if constexpr (V == BF16) {
    __m256i s = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)((const uint16_t*)values + start)));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(s, _mm256_load_si256((const __m256i*)T.bf16[byte])));
  } else if constexpr (V == F16) {
    __m128i s = _mm_loadu_si128((const __m128i*)((const uint16_t*)values + start));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(s, _mm_load_si128((const __m128i*)T.f16[byte])));
  } else {
    __m256 s = _mm256_loadu_ps((const float*)values + start);
    __m256 p = _mm256_permutevar8x32_ps(s, _mm256_load_si256((const __m256i*)T.perm[byte]));
    return _mm256_and_ps(p, _mm256_load_ps((const float*)T.keep[byte]));
  }
}

constexpr int PREFETCH = 1024;

// The first stored value of each byte of mask word m that starts at s.
inline void byte_starts(uint32_t m, int64_t s, int64_t st[4]) {
  st[0] = s;
  st[1] = s + __builtin_popcount(m & 0xFFu);
  st[2] = s + __builtin_popcount(m & 0xFFFFu);
  st[3] = s + __builtin_popcount(m & 0xFFFFFFu);
}

template <int V, int NT, bool DENSE>
void tiles(const Job& j, int64_t t0, int64_t t1, int64_t k0) {
  const int64_t groups = j.words / GROUP;
  for (int64_t t = t0; t < t1; ++t) {
    __m256 acc[NT][4];
    for (int k = 0; k < NT; ++k)
      for (int b = 0; b < 4; ++b) acc[k][b] = _mm256_setzero_ps();
    const int32_t* masks = j.masks + t * j.words;
    for (int64_t g = 0; g < groups; ++g) {
      // The group's stored offset: no popcount chain reaches across groups.
      int64_t s = DENSE ? (t * j.words + g * GROUP) * 32 : j.offsets[t * groups + g];
      for (int w = 0; w < GROUP; ++w) {
        const int64_t p = g * GROUP + w;
        const uint32_t m = DENSE ? 0xFFFFFFFFu : uint32_t(masks[p]);
        // Software prefetch PREFETCH bytes ahead in the value stream: the hardware prefetcher
        // alone falls behind when several threads each stream their own tile range.
        _mm_prefetch((const char*)j.values + s * (V == F32 ? 4 : 2) + PREFETCH, _MM_HINT_T0);
        __m256 xp[NT];
        for (int k = 0; k < NT; ++k)
          xp[k] = _mm256_castpd_ps(_mm256_broadcast_sd((const double*)(j.x + (k0 + k) * j.ldx + 2 * p)));
        int64_t st[4];
        byte_starts(m, s, st);
        for (int b = 0; b < 4; ++b) {
          __m256 w8 = expand8<V>(j.values, DENSE ? s + 8 * b : st[b], (m >> (8 * b)) & 0xFF);
          for (int k = 0; k < NT; ++k) acc[k][b] = _mm256_fmadd_ps(w8, xp[k], acc[k][b]);
        }
        s += DENSE ? 32 : __builtin_popcount(m);
      }
    }
    for (int k = 0; k < NT; ++k) {
      alignas(32) float a[32];
      for (int b = 0; b < 4; ++b) _mm256_store_ps(a + 8 * b, acc[k][b]);
      for (int r = 0; r < ROWS && t * ROWS + r < j.out; ++r) {
        int64_t row = t * ROWS + r;
        j.y[(k0 + k) * j.ldy + row] = a[2 * r] + a[2 * r + 1] + (j.bias ? j.bias[row] : 0.0f);
      }
    }
  }
}

// More than 2 tokens: the 4 accumulators per token no longer fit in registers, so each group
// of GROUP words is expanded once into an L1-resident scratch (64 registers' worth) and then
// multiplied against the tokens NT = 3 at a time, their accumulators kept in memory between
// groups. Every expansion is still done once per weight, whatever the number of tokens.
template <int V, int NT, bool DENSE>
inline void group_tokens(const Job& j, const __m256 (&w8)[GROUP][4], int64_t p0, int64_t k0, __m256* accs) {
  __m256 acc[NT][4];
  for (int k = 0; k < NT; ++k)
    for (int b = 0; b < 4; ++b) acc[k][b] = _mm256_load_ps((const float*)&accs[(k0 + k) * 4 + b]);
  for (int w = 0; w < GROUP; ++w) {
    __m256 xp[NT];
    for (int k = 0; k < NT; ++k)
      xp[k] = _mm256_castpd_ps(_mm256_broadcast_sd((const double*)(j.x + (k0 + k) * j.ldx + 2 * (p0 + w))));
    for (int b = 0; b < 4; ++b)
      for (int k = 0; k < NT; ++k) acc[k][b] = _mm256_fmadd_ps(w8[w][b], xp[k], acc[k][b]);
  }
  for (int k = 0; k < NT; ++k)
    for (int b = 0; b < 4; ++b) _mm256_store_ps((float*)&accs[(k0 + k) * 4 + b], acc[k][b]);
}

template <int V, bool DENSE>
void tiles_batched(const Job& j, int64_t t0, int64_t t1) {
  const int64_t groups = j.words / GROUP;
  alignas(32) __m256 w8[GROUP][4];
  std::vector<__m256> accs(size_t(j.ntok) * 4);  // std::vector<__m256> is 32-byte aligned (C++17)
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(accs.begin(), accs.end(), _mm256_setzero_ps());
    const int32_t* masks = j.masks + t * j.words;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t s = DENSE ? (t * j.words + g * GROUP) * 32 : j.offsets[t * groups + g];
      for (int w = 0; w < GROUP; ++w) {
        const uint32_t m = DENSE ? 0xFFFFFFFFu : uint32_t(masks[g * GROUP + w]);
        int64_t st[4];
        byte_starts(m, s, st);
        for (int b = 0; b < 4; ++b) w8[w][b] = expand8<V>(j.values, DENSE ? s + 8 * b : st[b], (m >> (8 * b)) & 0xFF);
        s += DENSE ? 32 : __builtin_popcount(m);
      }
      int64_t k = 0;
      for (; k + 3 <= j.ntok; k += 3) group_tokens<V, 3, DENSE>(j, w8, g * GROUP, k, accs.data());
      for (; k < j.ntok; ++k) group_tokens<V, 1, DENSE>(j, w8, g * GROUP, k, accs.data());
    }
    for (int64_t k = 0; k < j.ntok; ++k) {
      const float* a = (const float*)&accs[k * 4];
      for (int r = 0; r < ROWS && t * ROWS + r < j.out; ++r) {
        int64_t row = t * ROWS + r;
        j.y[k * j.ldy + row] = a[2 * r] + a[2 * r + 1] + (j.bias ? j.bias[row] : 0.0f);
      }
    }
  }
}

// 1-2 tokens: every accumulator in a register, one pass; more: the scratch path above.
template <int V, bool DENSE>
void run(const Job& j, int64_t t0, int64_t t1) {
  if (j.ntok == 1) return tiles<V, 1, DENSE>(j, t0, t1, 0);
  if (j.ntok == 2) return tiles<V, 2, DENSE>(j, t0, t1, 0);
  tiles_batched<V, DENSE>(j, t0, t1);
}

// Row-major rows: each mask byte gives 4 rows x 2 columns, stored as one pair per row.
template <int V>
void unpack(const Job& j, int64_t t0, int64_t t1, int64_t tbase, float* dst, int64_t ld) {
  const int64_t groups = j.words / GROUP;
  for (int64_t t = t0; t < t1; ++t) {
    float* base = dst + (t - tbase) * ROWS * ld;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t s = j.dense ? (t * j.words + g * GROUP) * 32 : j.offsets[t * groups + g];
      for (int w = 0; w < GROUP; ++w) {
        const int64_t p = g * GROUP + w;
        if (2 * p >= j.in) break;
        const uint32_t m = j.dense ? 0xFFFFFFFFu : uint32_t(j.masks[t * j.words + p]);
        const bool pair = 2 * p + 1 < j.in;
        int64_t st[4];
        byte_starts(m, s, st);
        for (int b = 0; b < 4; ++b) {
          __m256 v = expand8<V>(j.values, j.dense ? s + 8 * b : st[b], (m >> (8 * b)) & 0xFF);
          __m128 halves[2] = {_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)};
          for (int r = 0; r < 4; ++r) {
            float* at = base + (4 * b + r) * ld + 2 * p;
            __m128 h = halves[r / 2];
            if (r % 2) h = _mm_movehl_ps(h, h);
            if (pair) _mm_storel_pi((__m64*)at, h); else _mm_store_ss(at, h);
          }
        }
        s += j.dense ? 32 : __builtin_popcount(m);
      }
    }
  }
}

}  // namespace

void matmul_avx2(const Job& j, int64_t t0, int64_t t1) {
  if (j.dense) return run<BF16, true>(j, t0, t1);  // the dense baseline exists for bf16 only
  switch (j.vtype) {
    case F32: return run<F32, false>(j, t0, t1);
    case BF16: return run<BF16, false>(j, t0, t1);
    default: return run<F16, false>(j, t0, t1);
  }
}

void unpack_avx2(const Job& j, int64_t t0, int64_t t1, int64_t tbase, float* dst, int64_t ld) {
  switch (j.vtype) {
    case F32: return unpack<F32>(j, t0, t1, tbase, dst, ld);
    case BF16: return unpack<BF16>(j, t0, t1, tbase, dst, ld);
    default: return unpack<F16>(j, t0, t1, tbase, dst, ld);
  }
}

// As gemv_avx512, eight lanes wide; a row's tail is summed in scalar.
void gemv_avx2(const DenseJob& d, int64_t r0, int64_t r1) {
  const int64_t full = d.in / 8 * 8;
  constexpr int R = 4;
  for (int64_t r = r0; r < r1; r += R) {
    const int rows = int(std::min<int64_t>(R, r1 - r));
    const float* w[R];
    for (int q = 0; q < R; ++q) w[q] = d.w + (r + std::min(q, rows - 1)) * d.in;
    for (int64_t k = 0; k < d.ntok; ++k) {
      const float* x = d.x + k * d.in;
      __m256 acc[R];
      for (int q = 0; q < R; ++q) acc[q] = _mm256_setzero_ps();
      for (int64_t i = 0; i < full; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        for (int q = 0; q < R; ++q) acc[q] = _mm256_fmadd_ps(_mm256_loadu_ps(w[q] + i), xv, acc[q]);
      }
      for (int q = 0; q < rows; ++q) {
        alignas(32) float a[8];
        _mm256_store_ps(a, acc[q]);
        float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        for (int64_t i = full; i < d.in; ++i) sum += w[q][i] * x[i];
        d.y[k * d.out + r + q] = sum + (d.bias ? d.bias[r + q] : 0.0f);
      }
    }
  }
}

}  // namespace ptp
