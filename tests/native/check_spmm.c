/* The SpMM kernels (kernels/_spmm.c without its Python glue) against expected outputs:
 * built for x86-64, aarch64 and armv7 and run (under qemu-user for the last two) by
 * tests/native/test_cross.py. Prints "ok N <isa>" and exits 0, or names each failed check
 * and exits 1.
 *
 * Values are small multiples of 1/4, so every float32 sum is exact in any order: the
 * vectorised and the scalar loops must then agree with the reference bit for bit.
 */
#define DGDM_KERNELS_ONLY
#include "../../kernels/_spmm.c"

#include <stdio.h>
#include <stdlib.h>

static int checks, failures;

static void check(int ok, const char *what, long detail)
{
    checks++;
    if (!ok) {
        failures++;
        printf("FAIL %s (%ld)\n", what, detail);
    }
}

/* y = a * (T z) + c * x, computed one term at a time. */
static void reference(const int64_t *ip, const int64_t *ix, const float *data, const float *z,
                      const float *x, float *y, ptrdiff_t n, ptrdiff_t f, float a, float c)
{
    for (ptrdiff_t i = 0; i < n; i++)
        for (ptrdiff_t k = 0; k < f; k++) {
            float acc = 0.0f;
            for (int64_t jj = ip[i]; jj < ip[i + 1]; jj++) acc += data[jj] * z[ix[jj] * f + k];
            y[i * f + k] = a * acc + (x ? c * x[i * f + k] : 0.0f);
        }
}

static void check_hand_computed(spmm_kernel kernel)
{
    /* T = [[0, 2], [1, 0]], z = [[1, 2], [3, 4]], x = ones, a = 0.5, c = 2 */
    const int32_t ip[] = {0, 1, 2}, ix[] = {1, 0};
    const float data[] = {2, 1}, z[] = {1, 2, 3, 4}, x[] = {1, 1, 1, 1};
    const float expected[] = {5, 6, 2.5f, 3};
    float y[4];
    spmm_args p = {2, 2, 2, 2, ip, ix, data, z, x, y, 0.5f, 2.0f};
    check(kernel(&p) == 0, "hand-computed status", 0);
    check(memcmp(y, expected, sizeof y) == 0, "hand-computed y", 0);
}

/* A random CSR (n x m, ~3 entries a row) times z (m x f) against the reference. */
static void check_random(unsigned seed, ptrdiff_t f, spmm_kernel k32, spmm_kernel k64)
{
    enum { N = 7, M = 9, MAXNNZ = N * 4 };
    srand(seed);
    int64_t ip64[N + 1], ix64[MAXNNZ];
    int32_t ip32[N + 1], ix32[MAXNNZ];
    float data[MAXNNZ];
    ip64[0] = 0;
    for (int i = 0; i < N; i++) {
        int count = rand() % 4;
        ip64[i + 1] = ip64[i] + count;
        for (int64_t jj = ip64[i]; jj < ip64[i + 1]; jj++) {
            ix64[jj] = rand() % M;
            data[jj] = (float)(rand() % 9 - 4) * 0.25f;
        }
    }
    ptrdiff_t nnz = (ptrdiff_t)ip64[N];
    for (int i = 0; i <= N; i++) ip32[i] = (int32_t)ip64[i];
    for (ptrdiff_t jj = 0; jj < nnz; jj++) ix32[jj] = (int32_t)ix64[jj];
    float *z = malloc(sizeof(float) * (size_t)(M * f)), *x = malloc(sizeof(float) * (size_t)(N * f));
    float *want = malloc(sizeof(float) * (size_t)(N * f)), *y = malloc(sizeof(float) * (size_t)(N * f));
    for (ptrdiff_t q = 0; q < M * f; q++) z[q] = (float)(rand() % 17 - 8) * 0.25f;
    for (ptrdiff_t q = 0; q < N * f; q++) x[q] = (float)(rand() % 5) * 0.25f;
    for (int with_x = 0; with_x < 2; with_x++) {
        reference(ip64, ix64, data, z, with_x ? x : NULL, want, N, f, 0.5f, 0.75f);
        spmm_args p32 = {N, M, f, nnz, ip32, ix32, data, z, with_x ? x : NULL, y, 0.5f, 0.75f};
        spmm_args p64 = {N, M, f, nnz, ip64, ix64, data, z, with_x ? x : NULL, y, 0.5f, 0.75f};
        check(k32(&p32) == 0 && memcmp(y, want, sizeof(float) * (size_t)(N * f)) == 0,
              "int32 product = reference, F", (long)f);
        check(k64(&p64) == 0 && memcmp(y, want, sizeof(float) * (size_t)(N * f)) == 0,
              "int64 product = reference, F", (long)f);
    }
    free(z);
    free(x);
    free(want);
    free(y);
}

/* The fused series (three coefficients: two products) = two reference products, bit for
 * bit (dyadic values: every sum is exact), on one thread and three, rows scattered; with
 * `compact`, of the pattern and a scale vector, T_ij = s_i s_j. */
