// The chunk form of the general rule (SPEC.md section 3) in three kernels.
//
// They read the head-major problem of fastweights.rules.delta._layout.prepare (made
// C-contiguous in the compute type Tc): q, k [NH, R, K] (L2-normalised and scaled), v [NH, R, V],
// g [NH, R, G] (G = 1 per head, K per key channel), beta [NH, R] and the state [NH, K, V], with
// NH = sequences x value heads; packed sequences are already zero-padded rows (k = v = 0, g = 0,
// beta = 0: no change of state), DeltaProduct's steps interleaved rows. Chunk c holds rows
// [c*cs, c*cs + nr) with nr = min(cs, R - c*cs); cs <= C (the template's chunk capacity).
//
//   fw_chunk_prep    grid x = NH * nc (every chunk of every head at once), 256 threads:
//                    P = (Q K^T * Gamma) [cs, cs], the decayed Qd = Q * exp(b) and
//                    Kd = K * exp(b_C - b) [rows, K], the chunk's log-decay D = b_C [G]; for the
//                    delta rules (ERASE) also A = tril(Diag(beta) (K K^T * Gamma), -1), its
//                    inverse X = (I + A)^-1 in shared memory, W = X Diag(beta) (K * exp(b)) and
//                    U = X Diag(beta) V.
//   fw_chunk_state   grid x = NH * n_vtiles: the only sequential pass. The state tile lives in
//                    registers (the fw_recurrent tile); per chunk U' = U - W S, the inter-chunk
//                    output Qd S, then S <- Diag(exp(D)) S + Kd^T U'. Writes U' and Qd S.
//   fw_chunk_output  grid x = NH * nc: O += P U' (the intra-chunk output), in place.
//
// Numerics as fastweights/rules/chunk.py: every decay factor is exp of a sum of gates over an
// interval, accumulated directly (cumulative sums from the chunk's start, to its end, within a
// sub-block of SB rows, and sums of whole sub-blocks), never a difference of cumulative sums.
// A per-key-channel score sum_i x_ri y_si exp(sum_{s<u<=r} g_ui) takes the exponent of each
// (pair, channel) elementwise: for a pair in different sub-blocks the interval is split at the
// row's sub-block start (the reference point) into "row's sub-block up to r", the whole
// sub-blocks between, and "s's sub-block after s"; inside one sub-block the interval sum is
// accumulated term by term. No factor ever exceeds 1 for gates <= 0, so nothing overflows when
// the decay inside a chunk is far below -88. A -inf gate (a reset) is selected, never
// multiplied: a term whose exponent is -inf is skipped, the pairs across a reset of every
// channel ("hidden") are exactly 0 in A, X and P, and a zero coefficient (a selected decay, a
// hidden entry) never multiplies the state or U' (so a NaN does not leak across a reset).
//
// Accumulation is in Tc (float32 for float16/float32 inputs, float64 for float64).

enum : int {
    FWC_GATE_HEAD = 1,
    FWC_GATE_KEY = 2,
    FWC_ERASE = 4,
};

enum : int { FWC_HAS_HT = 1 };

// sum_{s<u<=r} g_u for s <= r, from a gate column (stride ld) and its per-sub-block sums:
// fw = sum from the sub-block's first row to u (inclusive), tl = sum after u to the
// sub-block's end, blk = the sub-block's total.
template <typename Tc, int SB>
__device__ __forceinline__ Tc fwc_interval(const Tc* g, const Tc* fw, const Tc* tl, const Tc* blk,
                                           int ld, int r, int s) {
    const int br = r / SB, bs = s / SB;
    if (br == bs) {
        Tc e = Tc(0);
        for (int u = s + 1; u <= r; ++u) e += g[u * ld];
        return e;
    }
    Tc e = tl[s * ld];
    for (int b = bs + 1; b < br; ++b) e += blk[b * ld];
    return e + fw[r * ld];
}

// The sub-block scans of one gate column (rows [0, nr), stride ld).
template <typename Tc, int SB>
__device__ __forceinline__ void fwc_block_scans(const Tc* g, Tc* fw, Tc* tl, Tc* blk, int ld,
                                                int nr) {
    for (int b0 = 0; b0 < nr; b0 += SB) {
        const int b1 = b0 + SB < nr ? b0 + SB : nr;
        Tc acc = Tc(0);
        for (int u = b0; u < b1; ++u) {
            acc += g[u * ld];
            fw[u * ld] = acc;
        }
        blk[(b0 / SB) * ld] = acc;
        acc = Tc(0);
        for (int u = b1 - 1; u >= b0; --u) {
            tl[u * ld] = acc;
            acc += g[u * ld];
        }
    }
}

