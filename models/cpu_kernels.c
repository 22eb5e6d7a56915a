/* Row-wise and element-wise fp32 kernels for the eager CPU training step (models/cpu_kernels.py builds and
 * loads this file; the Python side owns shapes, contiguity and autograd).
 *
 * Why: in Paddle 3.3's CPU build the backward of LayerNorm is a serial loop, exact GELU goes through serial
 * loops around MKL's vsErf, and the bias gradient of a broadcast add is a slow column reduction; together
 * they cost a ViT-B/16 step several hundred ms (benchmarks/elementwise_speed.py). These kernels compute the
 * same formulas, vectorised by the compiler and split over the OpenMP threads Paddle already uses (GNU
 * libgomp: Paddle sets its thread count with set_num_threads, MKL runs on the same runtime).
 *
 * Formulas (fp32 in and out; sums inside a row accumulate in double, so the order of the float terms does
 * not matter for the result beyond rounding):
 *   GELU (exact):  y = x * Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2;  dy/dx = Phi(x) + x * phi(x)
 *   LayerNorm over the last axis (rows x cols), xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps):
 *     dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w;  dw = sum_rows dy * xhat;  db = sum dy
 *   softmax over the last axis: dx = y * (dy - sum(dy * y))
 *   bias add y = x + b (b over the last axis): db = sum_rows dy
 * Column sums (dw, db) accumulate in double too, per thread over a contiguous block of rows and then added block by block
 * in a fixed order, so a given thread count gives the same bits on every call (a block is one part of the
 * rows, whichever thread the runtime gives it).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* glibc >= 2.35 has SIMD versions of erff and expf (libmvec); its math.h declares them only under -ffast-math,
 * which would also drop IEEE semantics (NaN, Inf) everywhere, so they are declared here instead. */
#ifdef RF_LIBMVEC
float erff(float) __attribute__((__simd__("notinbranch")));
float expf(float) __attribute__((__simd__("notinbranch")));
#endif

/* Below this many elements a kernel runs on the calling thread: waking the other threads costs more. */
#define RF_PARALLEL_MIN ((int64_t)1 << 15)

#define RF_SQRT1_2 0.70710678118654752440f
#define RF_INV_SQRT_2PI 0.39894228040143267794f

int rf_abi_version(void) { return 6; }

int rf_max_threads(void) { return omp_get_max_threads(); }

static inline float rf_gelu(float v) { return 0.5f * v * (1.0f + erff(v * RF_SQRT1_2)); }

/* dGELU/dv = Phi(v) + v phi(v) */
static inline float rf_gelu_grad(float v) {
    float cdf = 0.5f * (1.0f + erff(v * RF_SQRT1_2));
    float pdf = RF_INV_SQRT_2PI * expf(-0.5f * v * v);
    return cdf + v * pdf;
}

void rf_gelu_fwd(const float *restrict x, float *restrict y, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= RF_PARALLEL_MIN)
    for (int64_t i = 0; i < n; ++i) y[i] = rf_gelu(x[i]);
}

void rf_gelu_bwd(const float *restrict x, const float *restrict dy, float *restrict dx, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= RF_PARALLEL_MIN)
    for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * rf_gelu_grad(x[i]);
}

/* The rows [lo, hi) a thread takes when `rows` are split into `parts` contiguous blocks. */
static void rf_block(int64_t rows, int parts, int part, int64_t *lo, int64_t *hi) {
    int64_t base = rows / parts, extra = rows % parts;
    *lo = part * base + (part < extra ? part : extra);
    *hi = *lo + base + (part < extra ? 1 : 0);
}

/* Adds per-block partial column sums (parts x cols, block order) into out (cols). */
static void rf_reduce_parts(const double *parts_buf, int parts, int64_t cols, float *restrict out) {
    for (int64_t c = 0; c < cols; ++c) {
        double s = 0.0;
        for (int p = 0; p < parts; ++p) s += parts_buf[(int64_t)p * cols + c];
        out[c] = (float)s;
    }
}

