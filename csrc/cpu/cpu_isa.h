// Runtime choice of the x86 instruction set the CPU kernels run with.
//
//   baseline  x86-64 as compiled (SSE2), and every non-x86 architecture
//   avx2      AVX2 + FMA + F16C                (256-bit vectors, hardware fp16 <-> fp32 conversion)
//   avx512    AVX-512 F + BW + VL + DQ, F16C   (512-bit vectors, 16-bit lanes for bf16/fp16)
//
// The extension is compiled for baseline x86-64; the kernels for avx2 / avx512 are the same templates
// compiled a second and third time inside functions marked FK_TARGET_AVX2 / FK_TARGET_AVX512 (GCC target
// attributes), and the op picks one set of kernels per call from active_cpu_isa(). Every ISA computes the same
// IEEE operations in the same order, so the results are identical bit for bit. FMA is detected (it belongs to
// the avx2 level) but not enabled for code generation: the kernels never fuse a multiply and an add.
//
// active_cpu_isa(): the best ISA this CPU supports, or FORGETKERN_CPU_ISA=baseline|avx2|avx512 when set
// (read at every call, so it can be changed at runtime). A value above what the CPU supports, or an unknown
// value, raises an error naming the variable, the value and the allowed values.
#pragma once

namespace forgetkern {
namespace cpu {

enum class CpuIsa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__)
#define FK_CPU_X86 1
#define FK_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define FK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,prefer-vector-width=512")))
#else
#define FK_CPU_X86 0
#endif

// &KERNEL_baseline<ARGS...>, &KERNEL_avx2<ARGS...> or &KERNEL_avx512<ARGS...> for `isa`: the per-ISA
// instantiations a kernel file defines (the last two only on x86).
#if FK_CPU_X86
#define FK_ISA_PICK(isa, kernel, ...)                                               \
  ((isa) == ::forgetkern::cpu::CpuIsa::Avx512 ? &kernel##_avx512<__VA_ARGS__>       \
   : (isa) == ::forgetkern::cpu::CpuIsa::Avx2 ? &kernel##_avx2<__VA_ARGS__>         \
                                              : &kernel##_baseline<__VA_ARGS__>)
#else
#define FK_ISA_PICK(isa, kernel, ...) ((void)(isa), &kernel##_baseline<__VA_ARGS__>)
#endif

const char* cpu_isa_name(CpuIsa isa);
CpuIsa detected_cpu_isa();  // the best ISA of this CPU (cached)
CpuIsa active_cpu_isa();    // detected_cpu_isa() or FORGETKERN_CPU_ISA; raises on a bad value

}  // namespace cpu
}  // namespace forgetkern
