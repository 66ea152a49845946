// tsrun: command line front end. Text (or token ids) in, text (or token ids) out.
//
//   tsrun weights.bin --prompt TEXT | --prompt-ids 1,2,3 [--steps N] [--threads N] [--dense|--exact]
//         [--temperature T] [--top-p P] [--seed S] [--force-ids 4,5] [--dump-logits FILE]
//         [--tokenizer tokenizer.bin] [--print-ids] [--ignore-eos] [--print-isa]
//   tsrun weights.bin --encode-only --prompt TEXT      (prints the prompt's token ids)
//   tsrun weights.bin --decode-ids 1,2,3                (prints the text of token ids)
//
// The prompt runs token by token through the same (sparse) path as generation.
// --dump-logits writes little-endian float32 rows of [VOCAB_SIZE]:
//   with --force-ids F: 1 + len(F) rows, after the prompt and after each forced token (teacher forcing);
//   otherwise one row per generated token: the logits it was sampled from.
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__aarch64__)
#include <sys/auxv.h>
#include <asm/hwcap.h>
#endif

#include "model.h"
#include "tokenizer.h"

// ----------------------------------------------------------------------------
// Options

typedef struct {
    const char *weights, *tokenizer, *prompt, *dump_logits;
    int32_t *prompt_ids, *force_ids, *decode_ids;   // [n_prompt_ids], [n_force_ids], [n_decode_ids]
    int n_prompt_ids, n_force_ids, n_decode_ids;
    int steps, threads, force_mode, print_ids, ignore_eos, print_isa, encode_only;
    float temperature, top_p;
    unsigned long long seed;
} Options;

static int is_eos(int id) {
    static const int eos_ids[] = EOS_IDS;
    for (size_t i = 0; i < sizeof eos_ids / sizeof eos_ids[0]; i++)
        if (id == eos_ids[i]) return 1;
    return 0;
}

static void die(int code, const char *fmt, const char *arg) {
    fprintf(stderr, "tsrun: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(code);
}

#define USAGE "tsrun weights.bin --prompt TEXT | --prompt-ids 1,2,3 [--steps N] [--threads N] [--dense|--exact] " \
              "[--temperature T] [--top-p P] [--seed S] [--force-ids IDS] [--dump-logits FILE] [--tokenizer FILE] " \
              "[--print-ids] [--ignore-eos] [--print-isa] [--encode-only] [--decode-ids IDS]"

static void usage_error(const char *what, const char *arg) {
    fprintf(stderr, "tsrun: %s%s (usage: " USAGE ")\n", what, arg);
    exit(2);
}

static long parse_long(const char *flag, const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) usage_error(flag, ": not an integer in range");
    return v;
}

static float parse_float(const char *flag, const char *s, float lo, float hi) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) usage_error(flag, ": not a number in range");
    return v;
}

// "1,2,3" -> ids, each in [0, limit)
static int32_t *parse_ids(const char *flag, const char *s, int *count, long limit) {
    int n = 1;
    for (const char *p = s; *p; p++) n += *p == ',';
    int32_t *ids = malloc((size_t)n * sizeof(int32_t));   // [n]
    const char *p = s;
    for (int i = 0; i < n; i++) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || (*end != ',' && *end) || v < 0 || v >= limit) {
            fprintf(stderr, "tsrun: %s: '%s' is not a list of token ids below %ld\n", flag, s, limit);
            exit(2);
        }
        ids[i] = (int32_t)v;
        p = end + 1;
    }
    *count = n;
    return ids;
}

static Options parse_options(int argc, char **argv) {
    Options o = {0};
    o.steps = 16;
    o.threads = 1;
    o.force_mode = -1;
    o.top_p = 1.0f;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
#define VALUE() (has_value ? argv[++i] : (usage_error(a, ": missing value"), ""))
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: " USAGE "\n");
            exit(0);
        } else if (a[0] != '-') {
            if (o.weights) usage_error("unexpected argument ", a);
            o.weights = a;
        } else if (!strcmp(a, "--prompt")) o.prompt = VALUE();
        else if (!strcmp(a, "--prompt-ids")) o.prompt_ids = parse_ids(a, VALUE(), &o.n_prompt_ids, VOCAB_SIZE);
        else if (!strcmp(a, "--force-ids")) o.force_ids = parse_ids(a, VALUE(), &o.n_force_ids, VOCAB_SIZE);
        else if (!strcmp(a, "--decode-ids")) o.decode_ids = parse_ids(a, VALUE(), &o.n_decode_ids, 1L << 24);
        else if (!strcmp(a, "--encode-only")) o.encode_only = 1;
        else if (!strcmp(a, "--steps")) o.steps = (int)parse_long(a, VALUE(), 0, 1 << 20);
        else if (!strcmp(a, "--threads")) o.threads = (int)parse_long(a, VALUE(), 1, 256);
        else if (!strcmp(a, "--seed")) o.seed = (unsigned long long)parse_long(a, VALUE(), 0, 0x7fffffffL);
        else if (!strcmp(a, "--temperature")) o.temperature = parse_float(a, VALUE(), 0.0f, 100.0f);
        else if (!strcmp(a, "--top-p")) o.top_p = parse_float(a, VALUE(), 1e-6f, 1.0f);
        else if (!strcmp(a, "--dump-logits")) o.dump_logits = VALUE();
        else if (!strcmp(a, "--tokenizer")) o.tokenizer = VALUE();
        else if (!strcmp(a, "--dense")) o.force_mode = MODE_DENSE;
        else if (!strcmp(a, "--exact")) o.force_mode = MODE_EXACT;
        else if (!strcmp(a, "--print-ids")) o.print_ids = 1;
        else if (!strcmp(a, "--ignore-eos")) o.ignore_eos = 1;
        else if (!strcmp(a, "--print-isa")) o.print_isa = 1;
        else usage_error("unknown option ", a);
