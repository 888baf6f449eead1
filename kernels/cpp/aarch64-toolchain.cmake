# Cross-compile the native kernels for 64-bit ARM Linux (Jetson, Raspberry Pi 4/5, phones' Linux):
#   cmake -S . -B build/aarch64/native -DCMAKE_TOOLCHAIN_FILE=kernels/cpp/aarch64-toolchain.cmake
# with Debian's g++-aarch64-linux-gnu (bench/aarch64/setup.sh). On the board itself no toolchain
# file is needed. The CPU kernel builds its generic path: CMakeLists.txt adds the x86 AVX2/SSE4.2
# units only for x86-64, and Advanced SIMD (NEON) is part of the aarch64 base ISA, so -O3
# vectorizes the generic loops with it.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(MOBILLM_CROSS_PREFIX aarch64-linux-gnu- CACHE STRING "prefix of the cross compiler's tools")
set(CMAKE_C_COMPILER ${MOBILLM_CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${MOBILLM_CROSS_PREFIX}g++)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# Armv8.0-A, the baseline every 64-bit ARM board runs (Cortex-A53/A72/A76, Carmel, A78AE).
set(CMAKE_CXX_FLAGS_INIT "-march=armv8-a")
set(CMAKE_C_FLAGS_INIT "-march=armv8-a")
