// A small pthread pool: pool_run() splits [0, n) into one contiguous chunk per thread.
//
// Workers sleep on a condition variable between jobs; the calling thread runs chunk 0 itself,
// so --threads 1 never touches pthreads at all.
#include <pthread.h>
#include <stdlib.h>

#include "model.h"

// ----------------------------------------------------------------------------
// Pool state

struct Pool {
    int n_threads;
    pthread_t *threads;       // [n_threads - 1] workers
    pthread_mutex_t lock;
    pthread_cond_t wake;      // a new job (generation changed) or shutdown
    pthread_cond_t done;      // a worker finished its chunk
    long generation;          // bumped once per job
    int pending;              // workers still running the current job
    int shutdown;
    task_fn fn;               // the current job
    void *ctx;                // its argument (opaque to the pool)
    int n, align;
};

typedef struct {
    Pool *pool;
    int index;                // chunk index of this worker (1..n_threads-1)
} Worker;

static void chunk_range(const Pool *p, int index, int *begin, int *end) {
    int units = (p->n + p->align - 1) / p->align;           // split in units of `align`
    int per = units / p->n_threads, extra = units % p->n_threads;
    int first = index * per + (index < extra ? index : extra);
    int count = per + (index < extra ? 1 : 0);
    *begin = first * p->align;
    *end = (first + count) * p->align;
    if (*begin > p->n) *begin = p->n;
    if (*end > p->n) *end = p->n;
}

// ----------------------------------------------------------------------------
// Workers

static void *worker_main(void *arg) {
    Worker *me = (Worker *)arg;
    Pool *p = me->pool;
    long seen = 0;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        while (p->generation == seen && !p->shutdown) pthread_cond_wait(&p->wake, &p->lock);
        if (p->shutdown) { pthread_mutex_unlock(&p->lock); break; }
        seen = p->generation;
        pthread_mutex_unlock(&p->lock);

        int begin, end;
        chunk_range(p, me->index, &begin, &end);
        if (begin < end) p->fn(p->ctx, begin, end);

        pthread_mutex_lock(&p->lock);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->lock);
    }
    free(me);
    return NULL;
}

// ----------------------------------------------------------------------------
// API

Pool *pool_create(int n_threads) {
    Pool *p = calloc(1, sizeof(Pool));
    if (!p) return NULL;
    p->n_threads = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    p->threads = calloc((size_t)p->n_threads, sizeof(pthread_t));
    for (int i = 1; i < p->n_threads; i++) {
        Worker *w = malloc(sizeof(Worker));
        w->pool = p;
        w->index = i;
        if (pthread_create(&p->threads[i], NULL, worker_main, w) != 0) {
            free(w);
            p->n_threads = i;                 // run with the threads we got
            break;
        }
    }
    return p;
}

void pool_run(Pool *p, task_fn fn, void *ctx, int n, int align) {
    if (n <= 0) return;
    if (p->n_threads == 1 || n <= align) {
        fn(ctx, 0, n);
        return;
    }
    pthread_mutex_lock(&p->lock);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    p->align = align < 1 ? 1 : align;
    p->pending = p->n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);

    int begin, end;
    chunk_range(p, 0, &begin, &end);
    if (begin < end) fn(ctx, begin, end);

    pthread_mutex_lock(&p->lock);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->lock);
    pthread_mutex_unlock(&p->lock);
}

void pool_destroy(Pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->lock);
    p->shutdown = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p->threads);
    free(p);
}
