/* dgdm.kernels._spmm: float32 CSR x dense (N x F) product, y = a * (T z) + c * x.
 *
 * Why: scipy's csr_matvecs streams every output row through memory once per stored entry;
 * here each output row (F floats) stays in registers while the row's neighbours are
 * gathered, and the Horner step's "+ c * x" is fused into the same pass. That is ~2x
 * faster at 10,000-100,000 nodes. The AVX2+FMA path is picked at run time on x86-64 CPUs
 * that have it; everything else (older x86, aarch64, armv7) runs the portable C loop, which
 * the compiler vectorises at -O3.
 *
 * No numpy C API: arrays arrive through the buffer protocol, so building needs only a
 * C compiler and the Python headers. The GIL is released around the loop.
 *
 * The kernels are plain C; with DGDM_KERNELS_ONLY defined the Python glue (from
 * format_code on) is left out, and tests/native/ runs the kernels alone on aarch64 and
 * armv7 under qemu.
 */
#ifndef DGDM_KERNELS_ONLY
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>

#define SERIES_MAX_THREADS 64
#define SERIES_ALIGN 64 /* bytes: a cache line */

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SPMM_HAVE_AVX2 1
#include <immintrin.h>
#endif

typedef struct {
    ptrdiff_t n, m, f, nnz;
    const void *indptr, *indices;
    const float *data, *z, *x; /* x may be NULL: y = a * (T z) */
    float *y;
    float a, c;
} spmm_args;

/* Kernels return 0, or -1 for a bad indptr entry, -2 for a column index out of range. */
typedef int (*spmm_kernel)(const spmm_args *);

/* Portable path: 16-float accumulator blocks that stay in vector registers (4 NEON / SSE
 * registers) for the whole neighbour loop, then the remaining columns. The block is written
 * with GCC/Clang vector types: from a plain float acc[16] loop, GCC 12 -O3 vectorises only
 * half the block on aarch64 (two q registers and eight scalar fmadds, see -fopt-info-vec).
 * Where the target has no SIMD the compiler lowers the vector type to scalar code. */
#define SPMM_BLOCK 16

#if defined(__GNUC__) || defined(__clang__)
typedef float spmm_f4 __attribute__((vector_size(16)));

/* acc[0..3] (16 columns) += v * z[0..15]; memcpy: z rows need not be 16-byte aligned. */
#define SPMM_BLOCK_ACCUMULATE(ACC, V, ZR)                                                 \
    for (int q = 0; q < 4; q++) {                                                         \
        spmm_f4 zq;                                                                       \
        memcpy(&zq, (ZR) + 4 * q, sizeof zq);                                             \
        (ACC)[q] += (V) * zq;                                                             \
    }
#define SPMM_BLOCK_STORE(YR, A, ACC)                                                      \
    for (int q = 0; q < 4; q++) {                                                         \
        const spmm_f4 out = (A) * (ACC)[q];                                               \
        memcpy((YR) + 4 * q, &out, sizeof out);                                           \
    }
#define SPMM_BLOCK_ACC spmm_f4 acc[4] = {{0}}
#else
#define SPMM_BLOCK_ACCUMULATE(ACC, V, ZR)                                                 \
    for (int k = 0; k < SPMM_BLOCK; k++) (ACC)[k] += (V) * (ZR)[k]
#define SPMM_BLOCK_STORE(YR, A, ACC)                                                      \
    for (int k = 0; k < SPMM_BLOCK; k++) (YR)[k] = (A) * (ACC)[k]
#define SPMM_BLOCK_ACC float acc[SPMM_BLOCK] = {0}
#endif

#define SPMM_PORTABLE(NAME, IDX)                                                          \
    static int NAME(const spmm_args *p)                                                   \
    {                                                                                     \
        const IDX *restrict ip = (const IDX *)p->indptr;                                  \
        const IDX *restrict ix = (const IDX *)p->indices;                                 \
        const float *restrict data = p->data, *restrict z = p->z, *restrict x = p->x;     \
        float *restrict y = p->y;                                                         \
        const ptrdiff_t f = p->f, m = p->m, nnz = p->nnz;                                 \
        const float a = p->a, c = p->c;                                                   \
        for (ptrdiff_t i = 0; i < p->n; i++) {                                            \
            const IDX lo = ip[i], hi = ip[i + 1];                                         \
            if (lo < 0 || hi < lo || (ptrdiff_t)hi > nnz) return -1;                      \
            for (IDX jj = lo; jj < hi; jj++)                                              \
                if (ix[jj] < 0 || (ptrdiff_t)ix[jj] >= m) return -2;                      \
            float *restrict yr = y + i * f;                                               \
            ptrdiff_t k0 = 0;                                                             \
            for (; k0 + SPMM_BLOCK <= f; k0 += SPMM_BLOCK) {                              \
                SPMM_BLOCK_ACC;                                                           \
                for (IDX jj = lo; jj < hi; jj++)                                          \
                    SPMM_BLOCK_ACCUMULATE(acc, data[jj], z + (ptrdiff_t)ix[jj] * f + k0); \
                SPMM_BLOCK_STORE(yr + k0, a, acc);                                        \
            }                                                                             \
            for (ptrdiff_t k = k0; k < f; k++) {                                          \
                float acc = 0.0f;                                                         \
                for (IDX jj = lo; jj < hi; jj++)                                          \
                    acc += data[jj] * z[(ptrdiff_t)ix[jj] * f + k];                       \
                yr[k] = a * acc;                                                          \
            }                                                                             \
            if (x) {                                                                      \
                const float *restrict xr = x + i * f;                                     \
                for (ptrdiff_t k = 0; k < f; k++) yr[k] += c * xr[k];                     \
            }                                                                             \
        }                                                                                 \
        return 0;                                                                         \
    }

SPMM_PORTABLE(spmm_portable_i32, int32_t)
SPMM_PORTABLE(spmm_portable_i64, int64_t)

#ifdef SPMM_HAVE_AVX2
/* -1 in the first r lanes: loads/stores of a row's last F % 8 columns. */
static const int32_t spmm_mask_table[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                            0,  0,  0,  0,  0,  0,  0,  0};

/* One output row block of NACC x 8 columns: the accumulators live in registers for the
 * whole neighbour loop; `mask` is only used when TAIL (a last block of < 8 columns). */
#define SPMM_AVX_BLOCK(NACC, TAIL)                                                        \
    do {                                                                                  \
        __m256 acc[NACC];                                                                 \
        for (int q = 0; q < NACC; q++) acc[q] = _mm256_setzero_ps();                      \
        for (ptrdiff_t jj = lo; jj < hi; jj++) {                                          \
            const __m256 v = _mm256_broadcast_ss(p->data + jj);                           \
            const float *zr = p->z + (ptrdiff_t)ix[jj] * f + k0;                          \
            for (int q = 0; q < NACC; q++)                                                \
                acc[q] = _mm256_fmadd_ps(                                                 \
                    v, TAIL ? _mm256_maskload_ps(zr, mask) : _mm256_loadu_ps(zr + 8 * q), \
                    acc[q]);                                                              \
        }                                                                                 \
        for (int q = 0; q < NACC; q++) {                                                  \
            __m256 out = _mm256_mul_ps(va, acc[q]);                                       \
            if (xr) {                                                                     \
                const __m256 xv = TAIL ? _mm256_maskload_ps(xr + k0, mask)                \
                                       : _mm256_loadu_ps(xr + k0 + 8 * q);                \
                out = _mm256_fmadd_ps(vc, xv, out);                                       \
            }                                                                             \
            if (TAIL)                                                                     \
                _mm256_maskstore_ps(yr + k0, mask, out);                                  \
            else                                                                          \
                _mm256_storeu_ps(yr + k0 + 8 * q, out);                                   \
        }                                                                                 \
        k0 += TAIL ? f - k0 : 8 * NACC;                                                   \
    } while (0)

#define SPMM_AVX2(NAME, IDX)                                                              \
    __attribute__((target("avx2,fma"))) static int NAME(const spmm_args *p)               \
    {                                                                                     \
        const IDX *ip = (const IDX *)p->indptr, *ix = (const IDX *)p->indices;            \
        const ptrdiff_t f = p->f;                                                         \
        const __m256 va = _mm256_set1_ps(p->a), vc = _mm256_set1_ps(p->c);                \
        const __m256i mask = _mm256_loadu_si256(                                          \
            (const __m256i *)(spmm_mask_table + 8 - (f % 8)));                            \
        for (ptrdiff_t i = 0; i < p->n; i++) {                                            \
            const IDX lo = ip[i], hi = ip[i + 1];                                         \
            if (lo < 0 || hi < lo || (ptrdiff_t)hi > p->nnz) return -1;                   \
            for (IDX jj = lo; jj < hi; jj++)                                              \
                if (ix[jj] < 0 || (ptrdiff_t)ix[jj] >= p->m) return -2;                   \
            float *yr = p->y + i * f;                                                     \
            const float *xr = p->x ? p->x + i * f : NULL;                                 \
            ptrdiff_t k0 = 0;                                                             \
            while (k0 + 32 <= f) SPMM_AVX_BLOCK(4, 0);                                    \
            if (k0 + 16 <= f) SPMM_AVX_BLOCK(2, 0);                                       \
            if (k0 + 8 <= f) SPMM_AVX_BLOCK(1, 0);                                        \
            if (k0 < f) SPMM_AVX_BLOCK(1, 1);                                             \
        }                                                                                 \
        return 0;                                                                         \
    }