/* LayerNorm forward over the last axis: y = (x - mean) * rstd * w + b, mean and variance summed in double. */
void rf_layer_norm_fwd(const float *restrict x, const float *restrict w, const float *restrict b,
                       float *restrict y, int64_t rows, int64_t cols, float eps) {
#pragma omp parallel for schedule(static) if (rows * cols >= RF_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        double s = 0.0, ss = 0.0;
#pragma omp simd reduction(+:s)
        for (int64_t c = 0; c < cols; ++c) s += xr[c];
        double mean = s / (double)cols;
#pragma omp simd reduction(+:ss)
        for (int64_t c = 0; c < cols; ++c) { double d = xr[c] - mean; ss += d * d; }
        float rstd = (float)(1.0 / sqrt(ss / (double)cols + (double)eps)), fmean = (float)mean;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] - fmean) * rstd * w[c] + b[c];
    }
}

/* Returns 0, or -1 when the scratch memory could not be allocated (nothing written then). */
int rf_layer_norm_bwd(const float *restrict x, const float *restrict w, const float *restrict dy,
                      float *restrict dx, float *restrict dw, float *restrict db,
                      int64_t rows, int64_t cols, float eps) {
    int parts = rows * cols >= RF_PARALLEL_MIN ? omp_get_max_threads() : 1;
    if (parts > rows) parts = rows > 0 ? (int)rows : 1;
    double *scratch = (double *)calloc((size_t)parts * (size_t)(2 * cols), sizeof(double));
    float *xhat_rows = (float *)malloc((size_t)parts * (size_t)cols * sizeof(float));  /* a row per part */
    if (!scratch || !xhat_rows) { free(scratch); free(xhat_rows); return -1; }
    double *dw_parts = scratch, *db_parts = scratch + (int64_t)parts * cols;
#pragma omp parallel num_threads(parts)
    for (int part = omp_get_thread_num(); part < parts; part += omp_get_num_threads()) {
        int64_t lo, hi;
        rf_block(rows, parts, part, &lo, &hi);
        double *pdw = dw_parts + (int64_t)part * cols, *pdb = db_parts + (int64_t)part * cols;
        float *xhat = xhat_rows + (int64_t)part * cols;
        for (int64_t r = lo; r < hi; ++r) {
            const float *xr = x + r * cols, *gr = dy + r * cols;
            float *dxr = dx + r * cols;
            double s = 0.0, ss = 0.0;
            for (int64_t c = 0; c < cols; ++c) s += xr[c];
            double mean = s / (double)cols;
            for (int64_t c = 0; c < cols; ++c) { double d = xr[c] - mean; ss += d * d; }
            float rstd = (float)(1.0 / sqrt(ss / (double)cols + (double)eps));
            float fmean = (float)mean;
            double sg = 0.0, sgx = 0.0;
#pragma omp simd reduction(+:sg, sgx)
            for (int64_t c = 0; c < cols; ++c) {
                float xh = (xr[c] - fmean) * rstd;
                float g = gr[c] * w[c];
                xhat[c] = xh;
                sg += g;
                sgx += g * xh;
                pdw[c] += gr[c] * xh;
                pdb[c] += gr[c];
            }
            float mg = (float)(sg / (double)cols), mgx = (float)(sgx / (double)cols);
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c)
                dxr[c] = rstd * (gr[c] * w[c] - mg - xhat[c] * mgx);
        }
    }
    rf_reduce_parts(dw_parts, parts, cols, dw);
    rf_reduce_parts(db_parts, parts, cols, db);
    free(scratch);
    free(xhat_rows);
    return 0;
}

/* One row of softmax, `in` to `out` (the same pointer for in place). */
static void rf_softmax_row(const float *in, float *out, int64_t cols) {
    float m = -INFINITY;
#pragma omp simd reduction(max:m)
    for (int64_t c = 0; c < cols; ++c) m = in[c] > m ? in[c] : m;
    double s = 0.0;
#pragma omp simd reduction(+:s)
    for (int64_t c = 0; c < cols; ++c) {
        float e = expf(in[c] - m);
        out[c] = e;
        s += e;
    }
    float inv = (float)(1.0 / s);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) out[c] *= inv;
}

