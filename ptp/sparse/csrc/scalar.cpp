// The reference kernels: plain loops over the set bits of each mask word. They define what is
// right; every SIMD variant is tested against them (and against x @ W.T) on random data.
#include <cstring>
#include <vector>

#include "sparse.h"

namespace ptp {

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
  const int64_t groups = j.words / GROUP;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t s = j.dense ? t * j.words * 32 : j.offsets[t * groups];
    float* base = dst + (t - tbase) * ROWS;
    for (int64_t p = 0; p < j.words; ++p) {
      for (int c = 0; c < 2 && 2 * p + c < j.in; ++c) std::memset(base + (2 * p + c) * ld, 0, ROWS * sizeof(float));
      uint32_t m = j.dense ? 0xFFFFFFFFu : uint32_t(j.masks[t * j.words + p]);
      for (int b = 0; b < 32; ++b) {
        if (!(m >> b & 1)) continue;
        float v = load_value(j.values, j.vtype, s++);
        int64_t col = 2 * p + (b & 1);
        if (col < j.in) base[col * ld + (b >> 1)] = v;
      }
    }
  }
}

}  // namespace ptp