SPMM_AVX2(spmm_avx2_i32, int32_t)
SPMM_AVX2(spmm_avx2_i64, int64_t)
#endif

static spmm_kernel kernel_i32 = spmm_portable_i32, kernel_i64 = spmm_portable_i64;
static const char *kernel_isa = "portable";

static void choose_kernels(void)
{
#ifdef SPMM_HAVE_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        kernel_i32 = spmm_avx2_i32;
        kernel_i64 = spmm_avx2_i64;
        kernel_isa = "avx2";
    }
#endif
}

/* out[i] = src[rows[i]]: numpy's take(axis=0) copies short rows (F floats) element-wise and
 * cost as much as a whole CSR product here; a row loop is ~5x faster. */
#define TAKE_ROWS(NAME, IDX)                                                              \
    static ptrdiff_t NAME(const float *restrict src, ptrdiff_t m, const void *rows_,      \
                           float *restrict out, ptrdiff_t n, ptrdiff_t f)                 \
    {                                                                                     \
        const IDX *rows = (const IDX *)rows_;                                             \
        for (ptrdiff_t i = 0; i < n; i++) {                                               \
            const IDX r = rows[i];                                                        \
            if (r < 0 || (ptrdiff_t)r >= m) return i;                                     \
            const float *restrict s = src + (ptrdiff_t)r * f;                             \
            float *restrict o = out + i * f;                                              \
            if (f == 16)                                                                  \
                memcpy(o, s, 16 * sizeof(float)); /* inline moves, not a call per row */  \
            else                                                                          \
                for (ptrdiff_t k = 0; k < f; k++) o[k] = s[k];                            \
        }                                                                                 \
        return -1;                                                                        \
    }

TAKE_ROWS(take_rows_i32, int32_t)
TAKE_ROWS(take_rows_i64, int64_t)

/* ---- The whole truncated series in one pass: z_K = c_K x, z_j = c_j x + T z_{j+1}. ----
 *
 * Step by step, every Horner step streams T, its input and x through memory (~3 x 7 MB per
 * step at 100,000 nodes, F = 16, ten steps). After reverse Cuthill-McKee every row's
 * neighbours lie within `band` rows of it, so step s can run on a chunk of rows as soon as
 * step s - 1 is `band` rows further on: a wavefront. At time t, step s works on chunk
 * t - (s - 1) L (L = 1 + ceil(band / chunk) chunks of lag), so rows of T, of x and of every
 * step's output are reused while they are still in cache. An intermediate step keeps only
 * a ring of `ring` rows (a power of two >= (L + 1) chunk + band: what its successor may
 * still read plus what it writes now), so memory is (K - 1) rings, not K arrays.
 *
 * Threads split the rows into contiguous parts, each a wavefront of its own, that hand
 * each other a few rows once per call (see "Threads" below); no part repeats another's
 * rows, and none waits for another while both run. (A barrier per time step instead was
 * 3-10x slower on a loaded 2-core machine.)
 *
 * Every stored entry is checked by step 1 (indptr order, column in range, |i - j| <= band)
 * before any step reads through it: a part's later steps read rows its own step 1 checked,
 * its triangle also rows that the part above's step 1 checked before it handed its rows
 * over. */

typedef struct {
    ptrdiff_t n, f, nnz, k, chunk, lag, ring, band;
    const int32_t *indptr, *indices, *scatter; /* scatter may be NULL: out row = row */
    const float *data, *coeffs, *x;            /* coeffs: k + 1 values, c_0 .. c_k */
    float *out;
    const float *scale; /* NULL: T = data; else T = diag(scale) P diag(scale), data unused */
} series_args;

/* x filled by the threads first: x[i] = source[rows[i]], into `x` (the buffer of p->x). */
typedef struct {
    const int32_t *rows;
    const float *source;
    float *x;
} series_gather_args;

/* Lag and ring rows for a band and chunk (the ring a power of two: slots by masking). */
static void series_plan(ptrdiff_t band, ptrdiff_t chunk, ptrdiff_t *lag, ptrdiff_t *ring)
{
    *lag = 1 + (band + chunk - 1) / chunk;
    const ptrdiff_t need = (*lag + 1) * chunk + band;
    ptrdiff_t r = 1;
    while (r < need) r *= 2;
    *ring = r;
}

/* The error of row i's columns: 0, -2 a column out of range or -3 one beyond the band. */
static int series_row_error(const series_args *p, ptrdiff_t i)
{
    for (ptrdiff_t jj = p->indptr[i]; jj < p->indptr[i + 1]; jj++) {
        const ptrdiff_t j = p->indices[jj];
        if (j < 0 || j >= p->n) return -2;
        if (j - i > p->band || i - j > p->band) return -3;
    }
    return 0;
}

/* Step 1's checks of row i: 0, or -1 bad indptr, -2 column out of range, -3 beyond band. */
static int series_check_row(const series_args *p, ptrdiff_t i)
{
    const ptrdiff_t lo = p->indptr[i], hi = p->indptr[i + 1];
    if (lo < 0 || hi < lo || hi > p->nnz) return -1;
    return series_row_error(p, i);
}

/* Where step s reads and writes: step s - 1's row j at zin + (j & zmask) F (x for s = 1,
 * zmask all ones), its own row i at yout + (i & ymask) F, or for the last step (yout NULL)
 * out's row scatter[i]. The masks make rings: a power of two of rows, reused as a step
 * advances. */
typedef struct {
    const float *zin;
    float *yout;
    size_t zmask, ymask;
} series_io;

/* Rows [first, last) of step s: y = a * T z + c * x, z = x (s = 1) or step s - 1's ring.
 * F is p->f; the tasks also expand it with F = 16, a constant the compiler folds into the
 * row offsets and block loops (16 features is the common width, ~15% fewer instructions).
 *
 * The compact operator (p->scale, the pattern P without values) is what sym normalisation
 * of an unweighted graph gives, T = S P S: half the bytes of T per entry. Its rings hold
 * S z instead of z, so a step past the first only adds gathered rows: y_i = c x_i + a s_i
 * sum_j (S z)_j, stored as s_i y_i; step 1 gathers x with the column scale s_j, and the
 * last step stores y_i itself. A row ends as (c x + ra acc) * post: ra = a s_i, post = s_i
 * or 1 (both exact 1 and a for the stored values, which keeps their arithmetic as it was). */
#define SERIES_TASK_BODY(ROW, F, CHECK_ROW)                                               \
    const ptrdiff_t f = (F);                                                              \
    const size_t rmask = io->ymask, uf = (size_t)f;                                       \
    const float *zin = s == 1 ? p->x : io->zin; /* s == 1: x, known to the compiler */     \
    const size_t zmask = s == 1 ? (size_t)-1 : io->zmask;                                 \
    float *ring_out = io->yout;                                                           \
    const float a = s == 1 ? p->coeffs[p->k] : 1.0f, cc = p->coeffs[p->k - s];           \
    (void)cc; /* the AVX rows have it broadcast already */                                \
    for (ptrdiff_t i = first; i < last; i++) {                                            \
        if (s == 1) {                                                                     \
            const int bad = CHECK_ROW(p, i);                                              \
            if (bad) return bad;                                                          \
        }                                                                                 \
        const ptrdiff_t lo = p->indptr[i], hi = p->indptr[i + 1];                         \
        float *yr = ring_out ? ring_out + ((size_t)i & rmask) * uf                        \
                             : p->out + (size_t)(p->scatter ? p->scatter[i] : i) * uf;    \
        const float *xr = p->x + (size_t)i * uf;                                          \
        const int32_t *ix = p->indices;                                                   \
        const float *data = p->data, *scale = p->scale;                                   \
        const float rs = scale ? scale[i] : 1.0f, ra = a * rs;                            \
        const float post = scale && s != p->k ? rs : 1.0f;                                \
        (void)data, (void)scale, (void)ra, (void)post;                                    \
        ROW;                                                                              \
    }                                                                                     \
    return 0

/* The three kinds of step (see SERIES_TASK_BODY), for a row macro ROW(OP) that OP
 * specialises: values (data), step 1 of the compact operator (column scales) and its later
 * steps (sums of rows). F = 16 is expanded apart, as above. */
#define SERIES_TASK_KINDS(ROW, DATA_OP, COLUMN_OP, SUM_OP, CHECK_ROW)                     \
    if (!p->scale) {                                                                      \
        if (p->f == 16) {                                                                 \
            SERIES_TASK_BODY(ROW(DATA_OP), 16, CHECK_ROW);                                \
        }                                                                                 \
        SERIES_TASK_BODY(ROW(DATA_OP), p->f, CHECK_ROW);                                  \
    }                                                                                     \
    if (s == 1) {                                                                         \
        if (p->f == 16) {                                                                 \
            SERIES_TASK_BODY(ROW(COLUMN_OP), 16, CHECK_ROW);                              \
        }                                                                                 \
        SERIES_TASK_BODY(ROW(COLUMN_OP), p->f, CHECK_ROW);                                \
    }                                                                                     \
    if (p->f == 16) {                                                                     \
        SERIES_TASK_BODY(ROW(SUM_OP), 16, CHECK_ROW);                                     \
    }                                                                                     \
    SERIES_TASK_BODY(ROW(SUM_OP), p->f, CHECK_ROW)

/* Portable weights of entry J: the portable row multiplies by them (1: folded away). */
#define SERIES_W_DATA(J) data[J]
#define SERIES_W_COLUMN(J) scale[ix[J]]
#define SERIES_W_SUM(J) 1.0f