// From the chunk's start (inclusive) and to its end (exclusive): b_r and b_C - b_r, each a
// direct cumulative sum.
template <typename Tc>
__device__ __forceinline__ void fwc_edge_scans(const Tc* g, Tc* from_start, Tc* to_end, int ld,
                                               int nr) {
    Tc acc = Tc(0);
    for (int u = 0; u < nr; ++u) {
        acc += g[u * ld];
        from_start[u * ld] = acc;
    }
    acc = Tc(0);
    for (int u = nr - 1; u >= 0; --u) {
        to_end[u * ld] = acc;
        acc += g[u * ld];
    }
}

template <typename Tc>
__device__ __forceinline__ Tc fwc_decay(Tc x, Tc log_f) {
    return fw_is_neg_inf(log_f) ? Tc(0) : x * fw_exp(log_f);
}

// c * x, exactly 0 when the coefficient c is 0 (a selected term), even if x is NaN or Inf.
template <typename Tc>
__device__ __forceinline__ Tc fwc_term(Tc c, Tc x) {
    return c == Tc(0) ? Tc(0) : c * x;
}

template <typename Tc, int C, int SB, int MODE>
__global__ void __launch_bounds__(256, 1)
fw_chunk_prep(const Tc* __restrict__ q, const Tc* __restrict__ k, const Tc* __restrict__ v,
              const Tc* __restrict__ g, const Tc* __restrict__ beta, Tc* __restrict__ W,
              Tc* __restrict__ U, Tc* __restrict__ Qd, Tc* __restrict__ Kd, Tc* __restrict__ P,
              Tc* __restrict__ D, int R, int K, int V, int cs, int nc) {
    constexpr int NT = 256;
    constexpr int KT = 16;  // key (or value) channels per shared-memory tile
    constexpr int NB = (C + SB - 1) / SB;
    constexpr int PPT = (C * C + NT - 1) / NT;  // (row, column) pairs per thread
    constexpr int GATE = MODE & 3;
    constexpr bool ERASE = (MODE & FWC_ERASE) != 0;
    static_assert(C <= NT, "one thread per row in the row-wise steps");

    __shared__ Tc sk[C][KT + 1], sq[C][KT + 1];
    __shared__ Tc sg[C][KT], sfw[C][KT], stl[C][KT];
    __shared__ Tc sblk[NB][KT];
    __shared__ Tc sM[C][C + 1];  // A below the diagonal, X = (I + A)^-1 transposed above it
    __shared__ Tc sbeta[C];
    __shared__ Tc hg[C], hfw[C], htl[C], hblk[NB], hb[C], he[C];  // a per-head gate
    __shared__ int scnt[C];  // resets of every channel in rows <= r

    const int tid = threadIdx.x;
    const long long nh = blockIdx.x / nc;
    const int c = blockIdx.x % nc;
    const long long t0 = (long long)c * cs;
    const int nr = R - t0 < cs ? (int)(R - t0) : cs;
    const long long rows_p = (long long)nc * cs;  // rows of the padded scratch arrays
    const int G = GATE == FWC_GATE_KEY ? K : 1;
    const Tc* qb = q + (nh * R + t0) * K;
    const Tc* kb = k + (nh * R + t0) * K;
    const Tc* vb = v + (nh * R + t0) * V;
    const Tc* gb = g + (nh * R + t0) * G;

    // Rows where every channel resets, counted: pair (r, s) is hidden when a reset lies in (s, r].
    if (tid < C) {
        bool full = false;
        if (GATE != 0 && tid < nr) {
            full = true;
            for (int i = 0; i < G; ++i) full = full && fw_is_neg_inf(gb[(long long)tid * G + i]);
        }
        scnt[tid] = full ? 1 : 0;
        if (ERASE) sbeta[tid] = tid < nr ? beta[nh * R + t0 + tid] : Tc(0);
        if (GATE == FWC_GATE_HEAD) hg[tid] = tid < nr ? gb[tid] : Tc(0);
    }
    __syncthreads();
    if (tid == 0) {
        for (int r = 1; r < C; ++r) scnt[r] += scnt[r - 1];
        if (GATE == FWC_GATE_HEAD) {
            fwc_block_scans<Tc, SB>(hg, hfw, htl, hblk, 1, nr);
            fwc_edge_scans<Tc>(hg, hb, he, 1, nr);
        }
    }
    __syncthreads();
    auto hidden = [&](int r, int s) { return scnt[r] - scnt[s] > 0; };

    // Pass 1 over key tiles: the scores of (q, k) and (k, k) of every pair.
    Tc aP[PPT], aA[PPT];
#pragma unroll
    for (int m = 0; m < PPT; ++m) aP[m] = aA[m] = Tc(0);
    for (int k0 = 0; k0 < K; k0 += KT) {
        for (int e = tid; e < C * KT; e += NT) {
            const int r = e / KT, i = e % KT;
            const bool ok = r < nr && k0 + i < K;
            sk[r][i] = ok ? kb[(long long)r * K + k0 + i] : Tc(0);
            sq[r][i] = ok ? qb[(long long)r * K + k0 + i] : Tc(0);
            if (GATE == FWC_GATE_KEY) sg[r][i] = ok ? gb[(long long)r * K + k0 + i] : Tc(0);
        }
        __syncthreads();
        if (GATE == FWC_GATE_KEY && tid < KT)
            fwc_block_scans<Tc, SB>(&sg[0][tid], &sfw[0][tid], &stl[0][tid], &sblk[0][tid], KT, nr);
        __syncthreads();
#pragma unroll
        for (int m = 0; m < PPT; ++m) {
            const int e = m * NT + tid, r = e / C, s = e % C;
            if (e >= C * C || r >= nr || s > r) continue;
            Tc ap = aP[m], aa = aA[m];
            for (int i = 0; i < KT; ++i) {
                Tc ks = sk[s][i];
                if (GATE == FWC_GATE_KEY) {
                    const Tc lg = fwc_interval<Tc, SB>(&sg[0][i], &sfw[0][i], &stl[0][i],
                                                       &sblk[0][i], KT, r, s);
                    if (fw_is_neg_inf(lg)) continue;
                    ks *= fw_exp(lg);
                }
                ap += sq[r][i] * ks;
                if (ERASE && s < r) aa += sk[r][i] * ks;
            }
            aP[m] = ap;
            aA[m] = aa;
        }
        __syncthreads();
    }

    // P to global memory, A (scaled by beta, strictly lower) to shared memory.
    Tc* Pb = P + ((long long)nh * nc + c) * cs * cs;
#pragma unroll
    for (int m = 0; m < PPT; ++m) {
        const int e = m * NT + tid, r = e / C, s = e % C;
        if (e >= C * C) continue;
        bool vis = r < nr && s <= r && !hidden(r, s);
        Tc f = Tc(1);
        if (GATE == FWC_GATE_HEAD && vis) {
            const Tc lg = fwc_interval<Tc, SB>(hg, hfw, htl, hblk, 1, r, s);
            vis = !fw_is_neg_inf(lg);
            f = vis ? fw_exp(lg) : Tc(0);
        }
        if (r < cs && s < cs) Pb[r * cs + s] = vis ? aP[m] * f : Tc(0);
        if (ERASE && s < r) sM[r][s] = (vis && r < nr) ? sbeta[r] * (aA[m] * f) : Tc(0);
    }
    __syncthreads();

    // X = (I + A)^-1 by forward substitution, row by row; X_rc is stored at sM[c][r] (c < r).
    if (ERASE) {
        for (int r = 1; r < nr; ++r) {
            if (tid < r) {
                const int cc = tid;
                Tc x = Tc(0);
                if (!hidden(r, cc)) {
                    x = -sM[r][cc];
                    for (int j = cc + 1; j < r; ++j) x -= fwc_term(sM[r][j], sM[cc][j]);
                }
                sM[cc][r] = x;
            }
            __syncthreads();
        }
    }

    // Pass 2 over key tiles: Qd, Kd, D, and W = X Diag(beta) (K * exp(b)).
    for (int k0 = 0; k0 < K; k0 += KT) {
        for (int e = tid; e < C * KT; e += NT) {
            const int r = e / KT, i = e % KT;
            const bool ok = r < nr && k0 + i < K;
            sk[r][i] = ok ? kb[(long long)r * K + k0 + i] : Tc(0);
            sq[r][i] = ok ? qb[(long long)r * K + k0 + i] : Tc(0);
            if (GATE == FWC_GATE_KEY) sg[r][i] = ok ? gb[(long long)r * K + k0 + i] : Tc(0);
        }
        __syncthreads();
        if (GATE == FWC_GATE_KEY && tid < KT) {
            fwc_edge_scans<Tc>(&sg[0][tid], &sfw[0][tid], &stl[0][tid], KT, nr);
            if (k0 + tid < K && nr > 0)
                D[((long long)nh * nc + c) * K + k0 + tid] = sfw[nr - 1][tid];
        }
        if (GATE == FWC_GATE_HEAD && k0 == 0 && tid == 0 && nr > 0)
            D[(long long)nh * nc + c] = hb[nr - 1];
        __syncthreads();
        for (int e = tid; e < nr * KT; e += NT) {
            const int r = e / KT, i = e % KT;
            if (k0 + i >= K) continue;
            Tc lb = Tc(0), le = Tc(0);
            if (GATE == FWC_GATE_KEY) {
                lb = sfw[r][i];
                le = stl[r][i];
            } else if (GATE == FWC_GATE_HEAD) {
                lb = hb[r];
                le = he[r];
            }
            const long long o = (nh * rows_p + t0 + r) * K + k0 + i;
            Qd[o] = fwc_decay(sq[r][i], lb);
            Kd[o] = fwc_decay(sk[r][i], le);
            if (ERASE) sq[r][i] = sbeta[r] * fwc_decay(sk[r][i], lb);  // the right-hand side
        }
        __syncthreads();
        if (ERASE) {
            for (int e = tid; e < nr * KT; e += NT) {
                const int r = e / KT, i = e % KT;
                if (k0 + i >= K) continue;
                Tc w = sq[r][i];
                for (int s = 0; s < r; ++s) w += fwc_term(sM[s][r], sq[s][i]);
                W[(nh * rows_p + t0 + r) * K + k0 + i] = w;
            }
            __syncthreads();
        }
    }

    // U = X Diag(beta) V, by value tiles.
    if (ERASE) {
        for (int j0 = 0; j0 < V; j0 += KT) {
            for (int e = tid; e < C * KT; e += NT) {
                const int r = e / KT, j = e % KT;
                const bool ok = r < nr && j0 + j < V;
                sq[r][j] = ok ? sbeta[r] * vb[(long long)r * V + j0 + j] : Tc(0);
            }
            __syncthreads();
            for (int e = tid; e < nr * KT; e += NT) {
                const int r = e / KT, j = e % KT;
                if (j0 + j >= V) continue;
                Tc u = sq[r][j];
                for (int s = 0; s < r; ++s) u += fwc_term(sM[s][r], sq[s][j]);
                U[(nh * rows_p + t0 + r) * V + j0 + j] = u;
            }
            __syncthreads();
        }
    }
}

