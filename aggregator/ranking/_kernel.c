/* The rerank's arithmetic, compiled: pool.score_pool's BM25 and proximity, rerank's calibration, fusion and sort.
 *
 * pool.py and rerank.py hold the reference implementations (numpy and plain
 * Python) and the meaning of every number; this file computes the same
 * formulas in plain loops, without the dozens of array operations and Python
 * steps (each a few microseconds) they need for a pool of a few dozen
 * passages. It is optional: the rerank uses it when the build compiled it and
 * falls back to the references otherwise, and the tests check that both give
 * the same results.
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

/* How many of the pool's n passages hold a term (or pair), from its row of counts. */
static double
pool_frequency(const double *counts, Py_ssize_t n)
{
    double d = 0.0;
    for (Py_ssize_t j = 0; j < n; j++)
        d += counts[j] > 0.0;
    return d;
}

/* Each passage's BM25 over m terms (or pairs): the sum of weight x saturated count, over `ceiling` (0 where
 * the ceiling is not positive). counts: m rows of n; the arithmetic in the numpy reference's order. */
static void
saturated_sums(const double *counts, const double *weights, Py_ssize_t m, Py_ssize_t n, const double *lengths, double avgdl,
               double k1, double b, double ceiling, double *out)
{
    for (Py_ssize_t j = 0; j < n; j++) {
        double norm = k1 * (1.0 - b + b * lengths[j] / avgdl);
        double sum = 0.0;
        for (Py_ssize_t i = 0; i < m; i++) {
            double f = counts[i * n + j];
            sum += weights[i] * (f * (k1 + 1.0) / (f + norm));
        }
        out[j] = ceiling > 0.0 ? sum / ceiling : 0.0;
    }
}

