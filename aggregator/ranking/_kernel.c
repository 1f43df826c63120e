/* The inner loop of pool.score_pool, compiled: BM25 and term-pair proximity of a pool of passages.
 *
 * pool.py holds the reference in numpy and the meaning of every number; this
 * file computes the same formula in one pass over the pool's tokens, without
 * the thirty-odd array operations (each a few microseconds) numpy needs for a
 * pool of a few dozen passages. It is optional: pool.py uses it when the
 * build compiled it and falls back to numpy otherwise, and the tests check
 * that both give the same scores.
 *
 * Only the buffer protocol is used (no numpy headers), so building needs a C
 * compiler and Python's headers, nothing else.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A buffer of `count` items of `itemsize` bytes, C-contiguous, writable if asked; 0 on success. */
static int
get_array(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, Py_ssize_t count, int writable, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    if (view->itemsize != itemsize || (count >= 0 && view->len != count * itemsize)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes", name, count, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static double
idf(double n, double df)
{
    return log1p((n - df + 0.5) / (df + 0.5));
}

PyDoc_STRVAR(score_doc,
"score(documents, table, qtf, known, df, passages, term_avgdl, pair_index, pair_qtf, k1, b, bm25, proximity)\n"
"\n"
"documents: list of int32 arrays (term ids); table: int32, term id -> 1 + query column (0: not a query term);\n"
"qtf: float64[k]; known: bytes[k] (0: a word absent from the vocabulary); df: float64[k] document frequencies from\n"
"collection statistics, or None to count them in the pool; passages: the collection's size (with df);\n"
"term_avgdl: average length for single terms (<= 0: the pool's); pair_index: int64[k*k] -> pair number or -1;\n"
"pair_qtf: float64[pairs]; bm25 and proximity: float64[n], written (normalised by their ceilings).");

static PyObject *
score(PyObject *self, PyObject *args)
{
    PyObject *documents, *table_obj, *qtf_obj, *known_obj, *df_obj, *pair_index_obj, *pair_qtf_obj, *bm25_obj, *prox_obj;
    double passages, term_avgdl, k1, b;
    if (!PyArg_ParseTuple(args, "O!OOOOddOOddOO", &PyList_Type, &documents, &table_obj, &qtf_obj, &known_obj, &df_obj,
                          &passages, &term_avgdl, &pair_index_obj, &pair_qtf_obj, &k1, &b, &bm25_obj, &prox_obj))
        return NULL;

    Py_ssize_t n = PyList_GET_SIZE(documents);
    Py_buffer table = {0}, qtf = {0}, known = {0}, df = {0}, pair_index = {0}, pair_qtf = {0}, bm25 = {0}, prox = {0};
    Py_buffer *docs = NULL;
    Py_ssize_t docs_held = 0;
    double *tf = NULL, *pair_tf = NULL, *lengths = NULL, *weights = NULL, *pair_weights = NULL;
    PyObject *result = NULL;

    if (get_array(table_obj, &table, 4, -1, 0, "table") < 0 || get_array(qtf_obj, &qtf, 8, -1, 0, "qtf") < 0)
        goto done;
    Py_ssize_t k = qtf.len / 8;
    if (get_array(known_obj, &known, 1, k, 0, "known") < 0)
        goto done;
    if (df_obj != Py_None && get_array(df_obj, &df, 8, k, 0, "df") < 0)
        goto done;
    if (get_array(pair_index_obj, &pair_index, 8, k * k, 0, "pair_index") < 0 || get_array(pair_qtf_obj, &pair_qtf, 8, -1, 0, "pair_qtf") < 0)
        goto done;
    Py_ssize_t pairs = pair_qtf.len / 8;
    if (get_array(bm25_obj, &bm25, 8, n, 1, "bm25") < 0 || get_array(prox_obj, &prox, 8, n, 1, "proximity") < 0)
        goto done;

    docs = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    tf = PyMem_Calloc(k * n + 1, sizeof(double));
    pair_tf = PyMem_Calloc(pairs * n + 1, sizeof(double));
    lengths = PyMem_Calloc(n + 1, sizeof(double));
    weights = PyMem_Calloc(k + 1, sizeof(double));
    pair_weights = PyMem_Calloc(pairs + 1, sizeof(double));
    if (!docs || !tf || !pair_tf || !lengths || !weights || !pair_weights) {
        PyErr_NoMemory();
        goto done;
    }
    for (; docs_held < n; docs_held++) {
        if (get_array(PyList_GET_ITEM(documents, docs_held), &docs[docs_held], 4, -1, 0, "document") < 0)
            goto done;
    }

    /* Counting: each token's query column from the table, and each adjacent pair of query terms. */
    const int32_t *columns = table.buf;
    const Py_ssize_t vocabulary = table.len / 4;
    const int64_t *pair_of = pair_index.buf;
    double total_length = 0.0;
    Py_ssize_t hits = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        const int32_t *tokens = docs[j].buf;
        Py_ssize_t size = docs[j].len / 4;
        lengths[j] = (double)size;
        total_length += (double)size;
        int32_t previous = 0;
        for (Py_ssize_t t = 0; t < size; t++) {
            int32_t id = tokens[t];
            int32_t column = (id >= 0 && id < vocabulary) ? columns[id] : 0;
            if (column > 0 && column <= k) {
                tf[(column - 1) * n + j] += 1.0;
                hits++;
                if (previous > 0) {
                    int64_t pair = pair_of[(previous - 1) * k + (column - 1)];
                    if (pair >= 0 && pair < pairs)
                        pair_tf[pair * n + j] += 1.0;
                }
            } else {
                column = 0;
            }
            previous = column;
        }
    }

    /* BM25 of single terms, as pool.score_pool's numpy reference computes it. */
    const double *q = qtf.buf, *frequency = df.buf;
    const char *is_known = known.buf;
    double *out = bm25.buf, *near = prox.buf;
    double pool_avgdl = n ? total_length / (double)n : 0.0;
    if (pool_avgdl == 0.0)
        pool_avgdl = 1.0;
    double avgdl = term_avgdl > 0.0 ? term_avgdl : pool_avgdl;
    double ceiling = 0.0;
    for (Py_ssize_t i = 0; i < k; i++) {
        double d;
        double collection = passages;
        if (df.buf) {
            d = frequency[i];
            collection = passages > 1.0 ? passages : 1.0;
        } else {
            d = 0.0;
            for (Py_ssize_t j = 0; j < n; j++)
                d += tf[i * n + j] > 0.0;
            collection = (double)n;
        }
        weights[i] = q[i] * idf(collection, d);
        ceiling += weights[i];
    }
    ceiling *= k1 + 1.0;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (!is_known[i])
            weights[i] = 0.0;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        double norm = k1 * (1.0 - b + b * lengths[j] / avgdl);
        double sum = 0.0;
        for (Py_ssize_t i = 0; i < k; i++) {
            double f = tf[i * n + j];
            sum += weights[i] * (f * (k1 + 1.0) / (f + norm));
        }
        out[j] = ceiling > 0.0 ? sum / ceiling : 0.0;
    }

    /* Proximity: pairs scored like terms, with the pool's own counts and average length. */
    for (Py_ssize_t j = 0; j < n; j++)
        near[j] = 0.0;
    if (pairs > 0 && hits > 1) {
        const double *pq = pair_qtf.buf;
        double pair_ceiling = 0.0;
        for (Py_ssize_t p = 0; p < pairs; p++) {
            double d = 0.0;
            for (Py_ssize_t j = 0; j < n; j++)
                d += pair_tf[p * n + j] > 0.0;
            pair_weights[p] = pq[p] * idf((double)n, d);
            pair_ceiling += pair_weights[p];
        }
        pair_ceiling *= k1 + 1.0;
        if (pair_ceiling > 0.0) {
            for (Py_ssize_t j = 0; j < n; j++) {
                double norm = k1 * (1.0 - b + b * lengths[j] / pool_avgdl);
                double sum = 0.0;
                for (Py_ssize_t p = 0; p < pairs; p++) {
                    double f = pair_tf[p * n + j];
                    sum += pair_weights[p] * (f * (k1 + 1.0) / (f + norm));
                }
                near[j] = sum / pair_ceiling;
            }
        }
    }
    result = Py_NewRef(Py_None);

done:
    for (Py_ssize_t j = 0; j < docs_held; j++)
        PyBuffer_Release(&docs[j]);
    PyMem_Free(docs);
    PyMem_Free(tf);
    PyMem_Free(pair_tf);
    PyMem_Free(lengths);
    PyMem_Free(weights);
    PyMem_Free(pair_weights);
    Py_buffer *views[] = {&table, &qtf, &known, &df, &pair_index, &pair_qtf, &bm25, &prox};
    for (size_t i = 0; i < sizeof(views) / sizeof(views[0]); i++) {
        if (views[i]->obj)
            PyBuffer_Release(views[i]);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"score", score, METH_VARARGS, score_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "Compiled inner loop of the rerank's pool scoring (see pool.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__kernel(void)
{
    return PyModule_Create(&module);
}
