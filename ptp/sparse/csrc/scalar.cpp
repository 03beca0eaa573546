// The reference kernels: plain loops over the set bits of each mask word. They define what is
// right; every SIMD variant is tested against them (and against x @ W.T) on random data.
#include <cstring>
#include <vector>

#include "sparse.h"

namespace ptp {
namespace {

// Both unpacks: dst(row, col) = value for every stored (row, col) of the tile, zeros elsewhere.
template <typename T, typename Load>
void unpack_tiles(const Job& j, int64_t t0, int64_t t1, int64_t tbase, T* dst, int64_t ld, Load load) {
  const int64_t groups = j.words / GROUP;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t s = j.dense ? t * j.words * 32 : j.offsets[t * groups];
    T* base = dst + (t - tbase) * ROWS * ld;
    for (int r = 0; r < ROWS; ++r) std::memset(base + r * ld, 0, j.in * sizeof(T));
    for (int64_t p = 0; p < j.words; ++p) {
      uint32_t m = j.dense ? 0xFFFFFFFFu : uint32_t(j.masks[t * j.words + p]);
      for (int b = 0; b < 32; ++b) {
        if (!(m >> b & 1)) continue;
        int64_t col = 2 * p + (b & 1), i = s++;
        if (col < j.in) base[(b >> 1) * ld + col] = load(i);
      }
    }
  }
}

}  // namespace

void matmul_scalar(const Job& j, int64_t t0, int64_t t1) {
  const int64_t groups = j.words / GROUP;
  std::vector<float> acc(size_t(j.ntok) * ROWS);
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    int64_t s = 0;
    for (int64_t p = 0; p < j.words; ++p) {
      // Each group of words starts at its stored offset (dense: every word holds 32 values).
      if (p % GROUP == 0) s = j.dense ? (t * j.words + p) * 32 : j.offsets[t * groups + p / GROUP];
      uint32_t m = j.dense ? 0xFFFFFFFFu : uint32_t(j.masks[t * j.words + p]);
      for (int b = 0; b < 32; ++b) {
        if (!(m >> b & 1)) continue;
        float v = load_value(j.values, j.vtype, s++);
        int r = b >> 1;
        int64_t col = 2 * p + (b & 1);
        for (int64_t k = 0; k < j.ntok; ++k) acc[k * ROWS + r] += v * j.x[k * j.ldx + col];
      }
    }
    for (int r = 0; r < ROWS && t * ROWS + r < j.out; ++r) {
      int64_t row = t * ROWS + r;
      for (int64_t k = 0; k < j.ntok; ++k)
        j.y[k * j.ldy + row] = acc[k * ROWS + r] + (j.bias ? j.bias[row] : 0.0f);
    }
  }
}

void unpack_scalar(const Job& j, int64_t t0, int64_t t1, int64_t tbase, float* dst, int64_t ld) {
  unpack_tiles(j, t0, t1, tbase, dst, ld, [&](int64_t i) { return load_value(j.values, j.vtype, i); });
}

void unpack_bf16_scalar(const Job& j, int64_t t0, int64_t t1, int64_t tbase, uint16_t* dst, int64_t ld) {
  unpack_tiles(j, t0, t1, tbase, dst, ld, [&](int64_t i) { return static_cast<const uint16_t*>(j.values)[i]; });
}

void gemv_scalar(const DenseJob& d, int64_t r0, int64_t r1) {
  for (int64_t k = 0; k < d.ntok; ++k) {
    const float* x = d.x + k * d.in;
    for (int64_t r = r0; r < r1; ++r) {
      const float* w = d.w + r * d.in;
      float sum = 0.0f;
      for (int64_t i = 0; i < d.in; ++i) sum += w[i] * x[i];
      d.y[k * d.out + r] = sum + (d.bias ? d.bias[r] : 0.0f);
    }
  }
}

}  // namespace ptp
