// The self-referential weight matrix (srwm, Irie et al. 2022), one token after another.
// Per (sequence, head), W is D x M, M = V + 2D + 4 (output, key, query, four rate logits),
// phi = softmax over D:
//
//     [y, key, query, beta] = W_{t-1}^T phi(x_t)            o_t = y
//     pk = phi(key), pq = phi(query), lr = sigmoid(beta) repeated over V, D, D, 4 columns
//     W_t = W_{t-1} + pk (lr * (W_{t-1}^T pq - W_{t-1}^T pk))^T
//
// Every token reads all of the previous weight's columns, so one block owns a whole
// (sequence, head): thread `tid` owns rows [ks*KPT, ks*KPT + KPT) of the NVT columns
// cl + c*BV (ks = tid % KSPLIT, cl = tid / KSPLIT), W in registers; sums over D are butterfly
// shuffles over the KSPLIT lanes of a column (as fw_recurrent). The read of a token goes to
// shared memory, from which every thread takes the softmax maxima and sums over D.
//
// Grid: x = sequence, y = head; block: BV * KSPLIT threads, M <= NVT * BV, D <= KPT * KSPLIT.
// Arrays are C-contiguous: x [rows, H, D]; o [rows, H, V]; W [*, H, D, M], or W0 [H, D, M]
// for every sequence (FW_H0_SHARED). Flags: the FW_HAS_H0/HT/CU/IDX bits of recurrent.cu.

enum : int { FW_H0_SHARED = 128 };

template <typename Tin, typename Tc, int KPT, int KSPLIT, int BV, int NVT>
__global__ void __launch_bounds__(BV * KSPLIT, 1)
fw_srwm(const Tin* __restrict__ x, const Tc* h0, Tc* ht, Tin* __restrict__ o,
        const long long* __restrict__ cu_seqlens, const long long* __restrict__ state_idx, int T,
        int H, int D, int V, int flags) {
    constexpr int KP = KPT * KSPLIT;
    constexpr int NTHREADS = BV * KSPLIT;
    constexpr int MP = NVT * BV;
    __shared__ Tc xs[KP];   // x_t
    __shared__ Tc rd[MP];   // W_{t-1}^T phi(x_t)

    const int tid = threadIdx.x;
    const int ks = tid % KSPLIT;
    const int cl = tid / KSPLIT;
    const int r0 = ks * KPT;
    const int seq = blockIdx.x;
    const int hd = blockIdx.y;
    const int M = V + 2 * D + 4;

    long long bos, len;
    if (flags & FW_HAS_CU) {
        bos = cu_seqlens[seq];
        len = cu_seqlens[seq + 1] - bos;
    } else {
        bos = (long long)seq * T;
        len = T;
    }
    const long long srow = (flags & FW_HAS_IDX) ? state_idx[seq] : (long long)seq;
    const long long sbase = (srow * H + hd) * (long long)D * M;
    const long long ibase = (flags & FW_H0_SHARED) ? (long long)hd * D * M : sbase;
    const int kn = D - r0 < KPT ? D - r0 : KPT;

    Tc W[NVT][KPT];
#pragma unroll
    for (int c = 0; c < NVT; ++c) {
        const int j = c * BV + cl;
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            const bool ok = (flags & FW_HAS_H0) && i < kn && j < M;
            W[c][i] = ok ? h0[ibase + (long long)(r0 + i) * M + j] : Tc(0);
        }
    }
    // Every thread has read its own part of h0 before any thread writes ht (in place).
    __syncthreads();

    const long long xstride = (long long)H * D, ostride = (long long)H * V;
    for (long long t = 0; t < len; ++t) {
        const long long row = bos + t;
        for (int m = tid; m < KP; m += NTHREADS)
            xs[m] = m < D ? fw_cvt<Tc>(x[row * xstride + (long long)hd * D + m]) : Tc(0);
        __syncthreads();
        Tc mx = xs[0];
        for (int m = 1; m < D; ++m) mx = xs[m] > mx ? xs[m] : mx;
        Tc sx = Tc(0);
        for (int m = 0; m < D; ++m) sx += fw_exp(xs[m] - mx);
        Tc px[KPT];
#pragma unroll
        for (int i = 0; i < KPT; ++i) px[i] = i < kn ? fw_exp(xs[r0 + i] - mx) / sx : Tc(0);
#pragma unroll
        for (int c = 0; c < NVT; ++c) {
            const int j = c * BV + cl;
            const Tc r = fw_group_sum<KSPLIT>(fw_dot<KPT>(W[c], px));
            if (ks == 0 && j < MP) rd[j] = r;
            if (ks == 0 && j < V) fw_store(&o[row * ostride + (long long)hd * V + j], r);
        }
        __syncthreads();
        Tc mk = rd[V], mq = rd[V + D];
        for (int m = 1; m < D; ++m) {
            mk = rd[V + m] > mk ? rd[V + m] : mk;
            mq = rd[V + D + m] > mq ? rd[V + D + m] : mq;
        }
        Tc sk = Tc(0), sq = Tc(0);
        for (int m = 0; m < D; ++m) {
            sk += fw_exp(rd[V + m] - mk);
            sq += fw_exp(rd[V + D + m] - mq);
        }
        Tc pk[KPT], dq[KPT];
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            pk[i] = i < kn ? fw_exp(rd[V + r0 + i] - mk) / sk : Tc(0);
            dq[i] = i < kn ? fw_exp(rd[V + D + r0 + i] - mq) / sq - pk[i] : Tc(0);
        }
        Tc lr[4];
#pragma unroll
        for (int g = 0; g < 4; ++g) {  // sigmoid from exp(-|b|), which never overflows
            const Tc b = rd[V + 2 * D + g];
            const Tc e = fw_exp(b < Tc(0) ? b : -b);
            lr[g] = b >= Tc(0) ? Tc(1) / (Tc(1) + e) : e / (Tc(1) + e);
        }
        __syncthreads();  // everyone has read xs and rd of this token
#pragma unroll
        for (int c = 0; c < NVT; ++c) {
            const int j = c * BV + cl;
            const Tc ch = fw_group_sum<KSPLIT>(fw_dot<KPT>(W[c], dq));  // W^T pq - W^T pk
            const Tc rate = j < V ? lr[0] : j < V + D ? lr[1] : j < V + 2 * D ? lr[2] : lr[3];
            const Tc u = rate * ch;
#pragma unroll
            for (int i = 0; i < KPT; ++i)
                if (i < kn && j < M) W[c][i] += pk[i] * u;
        }
    }

    if (flags & FW_HAS_HT) {
#pragma unroll
        for (int c = 0; c < NVT; ++c) {
            const int j = c * BV + cl;
#pragma unroll
            for (int i = 0; i < KPT; ++i)
                if (i < kn && j < M) ht[sbase + (long long)(r0 + i) * M + j] = W[c][i];
        }
    }
}