void rf_softmax_fwd(const float *x, float *y, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= RF_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) rf_softmax_row(x + r * cols, y + r * cols, cols);
}

/* One row of the softmax gradient: dx = y * (dy - sum(dy * y)) (dx may be dy, for in place). */
static void rf_softmax_grad_row(const float *y, const float *dy, float *dx, int64_t cols) {
    double s = 0.0;
#pragma omp simd reduction(+:s)
    for (int64_t c = 0; c < cols; ++c) s += dy[c] * y[c];
    float fs = (float)s;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) dx[c] = y[c] * (dy[c] - fs);
}

void rf_softmax_bwd(const float *y, const float *dy, float *dx, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= RF_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) rf_softmax_grad_row(y + r * cols, dy + r * cols, dx + r * cols, cols);
}

/* y = x + b, or y = r + (x + b) with a residual r (NULL for none): the sum rounded as the two adds would be. */
void rf_bias_add(const float *restrict x, const float *restrict b, const float *restrict r, float *restrict y,
                 int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= RF_PARALLEL_MIN)
    for (int64_t i = 0; i < rows; ++i) {
        const float *xr = x + i * cols;
        float *yr = y + i * cols;
        if (r) {
            const float *rr = r + i * cols;
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) yr[c] = rr[c] + (xr[c] + b[c]);
        } else {
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) yr[c] = xr[c] + b[c];
        }
    }
}

/* The epilogue of a Linear followed by exact GELU: z = x + b, y = GELU(z), the same two roundings as the
 * bias add and rf_gelu_fwd. With keep set, z is written over x (the backward's input). */
void rf_bias_gelu_fwd(float *restrict x, const float *restrict b, float *restrict y, int64_t rows, int64_t cols,
                      int keep) {
#pragma omp parallel for schedule(static) if (rows * cols >= RF_PARALLEL_MIN)
    for (int64_t i = 0; i < rows; ++i) {
        float *xr = x + i * cols, *yr = y + i * cols;
        if (keep) {
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) {
                float z = xr[c] + b[c];
                xr[c] = z;
                yr[c] = rf_gelu(z);
            }
        } else {
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) {
                float z = xr[c] + b[c];
                yr[c] = rf_gelu(z);
            }
        }
    }
}

/* Column sums of g (rows x cols) in double, per block of rows, the blocks added in a fixed order. With z set, the
 * summed values are g * GELU'(z), also written to dz (the backward of rf_bias_gelu_fwd from z: dz and the bias
 * gradient in one sweep, the same values and order as rf_gelu_bwd followed by the plain sums). Returns 0, or -1
 * when the scratch memory could not be allocated. */
static int rf_column_sums(const float *restrict g, const float *restrict z, float *restrict dz, float *restrict out,
                          int64_t rows, int64_t cols) {
    int parts = rows * cols >= RF_PARALLEL_MIN ? omp_get_max_threads() : 1;
    if (parts > rows) parts = rows > 0 ? (int)rows : 1;
    double *parts_buf = (double *)calloc((size_t)parts * (size_t)cols, sizeof(double));
    if (!parts_buf) return -1;
#pragma omp parallel num_threads(parts)
    for (int part = omp_get_thread_num(); part < parts; part += omp_get_num_threads()) {
        int64_t lo, hi;
        rf_block(rows, parts, part, &lo, &hi);
        double *acc = parts_buf + (int64_t)part * cols;
        for (int64_t r = lo; r < hi; ++r) {
            const float *gr = g + r * cols;
            if (z) {
                const float *zr = z + r * cols;
                float *dzr = dz + r * cols;
#pragma omp simd
                for (int64_t c = 0; c < cols; ++c) {
                    float v = gr[c] * rf_gelu_grad(zr[c]);
                    dzr[c] = v;
                    acc[c] += v;
                }
            } else {
#pragma omp simd
                for (int64_t c = 0; c < cols; ++c) acc[c] += gr[c];
            }
        }
    }
    rf_reduce_parts(parts_buf, parts, cols, out);
    free(parts_buf);
    return 0;
}

