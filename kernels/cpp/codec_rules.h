// The per-element rules of kernels/codec.py as branch-free scalar functions, shared by the
// CPU kernel (compiled per instruction set) and the CUDA kernel. Every function is exact:
// integer bit manipulation, comparisons, and IEEE fp32 operations whose result is exact or
// correctly rounded (division, multiplication by powers of two, round-half-even).
#ifndef MOBILLM_CODEC_RULES_H
#define MOBILLM_CODEC_RULES_H

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define MOBILLM_HD __host__ __device__ __forceinline__
#define MOBILLM_RINTF(x) rintf(x)
#else
#define MOBILLM_HD static inline
#define MOBILLM_RINTF(x) __builtin_rintf(x)  // round half to even; vectorizes to roundps
#endif

namespace mobillm {

// codec.QMAX, indexed by mobillm_format (fp16 has none).
MOBILLM_HD float qmax_of(int fmt) {
  return fmt == 0 ? 127.0f : fmt == 1 ? 448.0f : fmt == 2 ? 7.0f : fmt == 5 ? 6.0f : 1.0f;
}

// codec.NF4_THRESHOLDS: fp32 midpoints between neighbouring NF4 values (exact hex literals).
#define MOBILLM_NF4_THRESHOLDS                                                                       \
  {-0x1.b239b0p-1f, -0x1.38a4e0p-1f, -0x1.d70900p-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f,             \
   -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f,  0x1.ec90c4p-4f,  0x1.a0cfc0p-3f,              \
   0x1.2b05a8p-2f,  0x1.8ea7f2p-2f,  0x1.00da08p-1f,  0x1.491b5ep-1f,  0x1.b913b4p-1f}
// codec.NF4_TABLE.
#define MOBILLM_NF4_TABLE                                                                            \
  {-1.0f,           -0x1.647362p-1f, -0x1.0cd660p-1f, -0x1.946540p-2f, -0x1.23449ap-2f,             \
   -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0.0f,            0x1.45f5fep-4f,  0x1.4995c6p-3f,              \
   0x1.f809bap-3f,  0x1.5a0674p-2f,  0x1.c34970p-2f,  0x1.200f56p-1f,  0x1.722766p-1f, 1.0f}

MOBILLM_HD uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
MOBILLM_HD float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// fp32 -> fp16 bits, round to nearest even, subnormals exact, overflow to inf; a NaN stays a
// NaN with its top payload bits and the quiet bit set (as F16C's vcvtps2ph does).
MOBILLM_HD uint16_t half_bits(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal range: rebias the exponent and round the 13 dropped bits half to even; a carry
  // out of the mantissa bumps the exponent, up to inf for [65520, 65536).
  const uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14: the fp16 subnormal count is rint(a * 2^24), exact in fp32 (<= 1024). The
  // select keeps the float -> int conversion in range for every input.
  const float small = a < 0x38800000u ? float_of(a) : 0.0f;
  const uint32_t subnormal = (uint32_t)(int32_t)MOBILLM_RINTF(small * 16777216.0f);
  const uint32_t special = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : 0x7c00u;
  const uint32_t mag = a >= 0x47800000u ? special : a < 0x38800000u ? subnormal : normal;
  return (uint16_t)(sign | mag);
}

// fp16 bits -> fp32, exact.
MOBILLM_HD float float_of_half(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  const float sub = (float)m * 0x1p-24f;  // exact: m < 1024
  const uint32_t normal = e == 31 ? (0x7f800000u | (m << 13)) : (((e + 112u) << 23) | (m << 13));
  return float_of(sign | (e == 0 ? bits_of(sub) : normal));
}

// codec._fp8_bits for one clamped y (|y| <= 448): E4M3FN, round to nearest even, zero -> 0x00.
MOBILLM_HD uint32_t fp8_code(float y) {
  const uint32_t a = bits_of(y) & 0x7fffffffu;
  // Subnormals (|y| < 2^-6) are multiples of 2^-9: the code is rint(|y| * 512), up to 8 = 2^-6.
  const float small = a < 0x3c800000u ? float_of(a) : 0.0f;
  const uint32_t sub = (uint32_t)(int32_t)MOBILLM_RINTF(small * 512.0f);
  // Normals: keep 3 mantissa bits, rounding the 20 dropped ones half to even, then rebias
  // the exponent from 127 to 7 (120 << 3 = 960 in code units).
  const uint32_t normal = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - 960u;
  const uint32_t mag = a < 0x3c800000u ? sub : normal;
  // The sign bit, unless the value rounded to zero (codec: y < 0 and r > 0).
  const uint32_t sign = (bits_of(y) >> 24) & 0x80u;
  return mag | (mag != 0 ? sign : 0u);
}

// codec._fp4_codes for one clamped, finite y (|y| <= 6): E2M1, round half to even code.
// By segments of equal spacing: |y| in [0, 2) steps 0.5 (codes 0-4), [2, 4) steps 1 (codes
// 4-6), [4, 6] steps 2 (codes 6-7); code = offset + rint((|y| - base) / step). The subtraction
// and the scaling by a power of two are exact, and each even offset keeps rint's tie-to-even
// choice on an even code.
MOBILLM_HD uint32_t fp4_code(float y) {
  const float a = float_of(bits_of(y) & 0x7fffffffu);
  const bool ge2 = a >= 2.0f, ge4 = a >= 4.0f;
  const float base = ge4 ? 4.0f : ge2 ? 2.0f : 0.0f;
  const float inv_step = ge4 ? 0.5f : ge2 ? 1.0f : 2.0f;
  const uint32_t offset = ge4 ? 6u : ge2 ? 4u : 0u;
  const uint32_t mag = offset + (uint32_t)(int32_t)MOBILLM_RINTF((a - base) * inv_step);
  const uint32_t sign = (bits_of(y) >> 28) & 0x8u;  // only for a nonzero code: zero is 0x0
  return mag | (mag != 0 ? sign : 0u);
}

// codec.FP4_TABLE entry of nibble c (bit 3 the sign; nibble 8 is -0.0).
MOBILLM_HD float fp4_value(uint32_t c) {
  const float mags[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float m = mags[c & 7u];
  return (c & 8u) ? -m : m;
}

}  // namespace mobillm

#endif
