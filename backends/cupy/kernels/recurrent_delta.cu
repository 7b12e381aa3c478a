// The Recurrent DeltaNet (recurrent_delta_rule, Irie et al. 2021), one token after another.
// Per (sequence, head), with o_0 zero or the given last output:
//
//     h   = tanh(o_{t-1})
//     qh  = softmax(q_t + R_q h)      kh = softmax(k_t + R_k h)      (over K)
//     vh  = v_t + R_v h               b  = sigmoid(beta_t + r_beta . h)
//     S_t = S_{t-1} + b kh (vh - S_{t-1}^T kh)^T
//     o_t = scale S_t^T qh
//
// Every token's inputs depend on all of the previous output, so one block owns a whole
// (sequence, head): thread `tid` owns rows [ks*KPT, ks*KPT + KPT) of the NVT columns
// cl + c*BV (ks = tid % KSPLIT, cl = tid / KSPLIT), the state in registers; sums over K are
// butterfly shuffles over the KSPLIT lanes of a column (as fw_recurrent). Per token the slow
// net's products (2K + V + 1 dot products over V) are spread over the block's threads into
// shared memory, each thread then takes the softmax maxima and sums over K from there.
//
// Grid: x = sequence, block: BV * KSPLIT threads, V <= NVT * BV, K <= KPT * KSPLIT <= 256.
// Arrays are C-contiguous: q, k [rows, H, K], v [rows, H, V], beta [rows, H], R_q, R_k
// [H, K, V], R_v [H, V, V], r_beta [H, V]; o [rows, H, V]; S [*, H, K, V], last [*, H, V].
// Flags: the FW_HAS_H0/HT/CU/IDX bits of recurrent.cu (H0/HT: both parts of the state).

__device__ __forceinline__ float fw_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double fw_tanh(double x) { return tanh(x); }

