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
 * Built as an optional extension (setup.py). The kernels (_quantized_products_kernels.h) are
 * compiled once per instruction set, each with the vector length and tiles that suit its
 * registers: AVX-512, AVX2 with FMA, and the compiler's baseline (the only one off x86-64 or
 * with another compiler than GCC); the machine's best is chosen when first called. Called
 * through ctypes (quantized_products.py), which splits the work across threads. The two
 * entry points check every argument and return an error code (quantized_error names it)
 * for a call that would read or write outside the matrix or its buffers' rows.
 */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { TYPE_Q8_0 = 8, TYPE_Q4_K = 12, TYPE_Q6_K = 14 };
#define QK 256 /* values dequantized at a time: a K-quant block, or eight Q8_0 blocks */
#define TC 64     /* transposed: rows whose bytes stay in cache while out is swept */
#define SPAN 1024 /* transposed: columns of out swept at a time */


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

/* One copy of the kernels per instruction set, the tiles measured for each with
 * tools/bench_blocks.py on 70B-shaped matrices and 16 tokens: FR rows by FT tokens in
 * registers for x @ W.T (32 vector registers with AVX-512, 16 with AVX2), RB rows added into
 * each load and store of out for g @ W. */
#define RB 8
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define NAME(x) x##_avx512
#define VL 16
#define FR 4
#define FT 4
#include "_quantized_products_kernels.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define NAME(x) x##_avx2
#define VL 8
#define FR 4
#define FT 2
#include "_quantized_products_kernels.h"
#pragma GCC pop_options
#endif
#define NAME(x) x##_baseline
#define VL 4
#define FR 4
#define FT 2
#include "_quantized_products_kernels.h"

