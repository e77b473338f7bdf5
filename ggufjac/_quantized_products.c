/* Products of float32 activations with quantized weight rows, the weights dequantized in
 * registers and L1 cache a 256-value block at a time (never written out whole).
 *
 * W is [rows, cols] in one of the quantized types below, row-major (each row its blocks).
 *   forward:    out[t, r]  = sum_c W[r, c] x[t, c]          (x @ W.T)
 *   transposed: out[t, c] (+)= sum_r g[t, r] W[r, c]         (g @ W)
 * Each weight is dequantized with the same float32 operations, in the same order, as ggml's
 * dequantize_row_* (and gguf-py, and ggufjac/quants.py): d*sc and dmin*m are exact products of
 * a float16 and a 6- or 8-bit integer, so contracting `d1 * q - m1` into one fused multiply-add
 * rounds once either way, and Q6_K's (d * sc) * q has no addition to contract. The products
 * then differ from a dequantize-then-BLAS product only in the order of the float32 sums.
 *
 * Built as an optional extension (setup.py): target_clones compiles each kernel for AVX-512,
 * AVX2+FMA and the baseline, chosen once at load for the machine at hand. Called through
 * ctypes (quantized_products.py), which splits the work across threads.
 */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

enum { TYPE_Q8_0 = 8, TYPE_Q4_K = 12, TYPE_Q6_K = 14 };
#define QK 256 /* values dequantized at a time: a K-quant block, or eight Q8_0 blocks */
/* Tiles (measured with tools/bench_blocks.py on 70B-shaped matrices and 16 tokens): */
#define FR 4      /* forward: rows by FT tokens multiplied in registers */
#define FT 4
#define RB 8      /* transposed: rows added into each load and store of out */
#define TC 64     /* transposed: rows whose bytes stay in cache while out is swept */
#define SPAN 1024 /* transposed: columns of out swept at a time */

typedef float vf __attribute__((vector_size(64), aligned(4)));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
typedef uint8_t vb __attribute__((vector_size(16), aligned(1)));
typedef int8_t vs __attribute__((vector_size(16), aligned(1)));
typedef int32_t vi __attribute__((vector_size(64)));
/* 16 bytes from p, each widened to a 32-bit integer */
static inline vi bytes16(const uint8_t *p) { vb b; memcpy(&b, p, sizeof b); return __builtin_convertvector(b, vi); }
static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

