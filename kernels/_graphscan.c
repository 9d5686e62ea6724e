/* The node/edge graph JSON form (SPEC §3) read straight from bytes into arrays.
 *
 * A generic JSON decoder builds a Python object for every node, edge, key and number
 * (~2,000 objects for a 100-node, 16-feature graph) which the validator then walks again;
 * this scanner writes the features, the edge endpoints' row numbers and the weights into
 * flat buffers in one pass. It only accepts the plain case, and says so by returning None
 * for anything else: escapes in strings, duplicate or unknown keys, null or non-finite
 * values, ids that are not ints/strs, unknown endpoints, weights <= 0, uneven feature rows,
 * a number it cannot read exactly. The caller then decodes and validates the body the
 * general way, which names the offending field. So for every body it accepts, the result is
 * what the general path gives (a property the tests check), and it never raises on input.
 *
 * Numbers are converted with PyOS_string_to_double, CPython's correctly rounded, locale-free
 * float(str); an integer literal converts to the same double as float(int(literal)).
 *
 * The scanner itself is plain C: node ids are handed to three host_* functions (the Python
 * module at the end keeps them in a list and a dict, so Python decides what equal ids are).
 * With DGDM_SCANNER_ONLY defined, only the scanner is compiled and the including file is the
 * host: tests/native/ runs it that way on aarch64 and armv7 under qemu.
 */

#ifndef DGDM_SCANNER_ONLY
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NUMBER_CHARS 64 /* longer literals (rare) go the general way */
#define MAX_DEPTH 64        /* nesting of a skipped value (`method`) */

typedef struct {
    const char *p, *end;
} Cursor;

typedef struct { /* a growable byte buffer */
    char *data;
    ptrdiff_t len, cap;
} Buf;

static int buf_reserve(Buf *b, ptrdiff_t extra)
{
    if (b->len + extra <= b->cap) return 1;
    ptrdiff_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra) {
        if (cap > PTRDIFF_MAX / 2) return 0;
        cap *= 2;
    }
    char *data = realloc(b->data, (size_t)cap);
    if (!data) return 0;
    b->data = data;
    b->cap = cap;
    return 1;
}

static int buf_put(Buf *b, const void *value, ptrdiff_t size)
{
    if (!buf_reserve(b, size)) return 0;
    memcpy(b->data + b->len, value, (size_t)size);
    b->len += size;
    return 1;
}

/* A node id as written: an int literal (value) or a plain string (its bytes s, n). */
typedef struct {
    const char *s;
    ptrdiff_t n;
    int is_int;
    long long value;
} IdToken;

/* The host keeps the node ids. Each returns 1, or 0 to decline the body (with a Python
 * host, a MemoryError stays set and is raised). */
static int host_add_id(void *host, const IdToken *id);
static int host_index_ids(void *host); /* id -> row; 0 when an id repeats */
static int host_find_id(void *host, const IdToken *id, int64_t *row);
static int host_string_to_double(const char *text, char **stop, double *value);

static void skip_ws(Cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t'))
        c->p++;
}

static int eat(Cursor *c, char ch)
{
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

/* A string without escapes or control characters: its bytes (not yet UTF-8 checked). */
static int plain_string(Cursor *c, const char **s, ptrdiff_t *n)
{
    skip_ws(c);
    if (c->p >= c->end || *c->p != '"') return 0;
    const char *q = ++c->p;
    while (q < c->end) {
        unsigned char ch = (unsigned char)*q;
        if (ch == '"') {
            *s = c->p;
            *n = q - c->p;
            c->p = q + 1;
            return 1;
        }
        if (ch == '\\' || ch < 0x20) return 0;
        q++;
    }
    return 0;
}

static int is_digit(const Cursor *c, const char *q) { return q < c->end && *q >= '0' && *q <= '9'; }

/* A JSON number's literal (RFC 8259 grammar); *is_int when it has no fraction or exponent. */
static int number_literal(Cursor *c, const char **s, ptrdiff_t *n, int *is_int)
{
    skip_ws(c);
    const char *q = c->p;
    if (q < c->end && *q == '-') q++;
    if (!is_digit(c, q)) return 0;
    if (*q == '0')
        q++;
    else
        while (is_digit(c, q)) q++;
    *is_int = 1;
    if (q < c->end && *q == '.') {
        q++;
        if (!is_digit(c, q)) return 0;
        while (is_digit(c, q)) q++;
        *is_int = 0;
    }
    if (q < c->end && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < c->end && (*q == '+' || *q == '-')) q++;
        if (!is_digit(c, q)) return 0;
        while (is_digit(c, q)) q++;
        *is_int = 0;
    }
    *s = c->p;
    *n = q - c->p;
    c->p = q;
    return 1;
}

