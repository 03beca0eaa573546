// Internal interface between the C ABI (runtime.cpp) and the per-ISA kernels.
// The packed layout is documented in ptp/sparse/format.py; in short, per row tile t of 16
// output rows and column pair p: one uint32 mask word masks[t*words + p], bit 2*r + c set when
// W[16t + r, 2p + c] is stored; the stored values follow in bit order; offsets[t*groups + g]
// indexes the first value of the group of GROUP words g of tile t.
#pragma once
#include <cstdint>

namespace ptp {

constexpr int ROWS = 16;
constexpr int GROUP = 16;
enum VType { F32 = 0, BF16 = 1, F16 = 2 };

struct Job {
  const int32_t* masks;     // [tiles, words]; ignored when dense
  const int64_t* offsets;   // [tiles*words/GROUP + 1]; ignored when dense
  const void* values;       // packed values; dense: 32 values per word, all stored
  int64_t out, in, words;   // weight [out, in]; words per tile (multiple of GROUP)
  int vtype;                // VType
  bool dense;               // the same loop without the mask: every bit set
  const float* x;           // [ntok, ldx] fp32 activations, zero-padded to ldx = 2*words
  int64_t ntok, ldx;
  // Or, for bf16 values on CPUs with AVX512_BF16 (matmul_avx512 only): bf16 activations as
  // [ntok, words] uint32 column pairs (x[2p] low half, x[2p+1] high half), zero-padded; x unused.
  const uint32_t* xpairs;
  const uint32_t* xtail;    // AMX prefill: tokens from ntok/32*32 on, zero-padded to 32; or nullptr
  float* y;                 // [ntok, ldy] fp32 outputs
  uint16_t* ybf16;          // or, AMX prefill only: bf16 outputs (then y is unused)
  int64_t ldy;
  const float* bias;        // [out] or nullptr
};

// y[tok, rows of tiles t0..t1) = x @ W.T (+ bias), for all ntok tokens.
void matmul_scalar(const Job& j, int64_t t0, int64_t t1);
void matmul_avx2(const Job& j, int64_t t0, int64_t t1);
void matmul_avx512(const Job& j, int64_t t0, int64_t t1);
// bf16 values with bf16 activations (xpairs) only, any ntok (in blocks of up to 16 tokens).
void matmul_amx(const Job& j, int64_t t0, int64_t t1);

// dst[(16*(t - tbase) + r) * ld + col] = W[16t + r, col] for tiles t0..t1), col < in: the
// dense rows, row-major as nn.Linear stores them (ld >= in; rows past `out` come out 0), fp32.
void unpack_scalar(const Job& j, int64_t t0, int64_t t1, int64_t tbase, float* dst, int64_t ld);
void unpack_avx2(const Job& j, int64_t t0, int64_t t1, int64_t tbase, float* dst, int64_t ld);
void unpack_avx512(const Job& j, int64_t t0, int64_t t1, int64_t tbase, float* dst, int64_t ld);
// The same for bf16 values into bf16 rows (the bits copied, so exact): the weight of torch's
// bf16 GEMM for prefill. No AVX2 variant: without AVX512_BF16 that GEMM is not the fast path.
void unpack_bf16_scalar(const Job& j, int64_t t0, int64_t t1, int64_t tbase, uint16_t* dst, int64_t ld);
void unpack_bf16_avx512(const Job& j, int64_t t0, int64_t t1, int64_t tbase, uint16_t* dst, int64_t ld);

// Row-major dense fp32 weights, for the layers a pruned model keeps dense (the LM head):
// y[k * out + r] = W[r, :] . x[k, :] (+ bias[r]) for rows r0..r1 and all ntok tokens.
struct DenseJob {
  const float* w;  // [out, in] row-major, as nn.Linear stores it
  int64_t out, in;
  const float* x;  // [ntok, in]
  int64_t ntok;
  float* y;        // [ntok, out]
  const float* bias;  // [out] or nullptr
};
void gemv_scalar(const DenseJob& d, int64_t r0, int64_t r1);
void gemv_avx2(const DenseJob& d, int64_t r0, int64_t r1);
void gemv_avx512(const DenseJob& d, int64_t r0, int64_t r1);

// Value conversions shared by the kernels (bit-exact; fp16 handles subnormals, inf and NaN).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch's .to(torch.bfloat16); NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (man << 13);                  // inf / NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);          // normal: rebias 15 -> 127
  } else if (man == 0) {
    u = sign;                                              // +-0
  } else {                                                 // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    u = sign | uint32_t(112 - e) << 23 | ((man & 0x3FF) << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline float load_value(const void* values, int vtype, int64_t i) {
  if (vtype == F32) return static_cast<const float*>(values)[i];
  uint16_t h = static_cast<const uint16_t*>(values)[i];
  return vtype == BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

}  // namespace ptp
