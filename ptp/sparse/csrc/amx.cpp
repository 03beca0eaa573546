// AMX (AMX-TILE + AMX-BF16) kernel for bf16 values with bf16 activations, 2-16 tokens.
// One mask word expanded is 16 rows x 2 inputs as 16 (W[r, 2p], W[r, 2p+1]) bf16 pairs:
// exactly one row of an AMX B tile in its VNNI layout (K pairs down, N = 16 output rows
// across). The 16 words of a group, expanded and stored to L1, are the B tile of 32 inputs x
// 16 rows; the tokens' 32 matching activations are the A tile (rows = tokens, read in place
// from the zero-padded activations); tdpbf16ps adds A.B into C (tokens x 16 rows, fp32). The
// multiply-adds leave the vector ports, which only expand and store: at 8 tokens the avx512
// kernel's 8 vdpbf16ps per word were the bottleneck, and torch's bf16 linear runs on AMX.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "expand512.h"
#include "sparse.h"

namespace ptp {
namespace {

template <typename T>
struct AlignedAlloc {  // 64-byte aligned: B tiles are written with aligned stores
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const AlignedAlloc&) const { return true; }
  bool operator!=(const AlignedAlloc&) const { return false; }
};

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Two accumulator chains (group g adds into chain g % 2), each with its own A and B tiles: a
// tdpbf16ps waits for the one before it on the same C tile, and tile registers are not
// renamed, so a load into a tile still being read would wait too.
//   chain 0: C tmm0, A tmm2, B tmm4;  chain 1: C tmm1, A tmm3, B tmm5
void configure(int ntok) {
  TileConfig c;
  for (int t = 0; t < 6; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = t < 4 ? ntok : 16;  // C and A: one row per token; B: 16 input pairs
  }
  _tile_loadconfig(&c);
}

// Expands the B tiles of groups [g0, g1) of row tile t into dst [g1 - g0][16 x 32] (dense: copied).
__attribute__((always_inline)) inline void expand_tile(const Job& j, int64_t t, int64_t g0, int64_t g1, uint16_t* dst) {
  const uint16_t* values = static_cast<const uint16_t*>(j.values);
  if (j.dense) {
    std::memcpy(dst, values + (t * j.words + g0 * GROUP) * 32, (g1 - g0) * GROUP * 64);
    return;
  }
  const int32_t* masks = j.masks + t * j.words;
  int64_t s = j.offsets[t * (j.words / GROUP) + g0];
  for (int64_t g = g0; g < g1; ++g) {
    _mm_prefetch((const char*)(masks + g * GROUP) + 512, _MM_HINT_T0);
#pragma GCC unroll 16
    for (int w = 0; w < GROUP; ++w, dst += 32) {
      const uint32_t m = uint32_t(masks[g * GROUP + w]);
      _mm_prefetch((const char*)(values + s) + 2048, _MM_HINT_T0);
      _mm512_store_si512(dst, expand16(m, _mm512_loadu_si512(values + s)));
      s += __builtin_popcount(m);
    }
  }
}

template <bool DENSE>
void tiles(const Job& j, int64_t t0, int64_t t1, int64_t k0, int ntok) {
  const int64_t groups = j.words / GROUP, lda = 4 * j.words;  // bytes per activation row
  const uint16_t* x = reinterpret_cast<const uint16_t*>(j.xpairs + k0 * j.words);
  alignas(64) uint16_t b[2][ROWS * 32];  // the two chains' B tiles, expanded
  alignas(64) float c[2][16 * ROWS];
  configure(ntok);
  for (int64_t t = t0; t < t1; ++t) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t g = 0; g < groups; ++g) {
      // dense: the B tile as stored
      const uint16_t* bt = static_cast<const uint16_t*>(j.values) + (t * j.words + g * GROUP) * 32;
      if constexpr (!DENSE) {
        expand_tile(j, t, g, g + 1, b[g & 1]);
        bt = b[g & 1];
      }
      if (g & 1) {
        _tile_loadd(3, x + 32 * g, lda);
        _tile_loadd(5, bt, 64);
        _tile_dpbf16ps(1, 3, 5);
      } else {
        _tile_loadd(2, x + 32 * g, lda);
        _tile_loadd(4, bt, 64);
        _tile_dpbf16ps(0, 2, 4);
      }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    for (int k = 0; k < ntok; ++k)
      for (int r = 0; r < ROWS && t * ROWS + r < j.out; ++r) {
        const int64_t row = t * ROWS + r;
        j.y[(k0 + k) * j.ldy + row] = c[0][k * ROWS + r] + c[1][k * ROWS + r] + (j.bias ? j.bias[row] : 0.0f);
      }
  }
  _tile_release();
}

