// The expand of one mask word, shared by the AVX-512 and the AMX units (both compiled with
// the AVX-512 VBMI2 flags).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace ptp {

// Inline asm pins the register forms: left to itself gcc folds the preceding load into
// `vpexpandw zmm{k}{z}, [mem]`, and zero-masking carries a false dependency on the old value
// of the destination; a vpxord zeroing idiom followed by a merge-masked expand has neither.
inline __m512i expand16(uint32_t m, __m512i src) {
  __m512i dst;
  asm("vpxord %0, %0, %0\n\tvpexpandw %2, %0%{%1%}" : "=&v"(dst) : "Yk"(__mmask32(m)), "v"(src));
  return dst;
}

}  // namespace ptp