#if FLT_EVAL_METHOD == 0
#define FAST_PATH 1 /* doubles are evaluated without excess precision */
#else
#define FAST_PATH 0
#endif
static const double POW10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                               1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                               1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

static int digit_at(const Cursor *c, const char *q) { return q < c->end && (unsigned)(*q - '0') <= 9; }

/* A finite JSON number (RFC 8259 grammar) as the double Python's json module and numpy
 * would make of it, in one pass. Clinger's fast path: when the significant digits form an
 * integer m <= 2^53 and the decimal exponent e has |e| <= 22, m and 10^|e| are exact
 * doubles and one IEEE multiply or divide rounds the exact value correctly. Otherwise
 * CPython's correctly rounded float(str) decides. */
static int finite_number(Cursor *c, double *out)
{
    skip_ws(c);
    const char *q = c->p, *start = q;
    int negative = q < c->end && *q == '-', digits = 0, exponent = 0, is_int = 1;
    uint64_t m = 0;
    q += negative;
    if (!digit_at(c, q)) return 0;
    if (*q == '0') {
        q++;
    } else {
        for (; digit_at(c, q); q++, digits++) m = digits < 19 ? m * 10 + (uint64_t)(*q - '0') : m;
    }
    if (q < c->end && *q == '.') {
        q++;
        if (!digit_at(c, q)) return 0;
        for (; digit_at(c, q); q++, exponent--) {
            digits += m != 0 || *q != '0';
            m = digits < 19 ? m * 10 + (uint64_t)(*q - '0') : m;
        }
        is_int = 0;
    }
    if (q < c->end && (*q == 'e' || *q == 'E')) {
        int sign = 1, e = 0;
        q++;
        if (q < c->end && (*q == '+' || *q == '-')) sign = *q++ == '-' ? -1 : 1;
        if (!digit_at(c, q)) return 0;
        for (; digit_at(c, q); q++) e = e < 100000 ? e * 10 + (*q - '0') : e;
        exponent += sign * e;
        is_int = 0;
    }
    c->p = q;
    double value;
    if (FAST_PATH && digits < 19 && m <= (UINT64_C(1) << 53) && exponent >= -22 && exponent <= 22) {
        value = exponent < 0 ? (double)m / POW10[-exponent] : (double)m * POW10[exponent];
        value = negative ? -value : value;
    } else {
        char text[MAX_NUMBER_CHARS + 1];
        ptrdiff_t n = q - start;
        if (n > MAX_NUMBER_CHARS) return 0;
        memcpy(text, start, (size_t)n);
        text[n] = '\0';
        char *stop = NULL;
        if (!host_string_to_double(text, &stop, &value) || stop != text + n) return 0;
    }
    if (!isfinite(value)) return 0;
    *out = (is_int && value == 0.0) ? 0.0 : value; /* float(int("-0")) is +0.0 */
    return 1;
}

/* A node id or edge endpoint: an int that fits in int64, or a string's bytes (not yet
 * UTF-8 checked). */
static int node_id(Cursor *c, IdToken *id)
{
    skip_ws(c);
    if (c->p < c->end && *c->p == '"') {
        id->is_int = 0;
        return plain_string(c, &id->s, &id->n);
    }
    const char *s;
    ptrdiff_t n;
    int literal_int;
    if (!number_literal(c, &s, &n, &literal_int) || !literal_int) return 0;
    ptrdiff_t digits = n - (s[0] == '-');
    if (digits > 18) return 0; /* beyond int64 is possible: the general path decides */
    long long value = 0;
    for (const char *q = s + (s[0] == '-'); q < s + n; q++) value = value * 10 + (*q - '0');
    id->is_int = 1;
    id->value = s[0] == '-' ? -value : value;
    id->s = s;
    id->n = n;
    return 1;
}