/* 2: AVX-512 (x86-64-v4), 1: AVX2 and FMA (x86-64-v3), 0: the compiler's baseline */
static int best_variant(void) {
    int v = 0;
#ifdef X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c"))
        v = 1;
    if (v == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        v = 2;
#endif
    return v;
}

static int chosen = -1;

static int variant(void) {
    if (chosen < 0) chosen = best_variant();
    return chosen;
}

/* Use variant v from now on (at most the machine's best; tests and benchmarks compare them);
 * returns the one in use. */
int quantized_use_variant(int v) {
    const int best = best_variant();
    chosen = v < best ? v : best;
    return chosen;
}

int quantized_variant(void) { return variant(); }

/* What the entry points return: 0, or one of these (quantized_error names each). The
 * kernels read and write where they are told, so every argument is checked first: a call
 * that would read or write past a row, a range or a buffer's stride is refused, not run. */
enum {
    QP_OK = 0,
    QP_NO_MEMORY = -1,  /* no memory for the sums */
    QP_BAD_TYPE = -2,   /* a type the kernels do not know */
    QP_BAD_COLS = -3,   /* columns not a positive multiple of QK */
    QP_BAD_RANGE = -4,  /* a row or column range outside the matrix, or off a QK step */
    QP_BAD_STRIDE = -5, /* a row stride (ldx, ldg, ldo) shorter than the rows it holds */
    QP_NULL = -6,       /* a null pointer where there is work */
    QP_BAD_SIZE = -7,   /* a negative count, or sizes whose byte offsets overflow */
};

const char *quantized_error(int code) {
    switch (code) {
    case QP_OK: return "no error";
    case QP_NO_MEMORY: return "no memory for the sums";
    case QP_BAD_TYPE: return "unknown quantized type";
    case QP_BAD_COLS: return "columns not a positive multiple of 256";
    case QP_BAD_RANGE: return "row or column range outside the matrix (or off a 256-column step)";
    case QP_BAD_STRIDE: return "a row stride shorter than the rows it must hold";
    case QP_NULL: return "null pointer";
    case QP_BAD_SIZE: return "negative count, or sizes whose byte offsets overflow";
    default: return "unknown error code";
    }
}

/* The checks both kernels share: W [n_rows, cols] of `type`, n_tok tokens. */
static int check_matrix(int type, int64_t cols, int64_t n_rows, int64_t n_tok) {
    const int64_t bb = block_bytes(type);
    if (bb == 0) return QP_BAD_TYPE;
    if (cols <= 0 || cols % QK) return QP_BAD_COLS;
    if (n_rows < 0 || n_tok < 0) return QP_BAD_SIZE;
    if (cols / QK > INT64_MAX / bb) return QP_BAD_SIZE;
    const int64_t row_bytes = cols / QK * bb;
    if (n_rows && row_bytes > INT64_MAX / n_rows) return QP_BAD_SIZE;
    return QP_OK;
}

/* n_tok rows of `ld` floats of which the first `width` are used: no stride shorter than a
 * row, no offset that overflows */
static int check_rows(int64_t n_tok, int64_t ld, int64_t width) {
    if (ld < width) return QP_BAD_STRIDE;
    if (n_tok && ld > INT64_MAX / 4 / n_tok) return QP_BAD_SIZE;
    return QP_OK;
}

/* rows [r0, r1) of out[t, r] = sum_c W[r, c] x[t, c], W [n_rows, cols]; x [n_tok, ldx],
 * out [n_tok, ldo]. 0, or a QP_ error (nothing written). */
int quantized_forward(int type, const uint8_t *w, int64_t cols, int64_t n_rows, int64_t r0,
                      int64_t r1, const float *x, int64_t n_tok, int64_t ldx, float *out,
                      int64_t ldo) {
    int e = check_matrix(type, cols, n_rows, n_tok);
    if (e) return e;
    if (r0 < 0 || r0 > r1 || r1 > n_rows) return QP_BAD_RANGE;
    if ((e = check_rows(n_tok, ldx, cols)) || (e = check_rows(n_tok, ldo, r1))) return e;
    if (r0 == r1 || n_tok == 0) return QP_OK;
    if (!w || !x || !out) return QP_NULL;
#ifdef X86_VARIANTS
    if (variant() == 2) return forward_avx512(type, w, cols, r0, r1, x, n_tok, ldx, out, ldo);
    if (variant() == 1) return forward_avx2(type, w, cols, r0, r1, x, n_tok, ldx, out, ldo);
#endif
    return forward_baseline(type, w, cols, r0, r1, x, n_tok, ldx, out, ldo);
}

/* columns [c0, c1) (QK steps) of out[t, c] (+)= sum_r g[t, r] W[r, c], W [n_rows, cols];
 * g [n_tok, ldg], out [n_tok, ldo]. 0, or a QP_ error (nothing written). */
int quantized_transposed(int type, const uint8_t *w, int64_t cols, int64_t n_rows,
                         int64_t c0, int64_t c1, const float *g, int64_t n_tok, int64_t ldg,
                         float *out, int64_t ldo, int accumulate) {
    int e = check_matrix(type, cols, n_rows, n_tok);
    if (e) return e;
    if (c0 < 0 || c0 > c1 || c1 > cols || c0 % QK || c1 % QK) return QP_BAD_RANGE;
    if ((e = check_rows(n_tok, ldg, n_rows)) || (e = check_rows(n_tok, ldo, c1))) return e;
    if (c0 == c1 || n_tok == 0) return QP_OK;
    if (!out || (n_rows && (!w || !g))) return QP_NULL;
#ifdef X86_VARIANTS
    if (variant() == 2) {
        transposed_avx512(type, w, cols, n_rows, c0, c1, g, n_tok, ldg, out, ldo, accumulate);
        return QP_OK;
    }
    if (variant() == 1) {
        transposed_avx2(type, w, cols, n_rows, c0, c1, g, n_tok, ldg, out, ldo, accumulate);
        return QP_OK;
    }
#endif
    transposed_baseline(type, w, cols, n_rows, c0, c1, g, n_tok, ldg, out, ldo, accumulate);
    return QP_OK;
}

int quantized_block_bytes(int type) { return block_bytes(type); }

/* A module of no functions: ctypes loads this file for the kernels above. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_quantized_products", .m_size = -1};
PyMODINIT_FUNC PyInit__quantized_products(void) { return PyModule_Create(&module); }
