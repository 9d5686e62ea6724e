/* The graph scanner's C core (kernels/_graphscan.c without its Python glue) against
 * expected outputs: built for x86-64, aarch64 and armv7 and run (under qemu-user for the
 * last two) by tests/native/test_cross.py. Prints "ok N" and exits 0, or names each failed
 * check and exits 1.
 *
 * This file is the scanner's host: node ids live in a plain array and compare as Python
 * would compare the ids the Python host makes of them (ints by value, strings by bytes).
 * Numbers beyond the fast path go to strtod (correctly rounded in glibc; the C locale,
 * as no setlocale is called).
 */
#define DGDM_SCANNER_ONLY
#include "../../kernels/_graphscan.c"

#include <stdio.h>

#define MAX_IDS 64

typedef struct {
    IdToken ids[MAX_IDS];
    ptrdiff_t n;
} Host;

static int same_id(const IdToken *a, const IdToken *b)
{
    if (a->is_int != b->is_int) return 0;
    if (a->is_int) return a->value == b->value;
    return a->n == b->n && memcmp(a->s, b->s, (size_t)a->n) == 0;
}

static int host_add_id(void *host, const IdToken *id)
{
    Host *h = host;
    if (h->n == MAX_IDS) return 0;
    h->ids[h->n++] = *id;
    return 1;
}

static int host_index_ids(void *host)
{
    Host *h = host;
    for (ptrdiff_t i = 0; i < h->n; i++)
        for (ptrdiff_t j = 0; j < i; j++)
            if (same_id(&h->ids[i], &h->ids[j])) return 0;
    return 1;
}

static int host_find_id(void *host, const IdToken *id, int64_t *row)
{
    Host *h = host;
    for (ptrdiff_t i = 0; i < h->n; i++)
        if (same_id(&h->ids[i], id)) {
            *row = i;
            return 1;
        }
    return 0;
}

static int host_string_to_double(const char *text, char **stop, double *value)
{
    *value = strtod(text, stop);
    return 1;
}

static int checks, failures;

static void check(int ok, const char *what, const char *body)
{
    checks++;
    if (!ok) {
        failures++;
        printf("FAIL %s: %s\n", what, body);
    }
}

/* Scan a body; 1 when it is read (g and h hold the result, free with scan_free). */
static int scan_text(const char *body, size_t len, Scan *g, Host *h)
{
    Cursor c = {body, body + len};
    memset(h, 0, sizeof *h);
    memset(g, 0, sizeof *g);
    g->host = h;
    g->identity = 1;
    g->width = -1;
    g->features = -1;
    return scan_body(&c, g);
}