// y (+ bias) of tokens m0.. (up to 32) and of row tiles t, t + 1 (only t when pairs_left is 1)
// from the C tiles c: [0] tokens 0-15 x tile t, [1] 0-15 x t + 1, [2] 16-31 x t, [3] 16-31 x t + 1.
void write_out(const Job& j, const float (&c)[4][16 * ROWS], int64_t m0, int64_t t, int64_t pairs_left) {
  for (int h = 0; h < 2 && h < pairs_left; ++h) {
    const int64_t row0 = (t + h) * ROWS;
    const int left = int(std::min<int64_t>(ROWS, j.out - row0));
    const __mmask16 keep = __mmask16((1u << left) - 1);
    const __m512 bias = j.bias ? _mm512_maskz_loadu_ps(keep, j.bias + row0) : _mm512_setzero_ps();
    for (int k = 0; k < 32 && m0 + k < j.ntok; ++k) {
      const __m512 sum = _mm512_add_ps(_mm512_load_ps(c[(k >= 16) * 2 + h] + (k % 16) * ROWS), bias);
      const int64_t at = (m0 + k) * j.ldy + row0;
      if (j.ybf16) _mm256_mask_storeu_epi16(j.ybf16 + at, keep, (__m256i)_mm512_cvtneps_pbh(sum));
      else _mm512_mask_storeu_ps(j.y + at, keep, sum);
    }
  }
}

// Prefill: a panel of row tiles is expanded once into a buffer that stays in L2, then every
// block of 32 tokens (A: 2 tiles) meets every pair of its row tiles (B: 2 tiles) in 4 C tiles
// — the 2 x 2 blocking that 8 tile registers allow. Inputs go in chunks of up to 4096 (the
// partial sums wait in a per-thread buffer between chunks), so that a panel of 8 or more row
// tiles fits in L2 beside a block of activations: each block of activations is then read once
// per 8 row tiles, not once per pair. The last partial block of 32 tokens is read from the
// zero-padded copy j.xtail.
void prefill(const Job& j, int64_t t0, int64_t t1) {
  constexpr int64_t CHUNK = 128;  // groups of 32 inputs
  const int64_t groups = j.words / GROUP, lda = 4 * j.words;
  const int64_t chunk = std::min(groups, CHUNK), tile_elems = chunk * ROWS * 32;
  // Row tiles per panel: about 1 MiB of expanded weights, an even number.
  const int64_t panel = std::max<int64_t>(8, ((int64_t(1) << 19) / tile_elems) & ~int64_t(1));
  const int64_t blocks = (j.ntok + 31) / 32;
  static thread_local std::vector<uint16_t, AlignedAlloc<uint16_t>> buf;
  static thread_local std::vector<float, AlignedAlloc<float>> partial;  // [blocks][panel/2][4][16 x 16]
  if (int64_t(buf.size()) < (panel + 1) * tile_elems) buf.resize((panel + 1) * tile_elems);
  if (groups > chunk && int64_t(partial.size()) < blocks * panel * 512) partial.resize(blocks * panel * 512);
  const uint16_t* x = reinterpret_cast<const uint16_t*>(j.xpairs);
  alignas(64) float c[4][16 * ROWS];
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
  for (int64_t p0 = t0; p0 < t1; p0 += panel) {
    const int64_t np = std::min(panel, t1 - p0);
    for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
      const int64_t g1 = std::min(groups, g0 + chunk);
      const bool first = g0 == 0, last = g1 == groups;
      for (int64_t q = 0; q < np; ++q) expand_tile(j, p0 + q, g0, g1, buf.data() + q * tile_elems);
      if (np & 1) std::memset(buf.data() + np * tile_elems, 0, tile_elems * 2);  // a zero partner
      for (int64_t m = 0, m0 = 0; m0 < j.ntok; ++m, m0 += 32) {
        const uint16_t* a = m0 + 32 <= j.ntok ? x + m0 * 2 * j.words : reinterpret_cast<const uint16_t*>(j.xtail);
        for (int64_t q = 0; q < np; q += 2) {
          const uint16_t* b0 = buf.data() + q * tile_elems;
          const uint16_t* b1 = b0 + tile_elems;
          float* held = partial.data() + (m * panel + q) * 512;  // this pair's 4 C tiles between chunks
          if (first) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, held, 64);
            _tile_loadd(1, held + 256, 64);
            _tile_loadd(2, held + 512, 64);
            _tile_loadd(3, held + 768, 64);
          }
          for (int64_t g = g0; g < g1; ++g) {
            const int64_t at = (g - g0) * ROWS * 32;
            _tile_loadd(4, a + 32 * g, lda);
            _tile_loadd(6, b0 + at, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, b1 + at, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, a + 16 * lda / 2 + 32 * g, lda);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          float* to = last ? c[0] : held;
          _tile_stored(0, to, 64);
          _tile_stored(1, to + 256, 64);
          _tile_stored(2, to + 512, 64);
          _tile_stored(3, to + 768, 64);
          if (last) write_out(j, c, m0, p0 + q, np - q);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace

void matmul_amx(const Job& j, int64_t t0, int64_t t1) {
  if (j.ntok > 16) return prefill(j, t0, t1);
  j.dense ? tiles<true>(j, t0, t1, 0, int(j.ntok)) : tiles<false>(j, t0, t1, 0, int(j.ntok));
}

}  // namespace ptp
