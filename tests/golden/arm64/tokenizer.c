// Byte-level BPE: special tokens, then pre-tokenization (digits, GPT-2 regex), then merges by rank.
//
// tokenizer.bin (little-endian):
//   char magic[8] "TSRUNTK\0", u32 version, u32 n_tokens, u32 n_merges, u32 n_special,
//   u32 flags (1: split digits, 2: GPT-2 regex), u32 n_prefix, i32 prefix[n_prefix],
//   i32 byte_token[256], per token {u32 len, u8 bytes[len]}, Merge merges[n_merges] (rank order),
//   i32 special[n_special], u32 crc32 of everything before it.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"

#define TOKENIZER_MAGIC "TSRUNTK"
#define TOKENIZER_VERSION 1

// ----------------------------------------------------------------------------
// Reading tokenizer.bin

typedef struct {
    const uint8_t *p, *end;   // the bytes not read yet: [p, end)
    int bad;
} Reader;

static uint32_t take_u32(Reader *r) {
    if (r->end - r->p < 4) { r->bad = 1; return 0; }
    uint32_t v;
    memcpy(&v, r->p, 4);
    r->p += 4;
    return v;
}

static const uint8_t *take_bytes(Reader *r, size_t n) {
    if ((size_t)(r->end - r->p) < n) { r->bad = 1; return NULL; }
    const uint8_t *at = r->p;
    r->p += n;
    return at;
}

static uint32_t crc32_bytes(const uint8_t *p, size_t n) {    // bitwise: tokenizer files are small
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1)));
    }
    return ~crc;
}

static size_t pair_slot(const Tokenizer *t, uint64_t key) {
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 17) & (t->table_size - 1);
}

