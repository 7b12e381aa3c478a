// Warp-level tile products D = A B + C for the chunk kernels: tensor cores for half and
// bfloat16 inputs (float32 accumulation), a scalar path of the same shape for float and double.
//
// Concatenate after common.cuh (it uses fw_half and fw_half_to_float). Valid for NVRTC and for
// g++ against the emulator's shim: the tensor-core instruction is the PTX
//     mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
// on sm_80 and later, and under the emulator (__CUDASIM__) the shim's warp-collective
// cudasim::mma_m16n8k16 with the PTX ISA's fragment layout. Below sm_80 (no m16n8k16) the
// half/bfloat16 inputs take the scalar path, products and sums in float32.
//
// The unit is a warp's 16x8 float accumulator (fw_acc16x8<Tc>); lane l holds
//     x[0] = D[g][2c], x[1] = D[g][2c+1], x[2] = D[g+8][2c], x[3] = D[g+8][2c+1],
//     g = l >> 2 (row group), c = l & 3
// (the PTX layout of the mma C/D fragment; the scalar path uses the same layout, so kernels
// apply masks and decays elementwise through fw_acc_row / fw_acc_col for every dtype).
//
// fw_warp_mma<NT, AT, BT>(acc, A, lda, B, ldb, k):
//     acc[j] += A[0:16, 0:k] @ B[0:k, 8j:8j+8]     for j < NT
//   A[m][kk] = AT ? A[kk * lda + m] : A[m * lda + kk]
//   B[kk][n] = BT ? B[n * ldb + kk] : B[kk * ldb + n]
//   (AT = false, BT = true is the native "row.col" form: Q K^T with Q, K stored [token][key]).
//   k must be a multiple of 16 (pad tiles with zeros); A and B are read from shared (or global)
//   memory, which the caller has published with __syncthreads / __syncwarp.
// The lane is threadIdx.x & 31: blocks are 1-D, or blockDim.x is a multiple of 32.
// Warp-collective: all 32 lanes of the warp call it together, with the same arguments
// (the emulator rejects a partial warp, or lanes at different call sites, for every dtype).
#ifndef FW_MMA_CUH
#define FW_MMA_CUH

// bfloat16 as its bits (the upper half of a float32).
struct __align__(2) fw_bf16 {
    unsigned short bits;
};
__device__ __forceinline__ float fw_bf16_to_float(unsigned short h) {
    return __int_as_float((int)((unsigned)h << 16));
}
// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ unsigned short fw_float_to_bf16(float f) {
    const unsigned x = (unsigned)__float_as_int(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
template <typename Tc> __device__ __forceinline__ Tc fw_cvt(fw_bf16 x) {
    return (Tc)fw_bf16_to_float(x.bits);
}
__device__ __forceinline__ void fw_store(fw_bf16* p, float x) { p->bits = fw_float_to_bf16(x); }

// Under the emulator the call site travels along, so lanes of a warp that reach the product at
// different places in the kernel are reported (mma.sync is .aligned: one instruction for all).
#if defined(__CUDASIM__)
#define FW_MMA_SITE_PARAM , const std::source_location& fw_site = std::source_location::current()
#define FW_MMA_SITE , fw_site
#else
#define FW_MMA_SITE_PARAM
#define FW_MMA_SITE
#endif

#if defined(__CUDASIM__) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define FW_MMA_TENSOR_CORES 1
#else
#define FW_MMA_TENSOR_CORES 0
#endif

// ------------------------------------------------------------ the instruction
// a: 4 registers of two halves (A 16x16), b: 2 registers (B 16x8), c/d: 4 floats (16x8).
#if FW_MMA_TENSOR_CORES
template <bool BF16>
__device__ __forceinline__ void fw_mma_m16n8k16(float* d, const unsigned* a, const unsigned* b,
                                                const float* c FW_MMA_SITE_PARAM) {
#if defined(__CUDASIM__)
    ::cudasim::mma_m16n8k16(BF16, d, a, b, c, fw_site);
#else
    if (BF16)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
              "f"(c[1]), "f"(c[2]), "f"(c[3]));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
              "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
#endif

// --------------------------------------------------------------- accumulators
template <typename Tc> struct fw_acc16x8 {
    Tc x[4];
};
__device__ __forceinline__ int fw_lane() { return (int)(threadIdx.x & 31u); }
// Row and column (in the 16x8 tile) of element i of this lane's accumulator.
__device__ __forceinline__ int fw_acc_row(int i) { return (fw_lane() >> 2) + (i >> 1) * 8; }
__device__ __forceinline__ int fw_acc_col(int i) { return (fw_lane() & 3) * 2 + (i & 1); }

template <int NT, typename Tc> __device__ __forceinline__ void fw_acc_zero(fw_acc16x8<Tc>* acc) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j].x[i] = Tc(0);
}
// D[m][8j + n] (row-major, leading dimension ldd) <- acc[j]; To = float, double, fw_half, fw_bf16.
template <int NT, typename Tc, typename To>
__device__ __forceinline__ void fw_acc_store(To* D, int ldd, const fw_acc16x8<Tc>* acc) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) fw_store(D + fw_acc_row(i) * ldd + 8 * j + fw_acc_col(i), acc[j].x[i]);
}
template <int NT, typename Tc, typename Ti>
__device__ __forceinline__ void fw_acc_load(fw_acc16x8<Tc>* acc, const Ti* C, int ldc) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j].x[i] = fw_cvt<Tc>(C[fw_acc_row(i) * ldc + 8 * j + fw_acc_col(i)]);
}