// The sequential pass over the chunks of one (head, value tile); the tile of fw_recurrent:
// thread tid owns rows [ks*KPT, ks*KPT + KPT) of column cl, ks = tid % KSPLIT, cl = tid / KSPLIT.
// U is the prep kernel's U (ERASE, rows_p rows per head) or v itself (rows R per head).
template <typename Tc, int KPT, int KSPLIT, int BV, int C, int MODE>
__global__ void __launch_bounds__(BV * KSPLIT, 1)
fw_chunk_state(const Tc* __restrict__ Qd, const Tc* __restrict__ Kd, const Tc* __restrict__ W,
               const Tc* __restrict__ U, const Tc* __restrict__ D, const Tc* h0, Tc* ht,
               Tc* __restrict__ O, Tc* __restrict__ Up, int R, int K, int V, int cs, int nc,
               int flags) {
    constexpr int GATE = MODE & 3;
    constexpr bool ERASE = (MODE & FWC_ERASE) != 0;
    constexpr int KP = KPT * KSPLIT;
    constexpr int NTHREADS = BV * KSPLIT;
    __shared__ Tc tile[KP][BV + 1];
    __shared__ Tc su[C][BV + 1];

    const int tid = threadIdx.x;
    const int ks = tid % KSPLIT;
    const int cl = tid / KSPLIT;
    const int r0 = ks * KPT;
    const int n_vt = (V + BV - 1) / BV;
    const long long nh = blockIdx.x / n_vt;
    const int v0 = (blockIdx.x % n_vt) * BV;
    const int j = v0 + cl;
    const bool col_ok = j < V;
    const int kn = K - r0 < KPT ? K - r0 : KPT;
    const long long rows_p = (long long)nc * cs;
    const long long sbase = nh * (long long)K * V;

#pragma unroll
    for (int it = 0; it < KPT; ++it) {  // KP * BV == KPT * NTHREADS entries
        const int e = it * NTHREADS + tid, r = e / BV, cc = e % BV;
        tile[r][cc] = (r < K && v0 + cc < V) ? h0[sbase + (long long)r * V + v0 + cc] : Tc(0);
    }
    __syncthreads();
    Tc S[KPT];
#pragma unroll
    for (int i = 0; i < KPT; ++i) S[i] = tile[r0 + i][cl];

    const long long urows = ERASE ? rows_p : (long long)R;
    for (int c = 0; c < nc; ++c) {
        const long long t0 = (long long)c * cs;
        const int nr = R - t0 < cs ? (int)(R - t0) : cs;
        for (int r = 0; r < nr; ++r) {
            const long long row = nh * rows_p + t0 + r;
            Tc aq[4] = {Tc(0), Tc(0), Tc(0), Tc(0)}, aw[4] = {Tc(0), Tc(0), Tc(0), Tc(0)};
#pragma unroll
            for (int i = 0; i < KPT; ++i) {
                if (i < kn) {
                    aq[i % 4] += fwc_term(Qd[row * K + r0 + i], S[i]);
                    if (ERASE) aw[i % 4] += fwc_term(W[row * K + r0 + i], S[i]);
                }
            }
            const Tc oq = fw_group_sum<KSPLIT>((aq[0] + aq[1]) + (aq[2] + aq[3]));
            Tc u = col_ok ? U[(nh * urows + t0 + r) * V + j] : Tc(0);
            if (ERASE) u -= fw_group_sum<KSPLIT>((aw[0] + aw[1]) + (aw[2] + aw[3]));
            if (ks == 0) {
                su[r][cl] = u;
                if (col_ok) {
                    O[(nh * R + t0 + r) * V + j] = oq;
                    Up[row * V + j] = u;
                }
            }
        }
        __syncthreads();
        if (GATE == FWC_GATE_HEAD) {
            const Tc lg = D[nh * nc + c];
#pragma unroll
            for (int i = 0; i < KPT; ++i) S[i] = fwc_decay(S[i], lg);
        } else if (GATE == FWC_GATE_KEY) {
#pragma unroll
            for (int i = 0; i < KPT; ++i)
                if (i < kn) S[i] = fwc_decay(S[i], D[(nh * nc + c) * K + r0 + i]);
        }
        for (int r = 0; r < nr; ++r) {
            const Tc u = su[r][cl];
            const long long row = nh * rows_p + t0 + r;
#pragma unroll
            for (int i = 0; i < KPT; ++i)
                if (i < kn) S[i] += fwc_term(Kd[row * K + r0 + i], u);
        }
        __syncthreads();
    }

    if (flags & FWC_HAS_HT) {
#pragma unroll
        for (int i = 0; i < KPT; ++i) tile[r0 + i][cl] = S[i];
        __syncthreads();
#pragma unroll
        for (int it = 0; it < KPT; ++it) {
            const int e = it * NTHREADS + tid, r = e / BV, cc = e % BV;
            if (r < K && v0 + cc < V) ht[sbase + (long long)r * V + v0 + cc] = tile[r][cc];
        }
    }
}

