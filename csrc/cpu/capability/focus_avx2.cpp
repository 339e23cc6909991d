// kernels/focus.inc at the AVX2 SIMD level: setup.py and CMakeLists.txt give this file that level's
// flags, and CPU_CAPABILITY=AVX2, from its name.
#include "../kernels/focus.inc"
