// Picks the SIMD level of the CPU kernels once per process, as ATen does for its own CPU kernels
// (ATEN_CPU_CAPABILITY): each level is compiled into the extension (capability/*.cpp), and the best
// one this CPU runs is used unless FANET_CPU_CAPABILITY names a lower one.  So one build runs on every
// x86-64 CPU, at that CPU's speed.  This file is compiled without SIMD flags, as is all host code.
#include <c10/util/Exception.h>

#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "capability.h"
#include "kernels.h"

namespace fanet::cpu {
namespace {

struct Level {
  const char* name;            // as FANET_CPU_CAPABILITY spells it
  void (*fill)(KernelTable&);  // adds every family's kernels of the level
  bool (*runs)();              // whether this CPU, and its OS, runs the level's instructions
};

#define FANET_FILL(level)          \
  [](KernelTable& t) {             \
    level::add_gate_kernels(t);    \
    level::add_bn_gate_kernels(t); \
    level::add_focus_kernels(t);   \
  }

#if defined(__x86_64__) || defined(_M_X64)
// libgcc's (and compiler-rt's) CPU model checks the OS too: AVX and AVX-512 features count only where
// XGETBV shows the OS saves their registers.  The sets are ATen's for its AVX2 and AVX512 levels.
bool runs_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool runs_avx512() {
  return runs_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool runs_avx512bf16() { return runs_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif

// Lowest to best; a build holds DEFAULT and the levels setup.py or CMake compiled (FANET_CPU_<LEVEL>).
const Level kLevels[] = {
    {"default", FANET_FILL(DEFAULT), [] { return true; }},
#ifdef FANET_CPU_AVX2
    {"avx2", FANET_FILL(AVX2), runs_avx2},
#endif
#ifdef FANET_CPU_AVX512
    {"avx512", FANET_FILL(AVX512), runs_avx512},
#endif
#if defined(FANET_CPU_AVX512) && defined(FANET_CPU_AVX512BF16)
    // AVX512's kernels, bfloat16's replaced (walks.h's for_each_dtype).
    {"avx512bf16",
     [](KernelTable& t) {
       FANET_FILL(AVX512)(t);
       FANET_FILL(AVX512BF16)(t);
     },
     runs_avx512bf16},
#endif
};
#undef FANET_FILL

std::string join(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

struct Chosen {
  const Level* level;
  KernelTable table;
};

const Level& choose() {
  const Level* best = &kLevels[0];
  for (const Level& l : kLevels)
    if (l.runs()) best = &l;
  const char* env = std::getenv("FANET_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return *best;
  std::string want(env);
  for (char& ch : want) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  const Level* asked = nullptr;
  std::vector<std::string> built;
  for (const Level& l : kLevels) {
    built.emplace_back(l.name);
    if (want == l.name) asked = &l;
  }
  TORCH_CHECK_VALUE(asked != nullptr, "fanet: FANET_CPU_CAPABILITY=", env,
                    " is not a SIMD level of this build; "
                    "allowed: ",
                    join(built), " (those this CPU runs: ", join(capabilities()), ")");
  TORCH_CHECK_VALUE(asked->runs(), "fanet: FANET_CPU_CAPABILITY=", env,
                    " asks for a SIMD level this CPU cannot "
                    "run; allowed here: ",
                    join(capabilities()), " (unset: ", best->name, ")");
  return *asked;
}

// Chosen on first use (a throw leaves it unset, so every later call raises the same error).
const Chosen& chosen() {
  static const Chosen chosen = [] {
    Chosen c{&choose(), {}};
    c.level->fill(c.table);
    return c;
  }();
  return chosen;
}

}  // namespace

const KernelTable& kernel_table() { return chosen().table; }

const std::string& capability() {
  static const std::string name = chosen().level->name;
  return name;
}

std::vector<std::string> capabilities() {
  std::vector<std::string> names;
  for (const Level& l : kLevels)
    if (l.runs()) names.emplace_back(l.name);
  return names;
}

}  // namespace fanet::cpu