#undef VALUE
    }
    if (!o.weights) usage_error("missing weights file", "");
    if (o.encode_only && !o.prompt) usage_error("--encode-only needs --prompt", "");
    if (!o.prompt && !o.prompt_ids && !o.print_isa && !o.decode_ids) usage_error("give --prompt or --prompt-ids", "");
    if (o.prompt && o.prompt_ids) usage_error("--prompt and --prompt-ids exclude each other", "");
    return o;
}

// ----------------------------------------------------------------------------
// Sampling

static unsigned long long rng_state;

static float random_f32(void) {   // xorshift64*, in [0, 1)
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)((rng_state * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

typedef struct { float p; int id; } ProbIndex;

static int by_prob_desc(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->p, pb = ((const ProbIndex *)b)->p;
    return pa > pb ? -1 : pa < pb ? 1 : ((const ProbIndex *)a)->id - ((const ProbIndex *)b)->id;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

// Greedy at temperature 0; else softmax(logits / T), keeping the smallest top set of mass >= top_p.
static int sample(float *logits, float temperature, float top_p, ProbIndex *scratch) {
    if (temperature <= 0.0f) return argmax(logits, VOCAB_SIZE);
    float max = logits[argmax(logits, VOCAB_SIZE)], sum = 0.0f;
    for (int i = 0; i < VOCAB_SIZE; i++) {
        scratch[i].p = expf((logits[i] - max) / temperature);
        scratch[i].id = i;
        sum += scratch[i].p;
    }
    int n = VOCAB_SIZE;
    if (top_p < 1.0f) {
        qsort(scratch, VOCAB_SIZE, sizeof(ProbIndex), by_prob_desc);
        float cum = 0.0f;
        n = 0;
        do cum += scratch[n++].p; while (n < VOCAB_SIZE && cum < top_p * sum);   // at least the top token
        sum = cum;
    }
    float r = random_f32() * sum, cum = 0.0f;
    for (int i = 0; i < n; i++) {
        cum += scratch[i].p;
        if (r < cum) return scratch[i].id;
    }
    return scratch[n - 1].id;
}

// ----------------------------------------------------------------------------
// Main

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void default_tokenizer_path(const char *weights, char *out, size_t len) {
    const char *slash = strrchr(weights, '/');
    int dir = slash ? (int)(slash - weights + 1) : 0;
    snprintf(out, len, "%.*stokenizer.bin", dir, weights);
}

static void write_logits(FILE *f, const float *logits) {
    if (f && fwrite(logits, sizeof(float), VOCAB_SIZE, f) != VOCAB_SIZE) die(1, "%s: write failed", "--dump-logits");
}

// --encode-only / --decode-ids: the tokenizer alone, no weights loaded
static int run_tokenizer_only(const Options *o, const char *tok_path) {
    char err[512];
    Tokenizer tok;
    if (tokenizer_open(&tok, tok_path, err, sizeof(err))) die(2, "%s", err);
    if (o->encode_only) {
        int cap = (int)strlen(o->prompt) + tok.n_prefix + 1;
        int32_t *ids = malloc((size_t)cap * sizeof(int32_t));   // [cap]: the prefix, at most one id per byte
        int n = tokenizer_encode(&tok, o->prompt, ids, cap);
        for (int i = 0; i < n; i++) printf(i ? ",%d" : "%d", ids[i]);
        printf("\n");
        free(ids);
    } else {
        for (int i = 0; i < o->n_decode_ids; i++) {
            size_t len;
            const uint8_t *piece = tokenizer_piece(&tok, o->decode_ids[i], &len);
            fwrite(piece, 1, len, stdout);
        }
    }
    tokenizer_close(&tok);
    return 0;
}

int main(int argc, char **argv) {
    Options o = parse_options(argc, argv);
    char err[512];
    char tok_path[4096];
    if (o.tokenizer) snprintf(tok_path, sizeof(tok_path), "%s", o.tokenizer);
    else default_tokenizer_path(o.weights, tok_path, sizeof(tok_path));
    if (o.encode_only || o.decode_ids) {
        int rc = run_tokenizer_only(&o, tok_path);
        free(o.decode_ids);
        return rc;
    }

    Weights w;
    if (weights_open(&w, o.weights, err, sizeof(err))) die(2, "%s", err);
    const Kernels *k = pick_kernels();
    if (o.print_isa) {
#if defined(__aarch64__)
        fprintf(stderr, "tsrun: isa %s (cpu asimdhp: %s)\n", k->name,
                (getauxval(AT_HWCAP) & HWCAP_ASIMDHP) ? "yes" : "no");
#else
        fprintf(stderr, "tsrun: isa %s (portable build)\n", k->name);
#endif
        if (!o.prompt && !o.prompt_ids) { weights_close(&w); return 0; }
    }

    // tokenizer: needed for a text prompt; used for text output when present
    Tokenizer tok;
    int have_tok = 0;
    if (o.prompt || !o.print_ids) {
        FILE *probe = o.tokenizer || o.prompt ? NULL : fopen(tok_path, "rb");
        if (o.tokenizer || o.prompt || probe) {
            if (probe) fclose(probe);
            if (tokenizer_open(&tok, tok_path, err, sizeof(err))) die(2, "%s", err);
            have_tok = 1;
        }
    }
    int32_t *prompt = o.prompt_ids;
    int n_prompt = o.n_prompt_ids;
    if (o.prompt) {
        int cap = (int)strlen(o.prompt) + tok.n_prefix + 1;
        prompt = malloc((size_t)cap * sizeof(int32_t));   // [cap]: the prefix, at most one id per byte
        n_prompt = tokenizer_encode(&tok, o.prompt, prompt, cap);
        if (n_prompt < 0) die(1, "%s: tokenizer output overflow", "--prompt");
        for (int i = 0; i < n_prompt; i++)
            if (prompt[i] >= VOCAB_SIZE)
                die(2, "%s: tokenizer produced an id beyond the model's vocabulary", "--prompt");
    }
    if (n_prompt < 1) die(2, "%s: the prompt has no tokens", o.prompt ? "--prompt" : "--prompt-ids");

    int n_after = o.force_ids ? o.n_force_ids : o.steps;
    RunState s;
    if (state_alloc(&s, n_prompt + n_after + 1)) die(1, "%s: out of memory for the KV cache", "state");
    Pool *pool = pool_create(o.threads);
    Model m = {&w, &s, k, pick_float32_kernels(), pool, o.force_mode};
    FILE *dump = NULL;
    if (o.dump_logits && !(dump = fopen(o.dump_logits, "wb"))) die(2, "%s: cannot open for writing", o.dump_logits);
    ProbIndex *scratch = malloc(VOCAB_SIZE * sizeof(ProbIndex));   // [VOCAB_SIZE] (probability, id) to sample from
    rng_state = o.seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;

    int pos = 0;
    double t0 = now_seconds();
    for (int i = 0; i < n_prompt; i++) forward(&m, prompt[i], pos++);
    double t1 = now_seconds();
    int decoded = 0;
    if (o.force_ids) {                    // teacher forcing: logits after the prompt and each forced token
        write_logits(dump, s.logits);
        for (int i = 0; i < o.n_force_ids; i++) {
            forward(&m, o.force_ids[i], pos++);
            decoded++;
            write_logits(dump, s.logits);
        }
    } else {
        for (int step = 0; step < o.steps; step++) {
            write_logits(dump, s.logits);
            int next = sample(s.logits, o.temperature, o.top_p, scratch);
            int stop = !o.ignore_eos && is_eos(next);
            if (o.print_ids || !have_tok) {
                printf(step ? ",%d" : "%d", next);
            } else if (!stop) {                                // text mode: EOS ends the text, unprinted
                size_t len;
                const uint8_t *piece = tokenizer_piece(&tok, next, &len);
                fwrite(piece, 1, len, stdout);
            }
            fflush(stdout);
            if (stop || step == o.steps - 1) break;
            forward(&m, next, pos++);
            decoded++;
        }
        printf("\n");
    }
    double t2 = now_seconds();
    if (dump && fclose(dump) != 0) die(1, "%s: write failed", o.dump_logits);
    fprintf(stderr, "tsrun: prompt %d tokens in %.6f s, decode %d tokens in %.6f s (%.2f tok/s), "
            "FFN neurons computed %.1f%%, kernels %s\n", n_prompt, t1 - t0, decoded, t2 - t1,
            decoded > 0 && t2 > t1 ? decoded / (t2 - t1) : 0.0,
            s.total_neurons ? 100.0 * s.active_neurons / s.total_neurons : 0.0, k->name);

    free(scratch);
    pool_destroy(pool);
    state_free(&s);
    if (prompt != o.prompt_ids) free(prompt);
    free(o.prompt_ids);
    free(o.force_ids);
    free(o.decode_ids);
    if (have_tok) tokenizer_close(&tok);
    weights_close(&w);
    return 0;
}