/* Portable row: two accumulator sets over alternate neighbours (two dependency chains per
 * register instead of one), 16-column blocks in vector registers, then the last columns. */
#define SERIES_ROW_PORTABLE(W)                                                            \
    do {                                                                                  \
        ptrdiff_t k0 = 0;                                                                 \
        for (; k0 + SPMM_BLOCK <= f; k0 += SPMM_BLOCK) {                                  \
            SPMM_BLOCK_ACC;                                                               \
            SERIES_ACC2;                                                                  \
            ptrdiff_t jj = lo;                                                            \
            for (; jj + 2 <= hi; jj += 2) {                                               \
                SPMM_BLOCK_ACCUMULATE(acc, W(jj), zin + ((size_t)ix[jj] & zmask) * uf + k0); \
                SPMM_BLOCK_ACCUMULATE(acc2, W(jj + 1),                                    \
                                      zin + ((size_t)ix[jj + 1] & zmask) * uf + k0);      \
            }                                                                             \
            for (; jj < hi; jj++)                                                         \
                SPMM_BLOCK_ACCUMULATE(acc, W(jj), zin + ((size_t)ix[jj] & zmask) * uf + k0); \
            for (int q = 0; q < (int)(sizeof acc / sizeof acc[0]); q++) acc[q] += acc2[q];  \
            SPMM_BLOCK_STORE(yr + k0, ra, acc);                                           \
        }                                                                                 \
        for (ptrdiff_t k = k0; k < f; k++) {                                              \
            float acc1 = 0.0f;                                                            \
            for (ptrdiff_t jj = lo; jj < hi; jj++)                                        \
                acc1 += W(jj) * zin[((size_t)ix[jj] & zmask) * uf + (size_t)k];           \
            yr[k] = ra * acc1;                                                            \
        }                                                                                 \
        for (ptrdiff_t k = 0; k < f; k++) yr[k] = (yr[k] + cc * xr[k]) * post;            \
    } while (0)

#if defined(__GNUC__) || defined(__clang__)
#define SERIES_ACC2 spmm_f4 acc2[4] = {{0}}
#else
#define SERIES_ACC2 float acc2[SPMM_BLOCK] = {0}
#endif

/* The row tasks start on a cache line (SERIES_TASK_ALIGN): where their loops fall against
 * 64-byte boundaries moved with unrelated code and cost 3-4 % at 100,000 nodes (an AVX-512
 * Xeon, the same instructions 16 bytes apart). */
#if defined(__GNUC__) || defined(__clang__)
#define SERIES_TASK_ALIGN __attribute__((aligned(64)))
#else
#define SERIES_TASK_ALIGN
#endif

SERIES_TASK_ALIGN static int series_task_portable(const series_args *p, const series_io *io, ptrdiff_t s,
                                ptrdiff_t first, ptrdiff_t last)
{
    SERIES_TASK_KINDS(SERIES_ROW_PORTABLE, SERIES_W_DATA, SERIES_W_COLUMN, SERIES_W_SUM,
                      series_check_row);
}

#ifdef SPMM_HAVE_AVX2
/* Whether step s stores its rows with non-temporal (streaming) stores: the last step's rows
 * scattered to the permuted order land all over `out`, and an ordinary store of each first
 * reads its line from memory (~2 ms of 13 at 100,000 nodes, F = 16). Only whole vectors on
 * their alignment (F a multiple of `lanes`, out on a cache line); series_run fences them. */
static int series_streams(const series_args *p, ptrdiff_t s, ptrdiff_t lanes)
{
    return s == p->k && p->scatter && p->f % lanes == 0 && (uintptr_t)p->out % SERIES_ALIGN == 0;
}

/* acc += (weight of entry J) * Z, or acc += Z for the compact operator's later steps. */
#define SERIES_AVX2_DATA(ACC, J, Z) ACC = _mm256_fmadd_ps(_mm256_broadcast_ss(data + (J)), Z, ACC)
#define SERIES_AVX2_COLUMN(ACC, J, Z)                                                     \
    ACC = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + ix[J]), Z, ACC)
#define SERIES_AVX2_SUM(ACC, J, Z) ACC = _mm256_add_ps(Z, ACC)

/* NV registers of 8 columns, two accumulator sets over alternate neighbours (two FMA
 * chains per register; four were slower: rows of ~9 entries paid more for the reduction).
 * The runner pads rows to even lengths, so the remainder loop rarely runs. */
#define SERIES_AVX_BLOCK(NV, TAIL, OP)                                                    \
    do {                                                                                  \
        __m256 acc[2][NV];                                                                \
        for (int u = 0; u < 2; u++)                                                       \
            for (int q = 0; q < NV; q++) acc[u][q] = _mm256_setzero_ps();                 \
        ptrdiff_t jj = lo;                                                                \
        for (; jj + 2 <= hi; jj += 2)                                                     \
            for (int u = 0; u < 2; u++) {                                                 \
                const float *zr = zin + ((size_t)ix[jj + u] & zmask) * uf + k0;           \
                for (int q = 0; q < NV; q++)                                              \
                    OP(acc[u][q], jj + u,                                                 \
                       TAIL ? _mm256_maskload_ps(zr, mask) : _mm256_loadu_ps(zr + 8 * q)); \
            }                                                                             \
        for (; jj < hi; jj++) {                                                           \
            const float *zr = zin + ((size_t)ix[jj] & zmask) * uf + k0;                   \
            for (int q = 0; q < NV; q++)                                                  \
                OP(acc[0][q], jj,                                                         \
                   TAIL ? _mm256_maskload_ps(zr, mask) : _mm256_loadu_ps(zr + 8 * q));    \
        }                                                                                 \
        for (int q = 0; q < NV; q++) {                                                    \
            const __m256 sum = _mm256_add_ps(acc[0][q], acc[1][q]);                       \
            const __m256 xv = TAIL ? _mm256_maskload_ps(xr + k0, mask)                    \
                                   : _mm256_loadu_ps(xr + k0 + 8 * q);                    \
            const __m256 res = _mm256_mul_ps(                                             \
                _mm256_fmadd_ps(vc, xv, _mm256_mul_ps(_mm256_set1_ps(ra), sum)),          \
                _mm256_set1_ps(post));                                                    \
            if (TAIL)                                                                     \
                _mm256_maskstore_ps(yr + k0, mask, res);                                  \
            else if (stream)                                                              \
                _mm256_stream_ps(yr + k0 + 8 * q, res);                                   \
            else                                                                          \
                _mm256_storeu_ps(yr + k0 + 8 * q, res);                                   \
        }                                                                                 \
        k0 += TAIL ? f - k0 : 8 * NV;                                                     \
    } while (0)

#define SERIES_ROW_AVX2(OP)                                                               \
    do {                                                                                  \
        ptrdiff_t k0 = 0;                                                                 \
        while (k0 + 16 <= f) SERIES_AVX_BLOCK(2, 0, OP);                                  \
        if (k0 + 8 <= f) SERIES_AVX_BLOCK(1, 0, OP);                                      \
        if (k0 < f) SERIES_AVX_BLOCK(1, 1, OP);                                           \
    } while (0)

__attribute__((target("avx2,fma"))) SERIES_TASK_ALIGN static int
series_task_avx2(const series_args *p, const series_io *io, ptrdiff_t s, ptrdiff_t first,
                 ptrdiff_t last)
{
    const __m256 vc = _mm256_set1_ps(p->coeffs[p->k - s]);
    const __m256i mask =
        _mm256_loadu_si256((const __m256i *)(spmm_mask_table + 8 - (p->f % 8)));
    const int stream = series_streams(p, s, 8);
    SERIES_TASK_KINDS(SERIES_ROW_AVX2, SERIES_AVX2_DATA, SERIES_AVX2_COLUMN, SERIES_AVX2_SUM,
                      series_check_row);
}

/* series_check_row with one masked compare of up to 16 columns: a row of <= 16 entries
 * has no loop of its own, whose mispredicted end per row cost ~1 ms of 13 at 100,000 nodes.
 * Every column must lie in [base, base + span], the row's band clipped to [0, n). */
__attribute__((target("avx512f"))) static int series_check_row_avx512(const series_args *p,
                                                                      ptrdiff_t i)
{
    const ptrdiff_t lo = p->indptr[i], hi = p->indptr[i + 1];
    if (lo < 0 || hi < lo || hi > p->nnz) return -1;
    const ptrdiff_t first = i > p->band ? i - p->band : 0;
    const ptrdiff_t end = i + p->band < p->n - 1 ? i + p->band : p->n - 1;
    const __m512i base = _mm512_set1_epi32((int32_t)first);
    const __m512i span = _mm512_set1_epi32((int32_t)(end - first));
    for (ptrdiff_t jj = lo; jj < hi; jj += 16) {
        const __mmask16 lanes =
            hi - jj >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (hi - jj)) - 1u);
        const __m512i cols = _mm512_maskz_loadu_epi32(lanes, p->indices + jj);
        if (_mm512_mask_cmpgt_epu32_mask(lanes, _mm512_sub_epi32(cols, base), span))
            return series_row_error(p, i);
    }
    return 0;
}

#define SERIES_AVX512_DATA(ACC, J, Z) ACC = _mm512_fmadd_ps(_mm512_set1_ps(data[J]), Z, ACC)
#define SERIES_AVX512_COLUMN(ACC, J, Z)                                                   \
    ACC = _mm512_fmadd_ps(_mm512_set1_ps(scale[ix[J]]), Z, ACC)
