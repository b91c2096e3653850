/*
 * memcheck <MB> [MBps] — exact guest-memory consistency checker for tether.
 *
 * Optional MBps throttles the sweep to about that many MB per second (checked every
 * 1 MiB, each sleep capped at 100 ms so clock jumps after a rollback cannot stall it).
 * Default: unthrottled. Unthrottled, the guest re-dirties all MB every pass.
 *
 * Allocates MB megabytes and keeps this invariant over every 4 KiB page:
 * after pass p has visited page i, the page holds exactly content(p, i),
 * a pure function of (pass, page index):
 *   word 0: MAGIC, word 1: pass, word 2: page index, word 3: MAGIC ^ pass ^ index,
 *   words 4..511: xorshift64* stream seeded by splitmix64(pass, index).
 *
 * Pass 1 fills every page. Each later pass p walks the pages in order and, for
 * every page, compares all 512 words against content(p-1, i) and then rewrites
 * the page with content(p, i). So any page write that gets lost, duplicated
 * from an older checkpoint, or torn by a migration/rollback shows up as a
 * mismatch: the check is exhaustive, never sampled.
 *
 * Output (stdout, one write(2) per line, unbuffered):
 *   memcheck start mb=<MB> pages=<n>
 *   memcheck progress pass=<p> page=<i>          (at 1/4, 1/2, 3/4 of each pass)
 *   memcheck pass <p> ok                         (no corruption seen so far)
 *   memcheck CORRUPT page=<i> expected_pass=<p-1> found_pass=<x> word=<w>
 *   memcheck pass <p> CORRUPT total=<n>          (once any corruption was seen)
 * found_pass is the pass number in the page header when the header looks
 * valid (magic, index and check word match), otherwise -1. word is the first
 * mismatching 8-byte word in the page. At most MAX_REPORTS_PER_PASS CORRUPT
 * lines are printed per pass; the rest are summarised as
 *   memcheck CORRUPT suppressed=<n> pass=<p>
 * (total= always counts every corrupt page).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include "guest.h"

#define PAGE_BYTES 4096u
#define WORDS (PAGE_BYTES / 8u)
#define HDR_WORDS 4u
#define MAGIC 0x7465746865726d63ULL /* "tetherm c" */
#define MAX_REPORTS_PER_PASS 1000u

static void out(const char *s, size_t n) {
    while (n > 0) {
        ssize_t w = write(1, s, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return;
        }
        s += w;
        n -= (size_t)w;
    }
}

/* Tiny line builder: no stdio so every line is exactly one write(2). */
struct line { char buf[256]; size_t n; };
static void l_str(struct line *l, const char *s) {
    while (*s && l->n < sizeof l->buf - 1) l->buf[l->n++] = *s++;
}
static void l_u64(struct line *l, uint64_t v) {
    char t[24]; int i = 0;
    do { t[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i > 0 && l->n < sizeof l->buf - 1) l->buf[l->n++] = t[--i];
}
static void l_i64(struct line *l, int64_t v) {
    if (v < 0) { l_str(l, "-"); l_u64(l, (uint64_t)(-(v + 1)) + 1); }
    else l_u64(l, (uint64_t)v);
}
static void l_end(struct line *l) { l->buf[l->n++] = '\n'; out(l->buf, l->n); l->n = 0; }

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}
static inline uint64_t seed_for(uint64_t pass, uint64_t index) {
    uint64_t s = splitmix64(splitmix64(pass ^ 0x5bd1e9955bd1e995ULL) ^ index);
    return s ? s : 0x2545f4914f6cdd1dULL; /* xorshift state must be non-zero */
}
static inline uint64_t xs_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dULL;
}

static void fill_page(uint64_t *pg, uint64_t pass, uint64_t index) {
    uint64_t s = seed_for(pass, index);
    pg[0] = MAGIC; pg[1] = pass; pg[2] = index; pg[3] = MAGIC ^ pass ^ index;
    for (unsigned w = HDR_WORDS; w < WORDS; w++) pg[w] = xs_next(&s);
}

/* Verify page holds content(pass-1, index) and rewrite it with content(pass, index)
 * in one sweep. Returns the first mismatching word, or -1 if the page was intact. */
static int verify_and_rewrite(uint64_t *pg, uint64_t pass, uint64_t index, int64_t *found_pass) {
    const uint64_t old = pass - 1;
    int first_bad = -1;
    uint64_t h0 = pg[0], h1 = pg[1], h2 = pg[2], h3 = pg[3];
    *found_pass = (h0 == MAGIC && h2 == index && h3 == (MAGIC ^ h1 ^ h2)) ? (int64_t)h1 : -1;

    const uint64_t exp_hdr[HDR_WORDS] = { MAGIC, old, index, MAGIC ^ old ^ index };
    const uint64_t new_hdr[HDR_WORDS] = { MAGIC, pass, index, MAGIC ^ pass ^ index };
    for (unsigned w = 0; w < HDR_WORDS; w++) {
        if (pg[w] != exp_hdr[w] && first_bad < 0) first_bad = (int)w;
        pg[w] = new_hdr[w];
    }
    uint64_t so = seed_for(old, index), sn = seed_for(pass, index);
    uint64_t diff = 0;
    for (unsigned w = HDR_WORDS; w < WORDS; w++) {
        uint64_t e = xs_next(&so);
        diff |= pg[w] ^ e;
        if (__builtin_expect(diff != 0, 0) && first_bad < 0) first_bad = (int)w;
        pg[w] = xs_next(&sn);
    }
    return first_bad;
}