static int32_t read_i32_at(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

static void merge_at(const Tokenizer *t, int rank, int32_t *left, int32_t *right, int32_t *result) {
    const uint8_t *m = t->merges + (size_t)rank * sizeof(Merge);
    *left = read_i32_at(m);
    *right = read_i32_at(m + 4);
    *result = read_i32_at(m + 8);
}

int tokenizer_open(Tokenizer *t, const char *path, char *err, size_t err_len) {
    memset(t, 0, sizeof(*t));
    FILE *f = fopen(path, "rb");
    if (!f) { snprintf(err, err_len, "%s: cannot open", path); return 1; }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (size < 16) { fclose(f); snprintf(err, err_len, "%s: truncated tokenizer file", path); return 1; }
    t->data = malloc((size_t)size);
    t->size = (size_t)size;
    if (!t->data || fread(t->data, 1, t->size, f) != t->size) {
        fclose(f);
        snprintf(err, err_len, "%s: cannot read", path);
        tokenizer_close(t);
        return 1;
    }
    fclose(f);
    if (memcmp(t->data, TOKENIZER_MAGIC, 8) != 0) {
        snprintf(err, err_len, "%s: not a tsrun tokenizer (bad magic)", path);
        goto fail;
    }
    uint32_t want_crc;
    memcpy(&want_crc, t->data + t->size - 4, 4);
    if (crc32_bytes(t->data, t->size - 4) != want_crc) {
        snprintf(err, err_len, "%s: checksum mismatch (corrupt or truncated)", path);
        goto fail;
    }
    Reader r = {t->data + 8, t->data + t->size - 4, 0};
    uint32_t version = take_u32(&r);
    uint32_t n_tokens = take_u32(&r), n_merges = take_u32(&r), n_special = take_u32(&r);
    uint32_t flags = take_u32(&r), n_prefix = take_u32(&r);
    if (r.bad || version != TOKENIZER_VERSION || n_tokens == 0 || n_tokens > (1u << 24) ||
        n_merges > (1u << 24) || n_special > n_tokens || n_prefix > 16) {
        snprintf(err, err_len, "%s: bad header (version %u, %u tokens)", path, version, n_tokens);
        goto fail;
    }
    t->n_tokens = (int)n_tokens;
    t->split_digits = (flags & 1) != 0;
    t->byte_level_regex = (flags & 2) != 0;
    t->n_prefix = (int)n_prefix;
    t->n_special = (int)n_special;
    t->n_merges = (int)n_merges;
    t->prefix = calloc(n_prefix + 1, sizeof(int32_t));
    t->special = calloc(n_special + 1, sizeof(int32_t));
    t->token_bytes = calloc(n_tokens, sizeof(uint8_t *));
    t->token_len = calloc(n_tokens, sizeof(uint32_t));
    if (!t->prefix || !t->special || !t->token_bytes || !t->token_len) {
        snprintf(err, err_len, "%s: out of memory", path);
        goto fail;
    }
    for (uint32_t i = 0; i < n_prefix; i++) t->prefix[i] = (int32_t)take_u32(&r);
    for (int b = 0; b < 256; b++) t->byte_token[b] = (int32_t)take_u32(&r);
    for (uint32_t i = 0; i < n_tokens && !r.bad; i++) {
        t->token_len[i] = take_u32(&r);
        t->token_bytes[i] = take_bytes(&r, t->token_len[i]);
    }
    t->merges = take_bytes(&r, (size_t)n_merges * sizeof(Merge));
    for (uint32_t i = 0; i < n_special; i++) t->special[i] = (int32_t)take_u32(&r);
    if (r.bad || r.p != r.end) {
        snprintf(err, err_len, "%s: sections do not add up to the file size", path);
        goto fail;
    }
    for (uint32_t i = 0; i < n_prefix; i++)
        if (t->prefix[i] < 0 || t->prefix[i] >= (int32_t)n_tokens) goto bad_id;
    for (int b = 0; b < 256; b++)   // -1: a byte without a token (dropped)
        if (t->byte_token[b] < -1 || t->byte_token[b] >= (int32_t)n_tokens) goto bad_id;
    for (uint32_t i = 0; i < n_special; i++)
        if (t->special[i] < 0 || t->special[i] >= (int32_t)n_tokens || t->token_len[t->special[i]] == 0) goto bad_id;

    // pair -> rank table, at most half full
    t->table_size = 16;
    while (t->table_size < 2 * (size_t)n_merges) t->table_size <<= 1;
    t->merge_keys = calloc(t->table_size, sizeof(uint64_t));
    t->merge_rank = calloc(t->table_size, sizeof(int32_t));
    if (!t->merge_keys || !t->merge_rank) {
        snprintf(err, err_len, "%s: out of memory", path);
        goto fail;
    }
    for (int rank = 0; rank < t->n_merges; rank++) {
        int32_t left, right, result;
        merge_at(t, rank, &left, &right, &result);
        if (left < 0 || right < 0 || result < 0 || left >= t->n_tokens || right >= t->n_tokens ||
            result >= t->n_tokens) goto bad_id;
        uint64_t key = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;
        size_t slot = pair_slot(t, key);
        while (t->merge_keys[slot] && t->merge_keys[slot] != key) slot = (slot + 1) & (t->table_size - 1);
        if (!t->merge_keys[slot]) {                       // the first (lowest) rank of a pair wins
            t->merge_keys[slot] = key;
            t->merge_rank[slot] = rank;
        }
    }
    return 0;
bad_id:
    snprintf(err, err_len, "%s: token id out of range", path);
fail:
    tokenizer_close(t);
    return 1;
}

void tokenizer_close(Tokenizer *t) {
    free(t->data);
    free(t->prefix);
    free(t->special);
    free(t->token_bytes);
    free(t->token_len);
    free(t->merge_keys);
    free(t->merge_rank);
    memset(t, 0, sizeof(*t));
}

const uint8_t *tokenizer_piece(const Tokenizer *t, int id, size_t *len) {
    if (id < 0 || id >= t->n_tokens) { *len = 0; return (const uint8_t *)""; }
    *len = t->token_len[id];
    return t->token_bytes[id];
}

// ----------------------------------------------------------------------------
// Character classes of the GPT-2 pre-tokenizer (\p{L}, \p{N}, \s, anything else).
// ASCII is exact; beyond it, the common blocks of digits, spaces, punctuation and symbols are
// listed and every other code point counts as a letter (true for the scripts' letter blocks).

enum { CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE, CLASS_OTHER };

typedef struct { uint32_t lo, hi; } Range;

static const Range NUMBER_RANGES[] = {
    {0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE}, {0x660, 0x669}, {0x6F0, 0x6F9}, {0x7C0, 0x7C9},
    {0x966, 0x96F}, {0x9E6, 0x9EF}, {0xE50, 0xE59}, {0x2070, 0x2070}, {0x2074, 0x2079},
    {0x2080, 0x2089}, {0x2150, 0x2182}, {0x2185, 0x2189}, {0x2460, 0x249B}, {0x24EA, 0x24FF},
    {0x2776, 0x2793}, {0x3007, 0x3007}, {0x3021, 0x3029}, {0xFF10, 0xFF19},
};
static const Range SPACE_RANGES[] = {
    {0x85, 0x85}, {0xA0, 0xA0}, {0x1680, 0x1680}, {0x2000, 0x200A}, {0x2028, 0x2029},
    {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000},
};
static const Range OTHER_RANGES[] = {   // punctuation, symbols, marks, controls, private use
    {0x80, 0xA9}, {0xAB, 0xB4}, {0xB6, 0xB9}, {0xBB, 0xBF}, {0xD7, 0xD7}, {0xF7, 0xF7},
    {0x2C2, 0x2C5}, {0x2D2, 0x2DF}, {0x2E5, 0x2EB}, {0x2ED, 0x2ED}, {0x2EF, 0x36F},
    {0x37E, 0x37E}, {0x384, 0x385}, {0x387, 0x387}, {0x483, 0x489}, {0x55A, 0x55F},
    {0x589, 0x58A}, {0x591, 0x5C7}, {0x5F3, 0x5F4}, {0x600, 0x61F}, {0x64B, 0x65F},
    {0x66A, 0x66D}, {0x6D4, 0x6D4}, {0x964, 0x965}, {0xE3F, 0xE3F},
    {0x2010, 0x2027}, {0x202A, 0x202E}, {0x2030, 0x205E}, {0x2060, 0x206F}, {0x207A, 0x207E},
    {0x208A, 0x208E}, {0x20A0, 0x20FF}, {0x2100, 0x2101}, {0x2103, 0x2106}, {0x2108, 0x2109},
    {0x2114, 0x2114}, {0x2116, 0x2118}, {0x211E, 0x2123}, {0x2125, 0x2125}, {0x2127, 0x2127},
    {0x2129, 0x2129}, {0x212E, 0x212E}, {0x2140, 0x2144}, {0x214A, 0x214D}, {0x214F, 0x214F},
    {0x2190, 0x245F}, {0x249C, 0x24E9}, {0x2500, 0x2775}, {0x2794, 0x2BFF}, {0x2CE5, 0x2CEA},
    {0x2E00, 0x2E7F}, {0x2E80, 0x2FFF}, {0x3001, 0x3004}, {0x3008, 0x3020}, {0x302A, 0x3030},
    {0x303D, 0x303F}, {0x3099, 0x309C}, {0x30A0, 0x30A0}, {0x30FB, 0x30FB}, {0x3200, 0x33FF},
    {0xD800, 0xF8FF}, {0xFE00, 0xFE0F}, {0xFE10, 0xFE6F}, {0xFEFF, 0xFEFF}, {0xFF01, 0xFF0F},
    {0xFF1A, 0xFF20}, {0xFF3B, 0xFF40}, {0xFF5B, 0xFF65}, {0xFFE0, 0xFFFF},
    {0x1D100, 0x1D1FF}, {0x1F000, 0x1FAFF}, {0xE0000, 0x10FFFF},
};

static int in_ranges(uint32_t c, const Range *r, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (c >= r[i].lo && c <= r[i].hi) return 1;
    return 0;
}

static int char_class(uint32_t c) {
    if (c < 0x80) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return CLASS_LETTER;
        if (c >= '0' && c <= '9') return CLASS_NUMBER;
        if (c == ' ' || (c >= '\t' && c <= '\r')) return CLASS_SPACE;
        return CLASS_OTHER;
    }
    if (in_ranges(c, SPACE_RANGES, sizeof(SPACE_RANGES) / sizeof(Range))) return CLASS_SPACE;
    if (in_ranges(c, NUMBER_RANGES, sizeof(NUMBER_RANGES) / sizeof(Range))) return CLASS_NUMBER;
    if (in_ranges(c, OTHER_RANGES, sizeof(OTHER_RANGES) / sizeof(Range))) return CLASS_OTHER;
    return CLASS_LETTER;
}

