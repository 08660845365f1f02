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
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef RANK
#error "compile with -DRANK=<rank>"
#endif

#define VW 16                                       /* floats per vector */
#define RB (RANK > 24 ? 1 : (24 / RANK < 6 ? 24 / RANK : 6)) /* rows per P block: RB * RANK accumulators */
#define RB2 (2 * RB)                                /* rows per Q block */

typedef float vec __attribute__((vector_size(VW * sizeof(float))));

static inline vec vload(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline float vsum(vec v) { float s = 0.f; for (int i = 0; i < VW; i++) s += v[i]; return s; }

/* A row of X as seen by the vector loops: full vectors up to n16, then a zero-padded tail copy. */
typedef struct { const float *row; float tail[VW]; } xrow;

static inline void xrow_set(xrow *r, const float *row, int n) {
    int n16 = n & ~(VW - 1);
    r->row = row;
    memset(r->tail, 0, sizeof r->tail);
    if (n > n16) memcpy(r->tail, row + n16, sizeof(float) * (size_t)(n - n16));
}

static inline vec xrow_load(const xrow *r, int j, int n16) { return j < n16 ? vload(r->row + j) : vload(r->tail); }

/* p[r][k] = sum_j x[r][j] h[k][j] for RB rows. */
static void rows_times_ht(const xrow *x, const float *h, int n, int ldh, int nrows, float p[RB][RANK]) {
    int n16 = n & ~(VW - 1), ncols = (n + VW - 1) & ~(VW - 1);
    vec acc[RB][RANK];
    for (int r = 0; r < RB; r++)
        for (int k = 0; k < RANK; k++) acc[r][k] = (vec){0};
    for (int j = 0; j < ncols; j += VW) {
        vec xv[RB];
        for (int r = 0; r < RB; r++) xv[r] = xrow_load(&x[r < nrows ? r : 0], j, n16);
        for (int k = 0; k < RANK; k++) {
            vec hk = vload(h + (size_t)k * ldh + j);
            for (int r = 0; r < RB; r++) acc[r][k] += xv[r] * hk;
        }
    }
    for (int r = 0; r < RB; r++)
        for (int k = 0; k < RANK; k++) p[r][k] = vsum(acc[r][k]);
}

/* q[k][j] += sum_r v[r][k] x[r][j] for RB2 rows (rows past nrows have v = 0). */
static void accumulate_vt_x(const xrow *x, const float v[RB2][RANK], int n, int ldh, int nrows, float *q) {
    int n16 = n & ~(VW - 1), ncols = (n + VW - 1) & ~(VW - 1);
    for (int j = 0; j < ncols; j += VW) {
        vec xv[RB2];
        for (int r = 0; r < RB2; r++) xv[r] = xrow_load(&x[r < nrows ? r : 0], j, n16);
        for (int k = 0; k < RANK; k++) {
            float *qk = q + (size_t)k * ldh + j;
            vec a = vload(qk);
            for (int r = 0; r < RB2; r++) a += v[r][k] * xv[r];
            vstore(qk, a);
        }
    }
}

/* Phase 1: update every row of V, accumulate Q = V^T X and VV = V^T V with the new V. */
static void update_v(const float *X, float *V, const float *H, const float *G, float *Q, float VV[RANK][RANK],
                     int m, int n, int ldx, int ldh, float eps) {
    memset(Q, 0, sizeof(float) * RANK * (size_t)ldh);
    double vv[RANK][RANK] = {{0}};
    xrow x[RB2];
    for (int i = 0; i < m; i += RB2) {
        int nrows = m - i < RB2 ? m - i : RB2;
        for (int r = 0; r < nrows; r++) xrow_set(&x[r], X + (size_t)(i + r) * ldx, n);
        float p[RB2][RANK], v[RB2][RANK];
        rows_times_ht(x, H, n, ldh, nrows, p);
        if (nrows > RB) rows_times_ht(x + RB, H, n, ldh, nrows - RB, p + RB);
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
        accumulate_vt_x(x, v, n, ldh, nrows, Q);
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