// ------------------------------------------------------------ fragment loads
__device__ __forceinline__ float fw_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fw_fma(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename T> struct fw_is_mma_input { static constexpr bool value = false; };
template <> struct fw_is_mma_input<fw_half> { static constexpr bool value = true; };
template <> struct fw_is_mma_input<fw_bf16> { static constexpr bool value = true; };
template <typename T> struct fw_is_bf16 { static constexpr bool value = false; };
template <> struct fw_is_bf16<fw_bf16> { static constexpr bool value = true; };

template <typename T>
__device__ __forceinline__ unsigned fw_pack2(T lo, T hi) {
    return (unsigned)lo.bits | ((unsigned)hi.bits << 16);
}
// The A fragment (16x16 at A, k offset k0) of this lane: a_r holds A[row][col], A[row][col+1].
template <bool AT, typename T>
__device__ __forceinline__ void fw_mma_load_a(unsigned* a, const T* A, int lda, int k0) {
    const int g = fw_lane() >> 2, c = (fw_lane() & 3) * 2;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int m = g + (r & 1) * 8, kk = k0 + c + (r >> 1) * 8;
        a[r] = AT ? fw_pack2(A[kk * lda + m], A[(kk + 1) * lda + m])
                  : fw_pack2(A[m * lda + kk], A[m * lda + kk + 1]);
    }
}
// The B fragment (16x8, k offset k0, column offset n0): b_r holds B[k][n], B[k+1][n].
template <bool BT, typename T>
__device__ __forceinline__ void fw_mma_load_b(unsigned* b, const T* B, int ldb, int k0, int n0) {
    const int n = n0 + (fw_lane() >> 2), c = (fw_lane() & 3) * 2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int kk = k0 + c + r * 8;
        b[r] = BT ? fw_pack2(B[n * ldb + kk], B[n * ldb + kk + 1])
                  : fw_pack2(B[kk * ldb + n], B[(kk + 1) * ldb + n]);
    }
}

// ------------------------------------------------------------ the warp product
template <int NT, bool AT, bool BT, typename T, typename Tc>
__device__ __forceinline__ void fw_warp_mma(fw_acc16x8<Tc>* acc, const T* A, int lda, const T* B,
                                            int ldb, int k FW_MMA_SITE_PARAM) {
#if FW_MMA_TENSOR_CORES
    if constexpr (fw_is_mma_input<T>::value) {
        static_assert(sizeof(Tc) == 4, "tensor-core products accumulate in float");
        for (int k0 = 0; k0 < k; k0 += 16) {
            unsigned a[4];
            fw_mma_load_a<AT>(a, A, lda, k0);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                unsigned b[2];
                fw_mma_load_b<BT>(b, B, ldb, k0, 8 * j);
                fw_mma_m16n8k16<fw_is_bf16<T>::value>(acc[j].x, a, b, acc[j].x FW_MMA_SITE);
            }
        }
        return;
    }
#endif
    // Scalar: this lane's four elements, sequential fused multiply-adds in Tc.
#if defined(__CUDASIM__)
    ::cudasim::warp_collective("fw_warp_mma (scalar path)", fw_site);
#endif
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = fw_acc_row(i), n = 8 * j + fw_acc_col(i);
            Tc s = acc[j].x[i];
            for (int kk = 0; kk < k; ++kk) {
                const Tc av = fw_cvt<Tc>(AT ? A[kk * lda + m] : A[m * lda + kk]);
                const Tc bv = fw_cvt<Tc>(BT ? B[n * ldb + kk] : B[kk * ldb + n]);
                s = fw_fma(av, bv, s);
            }
            acc[j].x[i] = s;
        }
}

#endif  // FW_MMA_CUH
