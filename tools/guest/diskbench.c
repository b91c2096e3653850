/*
 * diskbench <device> <span-mib> <ops-per-case> [trigger] — 4 KiB disk throughput and
 * latency from inside the guest, on the virtio-blk disk as the guest's applications see it.
 *
 * Every request is O_DIRECT (the guest's page cache is bypassed: each one is a virtio-blk
 * request, i.e. one request to QEMU's block layer and, with the sidecar, one NBD request).
 * Cases, in this order: seq write, rand write, seq read, rand read at queue depth 1 (one
 * request at a time, per-request latency measured with CLOCK_MONOTONIC), then rand write
 * and rand read at queue depth 16 (16 threads, each issuing its share), then 64 KiB
 * sequential write and read at queue depth 1 (cases seq64k-write, seq64k-read; a quarter
 * of the requests, offsets stepping 64 KiB through the span). Offsets lie in the
 * first <span-mib> MiB; random ones come from a fixed xorshift seed, so every run and
 * every disk path sees the same sequence. Writes are not flushed (guest cache semantics of
 * the disk, as `qemu-img bench` on the host).
 *
 * With `trigger`, diskbench first waits until the device's last 4 KiB block begins with
 * TRIGGER_MAGIC (an O_DIRECT read every 20 ms), which the host writes into the raw image
 * when it wants the run to start: the journaled case starts it once the VM runs on the
 * migration's destination, so the whole run falls inside the post-copy window. The
 * trigger block must lie outside the first <span-mib> MiB.
 *
 * Output (stdout, one write(2) per line):
 *   diskbench waiting for the trigger            (with `trigger`)
 *   diskbench start dev=<device> span_mib=<n> ops=<n>
 *   diskbench case=<name> qd=<n> ops=<n> us=<elapsed> iops=<n> lat_mean_us=<n> lat_p50_us=<n> lat_p99_us=<n>
 *   diskbench done
 *   diskbench: <error>
 * The host (tools/bench/diskguest.ts) parses these lines from the serial log.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "guest.h"

#define BLOCK 4096u
#define MAX_DEPTH 16u
/* what the host writes at the start of the device's last 4 KiB block to start a triggered run */
#define TRIGGER_MAGIC "tether-diskbench-go"

static int fd;
static uint64_t span_blocks;
static uint32_t ops;
static uint64_t *lat; /* ns per request */

struct job {
    int write;
    int random;
    unsigned blocks; /* 4 KiB blocks per request */
    uint32_t first, count; /* request indexes [first, first+count) */
    int err;
};

static uint64_t block_of(int random, uint32_t i) {
    if (!random) return i % span_blocks;
    /* splitmix64 of the request index: a fixed, well-scattered sequence */
    uint64_t z = (uint64_t)i + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (z ^ (z >> 31)) % span_blocks;
}

static void *worker(void *arg) {
    struct job *j = arg;
    void *buf;
    size_t len = (size_t)j->blocks * BLOCK;
    if (posix_memalign(&buf, BLOCK, len) != 0) {
        j->err = ENOMEM;
        return NULL;
    }
    memset(buf, 0x5a, len);
    for (uint32_t i = j->first; i < j->first + j->count; i++) {
        uint64_t blk = j->blocks == 1 ? block_of(j->random, i) : ((uint64_t)i * j->blocks) % (span_blocks - span_blocks % j->blocks);
        off_t off = (off_t)(blk * BLOCK);
        uint64_t t0 = now_ns();
        ssize_t r = j->write ? pwrite(fd, buf, len, off) : pread(fd, buf, len, off);
        if (r != (ssize_t)len) {
            j->err = r < 0 ? errno : EIO;
            break;
        }
        lat[i] = now_ns() - t0;
    }
    free(buf);
    return NULL;
}