#define SERIES_AVX512_SUM(ACC, J, Z) ACC = _mm512_add_ps(Z, ACC)

/* AVX-512: a 16-column block is one register; NV of them, four accumulator sets (4-6%
 * faster than two on a Zen 4 at 10,000 and 100,000 nodes, values and compact alike: the
 * adds of the compact operator's steps then wait on no chain of their own). */
#define SERIES_AVX512_BLOCK(NV, TAIL, OP)                                                 \
    do {                                                                                  \
        __m512 acc[4][NV];                                                                \
        for (int u = 0; u < 4; u++)                                                       \
            for (int q = 0; q < NV; q++) acc[u][q] = _mm512_setzero_ps();                 \
        ptrdiff_t jj = lo;                                                                \
        for (; jj + 4 <= hi; jj += 4)                                                     \
            for (int u = 0; u < 4; u++) {                                                 \
                const float *zr = zin + ((size_t)ix[jj + u] & zmask) * uf + k0;           \
                for (int q = 0; q < NV; q++)                                              \
                    OP(acc[u][q], jj + u,                                                 \
                       TAIL ? _mm512_maskz_loadu_ps(tail, zr) : _mm512_loadu_ps(zr + 16 * q)); \
            }                                                                             \
        for (; jj < hi; jj++) {                                                           \
            const float *zr = zin + ((size_t)ix[jj] & zmask) * uf + k0;                   \
            for (int q = 0; q < NV; q++)                                                  \
                OP(acc[0][q], jj,                                                         \
                   TAIL ? _mm512_maskz_loadu_ps(tail, zr) : _mm512_loadu_ps(zr + 16 * q)); \
        }                                                                                 \
        for (int q = 0; q < NV; q++) {                                                    \
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][q], acc[1][q]), _mm512_add_ps(acc[2][q], acc[3][q]));                       \
            const __m512 xv = TAIL ? _mm512_maskz_loadu_ps(tail, xr + k0)                 \
                                   : _mm512_loadu_ps(xr + k0 + 16 * q);                   \
            const __m512 res = _mm512_mul_ps(                                             \
                _mm512_fmadd_ps(vc, xv, _mm512_mul_ps(_mm512_set1_ps(ra), sum)),          \
                _mm512_set1_ps(post));                                                    \
            if (TAIL)                                                                     \
                _mm512_mask_storeu_ps(yr + k0, tail, res);                                \
            else if (stream)                                                              \
                _mm512_stream_ps(yr + k0 + 16 * q, res);                                  \
            else                                                                          \
                _mm512_storeu_ps(yr + k0 + 16 * q, res);                                  \
        }                                                                                 \
        k0 += TAIL ? f - k0 : 16 * NV;                                                    \
    } while (0)

#define SERIES_ROW_AVX512(OP)                                                             \
    do {                                                                                  \
        ptrdiff_t k0 = 0;                                                                 \
        while (k0 + 64 <= f) SERIES_AVX512_BLOCK(4, 0, OP);                               \
        if (k0 + 32 <= f) SERIES_AVX512_BLOCK(2, 0, OP);                                  \
        if (k0 + 16 <= f) SERIES_AVX512_BLOCK(1, 0, OP);                                  \
        if (k0 < f) SERIES_AVX512_BLOCK(1, 1, OP);                                        \
    } while (0)

__attribute__((target("avx512f"))) SERIES_TASK_ALIGN static int
series_task_avx512(const series_args *p, const series_io *io, ptrdiff_t s, ptrdiff_t first,
                   ptrdiff_t last)
{
    const __m512 vc = _mm512_set1_ps(p->coeffs[p->k - s]);
    const __mmask16 tail = (__mmask16)((1u << (p->f % 16)) - 1u);
    const int stream = series_streams(p, s, 16);
    SERIES_TASK_KINDS(SERIES_ROW_AVX512, SERIES_AVX512_DATA, SERIES_AVX512_COLUMN,
                      SERIES_AVX512_SUM, series_check_row_avx512);
}
#endif

typedef int (*series_task_fn)(const series_args *, const series_io *, ptrdiff_t, ptrdiff_t,
                              ptrdiff_t);

/* The series task of an instruction set ("portable", "avx2", "avx512"; NULL: the best this
 * CPU has), or NULL when the CPU lacks it. choose_kernels() must have run. */
static series_task_fn series_task_for(const char *isa)
{
#ifdef SPMM_HAVE_AVX2
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int avx512 = __builtin_cpu_supports("avx512f");
    if (!isa)
        return avx512 ? series_task_avx512 : (avx2 ? series_task_avx2 : series_task_portable);
    if (strcmp(isa, "avx512") == 0)
        return avx512 ? series_task_avx512 : NULL;
    if (strcmp(isa, "avx2") == 0)
        return avx2 ? series_task_avx2 : NULL;
#else
    if (!isa)
        return series_task_portable;
#endif
    return strcmp(isa, "portable") == 0 ? series_task_portable : NULL;
}

/* ---- Threads: parts that repeat no row, run by a pool of parked workers. ----
 *
 * The rows are split at boundaries P_1 < ... < P_{T-1}: part w's step 1 computes rows
 * [P_w, P_{w+1}). At a boundary P, step s's rows below q_s read only step s - 1's rows below
 * q_{s-1}, and its rows from t_s on only step s - 1's rows from t_{s-1} on (q_1 = t_1 = P; q
 * falls and t rises by at most a band a step: series_edges). Part w sweeps upwards as one
 * thread would, step s over [t_s of the boundary below, q_s of the boundary above) (its
 * trapezoid, which needs nothing from another part), then computes the triangle [q_s, t_s)
 * at its upper boundary, which also reads the part above's rows [t_s, t_{s+1} + band) of
 * each step s. Those are the first rows the part above computes; it copies them out at
 * once, so the part below, which needs them only at the end of its sweep, finds them there
 * and waits only if the part above has not run (the split before this one instead repeated
 * each part's cone: 15 % of a part's work for 2 threads at 10,000 nodes). The boundaries
 * move down by the mean triangle height, so that every part has about as many row-steps;
 * the top part, which has no triangle and waits for no one, runs on the calling thread.
 *
 * Parts below it run on workers from a pool: threads started on first use and parked on a
 * condition variable between calls, not one pthread_create per call. A call claims free
 * workers and starts more while the pool has room (SERIES_MAX_THREADS - 1), so concurrent
 * calls never wait for one another; with fewer workers than asked it makes fewer parts. A
 * forked child starts with an empty pool (pthread_atfork); at exit the parked threads end
 * with the process. */

typedef struct series_part series_part;

struct series_part {
    const series_args *p;
    series_task_fn task;
    float *rings;     /* k - 1 rings of p->ring rows */
    float *window[2]; /* the triangle's steps: series_window_rows rows each, a power of two */
    float *imports;   /* the part above's bottom rows: k - 1 blocks of series_import_rows */
    ptrdiff_t *edges; /* 3 (k + 1): this part's hi and up, then (part 0) zeros for lo */
    /* index s = 1..k: the sweep does step s's rows [lo, hi), the triangle [hi, up) */
    const ptrdiff_t *lo, *hi, *up;
    series_part *above, *below;
    const series_gather_args *gather; /* or NULL */
    pthread_mutex_t *mu; /* with cv: a part waiting for the part above's `ready` */
    pthread_cond_t *cv;
    int ready; /* 0; 1: its bottom rows are in below->imports; 2: this part failed */
    int gathered; /* with gather: 0; 1: its rows of x are in place; 2: a bad gather row */
    int status;
};

/* The triangle's window: the rows [q_{s+1} - band, t_{s+1} + band) of one step, at most
 * 2 k band rows (q falls and t rises by a band a step at most) and at most n. */
static ptrdiff_t series_window_rows(const series_args *p)
{
    const ptrdiff_t need = 2 * p->k * p->band + 1 < p->n ? 2 * p->k * p->band + 1 : p->n;
    ptrdiff_t r = 1;
    while (r < need) r *= 2;
    return r;
}

/* Rows of one step the part below imports: [t_s, t_{s+1} + band), at most 2 band and n. */
static ptrdiff_t series_import_rows(const series_args *p)
{
    return 2 * p->band + 1 < p->n ? 2 * p->band + 1 : p->n;
}

/* One past the highest row of step s that the triangle below boundary t reads. */
static ptrdiff_t series_export_end(const series_args *p, const ptrdiff_t *t, ptrdiff_t s)
{
    return t[s + 1] + p->band < p->n ? t[s + 1] + p->band : p->n;
}

/* The lowest row of step s of its own that the triangle below boundary q reads. */
static ptrdiff_t series_own_low(const series_args *p, const ptrdiff_t *q, ptrdiff_t s)
{
    return q[s + 1] > p->band ? q[s + 1] - p->band : 0;
}

static int series_bad_indptr(const series_args *p, ptrdiff_t i)
{
    return p->indptr[i] < 0 || p->indptr[i + 1] < p->indptr[i] || p->indptr[i + 1] > p->nnz;
}

/* A boundary's edges q and t (index 1..k) from q_1 = t_1 = at. Only rows within a band of
 * an edge are read, each one's indptr checked first (-1 if bad); their columns are not
 * checked here: a bad one misplaces an edge, and step 1 refuses its row before any later
 * step reads through it. */
