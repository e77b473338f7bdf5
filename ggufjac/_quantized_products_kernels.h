/* The kernels of _quantized_products.c, compiled once per instruction set: that file
 * includes this one with NAME(x) naming the copy, VL floats per vector, the tiles FR, FT
 * (RB, TC, SPAN are shared), and the instruction set's target pragma in force. NAME, VL, FR
 * and FT are undefined at the end, for the next copy. The kernels trust their arguments:
 * quantized_forward and quantized_transposed check them before calling one. */

/* Helpers are copied too (and forced inline): a vector passed to a function compiled for
 * another instruction set would go through memory. */
#define INLINE static inline __attribute__((always_inline))
typedef float NAME(vf) __attribute__((vector_size(VL * 4)));
#define vf NAME(vf)
/* Loads and stores through unaligned, aliasing vector types: a memcpy of a vector went
 * through the stack in two halves under some tunings (AVX2), and then costs a stall. */
typedef float NAME(vf_unaligned) __attribute__((vector_size(VL * 4), aligned(4), may_alias));
INLINE vf NAME(load)(const float *p) { return *(const NAME(vf_unaligned) *)p; }
INLINE void NAME(store)(float *p, vf v) { *(NAME(vf_unaligned) *)p = v; }
INLINE float NAME(hsum)(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}
/* Dequantization works on VL values at a time too: a vector wider than the registers is
 * not always lowered well (AVX2 made scalar conversions of 16-lane integer vectors). */
typedef uint8_t NAME(vbyte) __attribute__((vector_size(VL), aligned(1), may_alias));
typedef int8_t NAME(vsbyte) __attribute__((vector_size(VL), aligned(1), may_alias));
typedef int32_t NAME(vint) __attribute__((vector_size(VL * 4)));
#define vint NAME(vint)
/* VL bytes from p, each widened to a 32-bit integer (unsigned, or signed) */
INLINE vint NAME(bytes)(const uint8_t *p) {
    return __builtin_convertvector(*(const NAME(vbyte) *)p, vint);
}
INLINE vint NAME(signed_bytes)(const uint8_t *p) {
    return __builtin_convertvector(*(const NAME(vsbyte) *)p, vint);
}
#define load NAME(load)
#define store NAME(store)
#define hsum NAME(hsum)
#define bytes NAME(bytes)
#define signed_bytes NAME(signed_bytes)

/* 256 values of one row from the bytes `b` of its QK values */
INLINE void NAME(dequantize)(int type, const uint8_t *b, float *y) {
    if (type == TYPE_Q4_K) {
        const float d = f16(b), dmin = f16(b + 2);
        const uint8_t *scales = b + 4, *q = b + 16;
        for (int j = 0, is = 0; j < QK; j += 64, is += 2, q += 32) {
            uint8_t sc, m;
            scale_min_k4(is, scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(is + 1, scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l += VL) {
                const vint v = bytes(q + l);
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
                for (int l = 16 * h; l < 16 * h + 16; l += VL) {
                    const vint lo = bytes(ql + l), hi = bytes(ql + 32 + l), high = bytes(qh + l);
                    const vint q1 = ((lo & 0xF) | ((high & 3) << 4)) - 32;
                    const vint q2 = ((hi & 0xF) | (((high >> 2) & 3) << 4)) - 32;
                    const vint q3 = ((lo >> 4) | (((high >> 4) & 3) << 4)) - 32;
                    const vint q4 = ((hi >> 4) | (((high >> 6) & 3) << 4)) - 32;
                    store(y + l, s1 * __builtin_convertvector(q1, vf));
                    store(y + 32 + l, s2 * __builtin_convertvector(q2, vf));
                    store(y + 64 + l, s3 * __builtin_convertvector(q3, vf));
                    store(y + 96 + l, s4 * __builtin_convertvector(q4, vf));
                }
            }
        }
    } else { /* Q8_0: eight blocks of 32 */
        for (int k = 0; k < 8; k++, b += 34, y += 32) {
            const float d = f16(b);
            for (int l = 0; l < 32; l += VL)
                store(y + l, d * __builtin_convertvector(signed_bytes(b + 2 + l), vf));
        }
    }
}

/* rows [r0, r1) of out[t, r] = sum_c W[r, c] x[t, c]; cols a multiple of QK. A tile of FR
 * rows by FT tokens is multiplied in registers (each load of W serves FT tokens, each load of
 * x FR rows); the tile's sums stay vectors in `acc` across blocks, reduced once at the end. */
static int NAME(forward)(int type, const uint8_t *w, int64_t cols, int64_t r0, int64_t r1,
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
                NAME(dequantize)(type, w + (r + i) * row_bytes + c / QK * bb, wq[i]);
            int64_t t = 0;
            for (; t + FT <= n_tok; t += FT) {
                vf a[FT][FR];
                for (int u = 0; u < FT; u++)
                    for (int i = 0; i < FR; i++) a[u][i] = acc[(t + u) * FR + i];
                for (int k = 0; k < QK; k += VL) {
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
                for (int k = 0; k < QK; k += VL) {
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
static void NAME(transposed)(int type, const uint8_t *w, int64_t cols, int64_t n_rows,
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
                        NAME(dequantize)(type, w + (r + i) * row_bytes + c / QK * bb, wq[i]);
                    for (int64_t t = 0; t < n_tok; t++) {
                        float gs[RB];
                        for (int i = 0; i < RB; i++) gs[i] = i < nr ? g[t * ldg + r + i] : 0.0f;
                        float *ot = out + t * ldo + c;
                        for (int k = 0; k < QK; k += VL) {
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

#undef vf
#undef load
#undef store
#undef hsum
#undef vint
#undef bytes
#undef signed_bytes
#undef INLINE
#undef NAME
#undef VL
#undef FR
#undef FT
