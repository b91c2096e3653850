/*
 * tether_native: page hashing and dirty-page scanning over a guest RAM file, and the
 * small system calls of the disk path Node does not offer. The addon's other file,
 * tap.c, holds the TAP devices and the socket queue ioctls (sockOutq, sockInq).
 *
 *   RAM (src/memory/, src/native.ts): hashFile, mapRam/unmapRam, scanDirty, scanCopy,
 *     readPages, zeroMask, hashBuffer, xxh64, zeroPageHash, softDirtyProbe
 *   disk (src/disk/; ofdLockProbe for `tether check`): fallocate, ofdLockProbe,
 *     pioNowait, addressMod, dioAlign, fadvise, residentPages
 *
 * hashFile, scanDirty and scanCopy run as N-API async work: argument checks happen in
 * the call (bad arguments throw), the page work runs on a libuv pool thread plus
 * its own pthreads, and the call returns a Promise, so the event loop (peer
 * heartbeats, lease and fence timers) keeps running while a large RAM file is
 * hashed. The other calls are synchronous and small. Guest RAM is
 * read in place through a read-only mapping of the RAM file on tmpfs (mapRam,
 * below), else with pread(). Either way only what SEEK_DATA reports as data is
 * touched: on the destination, pages that post-copy has not placed yet are holes
 * in the RAM file, and a read fault on a hole through a shared mapping would
 * allocate a page behind QEMU's back (a pread() of a hole returns zeros without
 * allocating).
 *
 * Errors are thrown as JS Errors with a `code` property:
 *   ERR_MEM_NATIVE_ARGS  bad argument (type, size, fd, pfn out of range)
 *   ERR_MEM_IO           a system call failed (`errno`, `syscall` properties)
 * except where an errno is an expected answer the caller acts on: fallocate and
 * ofdLockProbe return it, pioNowait returns it negated.
 *
 * Note: SEEK_DATA/SEEK_HOLE move the fd's file position; callers must not rely
 * on it (all reads here are positional).
 */
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <stdbool.h>
#include <unistd.h>

#include "xxh64.h"

#define PAGE_SHIFT 12
#define PAGE_SIZE ((size_t)1 << PAGE_SHIFT)
/* Per-thread read buffer. Small enough to stay in L2 so that the hash reads
 * what pread just wrote from cache instead of DRAM (see tools/bench/scan.ts). */
#ifndef TETHER_CHUNK_KIB
#define TETHER_CHUNK_KIB 256
#endif
#define CHUNK_BYTES ((size_t)TETHER_CHUNK_KIB * 1024)
#define CHUNK_PAGES (CHUNK_BYTES / PAGE_SIZE)
#define MAX_THREADS 64
#define DEFAULT_THREADS 2
/* Don't start a thread for less than this many pages of work. */
#define MIN_PAGES_PER_THREAD 1024
/* readPages: upper bound for one coalesced pread. */
#define MAX_RUN_BYTES ((size_t)64 * 1024 * 1024)

static uint64_t g_zero_hash;

/* ---------- small helpers ---------- */


static inline uint64_t page_hash(const uint8_t *p) { return tether_xxh64(p, PAGE_SIZE, 0); }

/* pread until len bytes or EOF; returns bytes read, or -1 with errno set. */
static ssize_t pread_full(int fd, uint8_t *buf, size_t len, off_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t r = pread(fd, buf + done, len - done, off + (off_t)done);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) break;
    done += (size_t)r;
  }
  return (ssize_t)done;
}

static int page_is_zero(const uint8_t *p) {
  /* Check a short prefix first: most non-zero pages fail here. */
  uint64_t acc = 0, w;
  for (size_t i = 0; i < 64; i += 8) {
    memcpy(&w, p + i, 8);
    acc |= w;
  }
  if (acc) return 0;
  for (size_t blk = 64; blk < PAGE_SIZE; blk += 512) {
    for (size_t i = 0; i < 512 && blk + i < PAGE_SIZE; i += 8) {
      memcpy(&w, p + blk + i, 8);
      acc |= w;
    }
    if (acc) return 0;
  }
  return 1;
}

/* ---------- error helpers ---------- */

static void throw_coded(napi_env env, const char *code, int err, const char *syscall, const char *msg) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (pending) return;
  napi_value jcode, jmsg, error;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &jcode) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &jmsg) != napi_ok ||
      napi_create_error(env, jcode, jmsg, &error) != napi_ok) {
    napi_throw_error(env, code, msg);
    return;
  }
  if (err != 0) {
    napi_value jerrno;
    if (napi_create_int32(env, err, &jerrno) == napi_ok) napi_set_named_property(env, error, "errno", jerrno);
  }
  if (syscall != NULL) {
    napi_value jsys;
    if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &jsys) == napi_ok)
      napi_set_named_property(env, error, "syscall", jsys);
  }
  napi_throw(env, error);
}

static void vthrow_args(napi_env env, const char *fmt, va_list ap) {
  char msg[256];
  vsnprintf(msg, sizeof msg, fmt, ap);
  throw_coded(env, "ERR_MEM_NATIVE_ARGS", 0, NULL, msg);
}

static void throw_args(napi_env env, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vthrow_args(env, fmt, ap);
  va_end(ap);
}

/*
 * The call's arguments into argv[0..max) (N-API fills those not passed with undefined).
 * Returns how many were passed, or -1 after throwing ERR_MEM_NATIVE_ARGS with the
 * usage message when fewer than `min` were.
 */
static ptrdiff_t get_args(napi_env env, napi_callback_info info, napi_value *argv, size_t max, size_t min, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static ptrdiff_t get_args(napi_env env, napi_callback_info info, napi_value *argv, size_t max, size_t min, const char *fmt, ...) {
  size_t argc = max;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) argc = 0;
  if (argc >= min) return (ptrdiff_t)argc;
  va_list ap;
  va_start(ap, fmt);
  vthrow_args(env, fmt, ap);
  va_end(ap);
  return -1;
}

static void throw_io(napi_env env, int err, const char *syscall, const char *what) {
  char msg[256];
  if (err != 0)
    snprintf(msg, sizeof msg, "%s: %s failed: %s (errno %d)", what, syscall, strerror(err), err);
  else
    snprintf(msg, sizeof msg, "%s: %s: unexpected end of file", what, syscall);
  throw_coded(env, "ERR_MEM_IO", err, syscall, msg);
}

/* ---------- argument parsing ---------- */

static int arg_integer(napi_env env, napi_value v, const char *name, double lo, double hi, double *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number) {
    throw_args(env, "%s must be a number", name);
    return 0;
  }
  double d;
  napi_get_value_double(env, v, &d);
  if (!(d >= lo && d <= hi) || d != (double)(int64_t)d) {
    throw_args(env, "%s must be an integer in [%.0f, %.0f], got %g", name, lo, hi, d);
    return 0;
  }
  *out = d;
  return 1;
}

static int arg_fd(napi_env env, napi_value v, int *fd) {
  double d;
  if (!arg_integer(env, v, "fd", 0, INT_MAX, &d)) return 0;
  *fd = (int)d;
  return 1;
}