static uint64_t bits(double v)
{
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

static void check_plain_body(void)
{
    const char *body =
        "{\"nodes\":[{\"id\":\"a\",\"features\":[1,2.5]},{\"id\":\"b\",\"features\":[-3e2,0.125]}],"
        "\"edges\":[{\"source\":\"a\",\"target\":\"b\",\"weight\":2.5},{\"target\":\"a\","
        "\"source\":\"b\"}],\"directed\":true,\"graph_id\":\"g1\","
        "\"method\":{\"kind\":\"heat\",\"t\":1.5}}";
    Scan g;
    Host h;
    int ok = scan_text(body, strlen(body), &g, &h);
    check(ok, "the plain body is read", body);
    if (ok) {
        const double *x = (const double *)g.x.data, *w = (const double *)g.weights.data;
        const int64_t *rows = (const int64_t *)g.rows.data, *cols = (const int64_t *)g.cols.data;
        check(h.n == 2 && !h.ids[0].is_int && memcmp(h.ids[1].s, "b", 1) == 0, "ids", body);
        check(g.features == 1 && g.width == 2 && g.x.len == 4 * 8, "x shape", body);
        check(x[0] == 1.0 && x[1] == 2.5 && x[2] == -300.0 && x[3] == 0.125, "x", body);
        check(g.rows.len == 2 * 8 && rows[0] == 0 && cols[0] == 1 && rows[1] == 1 &&
                  cols[1] == 0,
              "edges", body);
        check(w[0] == 2.5 && w[1] == 1.0, "weights (default 1)", body);
        check(g.passed[0].len == 4 && memcmp(g.passed[0].start, "true", 4) == 0, "directed",
              body);
        const char *method = "{\"kind\":\"heat\",\"t\":1.5}";
        check(g.passed[1].len == (ptrdiff_t)strlen(method) &&
                  memcmp(g.passed[1].start, method, strlen(method)) == 0,
              "method span", body);
        check(g.passed[2].len == 4 && memcmp(g.passed[2].start, "\"g1\"", 4) == 0, "graph_id",
              body);
    }
    scan_free(&g);
    /* Every proper prefix is declined (and read only within its bounds). */
    int all_declined = 1;
    for (size_t len = 0; len < strlen(body); len++) {
        char *copy = malloc(len ? len : 1); /* exact size: a read past it is a real overrun */
        memcpy(copy, body, len);
        all_declined &= !scan_text(copy, len, &g, &h);
        scan_free(&g);
        free(copy);
    }
    check(all_declined, "every truncation is declined", body);
}

static void check_identity_ids(void)
{
    const char *body = "{\"nodes\":[{\"id\":0},{\"id\":1},{\"id\":2}],"
                       "\"edges\":[{\"source\":2,\"target\":0,\"weight\":1e-3}]}";
    Scan g;
    Host h;
    int ok = scan_text(body, strlen(body), &g, &h);
    check(ok && g.identity && h.n == 3 && g.features == 0, "ids 0..N-1", body);
    if (ok) {
        check(((const int64_t *)g.rows.data)[0] == 2 && ((const int64_t *)g.cols.data)[0] == 0,
              "identity endpoints", body);
        check(((const double *)g.weights.data)[0] == 1e-3, "weight", body);
    }
    scan_free(&g);
}

static void check_numbers(void)
{
    static const struct {
        const char *literal;
        uint64_t expected;
    } cases[] = {
        {"0.1", 0x3fb999999999999aULL},
        {"1e23", 0x44b52d02c7e14af6ULL},
        {"5e-324", 0x0000000000000001ULL},
        {"2.5e-324", 0x0000000000000001ULL},
        {"-0", 0x0000000000000000ULL}, /* float(int("-0")) */
        {"-0.0", 0x8000000000000000ULL},
        {"9007199254740993", 0x4340000000000000ULL},
        {"1.7976931348623157e308", 0x7fefffffffffffffULL},
        {"123456789012345678901234567890", 0x45f8ee90ff6c373eULL},
        {"0.30000000000000004", 0x3fd3333333333334ULL},
        {"1E+2", 0x4059000000000000ULL},
        {"4.9406564584124654e-324", 0x0000000000000001ULL},
        {"0.000000000000000000000000000000001", 0x3914c4e977ba1f5cULL},
        {"1.0000000000000002", 0x3ff0000000000001ULL},
        {"1e22", 0x4480f0cf064dd592ULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char body[160];
        snprintf(body, sizeof body, "{\"nodes\":[{\"id\":0,\"features\":[%s]}]}",
                 cases[i].literal);
        Scan g;
        Host h;
        int ok = scan_text(body, strlen(body), &g, &h);
        check(ok && bits(((const double *)g.x.data)[0]) == cases[i].expected,
              "the number's double, bit for bit", body);
        scan_free(&g);
    }
}

static void check_declined(void)
{
    static const char *const bodies[] = {
        "{\"nodes\":[{\"id\":\"a\\u0062\"}]}",
        "{\"nodes\":[{\"id\":0,\"id\":1}]}",
        "{\"nodes\":[{\"id\":0}],\"nodes\":[{\"id\":1}]}",
        "{\"nodes\":[{\"id\":0,\"x\":1}]}",
        "{\"nodes\":[{\"id\":0,\"features\":null}]}",
        "{\"nodes\":[{\"id\":0,\"features\":[1e400]}]}",
        "{\"nodes\":[{\"id\":0,\"features\":[1]},{\"id\":1,\"features\":[1,2]}]}",
        "{\"nodes\":[{\"id\":\"a\"},{\"id\":\"a\"}]}",
        "{\"nodes\":[{\"id\":1.0}]}",
        "{\"nodes\":[{\"id\":true}]}",
        "{\"nodes\":[{\"id\":0}],\"edges\":[{\"source\":0,\"target\":0,\"weight\":0}]}",
        "{\"nodes\":[{\"id\":0}],\"edges\":[{\"source\":0,\"target\":1}]}",
        "{\"nodes\":[{\"id\":0}],\"edges\":[{\"source\":0}]}",
        "{\"edges\":[],\"nodes\":[{\"id\":0}]}",
        "{\"nodes\":[]}",
        "{\"nodes\":[{\"id\":0}]} x",
        "{\"nodes\":[{\"id\":12345678901234567890123}]}",
        "{\"nodes\":[{\"id\":0,\"features\":[11111111111111111111111111111111111111111111111111"
        "111111111111111.5]}]}", /* longer than MAX_NUMBER_CHARS */
        "{\"num_nodes\":1}",
    };
    for (size_t i = 0; i < sizeof bodies / sizeof bodies[0]; i++) {
        Scan g;
        Host h;
        check(!scan_text(bodies[i], strlen(bodies[i]), &g, &h), "declined", bodies[i]);
        scan_free(&g);
    }
}

int main(void)
{
    check_plain_body();
    check_identity_ids();
    check_numbers();
    check_declined();
    if (failures) {
        printf("%d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("ok %d\n", checks);
    return 0;
}
