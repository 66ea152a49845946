// A qemu TCG plugin: executed instructions and loaded bytes per function (symbol), written at exit.
//
//   qemu-aarch64 -plugin ./insn_count.so,out=counts.tsv,mem=ffn_,mem=rows_ ... ./tsrun ...
//
// Instructions are counted for every symbol; loaded bytes for symbols starting with one of the
// `mem=` prefixes (mem=* for all). Both are inline adds fixed at translation time: the bytes a load
// instruction reads follow from its disassembly (qemu 7.2 reports 128-bit vector accesses wrongly
// to memory callbacks, so those are not used).
// Output: one line per symbol, "name<TAB>instructions<TAB>loaded_bytes", most instructions first.
// Counts are deterministic for a given binary and input; run the guest single-threaded (inline adds
// are not atomic across vCPUs). Built against qemu-plugin.h from Debian's qemu source package.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MAX_SYMBOLS 65536
#define MAX_PREFIXES 16

typedef struct {
    const char *name;         // qemu's string for the symbol (stable for the run); NULL = free slot
    uint64_t insns;           // executed instructions
    uint64_t loaded;          // bytes loaded (symbols matching a mem= prefix)
    int count_loads;
} Symbol;

static Symbol symbols[MAX_SYMBOLS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static const char *prefixes[MAX_PREFIXES];
static int n_prefixes;
static char out_path[4096];

static int wants_loads(const char *name) {
    for (int i = 0; i < n_prefixes; i++)
        if (!strcmp(prefixes[i], "*") || !strncmp(name, prefixes[i], strlen(prefixes[i]))) return 1;
    return 0;
}

static Symbol *symbol_of(const char *name) {   // open addressing on the string's hash
    uint64_t h = 1469598103934665603ull;
    for (const char *p = name; *p; p++) h = (h ^ (uint8_t)*p) * 1099511628211ull;
    for (size_t i = h % MAX_SYMBOLS;; i = (i + 1) % MAX_SYMBOLS) {
        if (!symbols[i].name) {
            symbols[i].name = name;
            symbols[i].count_loads = wants_loads(name);
            return &symbols[i];
        }
        if (!strcmp(symbols[i].name, name)) return &symbols[i];
    }
}

// Bytes read by one AArch64 load, from its disassembly ("ldr q3, [x2, x3]", "ld1 {v0.4s, v1.4s}, [x0]");
// 0 for anything that is not a load.
static unsigned load_bytes(const char *disas) {
    char op[16] = {0};
    if (sscanf(disas, "%15s", op) != 1 || op[0] != 'l' || op[1] != 'd') return 0;
    if (!strncmp(op, "ldadd", 5) || !strncmp(op, "ldclr", 5) || !strncmp(op, "ldset", 5)) return 0;
    const char *args = disas + strlen(op);
    while (*args == ' ') args++;
    if (op[2] >= '1' && op[2] <= '4') {                   // ld1..ld4 {v0.4s, ...}: count registers
        unsigned regs = 0, bytes = 0;
        for (const char *p = args; *p && *p != '}'; p++)
            if (*p == '.') {
                regs++;
                bytes = (p[1] == '1' && p[2] == '6') || p[1] == '4' || (p[1] == '2' && p[2] == 'd') ||
                        (p[1] == '8' && p[2] == 'h') ? 16 : 8;
            }
        if (strchr(op, 'r')) {                            // ld1r: one element replicated
            const char *dot = strchr(args, '.');
            char t = dot ? dot[strspn(dot + 1, "0123456789") + 1] : 's';
            return regs * (t == 'b' ? 1 : t == 'h' ? 2 : t == 's' ? 4 : 8);
        }
        return regs * bytes;
    }
    unsigned n = !strncmp(op, "ldp", 3) || !strncmp(op, "ldnp", 4) || !strncmp(op, "ldxp", 4) ||
                 !strncmp(op, "ldaxp", 5) ? 2 : 1;        // pair loads
    size_t len = strlen(op);
    char last = op[len - 1];
    if (!strncmp(op, "ldr", 3) || !strncmp(op, "ldur", 4) || !strncmp(op, "ldar", 4) || !strncmp(op, "ldxr", 4) ||
        !strncmp(op, "ldaxr", 5) || !strncmp(op, "ldtr", 4) || !strncmp(op, "ldapr", 5)) {
        if (last == 'b' && len > 3) return 1;             // ldrb, ldrsb, ldurb, ...
        if (last == 'h' && len > 3) return 2;
        if (last == 'w' && strstr(op, "sw")) return 4;   // ldrsw
    }
    switch (args[0]) {                                    // register width of the destination
    case 'q': return 16 * n;
    case 'x': case 'd': return 8 * n;
    case 'w': case 's': return 4 * n;
    case 'h': return 2 * n;
    case 'b': return 1 * n;
    default: return 0;
    }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    pthread_mutex_lock(&lock);
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        const char *name = qemu_plugin_insn_symbol(insn);
        Symbol *s = symbol_of(name ? name : "?");
        qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &s->insns, 1);
        if (s->count_loads) {
            char *disas = qemu_plugin_insn_disas(insn);
            unsigned bytes = disas ? load_bytes(disas) : 0;
            free(disas);
            if (bytes) qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &s->loaded, bytes);
        }
    }
    pthread_mutex_unlock(&lock);
}

static int by_insns_desc(const void *a, const void *b) {
    uint64_t x = ((const Symbol *)a)->insns, y = ((const Symbol *)b)->insns;
    return x > y ? -1 : x < y ? 1 : 0;
}

static void write_counts(qemu_plugin_id_t id, void *udata) {
    (void)id; (void)udata;
    size_t n = 0;
    for (size_t i = 0; i < MAX_SYMBOLS; i++)
        if (symbols[i].name) symbols[n++] = symbols[i];
    qsort(symbols, n, sizeof(Symbol), by_insns_desc);
    FILE *f = out_path[0] ? fopen(out_path, "w") : NULL;
    for (size_t i = 0; i < n; i++) {
        char line[512];
        snprintf(line, sizeof(line), "%s\t%llu\t%llu\n", symbols[i].name,
                 (unsigned long long)symbols[i].insns, (unsigned long long)symbols[i].loaded);
        if (f) fputs(line, f);
        else qemu_plugin_outs(line);
    }
    if (f) fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "out=", 4)) {
            snprintf(out_path, sizeof(out_path), "%s", argv[i] + 4);
        } else if (!strncmp(argv[i], "mem=", 4) && n_prefixes < MAX_PREFIXES) {
            prefixes[n_prefixes++] = strdup(argv[i] + 4);
        } else {
            fprintf(stderr, "insn_count: unknown argument %s (use out=FILE, mem=PREFIX)\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, write_counts, NULL);
    return 0;
}