static int arg_pages(napi_env env, napi_value v, uint32_t *pages) {
  double d;
  if (!arg_integer(env, v, "pages", 0, UINT32_MAX, &d)) return 0;
  *pages = (uint32_t)d;
  return 1;
}

static int is_missing(napi_env env, napi_value v) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return 1;
  return t == napi_undefined || t == napi_null;
}

static int arg_threads(napi_env env, napi_value v, int *threads) {
  if (is_missing(env, v)) {
    *threads = DEFAULT_THREADS;
    return 1;
  }
  double d;
  if (!arg_integer(env, v, "threads", 1, MAX_THREADS, &d)) return 0;
  *threads = (int)d;
  return 1;
}

static int arg_typed(napi_env env, napi_value v, const char *name, napi_typedarray_type want, const char *want_name,
                     void **data, size_t *length) {
  bool is_ta = false;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta) {
    throw_args(env, "%s must be a %s", name, want_name);
    return 0;
  }
  napi_typedarray_type type;
  napi_value ab;
  size_t off;
  if (napi_get_typedarray_info(env, v, &type, length, data, &ab, &off) != napi_ok || type != want) {
    throw_args(env, "%s must be a %s", name, want_name);
    return 0;
  }
  if (*length > 0 && *data == NULL) {
    throw_args(env, "%s is detached", name);
    return 0;
  }
  return 1;
}

static int arg_bytes(napi_env env, napi_value v, const char *name, uint8_t **data, size_t *len) {
  return arg_typed(env, v, name, napi_uint8_array, "Buffer or Uint8Array", (void **)data, len);
}

static int arg_u32s(napi_env env, napi_value v, const char *name, uint32_t **data, size_t *len) {
  return arg_typed(env, v, name, napi_uint32_array, "Uint32Array", (void **)data, len);
}

/* Checks that fd is an open regular file of at least min_bytes. */
static int check_file(napi_env env, int fd, uint64_t min_bytes) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    char msg[128];
    snprintf(msg, sizeof msg, "fd %d is not usable: %s", fd, strerror(e));
    throw_coded(env, "ERR_MEM_NATIVE_ARGS", e, "fstat", msg);
    return 0;
  }
  if (!S_ISREG(st.st_mode)) {
    throw_args(env, "fd %d is not a regular file", fd);
    return 0;
  }
  if ((uint64_t)st.st_size < min_bytes) {
    throw_args(env, "file is %lld bytes, smaller than the %llu bytes requested", (long long)st.st_size,
               (unsigned long long)min_bytes);
    return 0;
  }
  return 1;
}

/* ---------- the page workers ---------- */

/* MODE_COPY: as MODE_SCAN, and each dirty page's bytes (from the same read that hashed
 * it) are kept too, zero pages as a flag only: one pass instead of a scan and a re-read. */
enum mode { MODE_HASH, MODE_SCAN, MODE_COPY };

typedef struct {
  int fd;
  enum mode mode;
  uint8_t *table; /* 8 bytes per pfn: output (hash) or reference, updated (scan) */
  /* Either a sorted, duplicate-free candidate list [cand, cand+ncand) ... */
  const uint32_t *cand;
  size_t ncand;
  /* ... or a pfn range [lo, hi) when cand == NULL. */
  uint32_t lo, hi;
  uint8_t *buf;
  /* The RAM file mapped read-only (a mapRam handle's), or NULL: pages are pread into buf. */
  const uint8_t *map;
  uint32_t *dirty;
  size_t ndirty, capdirty;
  /* MODE_COPY: one flag per dirty pfn (1 = zero page), and the non-zero pages' bytes in order */
  uint8_t *zero;
  uint8_t *data;
  size_t ndata, capdata; /* in pages */
  int err; /* errno of the first failure; -1 for unexpected EOF */
  const char *syscall;
  pthread_t tid;
  int started;
} work_t;

static int fail(work_t *w, int err, const char *syscall) {
  if (!w->err) {
    w->err = err ? err : -1;
    w->syscall = syscall;
  }
  return -1;
}

static int push_dirty(work_t *w, uint32_t pfn, const uint8_t *page) {
  if (w->ndirty == w->capdirty) {
    size_t cap = w->capdirty ? w->capdirty * 2 : 1024;
    uint32_t *p = realloc(w->dirty, cap * sizeof *p);
    if (!p) return fail(w, ENOMEM, "malloc");
    w->dirty = p;
    if (w->mode == MODE_COPY) {
      uint8_t *z = realloc(w->zero, cap);
      if (!z) return fail(w, ENOMEM, "malloc");
      w->zero = z;
    }
    w->capdirty = cap;
  }
  if (w->mode == MODE_COPY) {
    int z = page_is_zero(page);
    w->zero[w->ndirty] = (uint8_t)z;
    if (!z) {
      if (w->ndata == w->capdata) {
        size_t cap = w->capdata ? w->capdata * 2 : 256;
        uint8_t *d = realloc(w->data, cap * PAGE_SIZE);
        if (!d) return fail(w, ENOMEM, "malloc");
        w->data = d;
        w->capdata = cap;
      }
      memcpy(w->data + w->ndata * PAGE_SIZE, page, PAGE_SIZE);
      w->ndata++;
    }
  }
  w->dirty[w->ndirty++] = pfn;
  return 0;
}

/* Reads n (<= CHUNK_PAGES) pages starting at pfn into w->buf and hashes/compares them. */
static int do_pages(work_t *w, uint32_t pfn, size_t n) {
  const uint8_t *base;
  if (w->map) {
    base = w->map + ((size_t)pfn << PAGE_SHIFT);
  } else {
    size_t len = n * PAGE_SIZE;
    ssize_t r = pread_full(w->fd, w->buf, len, (off_t)pfn << PAGE_SHIFT);
    if (r < 0) return fail(w, errno, "pread");
    if ((size_t)r < len) return fail(w, 0, "pread"); /* file shrank under us */
    base = w->buf;
  }
  for (size_t i = 0; i < n; i++) {
    uint64_t h = page_hash(base + i * PAGE_SIZE);
    uint8_t *slot = w->table + ((size_t)(pfn + i) << 3);
    if (w->mode == MODE_HASH) {
      tether_store_le64(slot, h);
    } else if (tether_load_le64(slot) != h) {
      tether_store_le64(slot, h);
      if (push_dirty(w, pfn + (uint32_t)i, base + i * PAGE_SIZE) < 0) return -1;
    }
  }
  return 0;
}

static int do_run(work_t *w, uint32_t a, uint32_t b) {
  while (a < b) {
    size_t n = b - a;
    if (n > CHUNK_PAGES) n = CHUNK_PAGES;
    if (do_pages(w, a, n) < 0) return -1;
    a += (uint32_t)n;
  }
  return 0;
}

/*
 * First data pfn at or after pfn (returns `limit` when none before limit), and
 * the end of that data extent. SEEK_DATA/SEEK_HOLE are exact at page granularity
 * on tmpfs; filesystems without support report the whole file as data.
 */