static int series_edges(const series_args *p, ptrdiff_t at, ptrdiff_t *q, ptrdiff_t *t)
{
    const ptrdiff_t b = p->band, n = p->n;
    q[1] = t[1] = at;
    for (ptrdiff_t s = 2; s <= p->k; s++) {
        q[s] = q[s - 1];
        t[s] = t[s - 1];
        for (ptrdiff_t i = q[s - 1] > b ? q[s - 1] - b : 0; i < q[s - 1] && q[s] == q[s - 1]; i++) {
            if (series_bad_indptr(p, i)) return -1;
            for (ptrdiff_t jj = p->indptr[i]; jj < p->indptr[i + 1]; jj++)
                if (p->indices[jj] >= q[s - 1]) q[s] = i;
        }
        for (ptrdiff_t i = t[s - 1] + b < n ? t[s - 1] + b : n; i > t[s - 1] && t[s] == t[s - 1]; i--) {
            if (series_bad_indptr(p, i - 1)) return -1;
            for (ptrdiff_t jj = p->indptr[i - 1]; jj < p->indptr[i]; jj++)
                if (p->indices[jj] < t[s - 1]) t[s] = i;
        }
    }
    return 0;
}

/* Whether the parts' triangles fit: each one's own rows lie in its trapezoid, its imports
 * in the part above's, and a step's rows in a window. */
static int series_fits(const series_args *p, const series_part *parts, int count)
{
    const ptrdiff_t k = p->k, wrows = series_window_rows(p);
    for (int w = 0; w < count; w++) {
        const series_part *d = &parts[w], *u = w + 1 < count ? &parts[w + 1] : NULL;
        if (d->lo[k] > d->hi[k] || (u && u->lo[1] <= d->lo[1]))
            return 0;
        for (ptrdiff_t s = 1; u && s < k; s++) {
            const ptrdiff_t lo = series_own_low(p, d->hi, s), end = series_export_end(p, d->up, s);
            if (lo < d->lo[s] || end > u->hi[s] || end - lo > wrows)
                return 0;
        }
    }
    return 1;
}

/* Every part's edges: 0, 1 when these parts do not fit (use fewer), -1 for a bad indptr. */
static int series_split(const series_args *p, series_part *parts, int count)
{
    const ptrdiff_t k = p->k, n = p->n;
    for (int w = 0; w < count; w++) {
        ptrdiff_t *q = parts[w].edges, *t = q + (k + 1), *zeros = t + (k + 1);
        for (ptrdiff_t s = 0; s <= k; s++) q[s] = t[s] = n, zeros[s] = 0;
        parts[w].hi = q;
        parts[w].up = t;
        parts[w].lo = w ? parts[w - 1].up : zeros;
    }
    if (count == 1)
        return 0;
    /* the top part loses sum_s (t_s - P) rows to the triangle below it: every boundary
     * moves down by that over k */
    ptrdiff_t *q = parts[0].edges, lost = 0, below = 0;
    if (n / count < 1)
        return 1;
    if (series_edges(p, n - n / count, q, q + (k + 1))) return -1;
    for (ptrdiff_t s = 1; s <= k; s++) lost += q[k + 1 + s] - (n - n / count);
    for (int w = 0; w + 1 < count; w++) {
        const ptrdiff_t at = n * (w + 1) / count - lost / k;
        if (at <= below || at >= n) /* triangles as tall as the parts: fewer parts */
            return 1;
        q = parts[w].edges;
        if (series_edges(p, at, q, q + (k + 1))) return -1;
        below = at;
    }
    return series_fits(p, parts, count) ? 0 : 1;
}

/* A wait first spins this long (the awaited part is usually about done), then parks. The
 * spin reads the flag without pause instructions: under KVM a loop of them exits to the
 * host, which parks the vCPU (pause-loop exiting), and the wake-up then took ~45 us of a
 * 700 us call at 10,000 nodes. */
#define SERIES_SPIN_NS 200000

static int64_t series_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Whether the spin may go on: the clock is read every 64 turns. */
static int series_spinning(int64_t until, int *turns)
{
    return (++*turns & 63) != 0 || series_ns() < until;
}

/* A part's status when it stopped because the part above failed (whose status says why). */
#define SERIES_ABORTED 1

/* Sets a part's flag (`ready` or `gathered`) for the part below. */
static void series_publish(const series_part *w, int *flag, int value)
{
    pthread_mutex_lock(w->mu);
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);
    pthread_cond_broadcast(w->cv);
    pthread_mutex_unlock(w->mu);
}

/* A flag of the part above, once it is set. */
static int series_await(const series_part *w, const int *ready)
{
    const int64_t until = series_ns() + SERIES_SPIN_NS;
    int turns = 0;
    do {
        const int r = __atomic_load_n(ready, __ATOMIC_ACQUIRE);
        if (r) return r;
    } while (series_spinning(until, &turns));
    pthread_mutex_lock(w->mu);
    int r;
    while (!(r = __atomic_load_n(ready, __ATOMIC_ACQUIRE)))
        pthread_cond_wait(w->cv, w->mu);
    pthread_mutex_unlock(w->mu);
    return r;
}

/* Step s's buffers in a part's sweep: x or the ring of step s - 1, the ring of step s. */
static series_io series_ring_io(const series_args *p, float *rings, ptrdiff_t s)
{
    const size_t step = (size_t)p->ring * (size_t)p->f, mask = (size_t)p->ring - 1;
    const series_io io = {s == 1 ? p->x : rings + (size_t)(s - 2) * step,
                          s == p->k ? NULL : rings + (size_t)(s - 1) * step,
                          s == 1 ? (size_t)-1 : mask, mask};
    return io;
}

static const float *series_ring(const series_part *w, ptrdiff_t s)
{
    return w->rings + (size_t)(s - 1) * (size_t)w->p->ring * (size_t)w->p->f;
}

static float *series_import_block(const series_part *w, ptrdiff_t s)
{
    return w->imports + (size_t)(s - 1) * (size_t)series_import_rows(w->p) * (size_t)w->p->f;
}

/* Rows [lo, hi): row i from src + ((i - sbase) & smask) F to dst + ((i - dbase) & dmask) F. */
static void series_copy(const series_args *p, const float *src, ptrdiff_t sbase, size_t smask,
                        float *dst, ptrdiff_t dbase, size_t dmask, ptrdiff_t lo, ptrdiff_t hi)
{
    const size_t f = (size_t)p->f;
    for (ptrdiff_t i = lo; i < hi; i++)
        memcpy(dst + ((size_t)(i - dbase) & dmask) * f, src + ((size_t)(i - sbase) & smask) * f,
               f * sizeof(float));
}

/* The rows of x a part gathers: from a band below its step 1 (its own first chunks read
 * them at once) to a band below the part above's, which gathers the rest; 0, or -4 for a
 * gather row outside [0, n). */
static ptrdiff_t series_gather_end(const series_part *w)
{
    return w->above ? (w->hi[1] > w->p->band ? w->hi[1] - w->p->band : 0) : w->p->n;
}

static int series_gather(const series_part *w)
{
    const series_args *p = w->p;
    const series_gather_args *g = w->gather;
    const size_t f = (size_t)p->f;
    ptrdiff_t i = w->below ? w->lo[1] - p->band : 0;
    for (i = i > 0 ? i : 0; i < series_gather_end(w); i++) {
        const int32_t r = g->rows[i];
        if (r < 0 || r >= p->n)
            return -4;
        if (f == 16) /* inline moves, not a call per row */
            memcpy(g->x + (size_t)i * 16, g->source + (size_t)r * 16, 16 * sizeof(float));
        else
            memcpy(g->x + (size_t)i * f, g->source + (size_t)r * f, f * sizeof(float));
    }
    return 0;
}

/* A part's trapezoid as one thread's wavefront: chunk c of step s at time c + (s - 1) lag,
 * each step clipped to [lo, hi). Step s's bottom rows [t_s, t_{s+1} + band) go to the part
 * below's imports as soon as they are computed; that part may go on once all are out and
 * this part's step 1 has checked the rows of its triangle (up to t_k). */
static int series_sweep(series_part *w)
{
    const series_args *p = w->p;
    const ptrdiff_t k = p->k, C = p->chunk, base = w->lo[1];
    const ptrdiff_t nchunks = (w->hi[1] - base + C - 1) / C, steps = nchunks + (k - 1) * p->lag;
    const size_t rmask = (size_t)p->ring - 1;
    ptrdiff_t exported = 0, checked = base; /* steps exported; one past step 1's last row */
    int gathered = !w->gather || !w->above; /* the part above's rows of x are in place */
    for (ptrdiff_t s = 1; w->below && s < k; s++)
        exported += series_export_end(p, w->lo, s) <= w->lo[s];
    for (ptrdiff_t t = 0; t < steps; t++) {
        for (ptrdiff_t s = 1; s <= k; s++) {
            const ptrdiff_t c = t - (s - 1) * p->lag;
            if (c < 0)
                break;
            if (c >= nchunks)
                continue;
            ptrdiff_t first = base + c * C, last = first + C;
            if (first < w->lo[s]) first = w->lo[s];
            if (last > w->hi[s]) last = w->hi[s];
            if (first >= last)
                continue;
            if (s == 1 && !gathered && last + p->band > series_gather_end(w)) {
                if (series_await(w, &w->above->gathered) != 1)
                    return SERIES_ABORTED;
                gathered = 1;
            }
            const series_io io = series_ring_io(p, w->rings, s);
            const int status = w->task(p, &io, s, first, last);
            if (status)
                return status;
            if (s == 1)
                checked = last;
            if (w->below && s < k) {
                const ptrdiff_t end = series_export_end(p, w->lo, s);
                if (first < end && end <= last) {
                    series_copy(p, series_ring(w, s), 0, rmask, series_import_block(w->below, s),
                                w->lo[s], (size_t)-1, w->lo[s], end);
                    exported++;
                }
            }
        }
        if (w->below && !w->ready && exported == k - 1 && checked >= w->lo[k])
            series_publish(w, &w->ready, 1);
    }
    return 0;
}

