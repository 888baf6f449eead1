/* The CUDA form of kernels/cpp/block_quant.h: same formats, same bytes as kernels/codec.py. */
#ifndef MOBILLM_BLOCK_QUANT_CUDA_H
#define MOBILLM_BLOCK_QUANT_CUDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifndef MOBILLM_API
#define MOBILLM_API __attribute__((visibility("default")))
#endif

/* Enqueue quantization of x [rows, hidden] (device memory, dtype 0 = float32, 1 = float16)
 * on `stream` (a cudaStream_t, or NULL for the default stream). codes/scales are device
 * buffers laid out as in block_quant.h; fmt uses the mobillm_format numbering. Returns 0, or
 * nonzero with mobillm_cuda_last_error() describing the failure. */
MOBILLM_API int mobillm_cuda_block_quantize(const void* x, int dtype, int64_t rows, int64_t hidden, int fmt,
                                            int64_t block_size, void* codes, uint16_t* scales, void* stream);

/* Host-memory convenience for tests: copy in, quantize, copy out, synchronously. */
MOBILLM_API int mobillm_cuda_block_quantize_host(const void* x, int dtype, int64_t rows, int64_t hidden, int fmt,
                                                 int64_t block_size, void* codes, uint16_t* scales);

/* Benchmark on device copies of host x: mean milliseconds per quantize launch and per
 * device-to-device cudaMemcpy of x, over `iters` runs after a warm-up. */
MOBILLM_API int mobillm_cuda_bench(const void* x, int dtype, int64_t rows, int64_t hidden, int fmt,
                                   int64_t block_size, int iters, float* ms_quantize, float* ms_memcpy);

/* Name of the device in use ("" if none). */
MOBILLM_API const char* mobillm_cuda_device_name(void);

MOBILLM_API const char* mobillm_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif
