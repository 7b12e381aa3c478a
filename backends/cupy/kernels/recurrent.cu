// The recurrent form of the general fast-weight update rule, one token after another.
//
// For each (sequence, value head, tile of BV value columns), with S the K x V state of the
// head (key-first), x~ = x / sqrt(|x|^2 + FW_L2NORM_EPS) when L2-normalising, and q~ = scale q:
//
//     S' = Diag(alpha_t) S              alpha_t = exp(g_t) (per head) or exp(gk_t) (per key)
//     S  = S' + k_t (beta_t * (v_t - erase * S'^T k_t))^T
//     o_t = S^T q~_t,   or (S^T q~_t) / (q~_t . z_t + FW_NORMALIZE_EPS) with z_t = z_{t-1} + k_t
//
// MODE selects the parts at compile time: the gate (none / per head / per key channel), beta
// (none, i.e. Hebbian with erase = 0 and beta = 1 / per head / per value channel) and the
// normaliser of linear attention. DeltaProduct runs NS delta steps per token: the decay before
// the first, the read after the last. A gate of -inf is a hard reset: the state (its row, per
// key channel) becomes exactly 0, selected rather than multiplied by exp(-inf) = 0, so a NaN or
// Inf in it does not survive (API.md).
//
// Threads: thread `tid` owns rows [ks*KPT, ks*KPT + KPT) of column `cl` of the tile, with
// ks = tid % KSPLIT and cl = tid / KSPLIT, so the KSPLIT threads sharing a column are
// consecutive lanes of one warp and the sums over K are butterfly shuffles. The state lives in
// registers for the whole sequence; it enters and leaves through a shared-memory tile so that
// global reads and writes of S are coalesced along V. The key, gate, value and beta of the
// next row are loaded while the current row is computed; q, needed last, at the row's start.
//
// Grid: x = sequence * n_vtiles + vtile, y = value head; block: BV * KSPLIT threads.
// Arrays are C-contiguous: q [rows_q, H, K], k [rows_q*NS, H, K], v and o [rows, HV, V],
// gate [rows_q, HV] or [rows_q, HV, K], beta [rows_q*NS, HV] or [..., V], states [*, HV, K, V],
// z [*, HV, K]. Sequence n covers tokens [cu[n], cu[n+1]) (FW_HAS_CU) or [n*T, (n+1)*T).
// Decoding is the same kernel with T == 1, h0 == ht == the pool and state_idx its rows.

// The rules' constants are defined once, in fastweights/_constants.py, and passed as -D options.
#if !defined(FW_L2NORM_EPS) || !defined(FW_NORMALIZE_EPS)
#error "compile with the options of fastweights._constants.cuda_defines()"
#endif

enum : int {
    FW_GATE_HEAD = 1,
    FW_GATE_KEY = 2,
    FW_BETA_HEAD = 4,
    FW_BETA_VALUE = 8,
    FW_NORMALIZE = 16,
};

// Run-time flags (the `flags` argument).
enum : int {
    FW_HAS_H0 = 1,
    FW_HAS_HT = 2,
    FW_HAS_CU = 4,
    FW_HAS_IDX = 8,
    FW_L2NORM = 16,
    FW_HAS_Z0 = 32,
    FW_HAS_ZT = 64,
};