/* Step s's rows that the triangle's step s + 1 reads besides the triangle's own: this
 * part's [q_{s+1} - band, q_s) and the part above's [t_s, t_{s+1} + band), into a window. */
static void series_fill(const series_part *w, float *window, ptrdiff_t s)
{
    const series_args *p = w->p;
    const size_t wmask = (size_t)series_window_rows(p) - 1;
    series_copy(p, series_ring(w, s), 0, (size_t)p->ring - 1, window, 0, wmask,
                series_own_low(p, w->hi, s), w->hi[s]);
    series_copy(p, series_import_block(w, s), w->up[s], (size_t)-1, window, 0, wmask, w->up[s],
                series_export_end(p, w->up, s));
}

/* The triangle [q_s, t_s) at a part's upper boundary, step by step in two windows. */
static int series_triangle(const series_part *w)
{
    const series_args *p = w->p;
    const size_t wmask = (size_t)series_window_rows(p) - 1;
    if (series_await(w, &w->above->ready) != 1)
        return SERIES_ABORTED;
    float *in = w->window[0], *out = w->window[1];
    series_fill(w, in, 1);
    for (ptrdiff_t s = 2; s <= p->k; s++) {
        const series_io io = {in, s == p->k ? NULL : out, wmask, wmask};
        if (w->hi[s] < w->up[s]) {
            const int status = w->task(p, &io, s, w->hi[s], w->up[s]);
            if (status)
                return status;
        }
        if (s < p->k) {
            series_fill(w, out, s);
            float *swap = in;
            in = out;
            out = swap;
        }
    }
    return 0;
}

static void series_part_run(series_part *w)
{
    if (w->gather) {
        w->status = series_gather(w);
        if (w->below)
            series_publish(w, &w->gathered, w->status ? 2 : 1);
    }
    if (!w->status)
        w->status = series_sweep(w);
    if (w->below && !w->ready)
        series_publish(w, &w->ready, w->status ? 2 : 1);
    if (!w->status && w->above && w->p->k > 1) /* one step: q_1 = t_1, no triangle */
        w->status = series_triangle(w);
#ifdef SPMM_HAVE_AVX2
    _mm_sfence(); /* the streamed rows are in memory before the part counts as done */
#endif
}

/* ---- The pool. ---- */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    series_part *job; /* set by the worker's owner, NULL again once the part ran */
    int started;      /* the thread runs (it never ends) */
    int claimed;      /* a series_run owns this worker (compare-and-swap 0 -> 1) */
} series_worker;

static series_worker series_pool[SERIES_MAX_THREADS - 1];
static pthread_once_t series_pool_once = PTHREAD_ONCE_INIT;

/* Also pthread_atfork's child handler: a forked child has none of the threads, and a lock
 * some other thread held at the fork stays held in its copy. */
static void series_pool_reset(void)
{
    for (int i = 0; i < SERIES_MAX_THREADS - 1; i++) {
        series_worker *w = &series_pool[i];
        pthread_mutex_init(&w->mu, NULL);
        pthread_cond_init(&w->cv, NULL);
        w->job = NULL;
        w->started = 0;
        w->claimed = 0;
    }
}

static void series_pool_init(void)
{
    series_pool_reset();
    pthread_atfork(NULL, NULL, series_pool_reset);
}

static void *series_worker_main(void *arg)
{
    series_worker *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->job)
            pthread_cond_wait(&w->cv, &w->mu);
        series_part *job = w->job;
        pthread_mutex_unlock(&w->mu);
        series_part_run(job);
        pthread_mutex_lock(&w->mu);
        __atomic_store_n(&w->job, NULL, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&w->cv);
    }
    return NULL;
}

/* A detached thread with every signal blocked: Python's handlers run on its own threads. */
static int series_start(series_worker *w)
{
    pthread_attr_t attr;
    if (pthread_attr_init(&attr))
        return 0;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t id;
    w->started = pthread_create(&id, &attr, series_worker_main, w) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return w->started;
}

/* Up to `wanted` free workers into got (started if new); how many. */
static int series_claim(int wanted, series_worker **got)
{
    pthread_once(&series_pool_once, series_pool_init);
    int count = 0;
    for (int i = 0; i < SERIES_MAX_THREADS - 1 && count < wanted; i++) {
        series_worker *w = &series_pool[i];
        int free_ = 0;
        if (!__atomic_compare_exchange_n(&w->claimed, &free_, 1, 0, __ATOMIC_ACQUIRE,
                                         __ATOMIC_RELAXED))
            continue;
        if (!w->started && !series_start(w)) {
            __atomic_store_n(&w->claimed, 0, __ATOMIC_RELEASE);
            break;
        }
        got[count++] = w;
    }
    return count;
}

static void series_release(series_worker *w) { __atomic_store_n(&w->claimed, 0, __ATOMIC_RELEASE); }

static void series_dispatch(series_worker *w, series_part *part)
{
    pthread_mutex_lock(&w->mu);
    __atomic_store_n(&w->job, part, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&w->mu);
    pthread_cond_signal(&w->cv); /* after the unlock: the woken worker finds it free */
}

/* Until the worker's part ran (spinning first, as series_await), then free it. */
static void series_join(series_worker *w)
{
    const int64_t until = series_ns() + SERIES_SPIN_NS;
    int turns = 0;
    while (__atomic_load_n(&w->job, __ATOMIC_ACQUIRE) && series_spinning(until, &turns))
        continue;
    if (__atomic_load_n(&w->job, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&w->mu);
        while (__atomic_load_n(&w->job, __ATOMIC_ACQUIRE))
            pthread_cond_wait(&w->cv, &w->mu);
        pthread_mutex_unlock(&w->mu);
    }
    series_release(w);
}

/* Floats one part's rings take: whole cache lines, so every part's rings start on one. */
static size_t series_rings_only(const series_args *p)
{
    const size_t floats = (size_t)(p->k - 1) * (size_t)p->ring * (size_t)p->f;
    const size_t line = SERIES_ALIGN / sizeof(float);
    return (floats + line - 1) / line * line;
}

/* Floats one part's triangle takes: two windows and the imports, in whole cache lines. */
static size_t series_triangle_floats(const series_args *p)
{
    const size_t floats = ((size_t)(2 * series_window_rows(p)) +
                           (size_t)(p->k - 1) * (size_t)series_import_rows(p)) * (size_t)p->f;
    const size_t line = SERIES_ALIGN / sizeof(float);
    return (floats + line - 1) / line * line;
}

/* Floats a part needs without a triangle: its rings, then its edges (3 (k + 1)
 * ptrdiff_t), in whole cache lines; all a call on one thread needs. */
static size_t series_part_floats(const series_args *p)
{
    const size_t line = SERIES_ALIGN / sizeof(float);
    const size_t edges = (size_t)(3 * (p->k + 1)) * sizeof(ptrdiff_t) / sizeof(float);
    return series_rings_only(p) + (edges + line - 1) / line * line;
}

/* Floats one part of several needs: series_part_floats, then its triangle's buffers. */
static size_t series_ring_floats(const series_args *p)
{
    return series_part_floats(p) + series_triangle_floats(p);
}

/* The whole series in up to `threads` parts, `rings` holding threads * series_ring_floats:
 * the caller's thread runs the top part, the pool's workers the others (fewer parts when fewer
 * workers are free, or when narrower parts would not fit their triangles). */
static int series_run_gather(const series_args *p, const series_gather_args *gather,
                             series_task_fn task, int threads, float *rings)
{
    series_part parts[SERIES_MAX_THREADS];
    series_worker *workers[SERIES_MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > SERIES_MAX_THREADS) threads = SERIES_MAX_THREADS;
    const int count0 = 1 + (threads > 1 ? series_claim(threads - 1, workers) : 0);
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&cv, NULL);
    const size_t per = series_ring_floats(p), wfloats = (size_t)series_window_rows(p) * (size_t)p->f;
    for (int w = 0; w < count0; w++) { /* one part alone has no triangle buffers */
        /* the caller's (top) part first: a call on one thread next reuses its lines */
        float *own = rings + (size_t)(count0 - 1 - w) * per;
        float *tri = count0 > 1 ? own + series_part_floats(p) : NULL;
        parts[w] = (series_part){p, task, own, {tri, tri ? tri + wfloats : NULL},
                                 tri ? tri + 2 * wfloats : NULL,
                                 (ptrdiff_t *)(void *)(own + series_rings_only(p)),
                                 NULL, NULL, NULL, NULL, NULL, gather, &mu, &cv, 0, 0, 0};
    }
    int count = count0, status;
    while ((status = series_split(p, parts, count)) > 0)
        series_release(workers[--count - 1]);
    for (int w = 0; status == 0 && w < count; w++) {
        parts[w].above = w + 1 < count ? &parts[w + 1] : NULL;
        parts[w].below = w > 0 ? &parts[w - 1] : NULL;
    }
    for (int w = 0; status == 0 && w + 1 < count; w++)
        series_dispatch(workers[w], &parts[w]);
    if (status == 0) {
        series_part_run(&parts[count - 1]);
        status = parts[count - 1].status;
    }
    for (int w = 0; w + 1 < count; w++) { /* not dispatched after a bad indptr: no job, no wait */
        series_join(workers[w]);
        if (status >= 0 && parts[w].status < 0) status = parts[w].status;
    }
    pthread_cond_destroy(&cv);
    pthread_mutex_destroy(&mu);
    return status;
}