// Decodes one UTF-8 character at s[0..n); invalid bytes decode as themselves (class other).
static int utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t b = s[0];
    int len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (len == 0 || (size_t)len > n) { *cp = 0xFFFD; return 1; }
    uint32_t c = len == 1 ? b : len == 2 ? (b & 0x1f) : len == 3 ? (b & 0x0f) : (b & 0x07);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) { *cp = 0xFFFD; return 1; }
        c = (c << 6) | (s[i] & 0x3f);
    }
    *cp = c;
    return len;
}

// ----------------------------------------------------------------------------
// Encoding

typedef struct {
    int32_t *out;             // [max] ids, the first n written
    int n, max;
} Output;

static int emit(Output *o, int32_t id) {
    if (o->n >= o->max) return -1;
    o->out[o->n++] = id;
    return 0;
}

static int pair_rank(const Tokenizer *t, int32_t left, int32_t right) {
    uint64_t key = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;
    size_t slot = pair_slot(t, key);
    while (t->merge_keys[slot]) {
        if (t->merge_keys[slot] == key) return t->merge_rank[slot];
        slot = (slot + 1) & (t->table_size - 1);
    }
    return -1;
}

// BPE of one pre-token: start from byte tokens, merge the lowest-ranked adjacent pair until none is left.
static int bpe(const Tokenizer *t, const uint8_t *s, size_t n, Output *o) {
    int32_t stack_buf[256];
    int32_t *sym = n <= 256 ? stack_buf : malloc(n * sizeof(int32_t));   // [n] symbols
    if (!sym) return -1;
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        if (t->byte_token[s[i]] >= 0) sym[count++] = t->byte_token[s[i]];
    for (;;) {
        int best = -1;
        size_t at = 0;
        for (size_t i = 0; i + 1 < count; i++) {
            int r = pair_rank(t, sym[i], sym[i + 1]);
            if (r >= 0 && (best < 0 || r < best)) { best = r; at = i; }
        }
        if (best < 0) break;
        int32_t left, right, result;
        merge_at(t, best, &left, &right, &result);
        sym[at] = result;
        memmove(sym + at + 1, sym + at + 2, (count - at - 2) * sizeof(int32_t));
        count--;
    }
    int rc = 0;
    for (size_t i = 0; i < count && rc == 0; i++) rc = emit(o, sym[i]);
    if (sym != stack_buf) free(sym);
    return rc;
}

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
static int regex_split(const Tokenizer *t, const uint8_t *s, size_t n, Output *o) {
    // code points with their byte offsets
    uint32_t *cp = malloc((n + 1) * sizeof(uint32_t));   // [n + 1] code points (at most one per byte)
    size_t *at = malloc((n + 1) * sizeof(size_t));       // [n + 1] byte offset of each, then the end
    if (!cp || !at) { free(cp); free(at); return -1; }
    size_t m = 0;
    for (size_t i = 0; i < n;) {
        at[m] = i;
        i += (size_t)utf8_next(s + i, n - i, &cp[m]);
        m++;
    }
    at[m] = n;
    int rc = 0;
    size_t i = 0;
    while (i < m && rc == 0) {
        size_t end = i + 1;
        uint32_t c = cp[i];
        uint32_t c1 = i + 1 < m ? cp[i + 1] : 0, c2 = i + 2 < m ? cp[i + 2] : 0;
        if (c == '\'' && (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')) {
            end = i + 2;
        } else if (c == '\'' && ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))) {
            end = i + 3;
        } else {
            size_t j = (c == ' ' && i + 1 < m && char_class(c1) != CLASS_SPACE) ? i + 1 : i;
            int cls = char_class(cp[j]);
            if (cls != CLASS_SPACE) {
                end = j + 1;
                while (end < m && char_class(cp[end]) == cls) end++;
            } else {
                end = i;
                while (end < m && char_class(cp[end]) == CLASS_SPACE) end++;
                if (end < m && end - i >= 2) end--;       // leave the last space to prefix the next word
            }
        }
        rc = bpe(t, s + at[i], at[end] - at[i], o);
        i = end;
    }
    free(cp);
    free(at);
    return rc;
}

