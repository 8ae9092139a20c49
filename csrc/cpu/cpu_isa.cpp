// Detection of the CPU's instruction set and the FORGETKERN_CPU_ISA override (see cpu_isa.h), and the op
// forgetkern_cpu::cpu_isa() -> str that tells Python which kernels run.
#include "cpu_isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <string>

namespace forgetkern {
namespace cpu {
namespace {

constexpr const char* kIsaVar = "FORGETKERN_CPU_ISA";

CpuIsa detect() {
#if FK_CPU_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("f16c");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  // The avx512 kernels also use AVX2 instructions (on 256-bit halves), so avx512 requires the avx2 level.
  return avx2 && avx512 ? CpuIsa::Avx512 : avx2 ? CpuIsa::Avx2 : CpuIsa::Baseline;
#else
  return CpuIsa::Baseline;
#endif
}

// Case-insensitive match of an ISA name.
bool parse(const char* value, CpuIsa& out) {
  std::string name(value);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (name == cpu_isa_name(isa)) {
      out = isa;
      return true;
    }
  }
  return false;
}

// "baseline, avx2, ..." up to and including `last`.
std::string names_up_to(CpuIsa last) {
  std::string out;
  for (int i = 0; i <= static_cast<int>(last); ++i) {
    out += (i ? ", " : "") + std::string(cpu_isa_name(static_cast<CpuIsa>(i)));
  }
  return out;
}

std::string cpu_isa_op() { return cpu_isa_name(active_cpu_isa()); }

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Avx512: return "avx512";
    default: return "baseline";
  }
}

CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa active_cpu_isa() {
  const CpuIsa best = detected_cpu_isa();
  const char* value = std::getenv(kIsaVar);
  if (value == nullptr || value[0] == '\0') return best;
  CpuIsa wanted = CpuIsa::Baseline;
  TORCH_CHECK(parse(value, wanted), kIsaVar, "='", value, "' is not an instruction set of forgetkern's CPU kernels; ",
              "set it to one of: ", names_up_to(CpuIsa::Avx512), " (this CPU supports up to ", cpu_isa_name(best),
              "), or unset it to use the best this CPU supports");
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best), kIsaVar, "='", value,
              "' is not supported by this CPU, which supports up to ", cpu_isa_name(best), "; set it to one of: ",
              names_up_to(best), ", or unset it to use the best this CPU supports");
  return wanted;
}

}  // namespace cpu
}  // namespace forgetkern

// No tensor arguments: a catch-all kernel (runs whatever the dispatch keys).
TORCH_LIBRARY_FRAGMENT(forgetkern_cpu, m) {
  m.def("cpu_isa() -> str", &forgetkern::cpu::cpu_isa_op);
}
