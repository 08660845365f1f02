/*
 * CPU kernel for batched Lee-Seung NMF (Frobenius loss), the CPU twin of the Triton kernel in nmf.py.
 *
 * Same contract as nmf.py:nmf_ref: X [B, mp, ldx], V [B, mp, RANK], H [B, RANK, ldh], fp32, contiguous,
 * ldh a multiple of 16 and at least every n; sizes [B, 2] int32 holds each matrix's real (m, n).
 * Everything outside sizes is ignored and written as 0. V and H hold the initial factors on entry
 * and the fitted factors on return.
 *
 * One iteration is one pass over X (the V update with accumulation the issue asks for):
 *   phase 1, per block of rows: P = X_b H^T, V_b <- V_b * P / (V_b G + eps), then with the new V_b,
 *            while X_b is still in L1/L2: Q += V_b^T X_b and VV += V_b^T V_b;
 *   phase 2, per block of columns: H <- H * Q / (VV H + eps), and G = H H^T for the next phase 1.
 * The same iterates as textbook MU (V first, then H), with X streamed from memory once per iteration.
 * Matrices are fitted one after the other, all iterations each, so a matrix stays in cache for its whole
 * fit; callers run disjoint slices of a batch on separate threads. RANK is a compile-time constant so the
 * accumulators stay in registers.
 *
 * knsparse_residual is the CPU twin of residual.py:residual_ref, S = |X - V H| in one pass (S may be X).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef RANK
#error "compile with -DRANK=<rank>"
#endif

#define VW 16                                       /* floats per vector */
#define RB (RANK > 24 ? 1 : (24 / RANK < 6 ? 24 / RANK : 6)) /* rows per P block: RB * RANK accumulators */
#define RB2 (4 * RB)                                /* rows per Q block: Q loads/stores shared by more rows */

typedef float vec __attribute__((vector_size(VW * sizeof(float))));

