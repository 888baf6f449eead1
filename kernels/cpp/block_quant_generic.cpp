// The kernel body compiled for one instruction set (see CMakeLists.txt for its flags).
#define MOBILLM_ISA_NS isa_generic
#include "block_quant_impl.h"