static int is_digit_char(const uint8_t *s, size_t n, int *len) {
    uint32_t c;
    *len = utf8_next(s, n, &c);
    return char_class(c) == CLASS_NUMBER;
}

// A run of text without special tokens: digits split off one by one, then the regex, then BPE.
static int encode_plain(const Tokenizer *t, const uint8_t *s, size_t n, Output *o) {
    if (n == 0) return 0;
    if (!t->split_digits) return t->byte_level_regex ? regex_split(t, s, n, o) : bpe(t, s, n, o);
    size_t start = 0, i = 0;
    while (i < n) {
        int len;
        if (is_digit_char(s + i, n - i, &len)) {
            if (i > start && (t->byte_level_regex ? regex_split(t, s + start, i - start, o)
                                                  : bpe(t, s + start, i - start, o))) return -1;
            if (t->byte_level_regex ? regex_split(t, s + i, (size_t)len, o) : bpe(t, s + i, (size_t)len, o))
                return -1;
            start = i + (size_t)len;
        }
        i += (size_t)len;
    }
    if (start < n)
        return t->byte_level_regex ? regex_split(t, s + start, n - start, o) : bpe(t, s + start, n - start, o);
    return 0;
}

int tokenizer_encode(const Tokenizer *t, const char *text, int32_t *out, int max_out) {
    Output o = {out, 0, max_out};
    for (int i = 0; i < t->n_prefix; i++)
        if (emit(&o, t->prefix[i])) return -1;
    const uint8_t *s = (const uint8_t *)text;
    size_t n = strlen(text), start = 0;
    for (size_t i = 0; i < n;) {
        int best = -1;
        size_t best_len = 0;
        for (int k = 0; k < t->n_special; k++) {           // longest special token starting here
            size_t len = t->token_len[t->special[k]];
            if (len > best_len && len <= n - i && memcmp(s + i, t->token_bytes[t->special[k]], len) == 0) {
                best = t->special[k];
                best_len = len;
            }
        }
        if (best < 0) { i++; continue; }
        if (encode_plain(t, s + start, i - start, &o) || emit(&o, best)) return -1;
        i += best_len;
        start = i;
    }
    if (encode_plain(t, s + start, n - start, &o)) return -1;
    return o.n;
}