static int next_data(work_t *w, uint32_t pfn, uint32_t limit, uint32_t *dstart, uint32_t *dend) {
  off_t off = lseek(w->fd, (off_t)pfn << PAGE_SHIFT, SEEK_DATA);
  if (off < 0) {
    if (errno == ENXIO) { /* only holes up to EOF */
      *dstart = *dend = limit;
      return 0;
    }
    if (errno == EINVAL) { /* no SEEK_DATA support: treat as data */
      *dstart = pfn;
      *dend = limit;
      return 0;
    }
    return fail(w, errno, "lseek");
  }
  uint64_t s = (uint64_t)off >> PAGE_SHIFT;
  if (s >= limit) {
    *dstart = *dend = limit;
    return 0;
  }
  off_t hole = lseek(w->fd, (off_t)s << PAGE_SHIFT, SEEK_HOLE);
  if (hole < 0) {
    if (errno == ENXIO) { /* truncated in between: nothing more */
      *dstart = *dend = limit;
      return 0;
    }
    return fail(w, errno, "lseek");
  }
  uint64_t e = ((uint64_t)hole + PAGE_SIZE - 1) >> PAGE_SHIFT;
  if (e > limit) e = limit;
  if (e <= s) e = s + 1; /* defensive: always make progress */
  *dstart = (uint32_t)s;
  *dend = (uint32_t)e;
  return 0;
}

static void work_range(work_t *w) {
  uint32_t pfn = w->lo;
  while (pfn < w->hi) {
    uint32_t ds, de;
    if (next_data(w, pfn, w->hi, &ds, &de) < 0) return;
    if (w->mode == MODE_HASH)
      for (uint32_t p = pfn; p < ds; p++) tether_store_le64(w->table + ((size_t)p << 3), g_zero_hash);
    if (ds >= w->hi) return;
    if (do_run(w, ds, de) < 0) return;
    pfn = de;
  }
}

static void work_list(work_t *w) {
  const uint32_t *c = w->cand;
  size_t i = 0, n = w->ncand;
  while (i < n) {
    uint32_t ds, de;
    if (next_data(w, c[i], UINT32_MAX, &ds, &de) < 0) return;
    if (ds > c[i]) { /* c[i] is in a hole: skip every candidate before the data */
      while (i < n && c[i] < ds) i++;
      continue;
    }
    /* c[i] is allocated; take the candidates inside [ds, de) in contiguous runs. */
    while (i < n && c[i] < de) {
      size_t j = i;
      while (j + 1 < n && c[j + 1] == c[j] + 1 && c[j + 1] < de && (j + 1 - i) < CHUNK_PAGES) j++;
      if (do_pages(w, c[i], j - i + 1) < 0) return;
      i = j + 1;
    }
  }
}

static void *work_main(void *arg) {
  work_t *w = (work_t *)arg;
  if (w->cand)
    work_list(w);
  else
    work_range(w);
  return NULL;
}

/*
 * Splits the work over up to `threads` threads (the calling thread takes the
 * first share) and waits for all. No N-API calls: runs off the JS thread.
 * Returns the index of the first failed worker, or -1.
 */
static int run_work(work_t *ws, int nt) {
  for (int t = 0; t < nt; t++) {
    if (posix_memalign((void **)&ws[t].buf, 4096, CHUNK_BYTES) != 0) {
      ws[t].buf = NULL;
      fail(&ws[t], ENOMEM, "malloc");
      nt = t;
      goto out;
    }
  }
  for (int t = 1; t < nt; t++) {
    int e = pthread_create(&ws[t].tid, NULL, work_main, &ws[t]);
    if (e != 0) {
      fail(&ws[t], e, "pthread_create");
      continue;
    }
    ws[t].started = 1;
  }
  if (nt > 0) work_main(&ws[0]);
  for (int t = 1; t < nt; t++)
    if (ws[t].started) pthread_join(ws[t].tid, NULL);
out:
  for (int t = 0; t < MAX_THREADS; t++)
    if (ws[t].err) return t;
  return -1;
}

/* The error object for a failed worker (ERR_MEM_IO with errno/syscall). */
static napi_value work_error(napi_env env, const work_t *w, const char *what) {
  int err = w->err < 0 ? 0 : w->err;
  char msg[256];
  if (err != 0)
    snprintf(msg, sizeof msg, "%s: %s failed: %s (errno %d)", what, w->syscall, strerror(err), err);
  else
    snprintf(msg, sizeof msg, "%s: %s: unexpected end of file", what, w->syscall);
  napi_value jcode, jmsg, error, v;
  napi_create_string_utf8(env, "ERR_MEM_IO", NAPI_AUTO_LENGTH, &jcode);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &jmsg);
  napi_create_error(env, jcode, jmsg, &error);
  if (err != 0 && napi_create_int32(env, err, &v) == napi_ok) napi_set_named_property(env, error, "errno", v);
  if (w->syscall && napi_create_string_utf8(env, w->syscall, NAPI_AUTO_LENGTH, &v) == napi_ok)
    napi_set_named_property(env, error, "syscall", v);
  return error;
}

static void free_work(work_t *ws) {
  for (int t = 0; t < MAX_THREADS; t++) {
    free(ws[t].buf);
    free(ws[t].dirty);
    free(ws[t].zero);
    free(ws[t].data);
  }
}

static int pick_threads(int want, uint64_t units) {
  uint64_t most = units / MIN_PAGES_PER_THREAD;
  if (most < 1) most = 1;
  return (uint64_t)want < most ? want : (int)most;
}

static void split_range(work_t *ws, int nt, uint32_t pages) {
  for (int t = 0; t < nt; t++) {
    ws[t].lo = (uint32_t)((uint64_t)pages * t / nt);
    ws[t].hi = (uint32_t)((uint64_t)pages * (t + 1) / nt);
  }
}

/* ---------- the RAM file mapped (mapRam / unmapRam) ---------- */

/*
 * A RAM file on tmpfs mapped read-only for as long as a tracker lives, so that scans hash
 * the page cache in place instead of pread-copying every page first, and without
 * re-faulting the mapping on every scan: measured on this project's 2-core test host,
 * 75 ms of CPU per 512 MiB scan against 138 ms with pread (tools/bench/scan.ts).
 * Only tmpfs, and the workers still only touch what SEEK_DATA reports as data: a read
 * fault on a tmpfs hole ALLOCATES a zero page in the file (a pread of a hole does not), and
 * on a post-copy destination that page would then never fault in QEMU's userfaultfd, so
 * the guest would read zeros. After switchover holes only fill in (nothing punches them)
 * and the file never shrinks while it is mapped. Jobs hold a reference and count
 * themselves in `busy`; unmapRam while a job runs defers the munmap to that job's end.
 * Everything here runs on the JS thread (jobs take and drop `busy` in start/complete).
 */
typedef struct {
  uint8_t *addr; /* NULL once unmapped */
  size_t len;
  dev_t dev;
  ino_t ino;
  int busy;
  int closed;
} ram_map_t;

static void ram_map_settle(ram_map_t *m) {
  if (m->closed && m->busy == 0 && m->addr) {
    munmap(m->addr, m->len);
    m->addr = NULL;
  }
}

static void ram_map_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  ram_map_t *m = (ram_map_t *)data;
  m->closed = 1;
  ram_map_settle(m); /* busy is 0: every job holds a reference to the handle */
  free(m);
}