static int key_is(const char *s, ptrdiff_t n, const char *name)
{
    return (size_t)n == strlen(name) && memcmp(s, name, (size_t)n) == 0;
}

/* Skip any JSON value (for the top-level keys the caller decodes itself). The span is
 * checked loosely here; the caller's decoder checks it fully. */
static int skip_value(Cursor *c, int depth)
{
    if (depth > MAX_DEPTH) return 0;
    skip_ws(c);
    if (c->p >= c->end) return 0;
    char ch = *c->p;
    if (ch == '"') {
        for (c->p++; c->p < c->end; c->p++) {
            if (*c->p == '\\') {
                if (++c->p >= c->end) return 0;
            } else if (*c->p == '"') {
                c->p++;
                return 1;
            }
        }
        return 0;
    }
    if (ch == '{' || ch == '[') {
        char close = ch == '{' ? '}' : ']';
        c->p++;
        if (eat(c, close)) return 1;
        do {
            if (ch == '{') {
                skip_ws(c);
                if (c->p >= c->end || *c->p != '"' || !skip_value(c, depth + 1) || !eat(c, ':'))
                    return 0;
            }
            if (!skip_value(c, depth + 1)) return 0;
        } while (eat(c, ','));
        return eat(c, close);
    }
    const char *s;
    ptrdiff_t n;
    int is_int;
    if (ch == '-' || (ch >= '0' && ch <= '9')) return number_literal(c, &s, &n, &is_int);
    static const char *const words[] = {"true", "false", "null"};
    for (size_t i = 0; i < 3; i++) {
        size_t len = strlen(words[i]);
        if ((size_t)(c->end - c->p) >= len && memcmp(c->p, words[i], len) == 0) {
            c->p += len;
            return 1;
        }
    }
    return 0;
}

typedef struct {
    const char *start; /* NULL: absent */
    ptrdiff_t len;
} Span;

static const char *const PASSED[] = {"directed", "method", "graph_id"};
#define N_PASSED 3

typedef struct {
    void *host;       /* keeps the node ids */
    ptrdiff_t n;      /* nodes so far */
    int indexed;      /* the host has built id -> row */
    int identity;     /* ids are the ints 0..N-1 in order (so far) */
    ptrdiff_t width;  /* features per node; -1 until the first node says */
    int features;     /* nodes carry features (decided by the first node) */
    Buf x;            /* float64 (N, width) */
    Buf rows, cols;   /* int64 (E,) */
    Buf weights;      /* float64 (E,) */
    Span passed[N_PASSED]; /* raw JSON of directed, method, graph_id */
} Scan;

/* "features": [numbers...] appended as one row of x. */
static int feature_row(Cursor *c, Scan *g)
{
    if (!eat(c, '[')) return 0;
    ptrdiff_t count = 0;
    if (!eat(c, ']')) {
        do {
            if (!buf_reserve(&g->x, sizeof(double))) return 0;
            if (!finite_number(c, (double *)(g->x.data + g->x.len))) return 0;
            g->x.len += (ptrdiff_t)sizeof(double);
            count++;
        } while (eat(c, ','));
        if (!eat(c, ']')) return 0;
    }
    if (g->width < 0) g->width = count;
    return count == g->width;
}

static int scan_node(Cursor *c, Scan *g, ptrdiff_t row)
{
    int has_id = 0, has_features = 0;
    if (!eat(c, '{')) return 0;
    if (eat(c, '}')) return 0; /* no id */
    do {
        const char *key;
        ptrdiff_t n;
        if (!plain_string(c, &key, &n) || !eat(c, ':')) return 0;
        if (key_is(key, n, "id") && !has_id) {
            IdToken id;
            if (!node_id(c, &id) || !host_add_id(g->host, &id)) return 0;
            g->identity = g->identity && id.is_int && id.value == row;
            g->n++;
            has_id = 1;
        } else if (key_is(key, n, "features") && !has_features) {
            if (g->features < 0) g->features = 1;
            if (!g->features || !feature_row(c, g)) return 0;
            has_features = 1;
        } else {
            return 0; /* an unknown or repeated key */
        }
    } while (eat(c, ','));
    if (!eat(c, '}') || !has_id) return 0;
    if (g->features < 0) g->features = 0;
    return has_features == g->features;
}

