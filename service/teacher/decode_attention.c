/* Decode-step attention for the fast engine: every live slot's new tokens against its own
 * cached keys and values, reading each slot's keys and values once.
 *
 * Why our own kernel (issue 4): at decode sizes SDPA's CPU flash kernel spends about half
 * its time outside reading memory (measured: 30 layers x 64 slots x ~150 positions, 472 MB
 * of keys and values per step, 38-40 ms in SDPA against 19 ms for torch.sum over the same
 * bytes), and it needs a mask and a separate write of the new keys. This does the write,
 * the scores, the softmax and the weighted sum in one pass per (slot, key/value head).
 *
 * Layout (one layer): k_cache, v_cache [slots, kv_heads, max_len, d] contiguous; token row
 * r of slot s is row row_start[s] + j at position pos[s] + j and sees keys 0..pos[s] + j.
 * With P > 0, positions 0..P-1 (a prompt prefix every slot shares) are read from
 * prefix_k, prefix_v [kv_heads, P, d] instead of each slot's copy: the same values, read
 * once for all slots instead of once per slot.
 * q [rows, heads, d] with row stride q_stride; k_new, v_new [rows, kv_heads, d] with their
 * own row strides; out [rows, heads, d] contiguous. Query head hq uses key/value head
 * hq / (heads / kv_heads), as grouped-query attention does.
 *
 * Same arithmetic as SDPA (scores = (q . k) * scale, p = exp(score - row max), out =
 * sum(p v) / sum(p)); the sums run in another order, so results agree to rounding.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16 floats; GCC lowers it to AVX-512, AVX2 or SSE registers, whatever -march allows. */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static inline v16 ld(const float *p) { return *(const v16u *)p; }
static inline void st(float *p, v16 v) { *(v16u *)p = v; }
#define MAX_ROWS 12 /* query rows per (slot, key/value head) with a register path */
#define SV __builtin_shufflevector
/* lane i of the result = the sum of a[i]'s 16 lanes: four rounds of pairwise
 * shuffle-and-add instead of 16 horizontal sums (45 operations against ~130). */
