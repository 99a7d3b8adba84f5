// Everything the kernel sources include, included once at the top of each
// instruction-set unit (isa_*.cpp) BEFORE its `#pragma GCC target`.
//
// Why it matters: a unit compiles the same kernel sources (*.inc) for one
// instruction set. Functions defined after the pragma get that target; the
// headers' inline functions and templates were defined before it, so they
// (and any copy the linker keeps of them) stay at the baseline: no AVX-512
// code can leak into code that every CPU runs.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define RADIXSERVE_X86 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "int_gemm_layout.h"
#include "isa.h"
#include "numerics.h"