/* mapRam(fd, pages) → handle | null: maps the first pages of a RAM file on tmpfs (null elsewhere). */
static napi_value js_map_ram(napi_env env, napi_callback_info info) {
  napi_value argv[2], result;
  if (get_args(env, info, argv, 2, 2, "mapRam(fd, pages) needs 2 arguments") < 0) return NULL;
  int fd;
  uint32_t pages;
  if (!arg_fd(env, argv[0], &fd) || !arg_pages(env, argv[1], &pages)) return NULL;
  if (!check_file(env, fd, (uint64_t)pages << PAGE_SHIFT)) return NULL;
  struct statfs fs;
  struct stat st;
  napi_get_null(env, &result);
  if (pages == 0 || fstatfs(fd, &fs) != 0 || fs.f_type != 0x01021994 /* TMPFS_MAGIC */ || fstat(fd, &st) != 0)
    return result;
  size_t len = (size_t)pages << PAGE_SHIFT;
  void *a = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
  if (a == MAP_FAILED) return result;
  ram_map_t *m = calloc(1, sizeof *m);
  if (!m) {
    munmap(a, len);
    throw_io(env, ENOMEM, "malloc", "mapRam");
    return NULL;
  }
  m->addr = a;
  m->len = len;
  m->dev = st.st_dev;
  m->ino = st.st_ino;
  if (napi_create_external(env, m, ram_map_finalize, NULL, &result) != napi_ok) {
    munmap(a, len);
    free(m);
    throw_io(env, ENOMEM, "napi", "mapRam");
    return NULL;
  }
  return result;
}

/* unmapRam(handle): no scan reads it after this; unmapped now, or when the running one ends. */
static napi_value js_unmap_ram(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, argv, 1, 1, "unmapRam(handle) needs a handle from mapRam") < 0) return NULL;
  napi_valuetype t;
  void *data = NULL;
  if (napi_typeof(env, argv[0], &t) != napi_ok || t != napi_external ||
      napi_get_value_external(env, argv[0], &data) != napi_ok || !data) {
    throw_args(env, "unmapRam(handle) needs a handle from mapRam");
    return NULL;
  }
  ram_map_t *m = (ram_map_t *)data;
  m->closed = 1;
  ram_map_settle(m);
  return NULL;
}

/* ---------- async jobs (hashFile, scanDirty) ---------- */

/*
 * One hashFile/scanDirty call in flight. It owns a dup of the caller's fd (so
 * a close on the JS side while the job runs cannot make it read another file
 * that reused the number), a reference that keeps the table/out buffer alive,
 * and its private copy of the candidates.
 */
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref buf_ref;
  const char *what;
  int fd;
  int nt;
  int failed; /* index of the first failed worker, or -1 */
  int want_result; /* scanDirty: resolve with the dirty pfns */
  int want_copy;   /* scanCopy: resolve with {pfns, zero, data} */
  ram_map_t *rmap; /* the RAM file's mapping the workers read (busy while the job runs), or NULL */
  napi_ref map_ref;
  uint32_t *cand;
  /* scanCopy: every worker's page bytes in pfn order, merged off the JS thread */
  uint8_t *data;
  size_t ndata;
  /* Fault injection (TETHER_FAULTS slow-scan-ms): the job sleeps this long on its worker thread. */
  uint32_t delay_ms;
  work_t ws[MAX_THREADS];
} job_t;

static void job_free(napi_env env, job_t *job) {
  if (job->rmap) {
    job->rmap->busy--;
    ram_map_settle(job->rmap);
  }
  if (job->map_ref) napi_delete_reference(env, job->map_ref);
  free_work(job->ws);
  free(job->cand);
  free(job->data);
  if (job->fd >= 0) close(job->fd);
  if (job->buf_ref) napi_delete_reference(env, job->buf_ref);
  if (job->work) napi_delete_async_work(env, job->work);
  free(job);
}

