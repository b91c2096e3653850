/*
 * diskcheck <device> <blocks> [writes-per-pass] [delay-ms] [zero-every] — exact guest-disk consistency
 * checker for tether: disk and memory that disagree (after a rollback) are detected.
 *
 * The first <blocks> 4 KiB blocks of <device> (the raw disk, e.g. /dev/vda) start all
 * zero (the host creates the image). diskcheck keeps, in RAM, the sequence number each
 * block must hold (0 = still zero) and keeps this invariant: block b holds exactly
 * content(b, seq[b]), a pure function of (block, sequence):
 *   word 0: MAGIC, word 1: block, word 2: seq, word 3: MAGIC ^ block ^ seq,
 *   words 4..510: xorshift64* stream seeded by splitmix64(block, seq),
 *   word 511: checksum (FNV-1a over words 0..510).
 *
 * Every pass writes <writes-per-pass> records (default 16) with O_DIRECT to random blocks,
 * each with the next global sequence number, sleeping <delay-ms> (default 0) between them;
 * seq[b] is updated when pwrite returns. The block is drawn from a generator kept in RAM
 * mixed with the monotonic clock: a guest resumed from a checkpoint replays this program
 * from the checkpoint's memory, and a purely deterministic stream would rewrite exactly the
 * blocks the lost epochs wrote, with the same contents, before reading them back, so a
 * disk holding the lost writes would pass. With the clock mixed in, the resumed run writes
 * other blocks and reads the lost writes back. Then it reads every block back (O_DIRECT, so
 * from the device, never the page cache) and compares it word for word with
 * content(b, seq[b]). A rollback that resumes memory from checkpoint k over a disk that
 * holds a write of a later epoch (or lacks one of an earlier epoch) leaves some block
 * with the wrong sequence number: reported.
 *
 * With <zero-every> N > 0, every Nth write of a pass is replaced by a zeroing request on
 * 1..4 blocks from the drawn one, alternately BLKZEROOUT (WRITE_ZEROES) and BLKDISCARD
 * (TRIM); those blocks must then read as zeroes (seq 0). Tether's stack guarantees that
 * for a discard too (discard=unmap on every node: a hole punched in the file, a zero
 * extent in the destination's journal, a DISKZERO record applied on the source), so a
 * rollback that loses or misapplies a zeroing request is a MISMATCH like a lost write.
 *
 * Output (stdout, one write(2) per line):
 *   diskcheck start dev=<device> blocks=<n> [zero-every=<N>]
 *   diskcheck pass <p> ok seq=<last written seq>
 *   diskcheck MISMATCH block=<b> expected_seq=<s> found_seq=<x> word=<w>
 *   diskcheck pass <p> MISMATCH total=<n>        (every pass once any mismatch was seen)
 * found_seq is the sequence number in the block's header when header and checksum are
 * self-consistent, 0 for an all-zero block, else -1. A mismatching block is rewritten
 * with a new sequence number so later passes stay checkable. At most 20 MISMATCH lines
 * per pass.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include "guest.h"

#define BLOCK 4096u
#define WORDS (BLOCK / 8u)
#define MAGIC 0x7465746864736b63ULL /* "tethdskc" */
#define READ_BLOCKS 64u
#define MAX_REPORTS 20u

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}
static inline uint64_t xs_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dULL;
}
static uint64_t fnv(const uint64_t *w, unsigned n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (unsigned i = 0; i < n; i++) { h ^= w[i]; h *= 0x100000001b3ULL; }
    return h;
}

static void fill(uint64_t *w, uint64_t block, uint64_t seq) {
    if (seq == 0) { memset(w, 0, BLOCK); return; }
    uint64_t s = splitmix64(splitmix64(seq ^ 0x6a09e667f3bcc909ULL) ^ block);
    if (!s) s = 1;
    w[0] = MAGIC; w[1] = block; w[2] = seq; w[3] = MAGIC ^ block ^ seq;
    for (unsigned i = 4; i < WORDS - 1; i++) w[i] = xs_next(&s);
    w[WORDS - 1] = fnv(w, WORDS - 1);
}

static int64_t found_seq(const uint64_t *w, uint64_t block) {
    int zero = 1;
    for (unsigned i = 0; i < WORDS; i++) if (w[i]) { zero = 0; break; }
    if (zero) return 0;
    if (w[0] == MAGIC && w[1] == block && w[3] == (MAGIC ^ w[1] ^ w[2]) && w[WORDS - 1] == fnv(w, WORDS - 1))
        return (int64_t)w[2];
    return -1;
}

static int open_dev(const char *dev) {
    /* virtio_blk may bind a moment after insmod returns: wait up to ~10 s. */
    for (int i = 0; i < 100; i++) {
        int fd = open(dev, O_RDWR | O_DIRECT);
        if (fd >= 0) return fd;
        struct timespec ts = { 0, 100000000L };
        nanosleep(&ts, NULL);
    }
    return -1;
}

