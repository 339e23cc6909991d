// What a build of the extension was configured with, for messages and for Python
// (fanet_kernels._C.cuda_archs()).
#pragma once

#include <string>

// FANET_STRINGIFY(a:b+c) is "a:b+c": the macro argument expanded, then spelled.
#define FANET_STRINGIFY_SPELL(...) #__VA_ARGS__
#define FANET_STRINGIFY(...) FANET_STRINGIFY_SPELL(__VA_ARGS__)

namespace fanet {

// The CUDA architectures of the build in TORCH_CUDA_ARCH_LIST's form ("7.5;8.0;9.0+PTX"), from the
// compile definition FANET_CUDA_ARCHS=7.5:8.0:9.0+PTX of setup.py and CMakeLists.txt (colons, not
// semicolons or commas: a -D value passes through the shell, ninja and nvcc, which splits one at
// commas); "" where none was given.
inline std::string cuda_archs() {
#ifdef FANET_CUDA_ARCHS
  std::string archs = FANET_STRINGIFY(FANET_CUDA_ARCHS);
  for (char& ch : archs)
    if (ch == ':') ch = ';';
  return archs;
#else
  return "";
#endif
}

}  // namespace fanet