PyDoc_STRVAR(score_doc,
"score(documents, table, qtf, known, df, passages, term_avgdl, pair_index, pair_qtf, k1, b, bm25, proximity)\n"
"\n"
"documents: list of buffers of packed int32 term ids (bytes); table: int32, term id -> 1 + query column (0: not a query term);\n"
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
        /* packed int32 (bytes, whose buffer says items of one byte) */
        if (PyObject_GetBuffer(PyList_GET_ITEM(documents, docs_held), &docs[docs_held], PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        if (docs[docs_held].len % 4) {
            PyBuffer_Release(&docs[docs_held]);
            PyErr_SetString(PyExc_ValueError, "document: not a whole number of int32 term ids");
            goto done;
        }
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
            d = pool_frequency(tf + i * n, n);
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
    saturated_sums(tf, weights, k, n, lengths, avgdl, k1, b, ceiling, out);

    /* Proximity: pairs scored like terms, with the pool's own counts and average length. */
    if (pairs > 0 && hits > 1) {
        const double *pq = pair_qtf.buf;
        double pair_ceiling = 0.0;
        for (Py_ssize_t p = 0; p < pairs; p++) {
            pair_weights[p] = pq[p] * idf((double)n, pool_frequency(pair_tf + p * n, n));
            pair_ceiling += pair_weights[p];
        }
        saturated_sums(pair_tf, pair_weights, pairs, n, lengths, pool_avgdl, k1, b, pair_ceiling * (k1 + 1.0), near);
    } else {
        for (Py_ssize_t j = 0; j < n; j++)
            near[j] = 0.0;
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


/* -- calibration, fusion and order (rerank.py: _calibrate, _positions, fuse, _order) -------------------- */

/* Exactly rounded sum, as Python's math.fsum (Shewchuk's partials), so results match the reference bit for bit. */
static double
exact_sum(const double *values, Py_ssize_t n, double (*term)(double, const void *), const void *context)
{
    double partials[128];
    int count = 0;
    for (Py_ssize_t m = 0; m < n; m++) {
        double x = values[m];
        if (term)
            x = term(x, context);
        int i = 0;
        for (int j = 0; j < count; j++) {
            double y = partials[j];
            if (fabs(x) < fabs(y)) {
                double t = x;
                x = y;
                y = t;
            }
            double hi = x + y;
            double lo = y - (hi - x);
            if (lo != 0.0)
                partials[i++] = lo;
            x = hi;
        }
        count = i;
        if (x != 0.0 && count < 128)  /* finite doubles need at most about 40 partials */
            partials[count++] = x;
    }
    double hi = 0.0;
    if (count > 0) {
        int j = count - 1;
        hi = partials[j];
        double lo = 0.0;
        while (j > 0) {
            double x = hi;
            double y = partials[--j];
            hi = x + y;
            double yr = hi - x;
            lo = y - yr;
            if (lo != 0.0)
                break;
        }
        /* round half to even the way math.fsum does when the remainder is exactly half an ulp */
        if (j > 0 && ((lo < 0.0 && partials[j - 1] < 0.0) || (lo > 0.0 && partials[j - 1] > 0.0))) {
            double y = lo * 2.0;
            double x = hi + y;
            double yr = x - hi;
            if (y == yr)
                hi = x;
        }
    }
    return hi;
}

static double
squared_minus(double x, const void *context)
{
    double d = x - *(const double *)context;
    return d * d;
}

enum { USE_AUTO = 0, USE_RANK = 1, USE_TRUST = 2, USE_IGNORE = 3 };
enum { HOW_SCORES = 0, HOW_RANKS = 1, HOW_TRUSTED = 2, HOW_IGNORED = 3 };
#define NO_SCORE (-HUGE_VAL)

/* Sort keys for qsort's comparators: plain statics, safe because the GIL is held for the whole call. */
static const long long *sort_ranks;

static int
by_rank(const void *a, const void *b)
{
    Py_ssize_t i = *(const Py_ssize_t *)a, j = *(const Py_ssize_t *)b;
    if (sort_ranks[i] != sort_ranks[j])
        return sort_ranks[i] < sort_ranks[j] ? -1 : 1;
    return (i > j) - (i < j);
}

static const double *sort_scores, *sort_relevance;

static int
by_score(const void *a, const void *b)
{
    Py_ssize_t i = *(const Py_ssize_t *)a, j = *(const Py_ssize_t *)b;
    if (sort_scores[i] != sort_scores[j])
        return sort_scores[i] > sort_scores[j] ? -1 : 1;
    if (sort_relevance[i] != sort_relevance[j])
        return sort_relevance[i] > sort_relevance[j] ? -1 : 1;
    return (i > j) - (i < j);
}

/* One source's calibrated scores into out[0..n) (-1: none); returns how (HOW_*). x, y, order: scratch of n. */
static int
calibrate(int use, const double *score, const long long *rank, const double *relevance, Py_ssize_t n, double kappa,
          double *out, double *x, Py_ssize_t *order)
{
    if (use == USE_IGNORE) {
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = -1.0;
        return HOW_IGNORED;
    }
    if (use == USE_TRUST) {
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = score[i] == NO_SCORE ? -1.0 : fmin(1.0, fmax(0.0, score[i]));
        return HOW_TRUSTED;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        order[i] = i;
    sort_ranks = rank;
    qsort(order, (size_t)n, sizeof(Py_ssize_t), by_rank);
    int how = HOW_RANKS, done = 0, all_scored = 1, all_ranked = 1;
    double low = HUGE_VAL, high = -HUGE_VAL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (score[i] == NO_SCORE)
            all_scored = 0;
        else {
            low = fmin(low, score[i]);
            high = fmax(high, score[i]);
        }
        if (rank[i] == 2147483648LL)  /* rerank._NO_RANK */
            all_ranked = 0;
    }
    if (use != USE_RANK && n > 1 && all_scored && high > low) {
        double span = high - low;
        Py_ssize_t rising = 0;
        for (Py_ssize_t m = 1; m < n; m++) {
            double a = score[order[m - 1]], b = score[order[m]];
            rising += (b > a) - (b < a);
        }
        int distance = rising > 0 && all_ranked;
        for (Py_ssize_t i = 0; i < n; i++)
            x[i] = distance ? (high - score[i]) / span : (score[i] - low) / span;
        how = HOW_SCORES;
        done = 1;
    }
    if (!done) {
        if (n == 1)
            x[0] = 1.0;
        else {
            double floor_ = 1.0 / log2((double)n + 1.0);
            for (Py_ssize_t place = 0; place < n; place++)
                x[order[place]] = (1.0 / log2((double)place + 2.0) - floor_) / (1.0 - floor_);
        }
    }
    double mean_x = exact_sum(x, n, NULL, NULL) / (double)n;
    double mean_y = exact_sum(relevance, n, NULL, NULL) / (double)n;
    double spread = exact_sum(x, n, squared_minus, &mean_x);
    /* covariance: the products (x - mean_x) * (y - mean_y), summed exactly */
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = (x[i] - mean_x) * (relevance[i] - mean_y);
    double covariance = exact_sum(out, n, NULL, NULL);
    double slope = spread > 0.0 ? fmax(0.0, covariance / spread) * (double)n / ((double)n + kappa) : 0.0;
    double intercept = mean_y - slope * mean_x;
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = fmin(1.0, fmax(0.0, intercept + slope * x[i]));
    return how;
}

PyDoc_STRVAR(fuse_doc,
"fuse(relevance, group_of, answers, uses, weights, kappa, alpha, gamma, calibrated, how, winner, fused, order)\n"
"    -> number of adjacent ties in order\n"
"\n"
"relevance: float64[G] per distinct text; group_of: int64[N] per passage (answers one after the other);\n"
"answers: list of A lists of Passages (their source_score and source_rank are read); uses: int8[A] (0 auto,\n"
"1 rank, 2 trust, 3 ignore); weights: float64[A]. Written: calibrated float64[N] (-1: none), how int8[A]\n"
"(0 scores, 1 ranks, 2 trusted, 3 ignored), winner int64[G], fused float64[G], order int64[G] (best first;\n"
"equal score and relevance by group number).");

static PyObject *source_score_name, *source_rank_name;

/* What rerank.py reads as `p.source_score` (None: no score) and `p.source_rank or _NO_RANK`, for every passage. */
static int
read_answers(PyObject *answers, Py_ssize_t n, double *score, long long *rank, long long *start)
{
    Py_ssize_t at = 0;
    for (Py_ssize_t a = 0; a < PyList_GET_SIZE(answers); a++) {
        PyObject *passages = PyList_GET_ITEM(answers, a);
        if (!PyList_Check(passages)) {
            PyErr_SetString(PyExc_TypeError, "answers: a list of lists of passages");
            return -1;
        }
        start[a] = at;
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(passages); j++, at++) {
            if (at >= n) {
                PyErr_SetString(PyExc_ValueError, "answers: more passages than group_of has");
                return -1;
            }
            PyObject *passage = PyList_GET_ITEM(passages, j);
            PyObject *value = PyObject_GetAttr(passage, source_score_name);
            if (!value)
                return -1;
            score[at] = value == Py_None ? NO_SCORE : PyFloat_AsDouble(value);
            Py_DECREF(value);
            if (score[at] == -1.0 && PyErr_Occurred())
                return -1;
            value = PyObject_GetAttr(passage, source_rank_name);
            if (!value)
                return -1;
            long long r = value == Py_None ? 0 : PyLong_AsLongLong(value);
            Py_DECREF(value);
            if (r == -1 && PyErr_Occurred())
                return -1;
            rank[at] = r ? r : 2147483648LL;  /* rerank._NO_RANK */
        }
    }
    if (at != n) {
        PyErr_SetString(PyExc_ValueError, "answers: fewer passages than group_of has");
        return -1;
    }
    return 0;
}

static PyObject *
fuse(PyObject *self, PyObject *args)
{
    PyObject *objs[13];
    double kappa, alpha, gamma;
    if (!PyArg_ParseTuple(args, "OOO!OOdddOOOOO", &objs[0], &objs[1], &PyList_Type, &objs[2], &objs[3], &objs[4], &kappa, &alpha,
                          &gamma, &objs[8], &objs[9], &objs[10], &objs[11], &objs[12]))
        return NULL;
    Py_buffer relevance = {0}, group_of = {0}, uses = {0}, weights = {0};
    Py_buffer calibrated = {0}, how = {0}, winner = {0}, fused = {0}, order = {0};
    double *x = NULL, *y = NULL, *score = NULL;
    long long *rank = NULL, *start = NULL;
    Py_ssize_t *scratch = NULL;
    PyObject *result = NULL;
    Py_ssize_t answers = PyList_GET_SIZE(objs[2]);

    if (get_array(objs[0], &relevance, 8, -1, 0, "relevance") < 0 || get_array(objs[1], &group_of, 8, -1, 0, "group_of") < 0)
        goto done;
    Py_ssize_t groups = relevance.len / 8, n = group_of.len / 8;
    if (get_array(objs[3], &uses, 1, answers, 0, "uses") < 0 || get_array(objs[4], &weights, 8, answers, 0, "weights") < 0
        || get_array(objs[8], &calibrated, 8, n, 1, "calibrated") < 0 || get_array(objs[9], &how, 1, answers, 1, "how") < 0
        || get_array(objs[10], &winner, 8, groups, 1, "winner") < 0 || get_array(objs[11], &fused, 8, groups, 1, "fused") < 0
        || get_array(objs[12], &order, 8, groups, 1, "order") < 0)
        goto done;
    x = PyMem_Malloc((size_t)(n + 1) * sizeof(double));
    y = PyMem_Malloc((size_t)(n + 1) * sizeof(double));
    score = PyMem_Malloc((size_t)(n + 1) * sizeof(double));
    rank = PyMem_Malloc((size_t)(n + 1) * sizeof(long long));
    start = PyMem_Malloc((size_t)(answers + 1) * sizeof(long long));
    scratch = PyMem_Malloc((size_t)(n + groups + 1) * sizeof(Py_ssize_t));
    if (!x || !y || !score || !rank || !start || !scratch) {
        PyErr_NoMemory();
        goto done;
    }
    if (read_answers(objs[2], n, score, rank, start) < 0)
        goto done;

    const double *rel = relevance.buf, *weight = weights.buf;
    const long long *group = group_of.buf;
    const signed char *use = uses.buf;
    double *cal = calibrated.buf, *out = fused.buf;
    signed char *how_out = how.buf;
    long long *win = winner.buf, *sorted = order.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (group[i] < 0 || group[i] >= groups) {
            PyErr_SetString(PyExc_ValueError, "group_of: a group number out of range");
            goto done;
        }
    }

    /* Each answer's calibration over its own passages. */
    for (Py_ssize_t a = 0; a < answers; a++) {
        Py_ssize_t begin = start[a], end = a + 1 < answers ? start[a + 1] : n;
        if (begin < 0 || end > n || begin > end) {
            PyErr_SetString(PyExc_ValueError, "starts: answers out of order");
            goto done;
        }
        for (Py_ssize_t i = begin; i < end; i++)
            y[i - begin] = rel[group[i]];
        how_out[a] = (signed char)(end > begin ? calibrate(use[a], score + begin, rank + begin, y, end - begin, kappa, cal + begin, x, scratch) : HOW_SCORES);
    }

    /* The copy that vouches most speaks for its text (the first on a tie); fused score with its source's weight. */
    for (Py_ssize_t g = 0; g < groups; g++)
        win[g] = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        long long g = group[i];
        if (win[g] < 0 || cal[i] > cal[win[g]])
            win[g] = i;
    }
    Py_ssize_t a = 0;
    for (Py_ssize_t g = 0; g < groups; g++) {
        double r = rel[g], w = 1.0, f = r;
        if (win[g] >= 0) {
            double c = cal[win[g]];
            for (a = answers - 1; a > 0 && start[a] > win[g]; a--)
                ;
            w = answers ? weight[a] : 1.0;
            if (c >= 0.0)
                f = (1.0 - alpha) * r + alpha * c;
        }
        f = fmin(1.0, fmax(0.0, f));
        double lifted = gamma == 0.5 ? sqrt(f) : pow(f, gamma);
        out[g] = 1.0 - (w == 1.0 ? 1.0 - lifted : pow(1.0 - lifted, w));
    }

    /* Best first: score, then relevance, then group number (the reference's stable sort). */
    Py_ssize_t *index = scratch + n;
    for (Py_ssize_t g = 0; g < groups; g++)
        index[g] = g;
    sort_scores = out;
    sort_relevance = rel;
    qsort(index, (size_t)groups, sizeof(Py_ssize_t), by_score);
    Py_ssize_t ties = 0;
    for (Py_ssize_t g = 0; g < groups; g++) {
        sorted[g] = index[g];
        if (g > 0 && out[index[g]] == out[index[g - 1]] && rel[index[g]] == rel[index[g - 1]])
            ties++;
    }
    result = PyLong_FromSsize_t(ties);

done:
    PyMem_Free(x);
    PyMem_Free(y);
    PyMem_Free(score);
    PyMem_Free(rank);
    PyMem_Free(start);
    PyMem_Free(scratch);
    Py_buffer *views[] = {&relevance, &group_of, &uses, &weights, &calibrated, &how, &winner, &fused, &order};
    for (size_t i = 0; i < sizeof(views) / sizeof(views[0]); i++) {
        if (views[i]->obj)
            PyBuffer_Release(views[i]);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"score", score, METH_VARARGS, score_doc},
    {"fuse", fuse, METH_VARARGS, fuse_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "The rerank's arithmetic, compiled (see pool.py and rerank.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__kernel(void)
{
    source_score_name = PyUnicode_InternFromString("source_score");
    source_rank_name = PyUnicode_InternFromString("source_rank");
    if (!source_score_name || !source_rank_name)
        return NULL;
    return PyModule_Create(&module);
}