int rf_bias_gelu_bwd(const float *restrict z, const float *restrict dy, float *restrict dz, float *restrict db,
                     int64_t rows, int64_t cols) {
    return rf_column_sums(dy, z, dz, db, rows, cols);
}

int rf_column_sum(const float *restrict g, float *restrict out, int64_t rows, int64_t cols) {
    return rf_column_sums(g, 0, 0, out, rows, cols);
}

/* ---------------------------------------------------------------------------------------------- attention
 * softmax(scale * q k^T) v for every (batch, head), read straight from the qkv projection's output
 * [B, N, 3, H, Dh] and written straight into [B, N, H * Dh]: the products take the row strides (3 * C for q,
 * k, v; C for the output), so no head is ever transposed or copied. The products are the BLAS's cblas_sgemm
 * (the MKL Paddle itself calls; Python hands its address to rf_set_sgemm), one (batch, head) per OpenMP
 * iteration; MKL runs single-threaded inside a parallel region. `probs` [B, H, N, N] keeps the softmax for
 * the backward pass (as the plain formulation does). */
typedef void (*rf_sgemm_fn)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);
static rf_sgemm_fn rf_sgemm = 0;
enum { RF_ROW_MAJOR = 101, RF_NO_TRANS = 111, RF_TRANS = 112 };

void rf_set_sgemm(void *fn) { rf_sgemm = (rf_sgemm_fn)fn; }

/* Returns 0, -1 when no sgemm was set, -2 out of memory. `probs` NULL: the weights are not kept (inference);
 * each thread then reuses one N x N block, which stays in its cache. */
int rf_attention_fwd(const float *qkv, float *probs, float *out, int64_t B, int64_t N, int64_t H,
                     int64_t Dh, float scale) {
    if (!rf_sgemm) return -1;
    const int64_t C = H * Dh, ld = 3 * C;
    int failed = 0;
#pragma omp parallel if (B * H * N * N >= RF_PARALLEL_MIN)
    {
        float *own = probs ? 0 : (float *)malloc((size_t)(N * N) * sizeof(float));
        if (!probs && !own) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            if (!probs && !own) continue;
            int64_t b = bh / H, h = bh % H;
            const float *q = qkv + b * N * ld + h * Dh, *k = q + C, *v = q + 2 * C;
            float *p = probs ? probs + bh * N * N : own;
            rf_sgemm(RF_ROW_MAJOR, RF_NO_TRANS, RF_TRANS, (int)N, (int)N, (int)Dh, scale, q, (int)ld, k, (int)ld,
                     0.0f, p, (int)N);
            for (int64_t r = 0; r < N; ++r) rf_softmax_row(p + r * N, p + r * N, N);
            rf_sgemm(RF_ROW_MAJOR, RF_NO_TRANS, RF_NO_TRANS, (int)N, (int)Dh, (int)N, 1.0f, p, (int)N, v, (int)ld,
                     0.0f, out + b * N * C + h * Dh, (int)C);
        }
        free(own);
    }
    return failed ? -2 : 0;
}

