// Shared device helpers of the fastweights CUDA kernels.
//
// Valid CUDA C++ for NVRTC (through cupy.RawModule) and for g++ against the CPU shim of
// fastweights.backends.cupy.emulator: no CUDA headers, and the only inline PTX sits behind
// __CUDA_ARCH__ with a portable fallback that the emulator runs.
// (Concatenated before the kernel files by _launch.source(); no include guard needed.)

// IEEE binary16 as its bits: no cuda_fp16.h needed, and NumPy/CuPy float16 arrays pass as is.
struct __align__(2) fw_half {
    unsigned short bits;
};

__device__ __forceinline__ float fw_half_to_float(unsigned short h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned sign = (unsigned)(h & 0x8000u) << 16;
    const unsigned expo = (h >> 10) & 0x1fu;
    const unsigned mant = h & 0x3ffu;
    if (expo == 0u) {  // zero or subnormal: mant * 2^-24 is exact in float
        const float f = (float)mant * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    const unsigned bits = sign | (expo == 31u ? 0x7f800000u : (expo + 112u) << 23) | (mant << 13);
    return __int_as_float((int)bits);
#endif
}

// Round to nearest even, overflow to infinity, NaN stays NaN.
__device__ __forceinline__ unsigned short fw_float_to_half(float f) {
#if defined(__CUDA_ARCH__)
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    const unsigned x = (unsigned)__float_as_int(f);
    const unsigned sign = (x >> 16) & 0x8000u;
    unsigned a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (a < 0x38800000u)                                              // below 2^-14: subnormal
        return (unsigned short)(sign | (unsigned)rintf(fabsf(f) * 16777216.0f));
    a += 0xfffu + ((a >> 13) & 1u);
    return (unsigned short)(sign | ((a - 0x38000000u) >> 13));
#endif
}

template <typename Tc> __device__ __forceinline__ Tc fw_cvt(float x) { return (Tc)x; }
template <typename Tc> __device__ __forceinline__ Tc fw_cvt(double x) { return (Tc)x; }
template <typename Tc> __device__ __forceinline__ Tc fw_cvt(fw_half x) {
    return (Tc)fw_half_to_float(x.bits);
}

__device__ __forceinline__ void fw_store(float* p, float x) { *p = x; }
__device__ __forceinline__ void fw_store(double* p, double x) { *p = x; }
__device__ __forceinline__ void fw_store(fw_half* p, float x) { p->bits = fw_float_to_half(x); }

__device__ __forceinline__ float fw_exp(float x) { return expf(x); }
__device__ __forceinline__ double fw_exp(double x) { return exp(x); }
// x == -inf, without INFINITY (no headers under NVRTC): only -inf lies below -max.
__device__ __forceinline__ bool fw_is_neg_inf(float x) { return x < -3.40282346638528859812e38f; }
__device__ __forceinline__ bool fw_is_neg_inf(double x) { return x < -1.7976931348623157e308; }
__device__ __forceinline__ float fw_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double fw_sqrt(double x) { return sqrt(x); }

// sum_i a[i] * b[i] over a thread's N rows, in four independent chains (a shorter critical
// path than one chain of N dependent multiply-adds).
template <int N, typename T>
__device__ __forceinline__ T fw_dot(const T* a, const T* b) {
    T acc[4] = {T(0), T(0), T(0), T(0)};
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i % 4] += a[i] * b[i];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Sum over aligned groups of W consecutive lanes; every lane of a group gets the same bits
// (each butterfly step adds the same two operands, and addition commutes).
template <int W, typename T>
__device__ __forceinline__ T fw_group_sum(T x) {
#pragma unroll
    for (int off = W / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off, W);
    return x;
}
