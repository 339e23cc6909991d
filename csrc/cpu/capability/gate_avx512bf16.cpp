// kernels/gate.inc at the AVX512BF16 SIMD level: setup.py and CMakeLists.txt give this file that level's
// flags, and CPU_CAPABILITY=AVX512BF16, from its name.
#include "../kernels/gate.inc"