/* d_out [B, N, C] -> d_qkv [B, N, 3, H, Dh]. Returns 0, -1 when no sgemm was set, -2 out of memory. */
int rf_attention_bwd(const float *qkv, const float *probs, const float *d_out, float *d_qkv, int64_t B,
                     int64_t N, int64_t H, int64_t Dh, float scale) {
    if (!rf_sgemm) return -1;
    const int64_t C = H * Dh, ld = 3 * C;
    int failed = 0;
#pragma omp parallel if (B * H * N * N >= RF_PARALLEL_MIN)
    {
        float *ds = (float *)malloc((size_t)(N * N) * sizeof(float));  /* this thread's dP, then dS */
        if (!ds) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            if (!ds) continue;
            int64_t b = bh / H, h = bh % H;
            const float *q = qkv + b * N * ld + h * Dh, *k = q + C, *v = q + 2 * C;
            float *dq = d_qkv + b * N * ld + h * Dh, *dk = dq + C, *dv = dq + 2 * C;
            const float *p = probs + bh * N * N, *dout = d_out + b * N * C + h * Dh;
            /* dV = P^T dO;  dP = dO V^T */
            rf_sgemm(RF_ROW_MAJOR, RF_TRANS, RF_NO_TRANS, (int)N, (int)Dh, (int)N, 1.0f, p, (int)N, dout,
                     (int)C, 0.0f, dv, (int)ld);
            rf_sgemm(RF_ROW_MAJOR, RF_NO_TRANS, RF_TRANS, (int)N, (int)N, (int)Dh, 1.0f, dout, (int)C, v,
                     (int)ld, 0.0f, ds, (int)N);
            /* dS = P * (dP - rowsum(dP * P)) */
            for (int64_t r = 0; r < N; ++r) rf_softmax_grad_row(p + r * N, ds + r * N, ds + r * N, N);
            /* dQ = scale dS K;  dK = scale dS^T Q */
            rf_sgemm(RF_ROW_MAJOR, RF_NO_TRANS, RF_NO_TRANS, (int)N, (int)Dh, (int)N, scale, ds, (int)N, k,
                     (int)ld, 0.0f, dq, (int)ld);
            rf_sgemm(RF_ROW_MAJOR, RF_TRANS, RF_NO_TRANS, (int)N, (int)Dh, (int)N, scale, ds, (int)N, q,
                     (int)ld, 0.0f, dk, (int)ld);
        }
        free(ds);
    }
    return failed ? -2 : 0;
}

/* ------------------------------------------------------------------------------ depthwise convolution
 * A k x k depthwise convolution (one filter per channel), stride 1, zero padding (k - 1) / 2 ("same"), NCHW,
 * as ConvNeXt's 7 x 7 one. Per channel (the OpenMP iterations; every batch image of it in one thread, so the
 * filter's gradient needs no cross-thread sum):
 *   forward   y[i][j]  = b + sum_{u,v} w[u][v] x[i+u-p][j+v-p]
 *   backward  dx[i][j] = sum_{u,v} w[u][v] dy[i-u+p][j-v+p]  (the forward with the filter turned by 180 deg)
 *             dw[u][v] = sum_{n,i,j} dy[i][j] x[i+u-p][j+v-p],  db = sum dy
 * The inner loops run along a row, so they vectorise. */

/* out (H x W) += correlation of `in` (H x W, zero outside) with the k x k filter `w`; with `flip`, with the
 * filter turned by 180 degrees (source row i - u + p for filter row u: the backward pass to the input). */
static void rf_plane_corr(const float *restrict in, float *restrict out, const float *w, int64_t H, int64_t W,
                          int64_t k, int flip) {
    const int64_t p = (k - 1) / 2;
    for (int64_t i = 0; i < H; ++i) {
        float *orow = out + i * W;
        for (int64_t u = 0; u < k; ++u) {
            int64_t si = flip ? i - u + p : i + u - p;
            if (si < 0 || si >= H) continue;
            const float *irow = in + si * W;
            for (int64_t v = 0; v < k; ++v) {
                float wv = w[u * k + v];
                /* the columns j whose source column j + (v - p) (or j - (v - p)) is inside the row */
                int64_t off = flip ? p - v : v - p;
                int64_t lo = off < 0 ? -off : 0, hi = off > 0 ? W - off : W;
#pragma omp simd
                for (int64_t j = lo; j < hi; ++j) orow[j] += wv * irow[j + off];
            }
        }
    }
}

void rf_dwconv_fwd(const float *x, const float *w, const float *b, float *y, int64_t N, int64_t C, int64_t H,
                   int64_t W, int64_t k) {
    const int64_t plane = H * W;
#pragma omp parallel for schedule(static) if (N * C * plane >= RF_PARALLEL_MIN)
    for (int64_t c = 0; c < C; ++c) {
        for (int64_t n = 0; n < N; ++n) {
            float *out = y + (n * C + c) * plane;
            float bias = b ? b[c] : 0.0f;
            for (int64_t t = 0; t < plane; ++t) out[t] = bias;
            rf_plane_corr(x + (n * C + c) * plane, out, w + c * k * k, H, W, k, 0);
        }
    }
}

