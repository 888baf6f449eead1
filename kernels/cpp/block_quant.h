/* Fused block quantization of tapped activations: the native form of kernels/codec.py.
 *
 * One pass over each row: block absmax, fp16 scale, encode, pack. The bytes are identical
 * to codec.encode (tests/kernels/test_native.py checks it); codec.py is the specification.
 * A block holding NaN or +-Inf gets scale NaN (0x7E00) and the zero code for all its
 * elements, where codec.encode would raise instead.
 */
#ifndef MOBILLM_BLOCK_QUANT_H
#define MOBILLM_BLOCK_QUANT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifndef MOBILLM_API
#if defined(_WIN32)
#define MOBILLM_API __declspec(dllexport)
#else
#define MOBILLM_API __attribute__((visibility("default")))
#endif
#endif

/* Formats, in the order of codec.FORMATS. */
enum mobillm_format {
  MOBILLM_INT8 = 0, MOBILLM_FP8 = 1, MOBILLM_INT4 = 2, MOBILLM_NF4 = 3, MOBILLM_FP16 = 4, MOBILLM_FP4 = 5  /* new ones at the end */
};
/* Element type of the input rows. */
enum mobillm_dtype { MOBILLM_FLOAT32 = 0, MOBILLM_FLOAT16 = 1 };
/* Return codes. */
enum mobillm_status { MOBILLM_OK = 0, MOBILLM_BAD_FORMAT = 1, MOBILLM_BAD_SHAPE = 2, MOBILLM_BAD_DTYPE = 3 };

/* Format id of a name ("none" is an alias of "fp16"), or -1 if unknown. */
MOBILLM_API int mobillm_parse_format(const char* name);
/* Bytes of codes per row (fp16: 2 * hidden), as codec.code_bytes. */
MOBILLM_API int64_t mobillm_code_bytes(int fmt, int64_t hidden);
/* Scales per row: ceil(hidden / block_size), 0 for fp16. */
MOBILLM_API int64_t mobillm_scales_per_row(int fmt, int64_t hidden, int64_t block_size);

/* Quantize rows [row_begin, row_end) of x [rows, hidden] (dtype float32/float16).
 * codes: [rows, code_bytes] (fp16 format: float16 bit patterns); scales: [rows, n_blocks] fp16 bits.
 * Rows are independent, so callers may split the range across threads. */
MOBILLM_API int mobillm_block_quantize_rows(const void* x, int dtype, int64_t hidden, int fmt, int64_t block_size,
                                            int64_t row_begin, int64_t row_end, void* codes, uint16_t* scales);
/* All rows, on the calling thread. */
MOBILLM_API int mobillm_block_quantize(const void* x, int dtype, int64_t rows, int64_t hidden, int fmt,
                                       int64_t block_size, void* codes, uint16_t* scales);
/* codec.decode_arrays: value(code) * scale in fp32, out [rows, hidden]. */
MOBILLM_API int mobillm_block_dequantize(const void* codes, const uint16_t* scales, int64_t rows, int64_t hidden,
                                         int fmt, int64_t block_size, float* out);
/* Instruction set the dispatcher picked: "avx2+f16c", "sse4.2" (x86-64-v2) or "generic" (the
 * compiler's baseline for the target). */
MOBILLM_API const char* mobillm_codec_isa(void);
/* Force one of those instruction sets (tests and benchmarks compare them); nonzero if this
 * build or processor lacks it. Affects every later call in the process. */
MOBILLM_API int mobillm_codec_set_isa(const char* name);

#ifdef __cplusplus
}
#endif

#endif