static inline float f16(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0x1f) bits = sign | 0x7f800000u | (m << 13);         /* inf, nan */
    else if (e) bits = sign | ((e + 112) << 23) | (m << 13);        /* normal */
    else if (!m) bits = sign;                                       /* zero */
    else {                                                          /* subnormal: m * 2^-24 */
        float f = (float)m * 5.9604644775390625e-08f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static int block_bytes(int type) {
    switch (type) {
    case TYPE_Q8_0: return 8 * 34;
    case TYPE_Q4_K: return 144;
    case TYPE_Q6_K: return 210;
    default: return 0;
    }
}

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* 256 values of one row from the bytes `b` of its QK values */
static inline void dequantize(int type, const uint8_t *b, float *y) {
    if (type == TYPE_Q4_K) {
        const float d = f16(b), dmin = f16(b + 2);
        const uint8_t *scales = b + 4, *q = b + 16;
        for (int j = 0, is = 0; j < QK; j += 64, is += 2, q += 32) {
            uint8_t sc, m;
            scale_min_k4(is, scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(is + 1, scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l += 16) {
                const vi v = bytes16(q + l);
                store(y + j + l, d1 * __builtin_convertvector(v & 0xF, vf) - m1);
                store(y + j + 32 + l, d2 * __builtin_convertvector(v >> 4, vf) - m2);
            }
        }
    } else if (type == TYPE_Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = f16(b + 208);
        for (int n = 0; n < QK; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int h = 0; h < 2; h++) { /* values l in [16h, 16h + 16): scales h, h+2, h+4, h+6 */
                const float s1 = d * sc[h], s2 = d * sc[h + 2], s3 = d * sc[h + 4],
                            s4 = d * sc[h + 6];
                const vi lo = bytes16(ql + 16 * h), hi = bytes16(ql + 32 + 16 * h),
                         high = bytes16(qh + 16 * h);
                const vi q1 = ((lo & 0xF) | ((high & 3) << 4)) - 32;
                const vi q2 = ((hi & 0xF) | (((high >> 2) & 3) << 4)) - 32;
                const vi q3 = ((lo >> 4) | (((high >> 4) & 3) << 4)) - 32;
                const vi q4 = ((hi >> 4) | (((high >> 6) & 3) << 4)) - 32;
                store(y + 16 * h, s1 * __builtin_convertvector(q1, vf));
                store(y + 32 + 16 * h, s2 * __builtin_convertvector(q2, vf));
                store(y + 64 + 16 * h, s3 * __builtin_convertvector(q3, vf));
                store(y + 96 + 16 * h, s4 * __builtin_convertvector(q4, vf));
            }
        }
    } else { /* Q8_0: eight blocks of 32 */
        for (int k = 0; k < 8; k++, b += 34, y += 32) {
            const float d = f16(b);
            const int8_t *q = (const int8_t *)(b + 2);
            for (int l = 0; l < 32; l += 16) {
                vs b8;
                memcpy(&b8, q + l, sizeof b8);
                store(y + l, d * __builtin_convertvector(b8, vf));
            }
        }
    }
}

/* rows [r0, r1) of out[t, r] = sum_c W[r, c] x[t, c]; cols a multiple of QK. A tile of FR
 * rows by FT tokens is multiplied in registers (each load of W serves FT tokens, each load of
 * x FR rows); the tile's sums stay vectors in `acc` across blocks, reduced once at the end. */
CLONES
int quantized_forward(int type, const uint8_t *w, int64_t cols, int64_t r0, int64_t r1,
                      const float *x, int64_t n_tok, int64_t ldx, float *out, int64_t ldo) {
    const int64_t bb = block_bytes(type), row_bytes = cols / QK * bb;
    float wq[FR][QK] __attribute__((aligned(64)));
    vf *acc = aligned_alloc(64, (size_t)n_tok * FR * sizeof(vf));
    if (!acc) return -1;
    for (int64_t r = r0; r < r1; r += FR) {
        const int nr = (int)(r1 - r < FR ? r1 - r : FR);
        memset(acc, 0, n_tok * FR * sizeof(vf));
        for (int i = nr; i < FR; i++) memset(wq[i], 0, sizeof wq[i]);
        for (int64_t c = 0; c < cols; c += QK) {
            for (int i = 0; i < nr; i++)
                dequantize(type, w + (r + i) * row_bytes + c / QK * bb, wq[i]);
            int64_t t = 0;
            for (; t + FT <= n_tok; t += FT) {
                vf a[FT][FR];
                for (int u = 0; u < FT; u++)
                    for (int i = 0; i < FR; i++) a[u][i] = acc[(t + u) * FR + i];
                for (int k = 0; k < QK; k += 16) {
                    vf wv[FR];
                    for (int i = 0; i < FR; i++) wv[i] = load(wq[i] + k);
                    for (int u = 0; u < FT; u++) {
                        const vf xv = load(x + (t + u) * ldx + c + k);
                        for (int i = 0; i < FR; i++) a[u][i] += wv[i] * xv;
                    }
                }
                for (int u = 0; u < FT; u++)
                    for (int i = 0; i < FR; i++) acc[(t + u) * FR + i] = a[u][i];
            }
            for (; t < n_tok; t++) {
                vf a[FR];
                for (int i = 0; i < FR; i++) a[i] = acc[t * FR + i];
                for (int k = 0; k < QK; k += 16) {
                    const vf xv = load(x + t * ldx + c + k);
                    for (int i = 0; i < FR; i++) a[i] += load(wq[i] + k) * xv;
                }
                for (int i = 0; i < FR; i++) acc[t * FR + i] = a[i];
            }
        }
        for (int64_t t = 0; t < n_tok; t++)
            for (int i = 0; i < nr; i++) out[t * ldo + r + i] = hsum(acc[t * FR + i]);
    }
    free(acc);
    return 0;
}

/* columns [c0, c1) (multiples of QK) of out[t, c] (+)= sum_r g[t, r] W[r, c], r < n_rows.
 * Cache blocking: TC rows of W at a time (their bytes in L2), and for those a span of SPAN
 * columns of out at a time (its [n_tok, SPAN] in L1 for a few tokens), updated by RB rows
 * at once (each load and store of out serves RB multiply-adds). */
CLONES
void quantized_transposed(int type, const uint8_t *w, int64_t cols, int64_t n_rows,
                          int64_t c0, int64_t c1, const float *g, int64_t n_tok, int64_t ldg,
                          float *out, int64_t ldo, int accumulate) {
    const int64_t bb = block_bytes(type), row_bytes = cols / QK * bb;
    float wq[RB][QK] __attribute__((aligned(64)));
    if (!accumulate)
        for (int64_t t = 0; t < n_tok; t++) memset(out + t * ldo + c0, 0, (c1 - c0) * sizeof(float));
    for (int64_t r1 = 0; r1 < n_rows; r1 += TC) {
        const int64_t r2 = n_rows - r1 < TC ? n_rows : r1 + TC;
        for (int64_t s = c0; s < c1; s += SPAN) {
            const int64_t s2 = c1 - s < SPAN ? c1 : s + SPAN;
            for (int64_t r = r1; r < r2; r += RB) {
                const int nr = (int)(r2 - r < RB ? r2 - r : RB);
                for (int i = nr; i < RB; i++) memset(wq[i], 0, sizeof wq[i]);
                for (int64_t c = s; c < s2; c += QK) {
                    for (int i = 0; i < nr; i++)
                        dequantize(type, w + (r + i) * row_bytes + c / QK * bb, wq[i]);
                    for (int64_t t = 0; t < n_tok; t++) {
                        float gs[RB];
                        for (int i = 0; i < RB; i++) gs[i] = i < nr ? g[t * ldg + r + i] : 0.0f;
                        float *ot = out + t * ldo + c;
                        for (int k = 0; k < QK; k += 16) {
                            vf o = load(ot + k);
                            for (int i = 0; i < RB; i++) o += gs[i] * load(wq[i] + k);
                            store(ot + k, o);
                        }
                    }
                }
            }
        }
    }
}

int quantized_block_bytes(int type) { return block_bytes(type); }

/* A module of no functions: ctypes loads this file for the kernels above. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quantized_products", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__quantized_products(void) { return PyModule_Create(&module); }
