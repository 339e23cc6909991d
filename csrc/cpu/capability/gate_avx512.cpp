// kernels/gate.inc at the AVX512 SIMD level: setup.py and CMakeLists.txt give this file that level's
// flags, and CPU_CAPABILITY=AVX512, from its name.
#include "../kernels/gate.inc"