/* dx and db may be NULL (not wanted). */
void rf_dwconv_bwd(const float *x, const float *w, const float *dy, float *dx, float *dw, float *db, int64_t N,
                   int64_t C, int64_t H, int64_t W, int64_t k) {
    const int64_t plane = H * W, p = (k - 1) / 2;
#pragma omp parallel for schedule(static) if (N * C * plane >= RF_PARALLEL_MIN)
    for (int64_t c = 0; c < C; ++c) {
        double acc[k * k];
        double bsum = 0.0;
        for (int64_t t = 0; t < k * k; ++t) acc[t] = 0.0;
        for (int64_t n = 0; n < N; ++n) {
            const float *g = dy + (n * C + c) * plane, *in = x + (n * C + c) * plane;
            if (dx) {
                float *out = dx + (n * C + c) * plane;
                for (int64_t t = 0; t < plane; ++t) out[t] = 0.0f;
                rf_plane_corr(g, out, w + c * k * k, H, W, k, 1);
            }
            if (db) {
                double s = 0.0;
#pragma omp simd reduction(+:s)
                for (int64_t t = 0; t < plane; ++t) s += g[t];
                bsum += s;
            }
            for (int64_t u = 0; u < k; ++u) {
                for (int64_t v = 0; v < k; ++v) {
                    int64_t di = u - p, dj = v - p;
                    int64_t ilo = di < 0 ? -di : 0, ihi = di > 0 ? H - di : H;
                    int64_t jlo = dj < 0 ? -dj : 0, jhi = dj > 0 ? W - dj : W;
                    double s = 0.0;
                    for (int64_t i = ilo; i < ihi; ++i) {
                        const float *grow = g + i * W, *irow = in + (i + di) * W + dj;
                        float rs = 0.0f;
#pragma omp simd reduction(+:rs)
                        for (int64_t j = jlo; j < jhi; ++j) rs += grow[j] * irow[j];
                        s += rs;
                    }
                    acc[u * k + v] += s;
                }
            }
        }
        for (int64_t t = 0; t < k * k; ++t) dw[c * k * k + t] = (float)acc[t];
        if (db) db[c] = (float)bsum;
    }
}

/* ------------------------------------------------------------------------ channels-first LayerNorm
 * LayerNorm over the channels of an NCHW map (ConvNeXt's stem and downsampling layers): for every image n and
 * position p (P = H * W), over c: xhat = (x - mean) * rstd, y = w[c] xhat + b[c]; the backward as the row
 * LayerNorm's, with dw, db summed over images and positions. The loops over c stride by P; the inner loops run
 * over contiguous positions, so they vectorise. mean and rstd [N, P] are kept for the backward pass. Work is
 * split by image (images per part in a fixed order, so the column sums have a fixed order too). */
void rf_cf_layer_norm_fwd(const float *x, const float *w, const float *b, float *y, float *mean_out,
                          float *rstd_out, int64_t N, int64_t C, int64_t P, float eps) {
#pragma omp parallel for schedule(static) if (N * C * P >= RF_PARALLEL_MIN)
    for (int64_t n = 0; n < N; ++n) {
        const float *xn = x + n * C * P;
        float *yn = y + n * C * P, *mean = mean_out + n * P, *rstd = rstd_out + n * P;
        for (int64_t p = 0; p < P; ++p) mean[p] = 0.0f;
        for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) mean[p] += xn[c * P + p];
        }
        for (int64_t p = 0; p < P; ++p) { mean[p] /= (float)C; rstd[p] = 0.0f; }
        for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) { float d = xn[c * P + p] - mean[p]; rstd[p] += d * d; }
        }
        for (int64_t p = 0; p < P; ++p) rstd[p] = 1.0f / sqrtf(rstd[p] / (float)C + eps);
        for (int64_t c = 0; c < C; ++c) {
            float wc = w[c], bc = b[c];
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) yn[c * P + p] = (xn[c * P + p] - mean[p]) * rstd[p] * wc + bc;
        }
    }
}

