// The SIMD level of the CPU kernels (dispatch.cpp), for fanet_kernels._C.cpu_capability().
#pragma once

#include <string>
#include <vector>

namespace fanet::cpu {

// The level the kernels run at in this process, as FANET_CPU_CAPABILITY spells it ("default", "avx2",
// "avx512", "avx512bf16"): the best one this build holds and this CPU runs, or the environment
// variable's, which may only ask for such a level.  Chosen on first use; a bad value raises (a
// ValueError in Python) naming the variable and the values allowed, on this and every later call.
const std::string& capability();

// The levels this build holds that this CPU runs, from the lowest ("default") to the best.
std::vector<std::string> capabilities();

}  // namespace fanet::cpu
