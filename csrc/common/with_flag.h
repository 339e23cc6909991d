// A runtime flag as a template argument: both devices' kernels pick their residual / fold / BatchNorm
// variants with it.
#pragma once

#include <type_traits>

namespace fanet {

// Calls f(std::integral_constant<bool, flag>{}).
template <typename F>
inline void with_flag(bool flag, const F& f) {
  if (flag)
    f(std::true_type{});
  else
    f(std::false_type{});
}

}  // namespace fanet
