// kernels/bn_gate.inc at the DEFAULT SIMD level: setup.py and CMakeLists.txt give this file that level's
// flags, and CPU_CAPABILITY=DEFAULT, from its name.
#include "../kernels/bn_gate.inc"