static void job_execute(napi_env env, void *data) {
  (void)env;
  job_t *job = (job_t *)data;
  const uint8_t *map = job->rmap ? job->rmap->addr : NULL;
  for (int t = 0; t < job->nt; t++) {
    job->ws[t].fd = job->fd;
    job->ws[t].map = map;
  }
  if (job->delay_ms > 0) {
    /* on the libuv worker thread that runs the scan's first share, as a slow scan of a large RAM would */
    struct timespec ts = {.tv_sec = job->delay_ms / 1000, .tv_nsec = (long)(job->delay_ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
  }
  job->failed = run_work(job->ws, job->nt);
  if (job->failed >= 0 || !job->want_copy) return;
  /* Workers cover ascending, disjoint pfn ranges: their data concatenates in pfn order.
   * The first worker's buffer grows to hold all (no copy of its share). */
  size_t total = 0;
  for (int t = 0; t < job->nt; t++) total += job->ws[t].ndata;
  if (total == 0) return;
  uint8_t *d = job->nt > 0 ? realloc(job->ws[0].data, total * PAGE_SIZE) : NULL;
  if (!d) {
    fail(&job->ws[0], ENOMEM, "malloc");
    job->failed = 0;
    return;
  }
  job->ws[0].data = NULL;
  size_t pos = job->ws[0].ndata;
  for (int t = 1; t < job->nt; t++) {
    if (job->ws[t].ndata) memcpy(d + pos * PAGE_SIZE, job->ws[t].data, job->ws[t].ndata * PAGE_SIZE);
    pos += job->ws[t].ndata;
  }
  job->data = d;
  job->ndata = total;
}

static void free_data(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  free(data);
}

/* {pfns: Uint32Array, zero: Uint8Array, data: Buffer} of a finished scanCopy job (NULL on failure). */
static napi_value copy_result(napi_env env, job_t *job) {
  size_t total = 0;
  for (int t = 0; t < job->nt; t++) total += job->ws[t].ndirty;
  napi_value obj, pfns, zero, data, ab;
  void *p = NULL, *z = NULL;
  if (napi_create_object(env, &obj) != napi_ok || napi_create_arraybuffer(env, total * 4, &p, &ab) != napi_ok ||
      napi_create_typedarray(env, napi_uint32_array, total, ab, 0, &pfns) != napi_ok ||
      napi_create_arraybuffer(env, total, &z, &ab) != napi_ok ||
      napi_create_typedarray(env, napi_uint8_array, total, ab, 0, &zero) != napi_ok)
    return NULL;
  size_t pos = 0;
  for (int t = 0; t < job->nt; t++) {
    if (job->ws[t].ndirty) {
      memcpy((uint32_t *)p + pos, job->ws[t].dirty, job->ws[t].ndirty * 4);
      memcpy((uint8_t *)z + pos, job->ws[t].zero, job->ws[t].ndirty);
    }
    pos += job->ws[t].ndirty;
  }
  if (job->data) {
    /* Handed to JS without a copy; freed by the finalizer. */
    if (napi_create_external_buffer(env, job->ndata * PAGE_SIZE, job->data, free_data, NULL, &data) != napi_ok) return NULL;
    job->data = NULL;
  } else if (napi_create_buffer(env, 0, NULL, &data) != napi_ok) {
    return NULL;
  }
  napi_set_named_property(env, obj, "pfns", pfns);
  napi_set_named_property(env, obj, "zero", zero);
  napi_set_named_property(env, obj, "data", data);
  return obj;
}

static void job_complete(napi_env env, napi_status status, void *data) {
  job_t *job = (job_t *)data;
  napi_value result = NULL;
  if (status != napi_ok) {
    napi_value jcode, jmsg;
    napi_create_string_utf8(env, "ERR_MEM_IO", NAPI_AUTO_LENGTH, &jcode);
    napi_create_string_utf8(env, "native job cancelled", NAPI_AUTO_LENGTH, &jmsg);
    napi_create_error(env, jcode, jmsg, &result);
    napi_reject_deferred(env, job->deferred, result);
  } else if (job->failed >= 0) {
    napi_reject_deferred(env, job->deferred, work_error(env, &job->ws[job->failed], job->what));
  } else if (job->want_copy) {
    result = copy_result(env, job);
    if (result == NULL) {
      napi_value jcode, jmsg;
      napi_create_string_utf8(env, "ERR_MEM_IO", NAPI_AUTO_LENGTH, &jcode);
      napi_create_string_utf8(env, "scanCopy: cannot build the result", NAPI_AUTO_LENGTH, &jmsg);
      napi_create_error(env, jcode, jmsg, &result);
      napi_reject_deferred(env, job->deferred, result);
    } else {
      napi_resolve_deferred(env, job->deferred, result);
    }
  } else if (job->want_result) {
    size_t total = 0;
    for (int t = 0; t < job->nt; t++) total += job->ws[t].ndirty;
    napi_value ab;
    void *out = NULL;
    if (napi_create_arraybuffer(env, total * 4, &out, &ab) == napi_ok) {
      size_t pos = 0;
      for (int t = 0; t < job->nt; t++) {
        if (job->ws[t].ndirty) memcpy((uint32_t *)out + pos, job->ws[t].dirty, job->ws[t].ndirty * 4);
        pos += job->ws[t].ndirty;
      }
      napi_create_typedarray(env, napi_uint32_array, total, ab, 0, &result);
    }
    napi_resolve_deferred(env, job->deferred, result);
  } else {
    napi_get_undefined(env, &result);
    napi_resolve_deferred(env, job->deferred, result);
  }
  job_free(env, job);
}

/* Queues the job; returns its promise, or NULL with an exception thrown (job freed). */
static napi_value job_start(napi_env env, job_t *job, int fd, napi_value buf) {
  napi_value promise, name;
  job->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (job->fd < 0) {
    throw_io(env, errno, "dup", job->what);
    job_free(env, job);
    return NULL;
  }
  if (napi_create_reference(env, buf, 1, &job->buf_ref) != napi_ok ||
      napi_create_promise(env, &job->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, job->what, NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, job_execute, job_complete, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    /* a promise already created is left pending: the exception is what the caller sees */
    throw_io(env, ENOMEM, "napi", job->what);
    job_free(env, job);
    return NULL;
  }
  return promise;
}

static job_t *job_new(const char *what) {
  job_t *job = calloc(1, sizeof *job);
  if (job) {
    job->what = what;
    job->fd = -1;
    job->failed = -1;
  }
  return job;
}

/*
 * The optional `map` argument (a mapRam handle, or null/undefined: pread). It must map
 * the same file as fd, at least `pages` long, and not be unmapped. The job holds it until
 * it completes.
 */
static int job_take_map(napi_env env, job_t *job, napi_value v, int fd, uint32_t pages) {
  if (is_missing(env, v)) return 1;
  napi_valuetype t;
  void *data = NULL;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &data) != napi_ok || !data) {
    throw_args(env, "%s: map must be a handle from mapRam", job->what);
    return 0;
  }
  ram_map_t *m = (ram_map_t *)data;
  struct stat st;
  if (m->closed || !m->addr) {
    throw_args(env, "%s: map was unmapped", job->what);
    return 0;
  }
  if (fstat(fd, &st) != 0 || st.st_dev != m->dev || st.st_ino != m->ino) {
    throw_args(env, "%s: map is of another file than fd %d", job->what, fd);
    return 0;
  }
  if (((size_t)pages << PAGE_SHIFT) > m->len) {
    throw_args(env, "%s: map covers %zu bytes, fewer than the %llu requested", job->what, m->len,
               (unsigned long long)pages << PAGE_SHIFT);
    return 0;
  }
  if (napi_create_reference(env, v, 1, &job->map_ref) != napi_ok) {
    throw_io(env, ENOMEM, "napi", job->what);
    return 0;
  }
  job->rmap = m;
  m->busy++;
  return 1;
}

/* ---------- exported functions ---------- */

/* hashFile(fd, pages, out: Buffer(8*pages), threads?, map?) → Promise<void> */
static napi_value js_hash_file(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  ptrdiff_t argc = get_args(env, info, argv, 5, 3, "hashFile(fd, pages, out, threads?, map?) needs at least 3 arguments");
  if (argc < 0) return NULL;
  int fd, threads = DEFAULT_THREADS;
  uint32_t pages;
  uint8_t *out;
  size_t outlen;
  if (!arg_fd(env, argv[0], &fd) || !arg_pages(env, argv[1], &pages) || !arg_bytes(env, argv[2], "out", &out, &outlen))
    return NULL;
  if (argc > 3 && !arg_threads(env, argv[3], &threads)) return NULL;
  if (outlen != (size_t)pages * 8) {
    throw_args(env, "out must be exactly 8*pages = %llu bytes, got %zu", (unsigned long long)pages * 8, outlen);
    return NULL;
  }
  if (!check_file(env, fd, (uint64_t)pages << PAGE_SHIFT)) return NULL;

  job_t *job = job_new("hashFile");
  if (!job) {
    throw_io(env, ENOMEM, "malloc", "hashFile");
    return NULL;
  }
  if (argc > 4 && !job_take_map(env, job, argv[4], fd, pages)) {
    job_free(env, job);
    return NULL;
  }
  work_t *ws = job->ws;
  int nt = pick_threads(threads, pages);
  for (int t = 0; t < nt; t++) {
    ws[t].mode = MODE_HASH;
    ws[t].table = out;
  }
  split_range(ws, nt, pages);
  job->nt = nt;
  return job_start(env, job, fd, argv[2]);
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

/*
 * scanDirty(fd, pages, table: Buffer(8*pages), candidates: Uint32Array|null, threads?, map?) → Promise<Uint32Array>
 * scanCopy(same arguments) → Promise<{pfns, zero, data}>: the dirty pages' bytes too, from the
 * read that hashed them (zero pages flagged in `zero`, their bytes left out of `data`).
 */
static napi_value scan_common(napi_env env, napi_callback_info info, int copy) {
  const char *what = copy ? "scanCopy" : "scanDirty";
  napi_value argv[7];
  ptrdiff_t argc =
      get_args(env, info, argv, 7, 3, "%s(fd, pages, table, candidates?, threads?, map?, delayMs?) needs at least 3 arguments", what);
  if (argc < 0) return NULL;
  int fd, threads = DEFAULT_THREADS;
  uint32_t pages;
  uint8_t *table;
  size_t tablelen;
  uint32_t *cand_in = NULL;
  size_t ncand = 0;
  int have_cand = 0;
  if (!arg_fd(env, argv[0], &fd) || !arg_pages(env, argv[1], &pages) ||
      !arg_bytes(env, argv[2], "table", &table, &tablelen))
    return NULL;
  if (argc > 3 && !is_missing(env, argv[3])) {
    if (!arg_u32s(env, argv[3], "candidates", &cand_in, &ncand)) return NULL;
    have_cand = 1;
  }
  if (argc > 4 && !arg_threads(env, argv[4], &threads)) return NULL;
  if (tablelen != (size_t)pages * 8) {
    throw_args(env, "table must be exactly 8*pages = %llu bytes, got %zu", (unsigned long long)pages * 8, tablelen);
    return NULL;
  }
  for (size_t i = 0; i < ncand; i++) {
    if (cand_in[i] >= pages) {
      throw_args(env, "candidates[%zu] = %u is not below pages = %u", i, cand_in[i], pages);
      return NULL;
    }
  }
  if (!check_file(env, fd, (uint64_t)pages << PAGE_SHIFT)) return NULL;

  job_t *job = job_new(what);
  if (!job) {
    throw_io(env, ENOMEM, "malloc", what);
    return NULL;
  }
  job->want_result = 1;
  job->want_copy = copy;
  if (argc > 5 && !job_take_map(env, job, argv[5], fd, pages)) {
    job_free(env, job);
    return NULL;
  }
  if (argc > 6 && !is_missing(env, argv[6])) {
    if (napi_get_value_uint32(env, argv[6], &job->delay_ms) != napi_ok || job->delay_ms > 600000) {
      job_free(env, job);
      throw_args(env, "%s: delayMs must be an integer in 0..600000", what);
      return NULL;
    }
  }
  /* Sorted, duplicate-free private copy of the candidates (the caller's array may change meanwhile). */
  uint32_t *cand = NULL;
  if (have_cand && ncand > 0) {
    cand = malloc(ncand * sizeof *cand);
    if (!cand) {
      job_free(env, job);
      throw_io(env, ENOMEM, "malloc", what);
      return NULL;
    }
    job->cand = cand;
    memcpy(cand, cand_in, ncand * sizeof *cand);
    int sorted = 1;
    for (size_t i = 1; i < ncand && sorted; i++) sorted = cand[i - 1] < cand[i];
    if (!sorted) {
      qsort(cand, ncand, sizeof *cand, cmp_u32);
      size_t k = 1;
      for (size_t i = 1; i < ncand; i++)
        if (cand[i] != cand[k - 1]) cand[k++] = cand[i];
      ncand = k;
    }
  }

  work_t *ws = job->ws;
  int nt = 0;
  if (!have_cand) {
    nt = pick_threads(threads, pages);
    split_range(ws, nt, pages);
  } else if (ncand > 0) {
    nt = pick_threads(threads, ncand);
    for (int t = 0; t < nt; t++) {
      size_t a = ncand * (size_t)t / (size_t)nt, b = ncand * (size_t)(t + 1) / (size_t)nt;
      ws[t].cand = cand + a;
      ws[t].ncand = b - a;
    }
  }
  for (int t = 0; t < nt; t++) {
    ws[t].mode = copy ? MODE_COPY : MODE_SCAN;
    ws[t].table = table;
  }
  job->nt = nt;
  return job_start(env, job, fd, argv[2]);
}

static napi_value js_scan_dirty(napi_env env, napi_callback_info info) { return scan_common(env, info, 0); }
static napi_value js_scan_copy(napi_env env, napi_callback_info info) { return scan_common(env, info, 1); }

/* hashBuffer(buf) → Buffer(8 * buf.length / 4096) */
/* The single-Buffer argument of hashBuffer/xxh64; 0 (with a JS error thrown) if absent. */
static int one_buffer_arg(napi_env env, napi_callback_info info, const char *fname, uint8_t **buf, size_t *len) {
  napi_value argv[1];
  if (get_args(env, info, argv, 1, 1, "%s(buf) needs 1 argument", fname) < 0) return 0;
  return arg_bytes(env, argv[0], "buf", buf, len);
}

static napi_value js_hash_buffer(napi_env env, napi_callback_info info) {
  uint8_t *buf;
  size_t len;
  if (!one_buffer_arg(env, info, "hashBuffer", &buf, &len)) return NULL;
  if (len % PAGE_SIZE) {
    throw_args(env, "buf length %zu is not a multiple of 4096", len);
    return NULL;
  }
  size_t n = len / PAGE_SIZE;
  void *out;
  napi_value result;
  if (napi_create_buffer(env, n * 8, &out, &result) != napi_ok) return NULL;
  for (size_t i = 0; i < n; i++) tether_store_le64((uint8_t *)out + i * 8, page_hash(buf + i * PAGE_SIZE));
  return result;
}

/* xxh64(buf) → bigint: XXH64 (seed 0) of the whole buffer; for tests and tools. */
static napi_value js_xxh64(napi_env env, napi_callback_info info) {
  uint8_t *buf;
  size_t len;
  if (!one_buffer_arg(env, info, "xxh64", &buf, &len)) return NULL;
  napi_value result;
  napi_create_bigint_uint64(env, tether_xxh64(buf, len, 0), &result);
  return result;
}

/* readPages(fd, pfns: Uint32Array, out: Buffer(>= 4096 * pfns.length)) */
static napi_value js_read_pages(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (get_args(env, info, argv, 3, 3, "readPages(fd, pfns, out) needs 3 arguments") < 0) return NULL;
  int fd;
  uint32_t *pfns;
  size_t n;
  uint8_t *out;
  size_t outlen;
  if (!arg_fd(env, argv[0], &fd) || !arg_u32s(env, argv[1], "pfns", &pfns, &n) ||
      !arg_bytes(env, argv[2], "out", &out, &outlen))
    return NULL;
  if (outlen / PAGE_SIZE < n) {
    throw_args(env, "out is %zu bytes, needs 4096 * %zu", outlen, n);
    return NULL;
  }
  uint32_t maxpfn = 0;
  for (size_t i = 0; i < n; i++)
    if (pfns[i] > maxpfn) maxpfn = pfns[i];
  if (!check_file(env, fd, n ? ((uint64_t)maxpfn + 1) << PAGE_SHIFT : 0)) return NULL;
  size_t i = 0;
  while (i < n) {
    size_t j = i;
    while (j + 1 < n && pfns[j + 1] == pfns[j] + 1 && (j + 2 - i) * PAGE_SIZE <= MAX_RUN_BYTES) j++;
    size_t len = (j - i + 1) * PAGE_SIZE;
    ssize_t r = pread_full(fd, out + i * PAGE_SIZE, len, (off_t)pfns[i] << PAGE_SHIFT);
    if (r < 0) {
      throw_io(env, errno, "pread", "readPages");
      return NULL;
    }
    if ((size_t)r < len) {
      throw_io(env, 0, "pread", "readPages");
      return NULL;
    }
    i = j + 1;
  }
  return NULL;
}

/* zeroMask(buf, out: Uint8Array(>= pages)) → number of zero pages; out[i] = 1 if page i is all zero. */
static napi_value js_zero_mask(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, argv, 2, 2, "zeroMask(buf, out) needs 2 arguments") < 0) return NULL;
  uint8_t *buf, *out;
  size_t len, outlen;
  if (!arg_bytes(env, argv[0], "buf", &buf, &len) || !arg_bytes(env, argv[1], "out", &out, &outlen)) return NULL;
  if (len % PAGE_SIZE) {
    throw_args(env, "buf length %zu is not a multiple of 4096", len);
    return NULL;
  }
  size_t n = len / PAGE_SIZE;
  if (outlen < n) {
    throw_args(env, "out has %zu entries, needs %zu", outlen, n);
    return NULL;
  }
  uint32_t zeros = 0;
  for (size_t i = 0; i < n; i++) {
    out[i] = (uint8_t)page_is_zero(buf + i * PAGE_SIZE);
    zeros += out[i];
  }
  napi_value result;
  napi_create_uint32(env, zeros, &result);
  return result;
}