static int scan_nodes(Cursor *c, Scan *g)
{
    if (!eat(c, '[') || eat(c, ']')) return 0; /* no nodes: the general path decides */
    ptrdiff_t row = 0;
    do {
        if (!scan_node(c, g, row++)) return 0;
    } while (eat(c, ','));
    return eat(c, ']');
}

/* id -> row for ids that are not 0..N-1; a repeated id sends the body the general way. */
static int build_index(Scan *g)
{
    g->indexed = host_index_ids(g->host);
    return g->indexed;
}

static int endpoint_row(Cursor *c, Scan *g, int64_t *row)
{
    IdToken id;
    if (!node_id(c, &id)) return 0;
    if (g->identity) {
        if (!id.is_int || id.value < 0 || id.value >= g->n) return 0;
        *row = id.value;
        return 1;
    }
    return host_find_id(g->host, &id, row);
}

static int scan_edge(Cursor *c, Scan *g)
{
    int64_t source = 0, target = 0;
    double weight = 1.0;
    int seen = 0; /* bits: 1 source, 2 target, 4 weight */
    if (!eat(c, '{') || eat(c, '}')) return 0;
    do {
        const char *key;
        ptrdiff_t n;
        int bit;
        if (!plain_string(c, &key, &n) || !eat(c, ':')) return 0;
        if (key_is(key, n, "source"))
            bit = 1;
        else if (key_is(key, n, "target"))
            bit = 2;
        else if (key_is(key, n, "weight"))
            bit = 4;
        else
            return 0;
        if (seen & bit) return 0;
        seen |= bit;
        if (bit == 1 && !endpoint_row(c, g, &source)) return 0;
        if (bit == 2 && !endpoint_row(c, g, &target)) return 0;
        if (bit == 4 && (!finite_number(c, &weight) || !(weight > 0.0))) return 0;
    } while (eat(c, ','));
    if (!eat(c, '}') || (seen & 3) != 3) return 0;
    return buf_put(&g->rows, &source, sizeof source) && buf_put(&g->cols, &target, sizeof target) &&
           buf_put(&g->weights, &weight, sizeof weight);
}

static int scan_edges(Cursor *c, Scan *g)
{
    if (!g->identity && !g->indexed && !build_index(g)) return 0;
    if (!eat(c, '[')) return 0;
    if (eat(c, ']')) return 1;
    do {
        if (!scan_edge(c, g)) return 0;
    } while (eat(c, ','));
    return eat(c, ']');
}

/* The top-level object: nodes and edges scanned (nodes must come first: edges need the
 * ids), directed / method / graph_id returned as raw spans for the caller to decode. */
static int scan_body(Cursor *c, Scan *g)
{
    int seen_nodes = 0, seen_edges = 0;
    if (!eat(c, '{') || eat(c, '}')) return 0;
    do {
        const char *key;
        ptrdiff_t n;
        if (!plain_string(c, &key, &n) || !eat(c, ':')) return 0;
        if (key_is(key, n, "nodes") && !seen_nodes) {
            if (!scan_nodes(c, g)) return 0;
            seen_nodes = 1;
            continue;
        }
        if (key_is(key, n, "edges") && !seen_edges && seen_nodes) {
            if (!scan_edges(c, g)) return 0;
            seen_edges = 1;
            continue;
        }
        Span *span = NULL;
        for (size_t i = 0; i < N_PASSED; i++)
            if (key_is(key, n, PASSED[i])) span = &g->passed[i];
        if (!span || span->start) return 0; /* unknown or repeated */
        skip_ws(c);
        const char *start = c->p;
        if (!skip_value(c, 0)) return 0;
        span->start = start;
        span->len = c->p - start;
    } while (eat(c, ','));
    if (!eat(c, '}') || !seen_nodes) return 0;
    if (!g->identity && !g->indexed && !build_index(g)) return 0; /* ids unique, edges or not */
    skip_ws(c);
    return c->p == c->end;
}

