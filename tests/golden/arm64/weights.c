// weights.bin: load, check and map the weight blob.
//
// Layout (little-endian; written by tscompile's arm64 backend):
//   0   char  magic[8]          "TSRUNWB\0"
//   8   u32   version           2
//   12  u32   header_size       bytes of everything below up to and including header_crc
//   16  u32   n_tensors
//   20  u32   dtype             0 float32, 1 float16 (matrices; the rest is float32)
//   24  i32   dims[14]          vocab, dim, hidden_dim, layers, heads, kv_heads, head_dim,
//                               sliding_window, attn_bias, tied, bos, eos, experts (0: dense FFNs), top_k
//   80  f32   rms_eps
//   84  u32   reserved (0)
//   88  FFNSpec[N_FFNS]         24 bytes each (model.h): one per layer, or per expert of each layer
//   ..  TensorEntry[n_tensors]  80 bytes each (below)
//   ..  u32   header_crc        CRC-32 of every header byte before it
// Tensor data follows at 64-byte aligned offsets. Every field is checked before it is used:
// a truncated, corrupt or foreign file gets a one-line error, never a crash.
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__aarch64__)
#include <sys/auxv.h>
#include <asm/hwcap.h>
#endif

#include "model.h"

#define BLOB_MAGIC "TSRUNWB"
#define BLOB_VERSION 2
#define N_DIMS 14
#define FIXED_HEADER 88
#define FFN_SPEC_BYTES 24
#define TENSOR_ENTRY_BYTES 80
#define FFNS_PER_LAYER (N_FFNS / N_LAYERS)
// at most: embed, final norm, lm_head, rope; per layer 2 norms, 4 projections, 3 biases, the router; per FFN 3
// matrices and 2 predictor matrices
#define MAX_TENSORS (4 + N_LAYERS * (10 + 5 * FFNS_PER_LAYER))

typedef struct {
    char name[48];            // NUL-terminated
    uint32_t dtype;           // 0 float32, 1 float16
    uint32_t rows, cols;
    uint32_t crc;             // CRC-32 (zlib's) of the tensor's bytes
    uint64_t offset, nbytes;  // from the start of the file
} TensorEntry;

typedef struct {              // what this build expects at one table slot
    char name[48];
    uint32_t dtype, rows, cols;
    const void **slot;        // where the pointer goes
} Expected;

// ----------------------------------------------------------------------------
// CRC-32 (polynomial 0xEDB88320, as zlib): ARMv8 CRC32 instructions when present, else tables

static uint32_t crc_table[8][256];

static void crc_init_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

static uint32_t crc32_tables(uint32_t crc, const uint8_t *p, size_t n) {
    if (!crc_table[0][1]) crc_init_tables();
    crc = ~crc;
    for (; n >= 8; p += 8, n -= 8) {                     // slicing by 8
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
              crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
              crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
    }
    while (n--) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

#if defined(__aarch64__)
// CRC32X / CRC32B (ARMv8.0 optional, ARMv8.1 mandatory): used only when HWCAP_CRC32 says they exist.
static inline uint32_t crc32_step8(uint32_t crc, uint64_t v) {
    __asm__(".arch_extension crc\n\tcrc32x %w0, %w0, %x1" : "+r"(crc) : "r"(v));
    return crc;
}

static inline uint32_t crc32_step1(uint32_t crc, uint32_t byte) {
    __asm__(".arch_extension crc\n\tcrc32b %w0, %w0, %w1" : "+r"(crc) : "r"(byte));
    return crc;
}

static uint32_t crc32_armv8(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc = crc32_step8(crc, v);
    }
    while (n--) crc = crc32_step1(crc, *p++);
    return ~crc;
}
#endif

static uint32_t crc32(const uint8_t *p, size_t n) {
#if defined(__aarch64__)
    if (getauxval(AT_HWCAP) & HWCAP_CRC32) return crc32_armv8(0, p, n);
#endif
    return crc32_tables(0, p, n);
}

// ----------------------------------------------------------------------------
// The tensors this build expects, in file order

static void expect(Expected *e, int *n, const char *name, uint32_t dtype, uint32_t rows, uint32_t cols,
                   const void **slot) {
    snprintf(e[*n].name, sizeof(e[*n].name), "%s", name);
    e[*n].dtype = dtype;
    e[*n].rows = rows;
    e[*n].cols = cols;
    e[*n].slot = slot;
    (*n)++;
}

