// Byte-level BPE tokenizer (GPT-2 style) read from tokenizer.bin.
#ifndef TSRUN_TOKENIZER_H
#define TSRUN_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int32_t left, right, result;  // merging left + right gives result; index = rank
} Merge;

typedef struct {
    uint8_t *data;            // [size] the whole file
    size_t size;
    int n_tokens;
    const uint8_t **token_bytes;  // [n_tokens] raw bytes of each token
    uint32_t *token_len;      // [n_tokens]
    int32_t byte_token[256];  // token of each single byte, -1: no token (dropped)
    const uint8_t *merges;    // [n_merges] Merge records (12 bytes, little-endian)
    int n_merges;
    uint64_t *merge_keys;     // [table_size] open addressing: (left << 32 | right) + 1, 0 = empty
    int32_t *merge_rank;      // [table_size] rank of the pair
    size_t table_size;        // power of two
    int32_t *special;         // [n_special] tokens matched literally before pre-tokenization
    int n_special;
    int32_t *prefix;          // [n_prefix] tokens put before every encoding (e.g. BOS)
    int n_prefix;
    int split_digits;         // pre-tokenizer: each digit is its own piece
    int byte_level_regex;     // pre-tokenizer: GPT-2's regex
} Tokenizer;

// On a problem writes one line to err and returns nonzero.
int tokenizer_open(Tokenizer *t, const char *path, char *err, size_t err_len);
void tokenizer_close(Tokenizer *t);

// Encodes text into out (at most max_out ids); returns the count, or -1 if out is too small.
int tokenizer_encode(const Tokenizer *t, const char *text, int32_t *out, int max_out);
// The bytes of one token (empty for ids the tokenizer does not know).
const uint8_t *tokenizer_piece(const Tokenizer *t, int id, size_t *len);

#endif