/* Returns 0, or -1 when the scratch memory could not be allocated. */
int rf_cf_layer_norm_bwd(const float *x, const float *w, const float *mean_in, const float *rstd_in,
                         const float *dy, float *dx, float *dw, float *db, int64_t N, int64_t C, int64_t P) {
    int parts = N * C * P >= RF_PARALLEL_MIN ? omp_get_max_threads() : 1;
    if (parts > N) parts = N > 0 ? (int)N : 1;
    double *scratch = (double *)calloc((size_t)parts * (size_t)(2 * C), sizeof(double));
    float *rows = (float *)malloc((size_t)parts * (size_t)(2 * P) * sizeof(float));
    if (!scratch || !rows) { free(scratch); free(rows); return -1; }
#pragma omp parallel num_threads(parts)
    for (int part = omp_get_thread_num(); part < parts; part += omp_get_num_threads()) {
        int64_t lo, hi;
        rf_block(N, parts, part, &lo, &hi);
        double *pdw = scratch + (int64_t)part * 2 * C, *pdb = pdw + C;
        float *mg = rows + (int64_t)part * 2 * P, *mgx = mg + P;   /* mean over c of g and of g * xhat */
        for (int64_t n = lo; n < hi; ++n) {
            const float *xn = x + n * C * P, *gn = dy + n * C * P, *mean = mean_in + n * P, *rstd = rstd_in + n * P;
            float *dxn = dx ? dx + n * C * P : 0;
            for (int64_t p = 0; p < P; ++p) { mg[p] = 0.0f; mgx[p] = 0.0f; }
            for (int64_t c = 0; c < C; ++c) {
                float wc = w[c];
                double sw = 0.0, sb = 0.0;
#pragma omp simd reduction(+:sw, sb)
                for (int64_t p = 0; p < P; ++p) {
                    float xh = (xn[c * P + p] - mean[p]) * rstd[p], g = gn[c * P + p];
                    mg[p] += g * wc;
                    mgx[p] += g * wc * xh;
                    sw += g * xh;
                    sb += g;
                }
                pdw[c] += sw;
                pdb[c] += sb;
            }
            if (!dxn) continue;
            for (int64_t p = 0; p < P; ++p) { mg[p] /= (float)C; mgx[p] /= (float)C; }
            for (int64_t c = 0; c < C; ++c) {
                float wc = w[c];
#pragma omp simd
                for (int64_t p = 0; p < P; ++p) {
                    float xh = (xn[c * P + p] - mean[p]) * rstd[p];
                    dxn[c * P + p] = rstd[p] * (gn[c * P + p] * wc - mg[p] - xh * mgx[p]);
                }
            }
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        double sw = 0.0, sb = 0.0;
        for (int p = 0; p < parts; ++p) { sw += scratch[(int64_t)p * 2 * C + c]; sb += scratch[(int64_t)p * 2 * C + C + c]; }
        dw[c] = (float)sw;
        db[c] = (float)sb;
    }
    free(scratch);
    free(rows);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- patches
 * A ViT's patch embedding (a p x p convolution with stride p) as rows for one matrix product: image
 * [B, C, H, W] -> [B, (H/p) (W/p), C p p], a row per patch in row-major grid order, its columns in the order
 * of the convolution weight [D, C, p, p] flattened. Every pixel lands in exactly one row, so the backward is
 * the inverse copy (`inverse` set: rows -> image). */
void rf_patchify(float *x, float *rows, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p, int inverse) {
    const int64_t gh = H / p, gw = W / p, width = C * p * p;
#pragma omp parallel for schedule(static) if (B * C * H * W >= RF_PARALLEL_MIN)
    for (int64_t bg = 0; bg < B * gh; ++bg) {
        int64_t b = bg / gh, gi = bg % gh;
        for (int64_t gj = 0; gj < gw; ++gj) {
            float *row = rows + (b * gh * gw + gi * gw + gj) * width;
            for (int64_t c = 0; c < C; ++c)
                for (int64_t i = 0; i < p; ++i) {
                    float *pix = x + ((b * C + c) * H + gi * p + i) * W + gj * p;
                    float *col = row + (c * p + i) * p;
                    if (inverse) memcpy(pix, col, (size_t)p * sizeof(float));
                    else memcpy(col, pix, (size_t)p * sizeof(float));
                }
        }
    }
}
