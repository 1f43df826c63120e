/* The rerank's one compiled loop: how often each query term, and each adjacent pair of query terms, occurs
 * in each passage of a pool (pool.py's `_count_numpy` counts the same with numpy, where the build had no
 * C compiler, and the tests check that both give the same counts).
 *
 * Counting only: no formula and no constant of the ranking lives here. BM25, proximity, calibration and
 * fusion are computed once, in pool.py and rerank.py, from these counts. This loop is what numpy does
 * slowly for a pool of a few dozen passages (a dozen array operations of a few microseconds each over the
 * pool's thousands of tokens).
 *
 * Only the buffer protocol is used (no numpy headers), so building needs a C compiler and Python's headers,
 * nothing else. No state outside a call: the module can be called from any thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* A buffer of `count` items of `itemsize` bytes (any number when count < 0), C-contiguous, writable if
 * asked; 0 on success. */
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

PyDoc_STRVAR(count_doc,
"count(documents, table, k, pair_index, pairs, rows, lengths)\n"
"\n"
"documents: list of n buffers of packed int32 term ids (bytes); table: int32, term id -> 1 + the term's\n"
"column among the query's k distinct terms (0: not a query term); pair_index: int64[k*k], (first term's\n"
"column, second's) -> pair number (below pairs) or -1. Written: rows float64[(k+pairs)*n] (row i < k: how\n"
"often term i occurs in each passage; row k+p: how often pair p's terms stand side by side, in order),\n"
"lengths float64[n] (tokens per passage).");

static PyObject *
count(PyObject *self, PyObject *args)
{
    PyObject *documents, *table_obj, *pair_index_obj, *rows_obj, *lengths_obj;
    Py_ssize_t k, pairs;
    if (!PyArg_ParseTuple(args, "O!OnOnOO", &PyList_Type, &documents, &table_obj, &k, &pair_index_obj, &pairs, &rows_obj, &lengths_obj))
        return NULL;
    if (k < 0 || pairs < 0) {
        PyErr_SetString(PyExc_ValueError, "k and pairs: not negative");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(documents);
    Py_buffer table = {0}, pair_index = {0}, rows = {0}, lengths = {0}, doc = {0};
    PyObject *result = NULL;

    if (get_array(table_obj, &table, 4, -1, 0, "table") < 0 || get_array(pair_index_obj, &pair_index, 8, k * k, 0, "pair_index") < 0
        || get_array(rows_obj, &rows, 8, (k + pairs) * n, 1, "rows") < 0
        || get_array(lengths_obj, &lengths, 8, n, 1, "lengths") < 0)
        goto done;

    const int32_t *columns = table.buf;
    const Py_ssize_t vocabulary = table.len / 4;
    const int64_t *pair_of = pair_index.buf;
    double *terms = rows.buf, *adjacent = terms + k * n, *size_of = lengths.buf;
    memset(terms, 0, (size_t)rows.len);
    for (Py_ssize_t j = 0; j < n; j++) {
        /* packed int32 (bytes, whose buffer says items of one byte) */
        if (PyObject_GetBuffer(PyList_GET_ITEM(documents, j), &doc, PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        const int32_t *tokens = doc.buf;
        Py_ssize_t size = doc.len / 4;
        if (doc.len % 4) {
            PyErr_SetString(PyExc_ValueError, "document: not a whole number of int32 term ids");
            PyBuffer_Release(&doc);
            goto done;
        }
        size_of[j] = (double)size;
        int32_t previous = 0;
        for (Py_ssize_t t = 0; t < size; t++) {
            int32_t id = tokens[t];
            int32_t column = (id >= 0 && id < vocabulary) ? columns[id] : 0;
            if (column > 0 && column <= k) {
                terms[(column - 1) * n + j] += 1.0;
                if (previous > 0) {
                    int64_t pair = pair_of[(previous - 1) * k + (column - 1)];
                    if (pair >= 0 && pair < pairs)
                        adjacent[pair * n + j] += 1.0;
                }
            } else {
                column = 0;
            }
            previous = column;
        }
        PyBuffer_Release(&doc);
    }
    result = Py_NewRef(Py_None);

done:
    Py_buffer *views[] = {&table, &pair_index, &rows, &lengths};
    for (size_t i = 0; i < sizeof(views) / sizeof(views[0]); i++) {
        if (views[i]->obj)
            PyBuffer_Release(views[i]);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS, count_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "The pool's term and pair counts, compiled (see pool.py).", 0, methods,
};

PyMODINIT_FUNC
PyInit__kernel(void)
{
    return PyModule_Create(&module);
}
