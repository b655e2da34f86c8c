/* The small per-layer operations of a decode step, fused: a decode step at tens of rows
 * spends about a seventh of its time in a dozen elementwise torch calls per block
 * (RMSNorm alone is seven), each a pass over memory plus dispatch.
 *
 * Compiled WITHOUT -ffast-math and with -ffp-contract=off, so every product and sum is
 * rounded as torch rounds it: RoPE and the residual add give torch's bits exactly; RMSNorm
 * differs only in the order its sum of squares is added up (as a matrix product of
 * another shape does).
 */
#include <math.h>
#include <stdint.h>

/* x[r] += delta[r] (when delta is not NULL), then
 * out[r] = w * (x[r] * (1 / sqrt(mean(x[r]^2) + eps)))   -- LlamaRMSNorm, op for op. */
void distillery_add_rms_norm(float *x, const float *delta, const float *w, float *out,
                             int64_t rows, int64_t dim, float eps, int threads)
{
#pragma omp parallel for num_threads(threads) if (rows * dim >= 262144) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * dim;
        float *o = out + r * dim;
        if (delta) {
            const float *dr = delta + r * dim;
            for (int64_t i = 0; i < dim; i++) xr[i] = xr[i] + dr[i];
        }
        /* 16 partial sums, then a pairwise tree: vectorises without reassociating
         * anything the compiler is not told to. */
        float part[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16)
            for (int l = 0; l < 16; l++) part[l] += xr[i + l] * xr[i + l];
        for (int l = 0; i < dim; i++, l++) part[l] += xr[i] * xr[i];
        for (int s = 8; s >= 1; s /= 2)
            for (int l = 0; l < s; l++) part[l] += part[l + s];
        const float var = part[0] / (float)dim;
        const float inv = 1.0f / sqrtf(var + eps);
        for (int64_t j = 0; j < dim; j++) o[j] = w[j] * (xr[j] * inv);
    }
}

/* RoPE in place on x [rows, heads, d] (row stride row_stride): with h = d / 2,
 * x' = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[h:], x[:h]); cos/sin [rows, d]. */
void distillery_rope(float *x, int64_t row_stride, const float *cos_t, const float *sin_t,
                     int64_t rows, int64_t heads, int64_t d)
{
    const int64_t h = d / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_t + r * d, *s = sin_t + r * d;
        for (int64_t hd = 0; hd < heads; hd++) {
            float *v = x + r * row_stride + hd * d;
            float lo[h];
            for (int64_t i = 0; i < h; i++) lo[i] = v[i];
            for (int64_t i = 0; i < h; i++) v[i] = v[i] * c[i] + (-v[i + h]) * s[i];
            for (int64_t i = 0; i < h; i++) v[i + h] = v[i + h] * c[i + h] + lo[i] * s[i + h];
        }
    }
}