/*
 * softDirtyProbe() → { supported, clearRefsErrno, before, after }
 * Functional test of soft-dirty tracking on the calling process: touch a fresh
 * anonymous page, write "4" to /proc/self/clear_refs, read its pagemap entry
 * (`before`, must not be soft-dirty), write to it again, read it (`after`,
 * must be soft-dirty). A kernel without CONFIG_MEM_SOFT_DIRTY may accept the
 * clear_refs write and simply never set bit 55, so the write alone proves nothing.
 */
static int read_pagemap_self(uintptr_t addr, uint64_t *entry) {
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  uint8_t b[8];
  ssize_t r = pread_full(fd, b, 8, (off_t)(addr / (uintptr_t)sysconf(_SC_PAGESIZE)) * 8);
  int e = r < 0 ? errno : 0;
  close(fd);
  if (r >= 0 && r < 8) return EIO;
  if (e) return e;
  *entry = tether_load_le64(b);
  return 0;
}

static napi_value js_soft_dirty_probe(napi_env env, napi_callback_info info) {
  long ps = sysconf(_SC_PAGESIZE);
  volatile uint8_t *p = mmap(NULL, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    throw_io(env, errno, "mmap", "softDirtyProbe");
    return NULL;
  }
  p[0] = 1;
  int clear_err = 0, pm_err = 0;
  uint64_t before = 0, after = 0;
  int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    clear_err = errno;
  } else {
    if (write(fd, "4", 1) != 1) clear_err = errno ? errno : EIO;
    close(fd);
  }
  if (!clear_err) {
    pm_err = read_pagemap_self((uintptr_t)p, &before);
    p[0] = 2;
    if (!pm_err) pm_err = read_pagemap_self((uintptr_t)p, &after);
  }
  munmap((void *)p, (size_t)ps);
  const uint64_t SD = (uint64_t)1 << 55;
  bool supported = !clear_err && !pm_err && !(before & SD) && (after & SD);
  napi_value obj, v;
  napi_create_object(env, &obj);
  napi_get_boolean(env, supported, &v);
  napi_set_named_property(env, obj, "supported", v);
  napi_create_int32(env, clear_err, &v);
  napi_set_named_property(env, obj, "clearRefsErrno", v);
  napi_create_int32(env, pm_err, &v);
  napi_set_named_property(env, obj, "pagemapErrno", v);
  napi_create_bigint_uint64(env, before, &v);
  napi_set_named_property(env, obj, "before", v);
  napi_create_bigint_uint64(env, after, &v);
  napi_set_named_property(env, obj, "after", v);
  return obj;
}