/* Throttle: called every 256 pages (1 MiB); keeps the average at <= rate MB/s. */
struct throttle { uint64_t rate, t0, done_mb; };
static void throttle_mb(struct throttle *t) {
    if (!t->rate) return;
    t->done_mb++;
    uint64_t due = t->t0 + t->done_mb * 1000000000ull / t->rate, now = now_ns();
    if (due <= now) {
        if (now - due > 1000000000ull) { t->t0 = now; t->done_mb = 0; } /* don't burst to catch up */
        return;
    }
    uint64_t d = due - now;
    if (d > 100000000ull) d = 100000000ull;
    struct timespec ts = { (time_t)(d / 1000000000ull), (long)(d % 1000000000ull) };
    nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
    struct line l = { .n = 0 };
    if (argc != 2 && argc != 3) {
        l_str(&l, "usage: memcheck <MB> [MBps]"); l_end(&l);
        return 2;
    }
    struct throttle thr = { 0, 0, 0 };
    if (argc == 3) {
        char *e2 = NULL;
        thr.rate = strtoull(argv[2], &e2, 10);
        if (!e2 || *e2) { l_str(&l, "memcheck: bad MBps argument: "); l_str(&l, argv[2]); l_end(&l); return 2; }
        thr.t0 = now_ns();
    }
    char *end = NULL;
    unsigned long mb = strtoul(argv[1], &end, 10);
    if (!end || *end || mb == 0 || mb > (1UL << 20)) {
        l_str(&l, "memcheck: bad MB argument: "); l_str(&l, argv[1]); l_end(&l);
        return 2;
    }
    size_t bytes = (size_t)mb << 20;
    uint64_t pages = bytes / PAGE_BYTES;
    unsigned char *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        l_str(&l, "memcheck: mmap failed errno="); l_u64(&l, (uint64_t)errno); l_end(&l);
        return 1;
    }
    /* Keep our pages resident; ignore failure (e.g. RLIMIT_MEMLOCK), there is no swap anyway. */
    (void)mlock(mem, bytes);

    l_str(&l, "memcheck start mb="); l_u64(&l, mb);
    l_str(&l, " pages="); l_u64(&l, pages);
    if (thr.rate) { l_str(&l, " mbps="); l_u64(&l, thr.rate); }
    l_end(&l);

    const uint64_t quarter = pages / 4 ? pages / 4 : 1;
    uint64_t corrupt_total = 0;
    for (uint64_t pass = 1;; pass++) {
        uint64_t reported = 0, pass_corrupt = 0;
        for (uint64_t i = 0; i < pages; i++) {
            if (i && i % quarter == 0 && i / quarter < 4) {
                l_str(&l, "memcheck progress pass="); l_u64(&l, pass);
                l_str(&l, " page="); l_u64(&l, i); l_end(&l);
            }
            if (i % 256 == 0 && (pass > 1 || i > 0)) throttle_mb(&thr);
            uint64_t *pg = (uint64_t *)(mem + i * PAGE_BYTES);
            if (pass == 1) { fill_page(pg, 1, i); continue; }
            int64_t found;
            int bad = verify_and_rewrite(pg, pass, i, &found);
            if (bad >= 0) {
                corrupt_total++;
                pass_corrupt++;
                if (reported++ < MAX_REPORTS_PER_PASS) {
                    l_str(&l, "memcheck CORRUPT page="); l_u64(&l, i);
                    l_str(&l, " expected_pass="); l_u64(&l, pass - 1);
                    l_str(&l, " found_pass="); l_i64(&l, found);
                    l_str(&l, " word="); l_u64(&l, (uint64_t)bad); l_end(&l);
                }
            }
        }
        if (pass_corrupt > MAX_REPORTS_PER_PASS) {
            l_str(&l, "memcheck CORRUPT suppressed="); l_u64(&l, pass_corrupt - MAX_REPORTS_PER_PASS);
            l_str(&l, " pass="); l_u64(&l, pass); l_end(&l);
        }
#ifdef MEMCHECK_INJECT
        /* Host-side self-test only (never in the guest image): after pass 3, make
         * page 5 stale (pass-1 content), flip one bit in page 7, zero page 9. */
        if (pass == 3) {
            fill_page((uint64_t *)(mem + 5 * PAGE_BYTES), pass - 1, 5);
            ((uint64_t *)(mem + 7 * PAGE_BYTES))[100] ^= 1;
            memset(mem + 9 * PAGE_BYTES, 0, PAGE_BYTES);
        }
#endif
        l_str(&l, "memcheck pass "); l_u64(&l, pass);
        if (corrupt_total == 0) l_str(&l, " ok");
        else { l_str(&l, " CORRUPT total="); l_u64(&l, corrupt_total); }
        l_end(&l);
    }
}