/* Poll the device's last block until it begins with TRIGGER_MAGIC. */
static int wait_trigger(uint64_t dev_bytes) {
    void *buf;
    if (dev_bytes < (uint64_t)BLOCK * (span_blocks + 1)) {
        say("diskbench: the trigger block must lie beyond the span (device %llu bytes)", (unsigned long long)dev_bytes);
        return -1;
    }
    if (posix_memalign(&buf, BLOCK, BLOCK) != 0) {
        say("diskbench: out of memory");
        return -1;
    }
    say("diskbench waiting for the trigger");
    off_t off = (off_t)(dev_bytes / BLOCK - 1) * BLOCK;
    for (;;) {
        ssize_t r = pread(fd, buf, BLOCK, off);
        if (r != (ssize_t)BLOCK) {
            say("diskbench: reading the trigger block: %s", r < 0 ? strerror(errno) : "short read");
            free(buf);
            return -1;
        }
        if (memcmp(buf, TRIGGER_MAGIC, sizeof TRIGGER_MAGIC - 1) == 0) break;
        usleep(20000);
    }
    free(buf);
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int run_case_n(const char *name, int write, int random, unsigned depth, unsigned blocks, uint32_t nops) {
    struct job jobs[MAX_DEPTH];
    pthread_t th[MAX_DEPTH];
    uint32_t per = nops / depth;
    uint64_t t0 = now_ns();
    for (unsigned k = 0; k < depth; k++) {
        jobs[k] = (struct job){.write = write, .random = random, .blocks = blocks, .first = k * per, .count = per, .err = 0};
        if (depth == 1) worker(&jobs[k]);
        else if (pthread_create(&th[k], NULL, worker, &jobs[k]) != 0) {
            say("diskbench: pthread_create failed");
            return -1;
        }
    }
    if (depth > 1)
        for (unsigned k = 0; k < depth; k++) pthread_join(th[k], NULL);
    uint64_t elapsed = now_ns() - t0;
    for (unsigned k = 0; k < depth; k++)
        if (jobs[k].err) {
            say("diskbench: %s failed: %s", name, strerror(jobs[k].err));
            return -1;
        }
    uint32_t n = per * depth;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < n; i++) sum += lat[i];
    qsort(lat, n, sizeof lat[0], cmp_u64);
    say("diskbench case=%s qd=%u ops=%u us=%llu iops=%llu lat_mean_us=%llu lat_p50_us=%llu lat_p99_us=%llu", name, depth, n,
        (unsigned long long)(elapsed / 1000), (unsigned long long)((uint64_t)n * 1000000000ull / (elapsed ? elapsed : 1)),
        (unsigned long long)(sum / n / 1000), (unsigned long long)(lat[n / 2] / 1000),
        (unsigned long long)(lat[(uint64_t)n * 99 / 100] / 1000));
    return 0;
}

static int run_case(const char *name, int write, int random, unsigned depth) {
    return run_case_n(name, write, random, depth, 1, ops);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        say("diskbench: usage: diskbench <device> <span-mib> <ops-per-case> [trigger]");
        return 2;
    }
    const char *dev = argv[1];
    long mib = atol(argv[2]);
    long n = atol(argv[3]);
    if (mib <= 0 || n < (long)MAX_DEPTH || n > 10000000) {
        say("diskbench: span-mib must be > 0 and ops-per-case in [16, 10^7]");
        return 2;
    }
    span_blocks = (uint64_t)mib * 1024 * 1024 / BLOCK;
    ops = (uint32_t)n - (uint32_t)n % MAX_DEPTH;
    lat = calloc(ops, sizeof lat[0]);
    if (!lat) {
        say("diskbench: out of memory");
        return 1;
    }
    fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) {
        say("diskbench: open %s: %s", dev, strerror(errno));
        return 1;
    }
    if (argc > 4) {
        if (strcmp(argv[4], "trigger") != 0) {
            say("diskbench: unknown option %s", argv[4]);
            return 2;
        }
        off_t end = lseek(fd, 0, SEEK_END);
        if (end < 0) {
            say("diskbench: size of %s: %s", dev, strerror(errno));
            return 1;
        }
        /* the latency array is touched here, before the run, not on its first use */
        memset(lat, 0, ops * sizeof lat[0]);
        if (wait_trigger((uint64_t)end)) return 1;
    }
    say("diskbench start dev=%s span_mib=%ld ops=%u", dev, mib, ops);
    /* the writes come first: the reads then hit written (allocated) blocks */
    if (run_case("seq-write", 1, 0, 1) || run_case("rand-write", 1, 1, 1) || run_case("seq-read", 0, 0, 1) ||
        run_case("rand-read", 0, 1, 1) || run_case("rand-write", 1, 1, MAX_DEPTH) || run_case("rand-read", 0, 1, MAX_DEPTH) ||
        run_case_n("seq64k-write", 1, 0, 1, 16, ops / 4) || run_case_n("seq64k-read", 0, 0, 1, 16, ops / 4))
        return 1;
    close(fd);
    say("diskbench done");
    return 0;
}