void tap_register(napi_env env, napi_value exports); /* tap.c */
/* ---------- fallocate (disk images) ---------- */

/*
 * fallocate(fd, mode, offset, length) -> 0 or the errno. Returns the errno instead of
 * throwing: EOPNOTSUPP (a file system without punch-hole or zero-range) is an expected
 * answer that the caller handles by writing zeroes. Synchronous: a metadata operation
 * on the image, no data moves.
 */
static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (get_args(env, info, argv, 4, 4, "fallocate(fd, mode, offset, length)") < 0) return NULL;
  int fd;
  double mode, off, len;
  if (!arg_fd(env, argv[0], &fd)) return NULL;
  if (!arg_integer(env, argv[1], "mode", 0, INT_MAX, &mode)) return NULL;
  if (!arg_integer(env, argv[2], "offset", 0, 9007199254740991.0, &off)) return NULL;
  if (!arg_integer(env, argv[3], "length", 1, 9007199254740991.0, &len)) return NULL;
  int r = fallocate(fd, (int)mode, (off_t)off, (off_t)len);
  napi_value v;
  napi_create_int32(env, r == 0 ? 0 : errno, &v);
  return v;
}


/*
 * ofdLockProbe(fd, offset) -> errno of a non-blocking OFD read lock on the one byte at
 * `offset` (0: granted, and released again at once). `tether check` uses it to learn
 * whether a disk image's file system supports locks without disturbing anyone: a read
 * lock on a byte nobody else locks (QEMU's image locking uses bytes 100..~300) conflicts
 * with no lock and no later lock attempt. EAGAIN/EACCES (someone holds a write lock
 * there) still proves locking works; ENOLCK/EOPNOTSUPP/EINVAL mean it does not.
 */
static napi_value js_ofd_lock_probe(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, argv, 2, 2, "ofdLockProbe(fd, offset)") < 0) return NULL;
  int fd;
  double off;
  if (!arg_fd(env, argv[0], &fd)) return NULL;
  if (!arg_integer(env, argv[1], "offset", 0, 9007199254740991.0, &off)) return NULL;
  struct flock fl = {0};
  fl.l_type = F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)off;
  fl.l_len = 1;
  int err = 0;
  if (fcntl(fd, F_OFD_SETLK, &fl) != 0) {
    err = errno;
  } else {
    fl.l_type = F_UNLCK;
    if (fcntl(fd, F_OFD_SETLK, &fl) != 0) err = errno;
  }
  napi_value v;
  napi_create_int32(env, err, &v);
  return v;
}

/* ---------- non-blocking positional I/O (disk images) ---------- */

/*
 * pioNowait(write, fd, buf, offset) -> bytes transferred (>= 0) or -errno.
 * preadv2/pwritev2 with RWF_NOWAIT: the call completes only if it needs no blocking
 * I/O (data in the page cache, a write that needs no block allocation or writeback
 * throttling), otherwise it returns -EAGAIN at once (-EOPNOTSUPP where the file system
 * or kernel lacks the flag). So the NBD server can serve cached requests on the event
 * loop without a thread-pool hop and hand the rest to the pool, never stalling the
 * loop on the disk. A short count is returned as is: the caller finishes the rest.
 */
static napi_value js_pio_nowait(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (get_args(env, info, argv, 4, 4, "pioNowait(write, fd, buf, offset)") < 0) return NULL;
  bool write;
  if (napi_get_value_bool(env, argv[0], &write) != napi_ok) {
    throw_args(env, "write must be a boolean");
    return NULL;
  }
  int fd;
  uint8_t *buf;
  size_t len;
  double off;
  if (!arg_fd(env, argv[1], &fd) || !arg_bytes(env, argv[2], "buf", &buf, &len) ||
      !arg_integer(env, argv[3], "offset", 0, 9007199254740991.0, &off))
    return NULL;
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  ssize_t r;
#ifdef RWF_NOWAIT
  do {
    r = write ? pwritev2(fd, &iov, 1, (off_t)off, RWF_NOWAIT) : preadv2(fd, &iov, 1, (off_t)off, RWF_NOWAIT);
  } while (r < 0 && errno == EINTR);
#else
  r = -1;
  errno = EOPNOTSUPP;
#endif
  napi_value v;
  napi_create_double(env, r >= 0 ? (double)r : -(double)errno, &v);
  return v;
}