template <typename Tin, typename Tc, int KPT, int KSPLIT, int BV, int MODE>
__global__ void __launch_bounds__(BV * KSPLIT, 1)
fw_recurrent(const Tin* __restrict__ q, const Tin* __restrict__ k, const Tin* __restrict__ v,
             const Tin* __restrict__ gate, const Tin* __restrict__ beta, const Tc* h0, Tc* ht,
             const Tc* z0, Tc* zt, Tin* __restrict__ o, const long long* __restrict__ cu_seqlens,
             const long long* __restrict__ state_idx, int T, int H, int HV, int K, int V, int NS,
             Tc scale, int flags) {
    constexpr int GATE = MODE & 3;
    constexpr int BETA = MODE & 12;
    constexpr bool NORM = (MODE & FW_NORMALIZE) != 0;
    constexpr int KP = KPT * KSPLIT;
    constexpr int NTHREADS = BV * KSPLIT;
    constexpr int NG = GATE == FW_GATE_KEY ? KPT : 1;
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
    Tc Z[NORM ? KPT : 1];
#pragma unroll
    for (int i = 0; i < (NORM ? KPT : 1); ++i) {
        const bool ok = NORM && (flags & FW_HAS_Z0) && r0 + i < K;
        Z[i] = ok ? z0[(srow * HV + hv) * K + r0 + i] : Tc(0);
    }

    // Row r of the sequence is global row bos*NS + r of k, v, beta and token bos + r/NS of q,
    // the gate and o. Raw inputs outside K or V stay zero (alpha = 1, no write).
    const long long kstride = (long long)H * K, vstride = (long long)HV * V;
    const Tin* kb = k + (bos * NS * H + h) * K + r0;
    const Tin* qb = q + (bos * H + h) * K + r0;
    const Tin* vb = v + (bos * NS * HV + hv) * V + j;
    const int gw = GATE == FW_GATE_KEY ? K : 1, bw = BETA == FW_BETA_VALUE ? V : 1;
    const Tin* gb = gate + (bos * HV + hv) * gw + (GATE == FW_GATE_KEY ? r0 : 0);
    const Tin* betab = beta + (bos * NS * HV + hv) * bw + (BETA == FW_BETA_VALUE ? j : 0);
    Tin* ob = o + (bos * HV + hv) * V + j;
    const long long gstride = (long long)HV * gw, bstride = (long long)HV * bw;
    const int kn = K - r0 < KPT ? K - r0 : KPT;  // rows of this thread inside K (may be <= 0)

    Tin pk[KPT], pg[NG], pv = Tin{}, pb = Tin{};
#pragma unroll
    for (int i = 0; i < KPT; ++i) pk[i] = Tin{};
#pragma unroll
    for (int i = 0; i < NG; ++i) pg[i] = Tin{};
    auto fetch = [&](long long r, long long t) {
#pragma unroll
        for (int i = 0; i < KPT; ++i)
            if (i < kn) pk[i] = kb[r * kstride + i];
        if (GATE == FW_GATE_HEAD) pg[0] = gb[t * gstride];
        if (GATE == FW_GATE_KEY) {
#pragma unroll
            for (int i = 0; i < KPT; ++i)
                if (i < kn) pg[i] = gb[t * gstride + i];
        }
        if (col_ok) {
            pv = vb[r * vstride];
            if (BETA == FW_BETA_VALUE) pb = betab[r * bstride];
        }
        if (BETA == FW_BETA_HEAD) pb = betab[r * bstride];
    };

    const long long rows = len * NS;
    if (rows > 0) fetch(0, 0);
    long long t = 0;  // token of row r
    int s = 0;        // step of row r within its token
    for (long long r = 0; r < rows; ++r) {
        Tc kk[KPT], qq[KPT], gg[NG];
#pragma unroll
        for (int i = 0; i < KPT; ++i) kk[i] = fw_cvt<Tc>(pk[i]);
#pragma unroll
        for (int i = 0; i < NG; ++i) gg[i] = fw_cvt<Tc>(pg[i]);
        const Tc vv = fw_cvt<Tc>(pv);
        const Tc bb = fw_cvt<Tc>(pb);
        const bool last = s == NS - 1;
        Tin pq[KPT];  // q is used last: its load overlaps this row's update
#pragma unroll
        for (int i = 0; i < KPT; ++i) pq[i] = (last && i < kn) ? qb[t * kstride + i] : Tin{};
        if (r + 1 < rows) fetch(r + 1, last ? t + 1 : t);

        if (flags & FW_L2NORM) {
            const Tc ss = fw_group_sum<KSPLIT>(fw_dot<KPT>(kk, kk));
            const Tc inv = Tc(1) / fw_sqrt(ss + Tc(FW_L2NORM_EPS));
#pragma unroll
            for (int i = 0; i < KPT; ++i) kk[i] *= inv;
        }
        if (GATE != 0 && s == 0) {
            if (GATE == FW_GATE_HEAD) {
                const Tc a = fw_exp(gg[0]);
                const bool cut = fw_is_neg_inf(gg[0]);
#pragma unroll
                for (int i = 0; i < KPT; ++i) S[i] = cut ? Tc(0) : S[i] * a;
            } else {
#pragma unroll
                for (int i = 0; i < KPT; ++i)
                    S[i] = fw_is_neg_inf(gg[i]) ? Tc(0) : S[i] * fw_exp(gg[i]);
            }
        }
        const Tc u = BETA != 0 ? bb * (vv - fw_group_sum<KSPLIT>(fw_dot<KPT>(S, kk))) : vv;
        // Rows outside K stay exactly 0: 0 * NaN there would outlive a -inf reset of gk.
#pragma unroll
        for (int i = 0; i < KPT; ++i)
            if (i < kn) S[i] += kk[i] * u;
        if (NORM) {
#pragma unroll
            for (int i = 0; i < KPT; ++i) Z[i] += kk[i];
        }
        if (last) {
#pragma unroll
            for (int i = 0; i < KPT; ++i) qq[i] = fw_cvt<Tc>(pq[i]);
            Tc qs = scale;
            if (flags & FW_L2NORM)
                qs = scale / fw_sqrt(fw_group_sum<KSPLIT>(fw_dot<KPT>(qq, qq)) + Tc(FW_L2NORM_EPS));
#pragma unroll
            for (int i = 0; i < KPT; ++i) qq[i] *= qs;
            Tc acc = fw_group_sum<KSPLIT>(fw_dot<KPT>(S, qq));
            if (NORM) acc = acc / (fw_group_sum<KSPLIT>(fw_dot<KPT>(Z, qq)) + Tc(FW_NORMALIZE_EPS));
            if (ks == 0 && col_ok) fw_store(&ob[t * vstride], acc);
        }
        if (last) {
            s = 0;
            ++t;
        } else {
            ++s;
        }
    }

    if (flags & FW_HAS_HT) {
#pragma unroll
        for (int i = 0; i < KPT; ++i) tile[r0 + i][cl] = S[i];
        __syncthreads();
#pragma unroll
        for (int it = 0; it < KPT; ++it) {  // KP * BV == KPT * NTHREADS entries
            const int e = it * NTHREADS + tid, r = e / BV, c = e % BV;
            if (r < K && v0 + c < V) ht[sbase + (long long)r * V + v0 + c] = tile[r][c];
        }
    }
    if (NORM && (flags & FW_HAS_ZT) && v0 == 0 && cl == 0) {
#pragma unroll
        for (int i = 0; i < KPT; ++i)
            if (r0 + i < K) zt[(srow * HV + hv) * K + r0 + i] = Z[i];
    }
}