static int series_run(const series_args *p, series_task_fn task, int threads, float *rings)
{
    return series_run_gather(p, NULL, task, threads, rings);
}

#ifndef DGDM_KERNELS_ONLY
/* The element type of a buffer from its struct-module format ("f", "=i", "<l", ...). */
static char format_code(const Py_buffer *b)
{
    const char *fmt = b->format ? b->format : "B";
    if (fmt[0] == '@' || fmt[0] == '=')
        fmt++;
#if PY_LITTLE_ENDIAN
    else if (fmt[0] == '<')
        fmt++;
#else
    else if (fmt[0] == '>' || fmt[0] == '!')
        fmt++;
#endif
    return (fmt[0] != '\0' && fmt[1] == '\0') ? fmt[0] : '?';
}

static int get_buffer(PyObject *obj, Py_buffer *b, const char *name, int writable)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an array (buffer protocol), not %.100s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, b, flags) == 0)
        return 0;
    /* numpy says BufferError/ValueError ("not C-contiguous", "read-only"): name the argument */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous%s array: %S", name,
                 writable ? ", writable" : "", value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return -1;
}

static int check_float(const Py_buffer *b, const char *name, int ndim)
{
    if (format_code(b) != 'f' || b->itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "%s must be float32, got format '%s'", name,
                     b->format ? b->format : "B");
        return -1;
    }
    if (b->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-dimensional, got %d dimensions", name,
                     ndim, b->ndim);
        return -1;
    }
    return 0;
}

/* Index arrays: int32 or int64 (struct codes i, l, q by size), one dimension. */
static int check_index(const Py_buffer *b, const char *name)
{
    char code = format_code(b);
    if (!(code == 'i' || code == 'l' || code == 'q') ||
        !(b->itemsize == 4 || b->itemsize == 8)) {
        PyErr_Format(PyExc_TypeError, "%s must be int32 or int64, got format '%s'", name,
                     b->format ? b->format : "B");
        return -1;
    }
    if (b->ndim != 1) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-dimensional, got %d dimensions", name,
                     b->ndim);
        return -1;
    }
    return 0;
}

static int overlaps(const Py_buffer *a, const Py_buffer *b)
{
    const char *a0 = a->buf, *b0 = b->buf;
    return a->len > 0 && b->len > 0 && a0 < b0 + b->len && b0 < a0 + a->len;
}

/* Shapes and types of all arguments; fills `p` on success. */
static int check_args(Py_buffer *bufs[6], spmm_args *p)
{
    Py_buffer *ip = bufs[0], *ix = bufs[1], *data = bufs[2], *z = bufs[3], *y = bufs[4],
              *x = bufs[5];
    if (check_index(ip, "indptr") || check_index(ix, "indices") ||
        check_float(data, "data", 1) || check_float(z, "z", 2) || check_float(y, "y", 2) ||
        (x && check_float(x, "x", 2)))
        return -1;
    if (ip->itemsize != ix->itemsize) {
        PyErr_SetString(PyExc_TypeError, "indptr and indices must have the same dtype");
        return -1;
    }
    if (ix->shape[0] != data->shape[0]) {
        PyErr_Format(PyExc_ValueError, "indices has %zd entries but data has %zd",
                     ix->shape[0], data->shape[0]);
        return -1;
    }
    if (ip->shape[0] != y->shape[0] + 1) {
        PyErr_Format(PyExc_ValueError, "indptr must have len(y) + 1 = %zd entries, got %zd",
                     y->shape[0] + 1, ip->shape[0]);
        return -1;
    }
    if (z->shape[1] != y->shape[1]) {
        PyErr_Format(PyExc_ValueError, "z has %zd columns but y has %zd", z->shape[1],
                     y->shape[1]);
        return -1;
    }
    if (x && (x->shape[0] != y->shape[0] || x->shape[1] != y->shape[1])) {
        PyErr_Format(PyExc_ValueError, "x must have the shape of y (%zd, %zd), got (%zd, %zd)",
                     y->shape[0], y->shape[1], x->shape[0], x->shape[1]);
        return -1;
    }
    if (overlaps(y, z) || (x && overlaps(y, x))) {
        PyErr_SetString(PyExc_ValueError, "y must not share memory with z or x");
        return -1;
    }
    p->n = y->shape[0];
    p->f = y->shape[1];
    p->m = z->shape[0];
    p->nnz = ix->shape[0];
    p->indptr = ip->buf;
    p->indices = ix->buf;
    p->data = data->buf;
    p->z = z->buf;
    p->y = y->buf;
    p->x = x ? x->buf : NULL;
    return 0;
}

PyDoc_STRVAR(csr_spmm_doc,
"csr_spmm(indptr, indices, data, z, y, x=None, *, c=0.0, a=1.0, portable=False)\n--\n\n"
"y = a * (T @ z) + c * x for the CSR matrix T = (data, indices, indptr), in float32.\n\n"
"indptr/indices: int32 or int64 (same dtype); data: float32; z (M, F), y (N, F) and x\n"
"(N, F): C-contiguous float32. y is overwritten and must not overlap z or x.\n"
"portable=True forces the portable C loop (used to test it on AVX2 machines).");

static PyObject *csr_spmm(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"indptr", "indices", "data", "z", "y", "x", "c", "a", "portable", NULL};
    PyObject *objs[6] = {NULL, NULL, NULL, NULL, NULL, Py_None};
    double c = 0.0, a = 1.0;
    int portable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|O$ddp:csr_spmm", kwlist, &objs[0],
                                     &objs[1], &objs[2], &objs[3], &objs[4], &objs[5], &c, &a,
                                     &portable))
        return NULL;
    static const char *names[6] = {"indptr", "indices", "data", "z", "y", "x"};
    Py_buffer views[6];
    Py_buffer *bufs[6] = {NULL, NULL, NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    for (int k = 0; k < 6; k++) {
        if (k == 5 && objs[k] == Py_None)
            break;
        if (get_buffer(objs[k], &views[k], names[k], k == 4))
            goto done;
        bufs[k] = &views[k];
    }
    spmm_args p;
    if (check_args(bufs, &p))
        goto done;
    p.a = (float)a;
    p.c = (float)c;
    spmm_kernel kernel = bufs[0]->itemsize == 4 ? kernel_i32 : kernel_i64;
    if (portable)
        kernel = bufs[0]->itemsize == 4 ? spmm_portable_i32 : spmm_portable_i64;
    int status = 0;
    if (p.n > 0 && p.f > 0) {
        Py_BEGIN_ALLOW_THREADS
        status = kernel(&p);
        Py_END_ALLOW_THREADS
    }
    if (status == -1)
        PyErr_SetString(PyExc_ValueError,
                        "indptr must be non-decreasing, start at >= 0 and end at <= len(data)");
    else if (status == -2)
        PyErr_Format(PyExc_ValueError, "indices must lie in [0, %zd) (the rows of z)", p.m);
    else
        result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < 6; k++)
        if (bufs[k])
            PyBuffer_Release(bufs[k]);
    return result;
}

PyDoc_STRVAR(csr_series_doc,
"csr_series(indptr, indices, data, coeffs, x, out, *, band, chunk=64, threads=1,\n"
"           scatter=None, isa=None, scale=None, gather=None, source=None)\n--\n\n"
"out = sum_j coeffs[j] T^j x (Horner's rule, all steps in one wavefront pass) for the CSR\n"
"matrix T = (data, indices, indptr) whose entries all satisfy |row - column| <= band.\n"
"With data None and scale (float32, N) given, T is the compact operator\n"
"diag(scale) P diag(scale) of the pattern P = (indices, indptr) (ones where stored).\n\n"
"indptr/indices: int32; data, coeffs (>= 2 values), x and out (N, F): float32, C-contiguous;\n"
"out must not overlap x. scatter (int32, N): row i of the result goes to out[scatter[i]]\n"
"(give a permutation, or some rows of out are left as they were). gather (int32, N) with\n"
"source (N, F): x is first filled, x[i] = source[gather[i]] (each thread its rows), so x\n"
"must then be writable and not overlap source. threads: the rows are\n"
"split over this many threads (1: none started). isa: \"portable\", \"avx2\" or\n"
"\"avx512\" (default: the best of series_isas, this CPU's).");

static const char *series_isas = "portable"; /* set at import */

/* The first cache-line boundary in a block of SERIES_ALIGN more bytes than needed: rows of
 * 16 floats then load from one line each instead of straddling two. */
static float *series_aligned(float *block)
{
    const uintptr_t at = ((uintptr_t)block + SERIES_ALIGN - 1) & ~(uintptr_t)(SERIES_ALIGN - 1);
    return (float *)at;
}

static int check_int32(const Py_buffer *b, const char *name, Py_ssize_t len)
{
    if (check_index(b, name))
        return -1;
    if (b->itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "%s must be int32", name);
        return -1;
    }
    if (len >= 0 && b->shape[0] != len) {
        PyErr_Format(PyExc_ValueError, "%s must have %zd entries, got %zd", name, len,
                     b->shape[0]);
        return -1;
    }
    return 0;
}