// O[r] += sum_{s <= r} P[r, s] U'[s] for every chunk at once (the intra-chunk output).
template <typename Tc, int C>
__global__ void __launch_bounds__(256, 1)
fw_chunk_output(const Tc* __restrict__ P, const Tc* __restrict__ Up, Tc* __restrict__ O, int R,
                int V, int cs, int nc) {
    constexpr int NT = 256;
    __shared__ Tc sP[C][C + 1];
    const int tid = threadIdx.x;
    const long long nh = blockIdx.x / nc;
    const int c = blockIdx.x % nc;
    const long long t0 = (long long)c * cs;
    const int nr = R - t0 < cs ? (int)(R - t0) : cs;
    const long long rows_p = (long long)nc * cs;
    const Tc* Pb = P + ((long long)nh * nc + c) * cs * cs;
    for (int e = tid; e < nr * cs; e += NT) sP[e / cs][e % cs] = Pb[e];
    __syncthreads();
    for (int e = tid; e < nr * V; e += NT) {
        const int r = e / V, j = e % V;
        const long long o = (nh * R + t0 + r) * V + j;
        const Tc* ub = Up + (nh * rows_p + t0) * V + j;
        Tc even = O[o], odd = Tc(0);  // two independent chains
        int s = 0;
        for (; s + 1 <= r; s += 2) {
            even += fwc_term(sP[r][s], ub[(long long)s * V]);
            odd += fwc_term(sP[r][s + 1], ub[(long long)(s + 1) * V]);
        }
        if (s == r) even += fwc_term(sP[r][s], ub[(long long)s * V]);
        O[o] = even + odd;
    }
}