/* ---------- direct I/O support (the journal's reads of the image) ---------- */

/*
 * addressMod(buf, m) -> the address of buf's first byte modulo m (m a power of two).
 * O_DIRECT needs the buffer's address aligned; Node does not guarantee that for a
 * Buffer, so the caller over-allocates and slices at the offset this reports.
 */
static napi_value js_address_mod(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, argv, 2, 2, "addressMod(buf, m)") < 0) return NULL;
  uint8_t *buf;
  size_t len;
  double m;
  if (!arg_bytes(env, argv[0], "buf", &buf, &len)) return NULL;
  if (!arg_integer(env, argv[1], "m", 1, 1048576, &m)) return NULL;
  size_t mm = (size_t)m;
  if ((mm & (mm - 1)) != 0) {
    throw_args(env, "m must be a power of two");
    return NULL;
  }
  napi_value v;
  napi_create_double(env, (double)((uintptr_t)buf & (mm - 1)), &v);
  return v;
}

/*
 * dioAlign(fd) -> [memAlign, offsetAlign] from statx(STATX_DIOALIGN) (Linux 6.1+), or
 * null when the kernel or the file system does not report it. Both 0: the file does not
 * support O_DIRECT. glibc 2.36's struct statx predates the fields: they sit at byte
 * 0x98 and 0x9c of the kernel's struct (stx_dio_mem_align, stx_dio_offset_align).
 */
static napi_value js_dio_align(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, argv, 1, 1, "dioAlign(fd)") < 0) return NULL;
  int fd;
  if (!arg_fd(env, argv[0], &fd)) return NULL;
  napi_value v;
#if defined(STATX_BASIC_STATS) && defined(AT_EMPTY_PATH)
  struct statx stx;
  memset(&stx, 0, sizeof stx);
  if (statx(fd, "", AT_EMPTY_PATH, 0x00002000U /* STATX_DIOALIGN */, &stx) == 0 && (stx.stx_mask & 0x00002000U) != 0) {
    uint32_t al[2];
    memcpy(al, (const uint8_t *)&stx + 0x98, sizeof al);
    napi_value a, b;
    napi_create_array_with_length(env, 2, &v);
    napi_create_uint32(env, al[0], &a);
    napi_create_uint32(env, al[1], &b);
    napi_set_element(env, v, 0, a);
    napi_set_element(env, v, 1, b);
    return v;
  }
#endif
  napi_get_null(env, &v);
  return v;
}

/* fadvise(fd, offset, length, advice) -> errno (0: done). posix_fadvise; length 0: to the end. */
static napi_value js_fadvise(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (get_args(env, info, argv, 4, 4, "fadvise(fd, offset, length, advice)") < 0) return NULL;
  int fd;
  double off, len, advice;
  if (!arg_fd(env, argv[0], &fd)) return NULL;
  if (!arg_integer(env, argv[1], "offset", 0, 9007199254740991.0, &off)) return NULL;
  if (!arg_integer(env, argv[2], "length", 0, 9007199254740991.0, &len)) return NULL;
  if (!arg_integer(env, argv[3], "advice", 0, 5, &advice)) return NULL;
  int r = posix_fadvise(fd, (off_t)off, (off_t)len, (int)advice);
  napi_value v;
  napi_create_int32(env, r, &v);
  return v;
}

/*
 * residentPages(fd, offset, length) -> how many of the file's pages in the range are in
 * this host's page cache (mmap + mincore; the mapping is never touched, so nothing is
 * faulted in). The tests prove with it that the journal's O_DIRECT reads bypass the cache.
 * offset must be a multiple of the page size. -errno on failure.
 */
static napi_value js_resident_pages(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (get_args(env, info, argv, 3, 3, "residentPages(fd, offset, length)") < 0) return NULL;
  int fd;
  double off, len;
  if (!arg_fd(env, argv[0], &fd)) return NULL;
  if (!arg_integer(env, argv[1], "offset", 0, 9007199254740991.0, &off)) return NULL;
  if (!arg_integer(env, argv[2], "length", 1, 1099511627776.0, &len)) return NULL;
  long ps = sysconf(_SC_PAGESIZE);
  napi_value v;
  if (((uint64_t)off % (uint64_t)ps) != 0) {
    throw_args(env, "offset must be a multiple of the page size");
    return NULL;
  }
  size_t n = ((size_t)len + (size_t)ps - 1) / (size_t)ps;
  void *p = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, fd, (off_t)off);
  if (p == MAP_FAILED) {
    napi_create_double(env, -(double)errno, &v);
    return v;
  }
  unsigned char *vec = malloc(n);
  double count = 0;
  if (vec == NULL) {
    count = -ENOMEM;
  } else if (mincore(p, (size_t)len, vec) != 0) {
    count = -(double)errno;
  } else {
    for (size_t i = 0; i < n; i++) count += vec[i] & 1;
  }
  free(vec);
  munmap(p, (size_t)len);
  napi_create_double(env, count, &v);
  return v;
}

static napi_value init(napi_env env, napi_value exports) {
  static uint8_t zero_page[4096];
  g_zero_hash = page_hash(zero_page);
  napi_property_descriptor props[] = {
      {"hashFile", NULL, js_hash_file, NULL, NULL, NULL, napi_enumerable, NULL},
      {"mapRam", NULL, js_map_ram, NULL, NULL, NULL, napi_enumerable, NULL},
      {"unmapRam", NULL, js_unmap_ram, NULL, NULL, NULL, napi_enumerable, NULL},
      {"scanDirty", NULL, js_scan_dirty, NULL, NULL, NULL, napi_enumerable, NULL},
      {"scanCopy", NULL, js_scan_copy, NULL, NULL, NULL, napi_enumerable, NULL},
      {"hashBuffer", NULL, js_hash_buffer, NULL, NULL, NULL, napi_enumerable, NULL},
      {"readPages", NULL, js_read_pages, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroMask", NULL, js_zero_mask, NULL, NULL, NULL, napi_enumerable, NULL},
      {"xxh64", NULL, js_xxh64, NULL, NULL, NULL, napi_enumerable, NULL},
      {"softDirtyProbe", NULL, js_soft_dirty_probe, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdLockProbe", NULL, js_ofd_lock_probe, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pioNowait", NULL, js_pio_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
      {"addressMod", NULL, js_address_mod, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dioAlign", NULL, js_dio_align, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fadvise", NULL, js_fadvise, NULL, NULL, NULL, napi_enumerable, NULL},
      {"residentPages", NULL, js_resident_pages, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  napi_value zh;
  napi_create_bigint_uint64(env, g_zero_hash, &zh);
  napi_set_named_property(env, exports, "zeroPageHash", zh);
  tap_register(env, exports);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
