// The recurrent form of the DPLR rule (dplr; iplr and rwkv7 arrive rewritten into it), one
// token after another. For each (sequence, value head, tile of BV value columns), with S the
// K x V state of the head (key-first) and q~ = scale q (q, k L2-normalised first if asked):
//
//     u_t = a_t^T S_{t-1}                              (reads the old state)
//     S_t = Diag(exp(gk_t)) S_{t-1} + b_t u_t + k_t v_t^T
//     o_t = S_t^T q~_t
//
// GATE (compile time) says whether gk is there (iplr has none). A gk of -inf is a hard reset
// of its key row's decayed part: selected to exactly 0 (not multiplied by exp(-inf)), so a NaN
// or Inf there does not survive; the low-rank read u_t still reads the whole old row.
//
// Threads as in fw_recurrent (recurrent.cu): thread `tid` owns rows [ks*KPT, ks*KPT + KPT) of
// column `cl` of the tile, ks = tid % KSPLIT, cl = tid / KSPLIT; the sums over K (a^T S, the
// norms, S^T q) are the thread's partial dot products summed by butterfly shuffles among the
// KSPLIT consecutive lanes of its column. The state lives in registers and enters and leaves
// through a shared-memory tile (coalesced along V). The next token's inputs are loaded while
// the current token is computed.
//
// Grid: x = sequence * n_vtiles + vtile, y = value head; block: BV * KSPLIT threads.
// Arrays are C-contiguous: q, k [rows, H, K]; a, b, gk [rows, HV, K]; v, o [rows, HV, V];
// states [*, HV, K, V]. Sequence n covers tokens [cu[n], cu[n+1]) (FW_HAS_CU) or
// [n*T, (n+1)*T). Decoding is the same kernel with T == 1, h0 == ht == the pool and state_idx
// its rows (a block reads its part of a row before it writes the same part).
// Run-time flags: the FW_HAS_H0/HT/CU/IDX and FW_L2NORM bits of recurrent.cu.

template <typename Tin, typename Tc, int KPT, int KSPLIT, int BV, int GATE>
__global__ void __launch_bounds__(BV * KSPLIT, 1)
fw_dplr(const Tin* __restrict__ q, const Tin* __restrict__ k, const Tin* __restrict__ v,
        const Tin* __restrict__ a, const Tin* __restrict__ b, const Tin* __restrict__ gk,
        const Tc* h0, Tc* ht, Tin* __restrict__ o, const long long* __restrict__ cu_seqlens,
        const long long* __restrict__ state_idx, int T, int H, int HV, int K, int V, Tc scale,
        int flags) {
    constexpr int KP = KPT * KSPLIT;
    constexpr int NTHREADS = BV * KSPLIT;
    constexpr int NG = GATE ? KPT : 1;
    __shared__ Tc tile[KP][BV + 1];

    const int tid = threadIdx.x;
    const int ks = tid % KSPLIT;
    const int cl = tid / KSPLIT;
    const int r0 = ks * KPT;
    const int n_vt = (V + BV - 1) / BV;
    const int seq = blockIdx.x / n_vt;
    const int v0 = (blockIdx.x % n_vt) * BV;
    const int hv = blockIdx.y;
    const int h = hv / (HV / H);
    const int j = v0 + cl;
    const bool col_ok = j < V;

    long long bos, len;
    if (flags & FW_HAS_CU) {
        bos = cu_seqlens[seq];
        len = cu_seqlens[seq + 1] - bos;
    } else {
        bos = (long long)seq * T;
        len = T;
    }
    const long long srow = (flags & FW_HAS_IDX) ? state_idx[seq] : (long long)seq;
    const long long sbase = (srow * HV + hv) * (long long)K * V;

    Tc S[KPT];
    if (flags & FW_HAS_H0) {
#pragma unroll
        for (int it = 0; it < KPT; ++it) {  // KP * BV == KPT * NTHREADS entries
            const int e = it * NTHREADS + tid, r = e / BV, c = e % BV;
            tile[r][c] = (r < K && v0 + c < V) ? h0[sbase + (long long)r * V + v0 + c] : Tc(0);
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < KPT; ++i) S[i] = tile[r0 + i][cl];
    } else {
#pragma unroll
        for (int i = 0; i < KPT; ++i) S[i] = Tc(0);
    }

    // Raw inputs outside K or V stay zero (no read, no write; gk = 0 keeps a zero row zero).
    const long long kstride = (long long)H * K, astride = (long long)HV * K;
    const long long vstride = (long long)HV * V;
    const Tin* kb = k + (bos * H + h) * K + r0;
    const Tin* qb = q + (bos * H + h) * K + r0;
    const Tin* ab = a + (bos * HV + hv) * K + r0;
    const Tin* bb = b + (bos * HV + hv) * K + r0;
    const Tin* gb = gk + (bos * HV + hv) * K + r0;
    const Tin* vb = v + (bos * HV + hv) * V + j;
    Tin* ob = o + (bos * HV + hv) * V + j;
    const int kn = K - r0 < KPT ? K - r0 : KPT;  // rows of this thread inside K (may be <= 0)

    Tin pk[KPT], pa[KPT], pb[KPT], pg[NG], pv = Tin{};
#pragma unroll
    for (int i = 0; i < KPT; ++i) pk[i] = pa[i] = pb[i] = Tin{};
#pragma unroll
    for (int i = 0; i < NG; ++i) pg[i] = Tin{};
    auto fetch = [&](long long t) {
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            if (i < kn) {
                pk[i] = kb[t * kstride + i];
                pa[i] = ab[t * astride + i];
                pb[i] = bb[t * astride + i];
                if (GATE) pg[i] = gb[t * astride + i];
            }
        }
        if (col_ok) pv = vb[t * vstride];
    };

    if (len > 0) fetch(0);
    for (long long t = 0; t < len; ++t) {
        Tc kk[KPT], aa[KPT], bw[KPT], qq[KPT], gg[NG];
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            kk[i] = fw_cvt<Tc>(pk[i]);
            aa[i] = fw_cvt<Tc>(pa[i]);
            bw[i] = fw_cvt<Tc>(pb[i]);
        }