static PyObject *csr_series(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"indptr", "indices", "data",  "coeffs", "x",      "out",
                             "band",   "chunk",   "threads", "scatter", "isa", "scale",
                             "gather", "source",  NULL};
    PyObject *objs[10] = {NULL, NULL, NULL, NULL, NULL, NULL, Py_None, Py_None, Py_None, Py_None};
    Py_ssize_t band = -1, chunk = 64;
    int threads = 1;
    const char *isa = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|$nniOzOOO:csr_series", kwlist,
                                     &objs[0], &objs[1], &objs[2], &objs[3], &objs[4],
                                     &objs[5], &band, &chunk, &threads, &objs[6], &isa,
                                     &objs[7], &objs[8], &objs[9]))
        return NULL;
    if ((objs[8] == Py_None) != (objs[9] == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "give gather and source together");
        return NULL;
    }
    if ((objs[2] == Py_None) == (objs[7] == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "give data (T's values) or scale (compact T), not both");
        return NULL;
    }
    series_task_fn task = series_task_for(isa);
    if (!task) {
        PyErr_Format(PyExc_ValueError, "isa %s is not one of this CPU's: %s", isa, series_isas);
        return NULL;
    }
    static const char *names[10] = {"indptr", "indices", "data",  "coeffs", "x",
                                    "out",    "scatter", "scale", "gather", "source"};
    Py_buffer views[10];
    Py_buffer *bufs[10] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    float *rings = NULL;
    const int gathers = objs[8] != Py_None; /* x is written: the gathered rows of source */
    for (int k = 0; k < 10; k++) {
        if ((k == 2 || k >= 6) && objs[k] == Py_None)
            continue;
        if (get_buffer(objs[k], &views[k], names[k], k == 5 || (k == 4 && gathers)))
            goto done;
        bufs[k] = &views[k];
    }
    Py_buffer *ip = bufs[0], *ix = bufs[1], *data = bufs[2], *co = bufs[3], *x = bufs[4],
              *out = bufs[5], *sc = bufs[6], *scale = bufs[7], *ga = bufs[8], *src = bufs[9];
    if ((data && check_float(data, "data", 1)) || check_float(co, "coeffs", 1) ||
        check_float(x, "x", 2) || check_float(out, "out", 2) ||
        (scale && check_float(scale, "scale", 1)) || (src && check_float(src, "source", 2)))
        goto done;
    const Py_ssize_t n = out->shape[0], f = out->shape[1];
    if (check_int32(ip, "indptr", n + 1) ||
        check_int32(ix, "indices", data ? data->shape[0] : -1) ||
        (sc && check_int32(sc, "scatter", n)) || (ga && check_int32(ga, "gather", n)))
        goto done;
    if (src && (src->shape[0] != n || src->shape[1] != f)) {
        PyErr_Format(PyExc_ValueError,
                     "source must have the shape of out (%zd, %zd), got (%zd, %zd)", n, f,
                     src->shape[0], src->shape[1]);
        goto done;
    }
    if (src && (overlaps(src, x) || overlaps(src, out))) {
        PyErr_SetString(PyExc_ValueError, "source must not share memory with x or out");
        goto done;
    }
    if (scale && scale->shape[0] != n) {
        PyErr_Format(PyExc_ValueError, "scale must have %zd entries, got %zd", n,
                     scale->shape[0]);
        goto done;
    }
    if (x->shape[0] != n || x->shape[1] != f) {
        PyErr_Format(PyExc_ValueError, "x must have the shape of out (%zd, %zd), got (%zd, %zd)",
                     n, f, x->shape[0], x->shape[1]);
        goto done;
    }
    if (co->shape[0] < 2) {
        PyErr_SetString(PyExc_ValueError, "coeffs must have at least 2 values (one product)");
        goto done;
    }
    if (overlaps(out, x)) {
        PyErr_SetString(PyExc_ValueError, "out must not share memory with x");
        goto done;
    }
    if (band < 0 || chunk < 1 || threads < 1 || threads > SERIES_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError,
                     "band must be >= 0, chunk >= 1 and threads in [1, %d]", SERIES_MAX_THREADS);
        goto done;
    }
    if (sc) {
        const int32_t *s = sc->buf;
        for (Py_ssize_t i = 0; i < n; i++)
            if (s[i] < 0 || s[i] >= n) {
                PyErr_Format(PyExc_ValueError, "scatter[%zd] is outside [0, %zd)", i, n);
                goto done;
            }
    }
    series_args p = {0};
    p.n = n;
    p.f = f;
    p.nnz = ix->shape[0];
    p.k = co->shape[0] - 1;
    p.band = band < n ? band : n;
    p.chunk = chunk < n ? chunk : (n > 0 ? n : 1);
    series_plan(p.band, p.chunk, &p.lag, &p.ring);
    p.indptr = ip->buf;
    p.indices = ix->buf;
    p.scatter = sc ? sc->buf : NULL;
    p.data = data ? data->buf : NULL;
    p.scale = scale ? scale->buf : NULL;
    p.coeffs = co->buf;
    p.x = x->buf;
    p.out = out->buf;
    const series_gather_args gather = {ga ? ga->buf : NULL, src ? src->buf : NULL, x->buf};
    if (n == 0 || f == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (threads > 1 && n < 2 * threads * (p.band + 1))
        threads = 1; /* parts narrower than their halos would only repeat work */
    /* one float at least: the parts' ring pointers are offsets from it (none for k = 1) */
    const size_t ring_floats =
        (threads == 1 ? series_part_floats(&p) : series_ring_floats(&p) * (size_t)threads) + 1;
    rings = PyMem_RawMalloc(ring_floats * sizeof(float) + SERIES_ALIGN);
    if (!rings) {
        PyErr_NoMemory();
        goto done;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = series_run_gather(&p, ga ? &gather : NULL, task, threads, series_aligned(rings));
    Py_END_ALLOW_THREADS
    if (status == -1)
        PyErr_SetString(PyExc_ValueError,
                        "indptr must be non-decreasing, start at >= 0 and end at <= len(data)");
    else if (status == -2)
        PyErr_Format(PyExc_ValueError, "indices must lie in [0, %zd)", n);
    else if (status == -3)
        PyErr_Format(PyExc_ValueError, "an entry lies more than band = %zd from its row's diagonal", band);
    else if (status == -4)
        PyErr_Format(PyExc_ValueError, "gather must hold rows of source, in [0, %zd)", n);
    else
        result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(rings);
    for (int k = 0; k < 10; k++)
        if (bufs[k])
            PyBuffer_Release(bufs[k]);
    return result;
}

PyDoc_STRVAR(take_rows_doc,
"take_rows(src, rows, out)\n--\n\n"
"out[i] = src[rows[i]] for float32 src (M, F) and out (N, F), rows int32/int64 (N,).");

static PyObject *take_rows(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *objs[3];
    if (!PyArg_ParseTuple(args, "OOO:take_rows", &objs[0], &objs[1], &objs[2]))
        return NULL;
    static const char *names[3] = {"src", "rows", "out"};
    Py_buffer views[3];
    Py_buffer *bufs[3] = {NULL, NULL, NULL};
    PyObject *result = NULL;
    for (int k = 0; k < 3; k++) {
        if (get_buffer(objs[k], &views[k], names[k], k == 2))
            goto done;
        bufs[k] = &views[k];
    }
    Py_buffer *src = bufs[0], *rows = bufs[1], *out = bufs[2];
    if (check_float(src, "src", 2) || check_index(rows, "rows") || check_float(out, "out", 2))
        goto done;
    if (rows->shape[0] != out->shape[0] || src->shape[1] != out->shape[1]) {
        PyErr_Format(PyExc_ValueError,
                     "out must have shape (len(rows), src columns) = (%zd, %zd), got (%zd, %zd)",
                     rows->shape[0], src->shape[1], out->shape[0], out->shape[1]);
        goto done;
    }
    if (overlaps(src, out)) {
        PyErr_SetString(PyExc_ValueError, "out must not share memory with src");
        goto done;
    }
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = (rows->itemsize == 4 ? take_rows_i32 : take_rows_i64)(
        src->buf, src->shape[0], rows->buf, out->buf, out->shape[0], out->shape[1]);
    Py_END_ALLOW_THREADS
    if (bad >= 0)
        PyErr_Format(PyExc_ValueError, "rows[%zd] is outside [0, %zd) (the rows of src)", bad,
                     src->shape[0]);
    else
        result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < 3; k++)
        if (bufs[k])
            PyBuffer_Release(bufs[k]);
    return result;
}

static PyMethodDef spmm_methods[] = {
    {"csr_spmm", (PyCFunction)(void (*)(void))csr_spmm, METH_VARARGS | METH_KEYWORDS,
     csr_spmm_doc},
    {"csr_series", (PyCFunction)(void (*)(void))csr_series, METH_VARARGS | METH_KEYWORDS,
     csr_series_doc},
    {"take_rows", take_rows, METH_VARARGS, take_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef spmm_module = {
    PyModuleDef_HEAD_INIT, "_spmm",
    "Compiled float32 CSR x dense products for the sparse backend (optional extension).", -1,
    spmm_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__spmm(void)
{
    choose_kernels();
    series_isas = series_task_for("avx512")  ? "portable avx2 avx512"
                  : series_task_for("avx2") ? "portable avx2"
                                            : "portable";
    PyObject *module = PyModule_Create(&spmm_module);
    if (module && (PyModule_AddStringConstant(module, "isa", kernel_isa) < 0 ||
                   PyModule_AddStringConstant(module, "series_isas", series_isas) < 0)) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
#endif