static void scan_free(Scan *g)
{
    free(g->x.data);
    free(g->rows.data);
    free(g->cols.data);
    free(g->weights.data);
}

#ifndef DGDM_SCANNER_ONLY
/* The Python host: ids in a list, id -> row in a dict (built only when needed). */
typedef struct {
    PyObject *ids, *index;
} PyHost;

static PyObject *id_object(const IdToken *id)
{
    if (id->is_int) return PyLong_FromLongLong(id->value);
    PyObject *text = PyUnicode_DecodeUTF8(id->s, id->n, NULL);
    if (!text && !PyErr_ExceptionMatches(PyExc_MemoryError)) PyErr_Clear(); /* not UTF-8 */
    return text;
}

static int host_add_id(void *host, const IdToken *id)
{
    PyObject *object = id_object(id);
    if (!object) return 0;
    int ok = PyList_Append(((PyHost *)host)->ids, object) == 0;
    Py_DECREF(object);
    return ok;
}

static int host_index_ids(void *host)
{
    PyHost *h = host;
    Py_ssize_t n = PyList_GET_SIZE(h->ids);
    h->index = PyDict_New();
    if (!h->index) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = PyLong_FromSsize_t(i);
        if (!row) return 0;
        int known = PyDict_Contains(h->index, PyList_GET_ITEM(h->ids, i));
        int ok = known == 0 && PyDict_SetItem(h->index, PyList_GET_ITEM(h->ids, i), row) == 0;
        Py_DECREF(row);
        if (!ok) return 0;
    }
    return 1;
}

static int host_find_id(void *host, const IdToken *id, int64_t *row)
{
    PyObject *object = id_object(id);
    if (!object) return 0;
    PyObject *found = PyDict_GetItemWithError(((PyHost *)host)->index, object); /* borrowed */
    Py_DECREF(object);
    if (!found) return 0;
    *row = PyLong_AsLongLong(found);
    return 1;
}

static int host_string_to_double(const char *text, char **stop, double *value)
{
    *value = PyOS_string_to_double(text, stop, NULL); /* overflow gives +-inf */
    if (*value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static PyObject *as_bytearray(const Buf *b)
{
    return PyByteArray_FromStringAndSize(b->data ? b->data : "", b->len);
}

static PyObject *passed_spans(const Scan *g)
{
    PyObject *extras = PyDict_New();
    for (size_t i = 0; extras && i < N_PASSED; i++) {
        if (!g->passed[i].start) continue;
        PyObject *span = PyBytes_FromStringAndSize(g->passed[i].start, g->passed[i].len);
        if (!span || PyDict_SetItemString(extras, PASSED[i], span) < 0) Py_CLEAR(extras);
        Py_XDECREF(span);
    }
    return extras;
}

static PyObject *scan(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Cursor c = {(const char *)view.buf, (const char *)view.buf + view.len};
    PyHost host = {PyList_New(0), NULL};
    Scan g = {.host = &host, .identity = 1, .width = -1, .features = -1};
    PyObject *result = NULL;
    if (!host.ids) goto done;
    if (!scan_body(&c, &g)) {
        if (PyErr_ExceptionMatches(PyExc_MemoryError)) goto done;
        PyErr_Clear();
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = Py_BuildValue("((OOnNNNN)N)", host.ids, g.features > 0 ? Py_True : Py_False,
                           g.width < 0 ? (Py_ssize_t)0 : (Py_ssize_t)g.width,
                           as_bytearray(&g.x), as_bytearray(&g.rows), as_bytearray(&g.cols),
                           as_bytearray(&g.weights), passed_spans(&g));
done:
    PyBuffer_Release(&view);
    Py_XDECREF(host.ids);
    Py_XDECREF(host.index);
    scan_free(&g);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_O,
     "scan(data, /) -> ((ids, has_features, width, x, rows, cols, weights), extras) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_graphscan",
    "The plain node/edge graph JSON form read straight into arrays (None: not plain).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__graphscan(void) { return PyModule_Create(&module); }
#endif