static int pwrite_all(int fd, const void *buf, size_t n, off_t off) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, off);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        p += w; n -= (size_t)w; off += w;
    }
    return 0;
}
static int pread_all(int fd, void *buf, size_t n, off_t off) {
    char *p = buf;
    while (n > 0) {
        ssize_t r = pread(fd, p, n, off);
        if (r < 0) { if (errno == EINTR) continue; return -1; }
        if (r == 0) { errno = EIO; return -1; }
        p += r; n -= (size_t)r; off += r;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 6) {
        say("usage: diskcheck <device> <blocks> [writes-per-pass] [delay-ms] [zero-every]");
        return 2;
    }
    const char *dev = argv[1];
    uint64_t blocks = strtoull(argv[2], NULL, 10);
    unsigned per_pass = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 10) : 16;
    unsigned delay_ms = argc > 4 ? (unsigned)strtoul(argv[4], NULL, 10) : 0;
    unsigned zero_every = argc > 5 ? (unsigned)strtoul(argv[5], NULL, 10) : 0;
    uint64_t zero_ops = 0;
    if (blocks == 0) { say("diskcheck: blocks must be > 0"); return 2; }
    int fd = open_dev(dev);
    if (fd < 0) { say("diskcheck: cannot open %s: %s", dev, strerror(errno)); return 1; }
    off_t devsize = lseek(fd, 0, SEEK_END);
    if (devsize < 0 || (uint64_t)devsize < blocks * BLOCK) {
        say("diskcheck: %s has %lld bytes, need %llu", dev, (long long)devsize, (unsigned long long)(blocks * BLOCK));
        return 1;
    }
    uint64_t *seq = calloc(blocks, sizeof *seq);
    uint64_t *wbuf, *rbuf, *want;
    if (!seq || posix_memalign((void **)&wbuf, BLOCK, BLOCK) || posix_memalign((void **)&rbuf, BLOCK, READ_BLOCKS * BLOCK) ||
        posix_memalign((void **)&want, BLOCK, BLOCK)) {
        say("diskcheck: out of memory");
        return 1;
    }
    if (zero_every)
        say("diskcheck start dev=%s blocks=%llu zero-every=%u", dev, (unsigned long long)blocks, zero_every);
    else
        say("diskcheck start dev=%s blocks=%llu", dev, (unsigned long long)blocks);
    uint64_t rng = 0x9e3779b97f4a7c15ULL, next_seq = 0, total_bad = 0;
    for (uint64_t pass = 1;; pass++) {
        for (unsigned i = 0; i < per_pass; i++) {
            uint64_t b = (xs_next(&rng) ^ splitmix64(now_ns())) % blocks;
            if (zero_every && i % zero_every == zero_every - 1) {
                uint64_t n = 1 + xs_next(&rng) % 4;
                if (b + n > blocks) n = blocks - b;
                uint64_t range[2] = { b * BLOCK, n * BLOCK };
                int discard = (zero_ops++ & 1) != 0;
                if (ioctl(fd, discard ? BLKDISCARD : BLKZEROOUT, range) != 0) {
                    say("diskcheck: %s block=%llu n=%llu failed: %s", discard ? "BLKDISCARD" : "BLKZEROOUT", (unsigned long long)b,
                        (unsigned long long)n, strerror(errno));
                    return 1;
                }
                for (uint64_t k = 0; k < n; k++) seq[b + k] = 0;
                continue;
            }
            uint64_t s = ++next_seq;
            fill(wbuf, b, s);
            if (pwrite_all(fd, wbuf, BLOCK, (off_t)(b * BLOCK)) < 0) {
                say("diskcheck: write block=%llu failed: %s", (unsigned long long)b, strerror(errno));
                return 1;
            }
            seq[b] = s;
            if (delay_ms) {
                struct timespec ts = { delay_ms / 1000, (long)(delay_ms % 1000) * 1000000L };
                nanosleep(&ts, NULL);
            }
        }
        unsigned reports = 0;
        uint64_t bad = 0;
        for (uint64_t base = 0; base < blocks; base += READ_BLOCKS) {
            uint64_t n = blocks - base < READ_BLOCKS ? blocks - base : READ_BLOCKS;
            if (pread_all(fd, rbuf, n * BLOCK, (off_t)(base * BLOCK)) < 0) {
                say("diskcheck: read block=%llu failed: %s", (unsigned long long)base, strerror(errno));
                return 1;
            }
            for (uint64_t k = 0; k < n; k++) {
                uint64_t b = base + k;
                const uint64_t *got = rbuf + k * WORDS;
                fill(want, b, seq[b]);
                if (memcmp(got, want, BLOCK) == 0) continue;
                unsigned w = 0;
                while (w < WORDS && got[w] == want[w]) w++;
                bad++;
                if (reports++ < MAX_REPORTS)
                    say("diskcheck MISMATCH block=%llu expected_seq=%llu found_seq=%lld word=%u", (unsigned long long)b,
                        (unsigned long long)seq[b], (long long)found_seq(got, b), w);
                /* Rewrite so later passes stay checkable. */
                uint64_t s = ++next_seq;
                fill(wbuf, b, s);
                if (pwrite_all(fd, wbuf, BLOCK, (off_t)(b * BLOCK)) == 0) seq[b] = s;
            }
        }
        total_bad += bad;
        if (total_bad) say("diskcheck pass %llu MISMATCH total=%llu", (unsigned long long)pass, (unsigned long long)total_bad);
        else say("diskcheck pass %llu ok seq=%llu", (unsigned long long)pass, (unsigned long long)next_seq);
    }
}