// One FFN's tensors: Wg, Wu, Wd^T and the predictor if it has one; named "layers.L.w_gate" for a layer's MLP,
// "layers.L.experts.E.w_gate" for an expert (expert >= 0).
static void expect_ffn(Expected *e, int *n, int layer, int expert, FFNWeights *f, const FFNSpec *spec) {
    char name[48];
#define FFN_TENSOR(field, dtype, rows, cols) \
    if (expert < 0) snprintf(name, sizeof(name), "layers.%d." #field, layer); \
    else snprintf(name, sizeof(name), "layers.%d.experts.%d." #field, layer, expert); \
    expect(e, n, name, dtype, rows, cols, (const void **)&f->field)
    FFN_TENSOR(w_gate, WEIGHT_DTYPE, HIDDEN_DIM, DIM);
    FFN_TENSOR(w_up, WEIGHT_DTYPE, HIDDEN_DIM, DIM);
    FFN_TENSOR(w_down_t, WEIGHT_DTYPE, HIDDEN_DIM, DIM);
    if (spec->predictor_rank > 0) {
        FFN_TENSOR(pred_fc1, 0, spec->predictor_rank, DIM);
        FFN_TENSOR(pred_fc2, 0, HIDDEN_DIM, spec->predictor_rank);
    }
#undef FFN_TENSOR
}

static int expected_tensors(Weights *w, Expected *e) {
    int n = 0;
    char name[48];
    expect(e, &n, "embed", WEIGHT_DTYPE, VOCAB_SIZE, DIM, &w->embed);
    for (int l = 0; l < N_LAYERS; l++) {
        LayerWeights *L = &w->layers[l];
#define LAYER_TENSOR(field, dtype, rows, cols) \
        snprintf(name, sizeof(name), "layers.%d." #field, l); \
        expect(e, &n, name, dtype, rows, cols, (const void **)&L->field)
        LAYER_TENSOR(attn_norm, 0, 1, DIM);
        LAYER_TENSOR(wq, WEIGHT_DTYPE, Q_DIM, DIM);
        LAYER_TENSOR(wk, WEIGHT_DTYPE, KV_DIM, DIM);
        LAYER_TENSOR(wv, WEIGHT_DTYPE, KV_DIM, DIM);
        LAYER_TENSOR(wo, WEIGHT_DTYPE, DIM, Q_DIM);
        LAYER_TENSOR(bq, 0, 1, Q_DIM);
        LAYER_TENSOR(bk, 0, 1, KV_DIM);
        LAYER_TENSOR(bv, 0, 1, KV_DIM);
        LAYER_TENSOR(ffn_norm, 0, 1, DIM);
        expect_ffn(e, &n, l, -1, &L->ffn, &FFN_SPECS[l]);
#undef LAYER_TENSOR
    }
    expect(e, &n, "final_norm", 0, 1, DIM, (const void **)&w->final_norm);
    expect(e, &n, "lm_head", WEIGHT_DTYPE, VOCAB_SIZE, DIM, &w->lm_head);
    expect(e, &n, "rope_inv_freq", 0, 1, HEAD_DIM / 2, (const void **)&w->rope_inv_freq);
    return n;
}

// ----------------------------------------------------------------------------
// Loading

static uint32_t read_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t read_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int check_header(const uint8_t *base, size_t size, int n_exp,
                        const char *path, char *err, size_t err_len) {
    size_t header_size = FIXED_HEADER + (size_t)N_FFNS * FFN_SPEC_BYTES + (size_t)n_exp * TENSOR_ENTRY_BYTES + 4;
    if (size < FIXED_HEADER) {
        snprintf(err, err_len, "%s: truncated: %zu bytes, the header alone is %d", path, size, FIXED_HEADER);
        return 1;
    }
    if (memcmp(base, BLOB_MAGIC, 8) != 0) {
        snprintf(err, err_len, "%s: not a tsrun weight blob (bad magic)", path);
        return 1;
    }
    if (read_u32(base + 8) != BLOB_VERSION) {
        snprintf(err, err_len, "%s: blob format version %u, this tsrun reads version %d", path,
                 read_u32(base + 8), BLOB_VERSION);
        return 1;
    }
    if (read_u32(base + 12) != header_size || read_u32(base + 16) != (uint32_t)n_exp) {
        snprintf(err, err_len, "%s: header holds %u bytes / %u tensors, this model needs %zu / %d",
                 path, read_u32(base + 12), read_u32(base + 16), header_size, n_exp);
        return 1;
    }
    if (size < header_size) {
        snprintf(err, err_len, "%s: truncated: %zu bytes, the header alone is %zu", path, size, header_size);
        return 1;
    }
    uint32_t want_crc = read_u32(base + header_size - 4);
    if (crc32(base, header_size - 4) != want_crc) {
        snprintf(err, err_len, "%s: header checksum mismatch (corrupt header)", path);
        return 1;
    }
    static const char *dim_names[N_DIMS] = {"vocab", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                                            "head_dim", "sliding_window", "attn_bias", "tied", "bos", "eos",
                                            "n_experts", "top_k"};
    const int32_t compiled[N_DIMS] = {VOCAB_SIZE, DIM, HIDDEN_DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM,
                                      SLIDING_WINDOW, 1, 0, BOS_ID, EOS_ID,
                                      0, 0};
    if (read_u32(base + 20) != WEIGHT_DTYPE) {
        snprintf(err, err_len, "%s: weight dtype %u, this build was compiled for %d", path,
                 read_u32(base + 20), WEIGHT_DTYPE);
        return 1;
    }
    for (int i = 0; i < N_DIMS; i++) {
        int32_t v = (int32_t)read_u32(base + 24 + 4 * i);
        if (v != compiled[i]) {
            snprintf(err, err_len, "%s: %s is %d, this build was compiled for %d", path, dim_names[i], v, compiled[i]);
            return 1;
        }
    }
    float eps;
    memcpy(&eps, base + 24 + 4 * N_DIMS, 4);
    if (eps != (float)RMS_EPS) {
        snprintf(err, err_len, "%s: rms_eps %g, this build was compiled for %g", path, eps, (double)RMS_EPS);
        return 1;
    }
    for (int f = 0; f < N_FFNS; f++) {
        if (memcmp(base + FIXED_HEADER + (size_t)f * FFN_SPEC_BYTES, &FFN_SPECS[f], FFN_SPEC_BYTES) != 0) {
            snprintf(err, err_len, "%s: layers.%d: FFN sparsity spec differs from the compiled one", path, f);
            return 1;
        }
    }
    return 0;
}

static int check_tensor(const uint8_t *base, size_t size, size_t header_size, const uint8_t *entry_bytes,
                        const Expected *e, const char *path, char *err, size_t err_len) {
    TensorEntry t;
    memcpy(t.name, entry_bytes, 48);
    t.dtype = read_u32(entry_bytes + 48);
    t.rows = read_u32(entry_bytes + 52);
    t.cols = read_u32(entry_bytes + 56);
    t.crc = read_u32(entry_bytes + 60);
    t.offset = read_u64(entry_bytes + 64);
    t.nbytes = read_u64(entry_bytes + 72);
    if (memchr(t.name, 0, sizeof(t.name)) == NULL || strcmp(t.name, e->name) != 0) {
        snprintf(err, err_len, "%s: tensor table: expected %s here", path, e->name);
        return 1;
    }
    if (t.dtype != e->dtype || t.rows != e->rows || t.cols != e->cols) {
        snprintf(err, err_len, "%s: tensor %s: dtype %u shape [%u, %u], expected dtype %u shape [%u, %u]",
                 path, e->name, t.dtype, t.rows, t.cols, e->dtype, e->rows, e->cols);
        return 1;
    }
    uint64_t want_bytes = (uint64_t)e->rows * e->cols * (e->dtype == 1 ? 2 : 4);
    if (t.nbytes != want_bytes) {
        snprintf(err, err_len, "%s: tensor %s: %llu bytes, its shape needs %llu", path, e->name,
                 (unsigned long long)t.nbytes, (unsigned long long)want_bytes);
        return 1;
    }
    if (t.offset % 64 != 0) {
        snprintf(err, err_len, "%s: tensor %s: offset %llu is not 64-byte aligned", path, e->name,
                 (unsigned long long)t.offset);
        return 1;
    }
    if (t.offset < header_size || t.offset > size || t.nbytes > size - t.offset) {
        snprintf(err, err_len, "%s: tensor %s: bytes [%llu, +%llu) lie outside the file's data (%zu bytes; truncated?)",
                 path, e->name, (unsigned long long)t.offset, (unsigned long long)t.nbytes, size);
        return 1;
    }
    if (crc32(base + t.offset, (size_t)t.nbytes) != t.crc) {
        snprintf(err, err_len, "%s: tensor %s: checksum mismatch (corrupt data)", path, e->name);
        return 1;
    }
    *e->slot = base + t.offset;
    return 0;
}

int weights_open(Weights *w, const char *path, char *err, size_t err_len) {
    memset(w, 0, sizeof(*w));
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        snprintf(err, err_len, "%s: cannot open", path);
        return 1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0) {
        snprintf(err, err_len, "%s: empty or unreadable", path);
        close(fd);
        return 1;
    }
    size_t size = (size_t)st.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);   // [size] bytes
    close(fd);
    if (map == MAP_FAILED) {
        snprintf(err, err_len, "%s: cannot map %zu bytes", path, size);
        return 1;
    }
    w->map = map;
    w->map_size = size;

    static Expected exp[MAX_TENSORS];
    int n_exp = expected_tensors(w, exp);
    const uint8_t *base = (const uint8_t *)map;
    if (check_header(base, size, n_exp, path, err, err_len)) goto fail;
    size_t header_size = read_u32(base + 12);
    const uint8_t *table = base + FIXED_HEADER + (size_t)N_FFNS * FFN_SPEC_BYTES;
    for (int i = 0; i < n_exp; i++)
        if (check_tensor(base, size, header_size, table + (size_t)i * TENSOR_ENTRY_BYTES, &exp[i], path, err, err_len))
            goto fail;
    return 0;
fail:
    weights_close(w);
    return 1;
}

void weights_close(Weights *w) {
    if (w->map) munmap(w->map, w->map_size);
    memset(w, 0, sizeof(*w));
}