static inline vec vload(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline float vsum(vec v) { float s = 0.f; for (int i = 0; i < VW; i++) s += v[i]; return s; }

/* acc[r][k] += x[r][j:j+VW] * h[k][j:j+VW] for the RB rows at xp. */
static inline void p_step(vec acc[RB][RANK], const float *const xp[RB], const float *h, int ldh, int j) {
    vec xv[RB];
    for (int r = 0; r < RB; r++) xv[r] = vload(xp[r] + j);
    for (int k = 0; k < RANK; k++) {
        vec hk = vload(h + (size_t)k * ldh + j);
        for (int r = 0; r < RB; r++) acc[r][k] += xv[r] * hk;
    }
}

/* q[k][j:j+QV*VW] += sum_r v[r][k] x[r][j:j+QV*VW] over the nr rows at xp; the RANK x QV partial sums stay
 * in registers while the rows stream through, each v[r][k] broadcast once for QV vectors. Inlined with
 * nr == RB2 the row loop unrolls fully. */
#define QV (RANK > 8 ? 1 : (RANK > 5 ? 3 : 4))
static inline void q_step(float *q, int ldh, const float *const xp[RB2], const float v[RB2][RANK], int j,
                          int nr) {
    vec a[RANK][QV];
    for (int k = 0; k < RANK; k++)
        for (int u = 0; u < QV; u++) a[k][u] = vload(q + (size_t)k * ldh + j + u * VW);
    for (int r = 0; r < nr; r++) {
        vec xv[QV];
        for (int u = 0; u < QV; u++) xv[u] = vload(xp[r] + j + u * VW);
        for (int k = 0; k < RANK; k++)
            for (int u = 0; u < QV; u++) a[k][u] += v[r][k] * xv[u];
    }
    for (int k = 0; k < RANK; k++)
        for (int u = 0; u < QV; u++) vstore(q + (size_t)k * ldh + j + u * VW, a[k][u]);
}

/* q_step for one vector of columns (the remainder of a row after the QV-wide steps, and the tail). */
static inline void q_step1(float *q, int ldh, const float *const xp[RB2], const float v[RB2][RANK], int j,
                           int nr) {
    vec a[RANK];
    for (int k = 0; k < RANK; k++) a[k] = vload(q + (size_t)k * ldh + j);
    for (int r = 0; r < nr; r++) {
        vec xv = vload(xp[r] + j);
        for (int k = 0; k < RANK; k++) a[k] += v[r][k] * xv;
    }
    for (int k = 0; k < RANK; k++) vstore(q + (size_t)k * ldh + j, a[k]);
}

/* Phase 1: update every row of V, accumulate Q = V^T X and VV = V^T V with the new V.
 * Rows go in blocks of RB2; columns in vectors of VW, the last partial vector read from a
 * zero-padded copy of the block's row tails. */
static void update_v(const float *X, float *V, const float *H, const float *G, float *Q, float VV[RANK][RANK],
                     int m, int n, int ldx, int ldh, float eps) {
    const int n16 = n & ~(VW - 1);
    memset(Q, 0, sizeof(float) * RANK * (size_t)ldh);
    double vv[RANK][RANK] = {{0}};
    float tails[RB2][VW];
    for (int i = 0; i < m; i += RB2) {
        const int nrows = m - i < RB2 ? m - i : RB2;
        const float *row[RB2], *tail[RB2];
        for (int r = 0; r < RB2; r++) {
            const int src = r < nrows ? r : 0; /* rows past the end repeat row 0 with v = 0 */
            row[r] = X + (size_t)(i + src) * ldx;
            memset(tails[r], 0, sizeof tails[r]);
            memcpy(tails[r], row[r] + n16, sizeof(float) * (size_t)(n - n16));
            tail[r] = tails[r];
        }
        float p[RB2][RANK], v[RB2][RANK];
        for (int half = 0; half < nrows; half += RB) {
            vec acc[RB][RANK];
            for (int r = 0; r < RB; r++)
                for (int k = 0; k < RANK; k++) acc[r][k] = (vec){0};
            int j = 0;
            for (; j < n16; j += VW) p_step(acc, row + half, H, ldh, j);
            if (j < n) p_step(acc, tail + half, H + n16, ldh, 0);
            for (int r = 0; r < RB; r++)
                for (int k = 0; k < RANK; k++) p[half + r][k] = vsum(acc[r][k]);
        }
        for (int r = 0; r < RB2; r++) {
            if (r >= nrows) {
                for (int k = 0; k < RANK; k++) v[r][k] = 0.f;
                continue;
            }
            float *vi = V + (size_t)(i + r) * RANK;
            for (int k = 0; k < RANK; k++) {
                float d = 0.f;
                for (int l = 0; l < RANK; l++) d += vi[l] * G[l * RANK + k];
                v[r][k] = vi[k] * (p[r][k] / (d + eps));
            }
            for (int k = 0; k < RANK; k++) vi[k] = v[r][k];
            for (int k = 0; k < RANK; k++)
                for (int l = 0; l < RANK; l++) vv[k][l] += (double)v[r][k] * v[r][l];
        }
        const int nq = n16 - n16 % (QV * VW);
        if (nrows == RB2) {
            for (int j = 0; j < nq; j += QV * VW) q_step(Q, ldh, row, v, j, RB2);
            for (int j = nq; j < n16; j += VW) q_step1(Q, ldh, row, v, j, RB2);
            if (n16 < n) q_step1(Q + n16, ldh, tail, v, 0, RB2);
        } else {
            for (int j = 0; j < nq; j += QV * VW) q_step(Q, ldh, row, v, j, nrows);
            for (int j = nq; j < n16; j += VW) q_step1(Q, ldh, row, v, j, nrows);
            if (n16 < n) q_step1(Q + n16, ldh, tail, v, 0, nrows);
        }
    }
    for (int k = 0; k < RANK; k++)
        for (int l = 0; l < RANK; l++) VV[k][l] = (float)vv[k][l];
}

/* Phase 2: H <- H * Q / (VV H + eps) (skipped when update == 0), then G = H H^T. */
static void update_h(float *H, const float *Q, const float VV[RANK][RANK], float *G, int n, int ldh, float eps,
                     int update) {
    int ncols = (n + VW - 1) & ~(VW - 1);
    vec gacc[RANK][RANK];
    for (int k = 0; k < RANK; k++)
        for (int l = 0; l < RANK; l++) gacc[k][l] = (vec){0};
    for (int j = 0; j < ncols; j += VW) {
        vec h[RANK];
        for (int k = 0; k < RANK; k++) h[k] = vload(H + (size_t)k * ldh + j);
        if (update) {
            vec hn[RANK];
            for (int k = 0; k < RANK; k++) {
                vec e = (vec){0};
                for (int l = 0; l < RANK; l++) e += VV[k][l] * h[l];
                hn[k] = h[k] * (vload(Q + (size_t)k * ldh + j) / (e + eps));
            }
            for (int k = 0; k < RANK; k++) {
                h[k] = hn[k];
                vstore(H + (size_t)k * ldh + j, h[k]);
            }
        }
        for (int k = 0; k < RANK; k++)
            for (int l = 0; l <= k; l++) gacc[k][l] += h[k] * h[l];
    }
    for (int k = 0; k < RANK; k++)
        for (int l = 0; l <= k; l++) {
            float s = vsum(gacc[k][l]);
            G[k * RANK + l] = s;
            G[l * RANK + k] = s;
        }
}

/* Fit every matrix of the batch; returns 0, or 1 if the scratch buffer cannot be allocated. */
int knsparse_nmf_mu(const float *X, float *V, float *H, const int32_t *sizes, int64_t batch, int64_t mp,
                    int64_t ldx, int64_t ldh, int64_t iters, float eps) {
    float *Q = malloc(sizeof(float) * RANK * (size_t)ldh);
    if (!Q) return 1;
    for (int64_t b = 0; b < batch; b++) {
        const int m = sizes[2 * b], n = sizes[2 * b + 1];
        const float *Xb = X + b * mp * ldx;
        float *Vb = V + b * mp * RANK, *Hb = H + b * RANK * ldh;
        memset(Vb + (size_t)m * RANK, 0, sizeof(float) * (size_t)(mp - m) * RANK);
        for (int k = 0; k < RANK; k++) memset(Hb + (size_t)k * ldh + n, 0, sizeof(float) * (size_t)(ldh - n));
        float G[RANK * RANK], VV[RANK][RANK];
        update_h(Hb, Q, (const float(*)[RANK])VV, G, n, (int)ldh, eps, 0);
        for (int64_t it = 0; it < iters; it++) {
            update_v(Xb, Vb, Hb, G, Q, VV, m, n, (int)ldx, (int)ldh, eps);
            update_h(Hb, Q, (const float(*)[RANK])VV, G, n, (int)ldh, eps, 1);
        }
    }
    free(Q);
    return 0;
}

/* S = |X - V H| for every matrix of the batch, zero outside sizes. X and S are [B, mp, ldx], V [B, mp, RANK],
 * H [B, RANK, ldh]; S may alias X (each entry is read before it is written). */
void knsparse_residual(const float *X, const float *V, const float *H, float *S, const int32_t *sizes,
                       int64_t batch, int64_t mp, int64_t ldx, int64_t ldh) {
    typedef int32_t ivec __attribute__((vector_size(VW * sizeof(int32_t))));
    const ivec absmask = (ivec){0} + 0x7fffffff;
    for (int64_t b = 0; b < batch; b++) {
        const int m = sizes[2 * b], n = sizes[2 * b + 1];
        const int n16 = n & ~(VW - 1);
        const float *Hb = H + b * RANK * ldh;
        for (int64_t i = 0; i < mp; i++) {
            const float *x = X + (b * mp + i) * ldx;
            float *s = S + (b * mp + i) * ldx;
            if (i >= m) {
                memset(s, 0, sizeof(float) * (size_t)ldx);
                continue;
            }
            const float *v = V + (b * mp + i) * RANK;
            int j = 0;
            for (; j < n16; j += VW) {
                vec d = vload(x + j);
                for (int k = 0; k < RANK; k++) d -= v[k] * vload(Hb + (size_t)k * ldh + j);
                vstore(s + j, (vec)((ivec)d & absmask));
            }
            for (; j < n; j++) {
                float d = x[j];
                for (int k = 0; k < RANK; k++) d -= v[k] * Hb[(size_t)k * ldh + j];
                s[j] = d < 0.f ? -d : d;
            }
            if (n < ldx) memset(s + n, 0, sizeof(float) * (size_t)(ldx - n));
        }
    }
}