static void check_series(series_task_fn task, ptrdiff_t f, int threads, int compact)
{
    enum { N = 40, BAND = 3, MAXNNZ = N * 5 };
    srand((unsigned)(f * 31 + threads));
    int64_t ip64[N + 1], ix64[MAXNNZ];
    int32_t ip32[N + 1], ix32[MAXNNZ], scatter[N];
    float data[MAXNNZ], scale[N];
    for (int i = 0; i < N; i++) scale[i] = (float)(rand() % 4) * 0.25f;
    ip64[0] = 0;
    for (int i = 0; i < N; i++) {
        int count = rand() % 5;
        ip64[i + 1] = ip64[i] + count;
        for (int64_t jj = ip64[i]; jj < ip64[i + 1]; jj++) {
            int j = i + rand() % (2 * BAND + 1) - BAND;
            ix64[jj] = j < 0 ? 0 : (j >= N ? N - 1 : j);
            data[jj] = compact ? scale[i] * scale[ix64[jj]] : (float)(rand() % 9 - 4) * 0.25f;
        }
        scatter[i] = N - 1 - i;
    }
    const ptrdiff_t nnz = (ptrdiff_t)ip64[N];
    for (int i = 0; i <= N; i++) ip32[i] = (int32_t)ip64[i];
    for (ptrdiff_t jj = 0; jj < nnz; jj++) ix32[jj] = (int32_t)ix64[jj];
    const size_t size = sizeof(float) * (size_t)(N * f);
    float *x = malloc(size), *mid = malloc(size), *want = malloc(size), *out = malloc(size);
    for (ptrdiff_t q = 0; q < N * f; q++) x[q] = (float)(rand() % 9 - 4) * 0.25f;
    const float coeffs[3] = {0.25f, 0.75f, 0.5f};
    reference(ip64, ix64, data, x, x, mid, N, f, coeffs[2], coeffs[1]);
    reference(ip64, ix64, data, mid, x, want, N, f, 1.0f, coeffs[0]);
    series_args p = {N,      f,    nnz,   2,       4,
                     0,      0,    BAND,  ip32,    ix32,
                     scatter, compact ? NULL : data, coeffs, x, out,
                     compact ? scale : NULL};
    series_plan(p.band, p.chunk, &p.lag, &p.ring);
    float *rings = malloc(series_ring_floats(&p) * sizeof(float) * (size_t)threads);
    int ok = series_run(&p, task, threads, rings) == 0;
    for (int i = 0; i < N && ok; i++)
        ok = memcmp(out + (size_t)(scatter[i] * f), want + (size_t)(i * f),
                    sizeof(float) * (size_t)f) == 0;
    check(ok, compact ? "compact series = two reference products, F"
                      : "series = two reference products, F",
          (long)f);
    ix32[0] = ip32[1] > 0 ? (int32_t)N - 1 : 0; /* row 0 -> column N - 1: beyond the band */
    check(ip32[1] == 0 || series_run(&p, task, threads, rings) == -3,
          "an entry beyond the band is refused", (long)f);
    free(rings);
    free(x);
    free(mid);
    free(want);
    free(out);
}

static void check_bad_indices(spmm_kernel kernel)
{
    const int32_t bad_ip[] = {0, 2, 1}, ix[] = {0, 1}, bad_ix[] = {0, 5};
    const int32_t ip[] = {0, 1, 2};
    const float data[] = {1, 1}, z[] = {1, 2, 3, 4};
    float y[4];
    spmm_args p = {2, 2, 2, 2, bad_ip, ix, data, z, NULL, y, 1.0f, 0.0f};
    check(kernel(&p) == -1, "a decreasing indptr is refused", 0);
    spmm_args q = {2, 2, 2, 2, ip, bad_ix, data, z, NULL, y, 1.0f, 0.0f};
    check(kernel(&q) == -2, "a column index past z is refused", 0);
}

static void check_take_rows(void)
{
    const float src[] = {1, 2, 3, 4, 5, 6};
    const int64_t rows[] = {2, 0, 2};
    const int32_t bad[] = {1, 3};
    const float expected[] = {5, 6, 1, 2, 5, 6};
    float out[6];
    check(take_rows_i64(src, 3, rows, out, 3, 2) == -1, "take_rows status", 0);
    check(memcmp(out, expected, sizeof out) == 0, "take_rows rows", 0);
    check(take_rows_i32(src, 3, bad, out, 2, 2) == 1, "take_rows names the bad row", 1);
}

int main(void)
{
    choose_kernels(); /* x86-64 with AVX2+FMA: the AVX2 kernels, checked alongside */
    static const ptrdiff_t widths[] = {1, 3, 8, 15, 16, 17, 31, 32, 33, 40, 64};
    spmm_kernel kernels32[] = {spmm_portable_i32, kernel_i32};
    spmm_kernel kernels64[] = {spmm_portable_i64, kernel_i64};
    for (int which = 0; which < 2; which++) {
        check_hand_computed(kernels32[which]);
        check_bad_indices(kernels32[which]);
        for (size_t w = 0; w < sizeof widths / sizeof widths[0]; w++)
            check_random(7u + (unsigned)w, widths[w], kernels32[which], kernels64[which]);
    }
    check_take_rows();
    /* every series path this CPU has (the portable one stands in for the others) */
    series_task_fn tasks[3] = {series_task_for("portable"), series_task_for("avx2"),
                               series_task_for("avx512")};
    for (int which = 0; which < 3; which++)
        if (!tasks[which])
            tasks[which] = series_task_portable;
    for (int which = 0; which < 3; which++)
        for (size_t w = 0; w < sizeof widths / sizeof widths[0]; w++)
            for (int threads = 1; threads <= 3; threads += 2)
                for (int compact = 0; compact < 2; compact++)
                    check_series(tasks[which], widths[w], threads, compact);
    if (failures) {
        printf("%d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("ok %d %s\n", checks, kernel_isa);
    return 0;
}