#pragma unroll
        for (int i = 0; i < NG; ++i) gg[i] = fw_cvt<Tc>(pg[i]);
        const Tc vv = fw_cvt<Tc>(pv);
        Tin pq[KPT];  // q is used last: its load overlaps this token's update
#pragma unroll
        for (int i = 0; i < KPT; ++i) pq[i] = i < kn ? qb[t * kstride + i] : Tin{};
        if (t + 1 < len) fetch(t + 1);

        if (flags & FW_L2NORM) {
            const Tc ss = fw_group_sum<KSPLIT>(fw_dot<KPT>(kk, kk));
            const Tc inv = Tc(1) / fw_sqrt(ss + Tc(FW_L2NORM_EPS));
#pragma unroll
            for (int i = 0; i < KPT; ++i) kk[i] *= inv;
        }
        const Tc u = fw_group_sum<KSPLIT>(fw_dot<KPT>(aa, S));  // a^T S_{t-1}, column j
        // Rows outside K stay exactly 0 (0 * NaN there would outlive a -inf reset).
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            if (i < kn) {
                Tc d = S[i];
                if (GATE) d = fw_is_neg_inf(gg[i]) ? Tc(0) : d * fw_exp(gg[i]);
                S[i] = d + bw[i] * u + kk[i] * vv;
            }
        }
#pragma unroll
        for (int i = 0; i < KPT; ++i) qq[i] = fw_cvt<Tc>(pq[i]);
        Tc qs = scale;
        if (flags & FW_L2NORM)
            qs = scale / fw_sqrt(fw_group_sum<KSPLIT>(fw_dot<KPT>(qq, qq)) + Tc(FW_L2NORM_EPS));
#pragma unroll
        for (int i = 0; i < KPT; ++i) qq[i] *= qs;
        const Tc acc = fw_group_sum<KSPLIT>(fw_dot<KPT>(S, qq));
        if (ks == 0 && col_ok) fw_store(&ob[t * vstride], acc);
    }

    if (flags & FW_HAS_HT) {
        __syncthreads();  // every thread has read its part of h0 from the tile
#pragma unroll
        for (int i = 0; i < KPT; ++i) tile[r0 + i][cl] = S[i];
        __syncthreads();
#pragma unroll
        for (int it = 0; it < KPT; ++it) {  // KP * BV == KPT * NTHREADS entries
            const int e = it * NTHREADS + tid, r = e / BV, c = e % BV;
            if (r < K && v0 + c < V) ht[sbase + (long long)r * V + v0 + c] = tile[r][c];
        }
    }
}