static inline v16 reduce16(const v16 *a)
{
    v16 c[8], d[4], e[2];
    for (int i = 0; i < 8; i++)
        c[i] = SV(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
               + SV(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        d[i] = SV(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
               + SV(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        e[i] = SV(d[2 * i], d[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
               + SV(d[2 * i], d[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SV(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
           + SV(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* Softmax numerators of each score row r (token r / per) over the keys it sees, 0 to
 * p0 + r / per, in place, zero beyond; sums[r] gets the row's denominator. */
static inline void softmax_rows(float *buf, int R, int L, int p0, int per, float *sums)
{
    for (int r = 0; r < R; r++) {
        float *row = buf + (int64_t)r * L;
        const int lim = p0 + r / per + 1;
        float m = row[0];
        for (int j = 1; j < lim; j++) m = row[j] > m ? row[j] : m;
        float sum = 0.f;
        for (int j = 0; j < lim; j++) {
            row[j] = expf(row[j] - m);
            sum += row[j];
        }
        for (int j = lim; j < L; j++) row[j] = 0.f;
        sums[r] = sum;
    }
}

/* The scores and the weighted sum for head_dim 64 and a constant number of query rows,
 * with the queries and the accumulators held in registers. Keys/values 0..P-1 are read
 * from the shared prefix (pk, pv), the rest from the slot's own cache (K, V); the keys
 * are visited in the same order either way, so the sums are the same. */
static inline __attribute__((always_inline)) void block64(
    const int R, const float *const *qr, const float *pk, const float *pv, int P,
    const float *K, const float *V, int L, int p0, int per, float scale, float *buf,
    float **dst)
{
    v16 qv[R][4], acc[R][4];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) qv[r][i] = ld(qr[r] + 16 * i), acc[r][i] = (v16){0};
    for (int seg = 0; seg < 2; seg++) {
        const int off = seg ? P : 0, n = seg ? L - P : P;
        const float *Ks = seg ? K + (int64_t)P * 64 : pk, *Vs = seg ? V + (int64_t)P * 64 : pv;
        /* Every score comes out of reduce16, a partial last block padded with zeros, so
         * a key's score does not depend on where a block starts. */
        for (int j0 = 0; j0 < n; j0 += 16) {
            const int m = n - j0 < 16 ? n - j0 : 16;
            v16 t[R][16];
            for (int jj = 0; jj < 16; jj++) {
                if (jj >= m) {
                    for (int r = 0; r < R; r++) t[r][jj] = (v16){0};
                    continue;
                }
                const float *kj = Ks + (int64_t)(j0 + jj) * 64;
                const v16 k0 = ld(kj), k1 = ld(kj + 16), k2 = ld(kj + 32), k3 = ld(kj + 48);
                /* Fetch ahead: these keys 8 rows on, and the values the second pass reads;
                 * with both streams in flight the pass runs near the memory's rate
                 * (measured: 26 -> 20 ms a step, against 19 ms for reading the bytes). */
                for (int i = 0; i < 64; i += 16) {
                    __builtin_prefetch(kj + 8 * 64 + i);
                    __builtin_prefetch(Vs + (int64_t)(j0 + jj) * 64 + i);
                }
                for (int r = 0; r < R; r++)
                    t[r][jj] = qv[r][0] * k0 + qv[r][1] * k1 + qv[r][2] * k2 + qv[r][3] * k3;
            }
            for (int r = 0; r < R; r++) {
                const v16 sc = reduce16(t[r]) * scale;
                float *o = buf + (int64_t)r * L + off + j0;
                if (m == 16)
                    st(o, sc);
                else
                    for (int i = 0; i < m; i++) o[i] = sc[i];
            }
        }
    }
    float sums[R];
    softmax_rows(buf, R, L, p0, per, sums);
    for (int seg = 0; seg < 2; seg++) {
        const int off = seg ? P : 0, n = seg ? L - P : P;
        const float *Vs = seg ? V + (int64_t)P * 64 : pv;
        for (int j = 0; j < n; j++) {
            const float *vj = Vs + (int64_t)j * 64;
            const v16 v0 = ld(vj), v1 = ld(vj + 16), v2 = ld(vj + 32), v3 = ld(vj + 48);
            for (int r = 0; r < R; r++) {
                const float w = buf[(int64_t)r * L + off + j];
                acc[r][0] += w * v0, acc[r][1] += w * v1, acc[r][2] += w * v2,
                    acc[r][3] += w * v3;
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const float inv = 1.f / sums[r];
        for (int i = 0; i < 4; i++) st(dst[r] + 16 * i, acc[r][i] * inv);
    }
}

int distillery_decode_attention(
    const float *q, int64_t q_stride,
    const float *k_new, int64_t k_stride,
    const float *v_new, int64_t v_stride,
    float *k_cache, float *v_cache, int64_t max_len,
    const int32_t *row_start, const int32_t *pos,
    const float *prefix_k, const float *prefix_v, int P,
    float *out,
    int n_slots, int heads, int kv_heads, int d, float scale, int threads)
{
    const int per = heads / kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *buf = NULL, *acc = NULL;
        size_t buf_cap = 0, acc_cap = 0;
#pragma omp for schedule(dynamic, 2)
        for (int64_t t = 0; t < (int64_t)n_slots * kv_heads; t++) {
            const int s = (int)(t / kv_heads), h = (int)(t % kv_heads);
            const int r0 = row_start[s], cnt = row_start[s + 1] - r0, p0 = pos[s];
            if (cnt <= 0 || p0 + cnt > max_len || p0 < P) continue;
            float *K = k_cache + ((int64_t)s * kv_heads + h) * max_len * d;
            float *V = v_cache + ((int64_t)s * kv_heads + h) * max_len * d;
            /* this head's shared prefix, or the slot's own copy of it */
            const float *pk = P ? prefix_k + (int64_t)h * P * d : K;
            const float *pv = P ? prefix_v + (int64_t)h * P * d : V;
            for (int j = 0; j < cnt; j++) {
                memcpy(K + (int64_t)(p0 + j) * d, k_new + (int64_t)(r0 + j) * k_stride + h * d,
                       sizeof(float) * d);
                memcpy(V + (int64_t)(p0 + j) * d, v_new + (int64_t)(r0 + j) * v_stride + h * d,
                       sizeof(float) * d);
            }
            const int L = p0 + cnt, R = cnt * per;
            if (buf_cap < (size_t)R * L) {
                free(buf);
                buf_cap = (size_t)R * L * 2;
                buf = malloc(sizeof(float) * buf_cap);
            }
            if (acc_cap < (size_t)R * d) {
                free(acc);
                acc_cap = (size_t)R * d;
                acc = malloc(sizeof(float) * acc_cap);
            }
            if (!buf || !acc) {
                failed = 1;
                continue;
            }
            if (d == 64 && R <= MAX_ROWS) {
                const float *qr[MAX_ROWS];
                float *dst[MAX_ROWS];
                for (int r = 0; r < R; r++) {
                    qr[r] = q + (int64_t)(r0 + r / per) * q_stride + (int64_t)(h * per + r % per) * d;
                    dst[r] = out + ((int64_t)(r0 + r / per) * heads + h * per + r % per) * d;
                }
#define CASE(n) case n: block64(n, qr, pk, pv, P, K, V, L, p0, per, scale, buf, dst); break;
                switch (R) {
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
                CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
                }
#undef CASE
                continue;
            }
            /* scores: row r = token r / per, query head h * per + r % per */
            for (int j = 0; j < L; j++) {
                const float *kj = (j < P ? pk : K) + (int64_t)j * d;
                for (int r = 0; r < R; r++) {
                    const float *qr = q + (int64_t)(r0 + r / per) * q_stride
                                      + (int64_t)(h * per + r % per) * d;
                    float dot = 0.f;
                    for (int x = 0; x < d; x++) dot += qr[x] * kj[x];
                    buf[(int64_t)r * L + j] = dot * scale;
                }
            }
            float sums[R];
            softmax_rows(buf, R, L, p0, per, sums);
            memset(acc, 0, sizeof(float) * R * d);
            for (int j = 0; j < L; j++) {
                const float *vj = (j < P ? pv : V) + (int64_t)j * d;
                for (int r = 0; r < R; r++) {
                    const float w = buf[(int64_t)r * L + j];
                    float *a = acc + (int64_t)r * d;
                    for (int x = 0; x < d; x++) a[x] += w * vj[x];
                }
            }
            for (int r = 0; r < R; r++) {
                float *o = out + ((int64_t)(r0 + r / per) * heads + h * per + r % per) * d;
                const float inv = 1.f / sums[r];
                for (int x = 0; x < d; x++) o[x] = acc[(int64_t)r * d + x] * inv;
            }
        }
        free(buf);
        free(acc);
    }
    return failed ? -1 : 0;
}