template <typename Tin, typename Tc, int KPT, int KSPLIT, int BV, int NVT>
__global__ void __launch_bounds__(BV * KSPLIT, 1)
fw_rdelta(const Tin* __restrict__ q, const Tin* __restrict__ k, const Tin* __restrict__ v,
          const Tin* __restrict__ beta, const Tin* __restrict__ Rq, const Tin* __restrict__ Rk,
          const Tin* __restrict__ Rv, const Tin* __restrict__ rb, const Tc* h0, const Tc* l0,
          Tc* ht, Tc* lt, Tin* __restrict__ o, const long long* __restrict__ cu_seqlens,
          const long long* __restrict__ state_idx, int T, int H, int K, int V, Tc scale,
          int flags) {
    constexpr int KP = KPT * KSPLIT;
    constexpr int NTHREADS = BV * KSPLIT;
    constexpr int VP = NVT * BV;
    __shared__ Tc hs[VP];      // tanh(o_{t-1})
    __shared__ Tc last[VP];    // o_{t-1}
    __shared__ Tc xq[KP];      // q + R_q h, then qh
    __shared__ Tc xk[KP];      // k + R_k h, then kh
    __shared__ Tc vh[VP];      // v + R_v h
    __shared__ Tc bs[1];       // b

    const int tid = threadIdx.x;
    const int ks = tid % KSPLIT;
    const int cl = tid / KSPLIT;
    const int r0 = ks * KPT;
    const int seq = blockIdx.x;
    const int hd = blockIdx.y;

    long long bos, len;
    if (flags & FW_HAS_CU) {
        bos = cu_seqlens[seq];
        len = cu_seqlens[seq + 1] - bos;
    } else {
        bos = (long long)seq * T;
        len = T;
    }
    const long long srow = (flags & FW_HAS_IDX) ? state_idx[seq] : (long long)seq;
    const long long sbase = (srow * H + hd) * (long long)K * V;
    const long long lbase = (srow * H + hd) * (long long)V;
    const int kn = K - r0 < KPT ? K - r0 : KPT;

    Tc S[NVT][KPT];
#pragma unroll
    for (int c = 0; c < NVT; ++c) {
        const int j = c * BV + cl;
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            const bool ok = (flags & FW_HAS_H0) && i < kn && j < V;
            S[c][i] = ok ? h0[sbase + (long long)(r0 + i) * V + j] : Tc(0);
        }
    }
    for (int j = tid; j < VP; j += NTHREADS)
        last[j] = ((flags & FW_HAS_H0) && j < V) ? l0[lbase + j] : Tc(0);
    // Every thread reads its own part of h0/l0 before any thread writes ht/lt (in place).
    __syncthreads();

    const Tin* RqH = Rq + (long long)hd * K * V;
    const Tin* RkH = Rk + (long long)hd * K * V;
    const Tin* RvH = Rv + (long long)hd * V * V;
    const Tin* rbH = rb + (long long)hd * V;
    const long long kstride = (long long)H * K, vstride = (long long)H * V;

    for (long long t = 0; t < len; ++t) {
        const long long row = bos + t;
        for (int j = tid; j < VP; j += NTHREADS) hs[j] = j < V ? fw_tanh(last[j]) : Tc(0);
        __syncthreads();
        // The slow net: rows 0..K-1 of R_q, K..2K-1 of R_k, 2K..2K+V-1 of R_v, then r_beta.
        for (int e = tid; e < 2 * K + V + 1; e += NTHREADS) {
            const Tin* R;
            Tc x;
            if (e < K) {
                R = RqH + (long long)e * V;
                x = fw_cvt<Tc>(q[row * kstride + (long long)hd * K + e]);
            } else if (e < 2 * K) {
                R = RkH + (long long)(e - K) * V;
                x = fw_cvt<Tc>(k[row * kstride + (long long)hd * K + e - K]);
            } else if (e < 2 * K + V) {
                R = RvH + (long long)(e - 2 * K) * V;
                x = fw_cvt<Tc>(v[row * vstride + (long long)hd * V + e - 2 * K]);
            } else {
                R = rbH;
                x = fw_cvt<Tc>(beta[row * H + hd]);
            }
            Tc acc = Tc(0);
            for (int m = 0; m < V; ++m) acc += fw_cvt<Tc>(R[m]) * hs[m];
            x += acc;
            if (e < K) xq[e] = x;
            else if (e < 2 * K) xk[e - K] = x;
            else if (e < 2 * K + V) vh[e - 2 * K] = x;
            else {  // sigmoid from exp(-|x|), which never overflows
                const Tc ex = fw_exp(x < Tc(0) ? x : -x);
                bs[0] = x >= Tc(0) ? Tc(1) / (Tc(1) + ex) : ex / (Tc(1) + ex);
            }
        }
        __syncthreads();
        Tc mq = xq[0], mk = xk[0];
        for (int m = 1; m < K; ++m) {
            mq = xq[m] > mq ? xq[m] : mq;
            mk = xk[m] > mk ? xk[m] : mk;
        }
        Tc sq = Tc(0), sk = Tc(0);
        for (int m = 0; m < K; ++m) {
            sq += fw_exp(xq[m] - mq);
            sk += fw_exp(xk[m] - mk);
        }
        Tc qq[KPT], kk[KPT];
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            qq[i] = i < kn ? fw_exp(xq[r0 + i] - mq) / sq : Tc(0);
            kk[i] = i < kn ? fw_exp(xk[r0 + i] - mk) / sk : Tc(0);
        }
        const Tc b = bs[0];
        __syncthreads();  // everyone has read hs, xq, xk, bs and last of this token
#pragma unroll
        for (int c = 0; c < NVT; ++c) {
            const int j = c * BV + cl;
            const Tc vv = j < V ? vh[j] : Tc(0);
            const Tc u = b * (vv - fw_group_sum<KSPLIT>(fw_dot<KPT>(S[c], kk)));
#pragma unroll
            for (int i = 0; i < KPT; ++i)
                if (i < kn) S[c][i] += kk[i] * u;
            const Tc acc = scale * fw_group_sum<KSPLIT>(fw_dot<KPT>(S[c], qq));
            if (ks == 0 && j < V) {
                last[j] = acc;
                fw_store(&o[row * vstride + (long long)hd * V + j], acc);
            }
        }
        __syncthreads();
    }

    if (flags & FW_HAS_HT) {
#pragma unroll
        for (int c = 0; c < NVT; ++c) {
            const int j = c * BV + cl;
#pragma unroll
            for (int i = 0; i < KPT; ++i)
                if (i < kn && j < V) ht[sbase + (long long)(r0 + i) * V + j] = S[c][i];
        }
        for (int j = tid; j < V; j += NTHREADS) lt[lbase + j] = last[j];
    }
}
