/*
 * labwriter: the lab VM's stand-in for QEMU (docs/lab.md). It maps a guest-RAM-like file on
 * tmpfs MAP_SHARED and writes it on command, so the trackers in tools/lab/lab.ts read its
 * /proc/<pid>/{maps,pagemap,clear_refs} exactly as they read QEMU's. Built statically on the
 * host (tools/lab/vm.ts) and run inside the Debian lab guest.
 *
 * One command per stdin line, one answer line per command on stdout ("ok ..." or "err ..."):
 *   open PATH PAGES HUGE   create/size PATH, mmap it shared (HUGE=1: madvise(MADV_HUGEPAGE))
 *   w EPOCH PFN...         write the 8-byte tag (EPOCH<<32|PFN) into each page (content changes every epoch)
 *   wr EPOCH START COUNT STRIDE   the same for START, START+STRIDE, ... (COUNT pages)
 *   r PFN EPOCH            read the page's tag slot for EPOCH (a read fault if it is not mapped)
 *   pageout PFN COUNT      madvise(MADV_PAGEOUT) on the pages; answers the errno (0 = accepted)
 *   collapse PFN COUNT     madvise(MADV_COLLAPSE, 6.1+): what khugepaged does; answers the errno
 *   incore PFN COUNT       mincore: how many of the pages are resident
 *   mlock | munlock        lock / unlock the whole mapping
 *   spin GAP_US            a thread writes every page once, in order, GAP_US microseconds apart,
 *                          while the trackers run (no pause)
 *   spun                   how many pages that thread has written so far
 *   halt                   stop that thread; answers the number of writes it made
 *   quit
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

static uint8_t *base;
static uint64_t npages;
static pthread_t spinner;
static atomic_int spinning;
static uint64_t spin_seed, spin_writes;

static void tag(uint64_t epoch, uint64_t pfn) {
  if (pfn >= npages) return;
  volatile uint64_t *p = (volatile uint64_t *)(base + pfn * 4096 + (epoch % 512) * 8);
  *p = (epoch << 32) | pfn;
}

static atomic_ullong spun;

/* One pass over the pages in order, each written once (tag epoch 3), spin_seed us apart. */
static void *spin(void *arg) {
  (void)arg;
  struct timespec gap = {0, (long)spin_seed * 1000};
  for (uint64_t p = 0; p < npages && atomic_load_explicit(&spinning, memory_order_relaxed); p++) {
    tag(3, p);
    atomic_store(&spun, p + 1);
    if (spin_seed) nanosleep(&gap, NULL);
  }
  spin_writes = atomic_load(&spun);
  return NULL;
}

int main(void) {
  char *line = NULL;
  size_t cap = 0;
  setvbuf(stdout, NULL, _IOLBF, 0);
  while (getline(&line, &cap, stdin) > 0) {
    char *save = NULL, *cmd = strtok_r(line, " \n", &save);
    if (!cmd) continue;
#define ARG() strtoull(strtok_r(NULL, " \n", &save) ?: "0", NULL, 0)
    if (!strcmp(cmd, "open")) {
      char *path = strtok_r(NULL, " \n", &save);
      npages = ARG();
      int huge = (int)ARG();
      int fd = open(path ?: "", O_RDWR | O_CREAT, 0600);
      if (fd < 0 || ftruncate(fd, (off_t)(npages * 4096)) != 0) {
        printf("err open %s\n", strerror(errno));
        continue;
      }
      base = mmap(NULL, npages * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (base == MAP_FAILED) {
        printf("err mmap %s\n", strerror(errno));
        continue;
      }
      if (huge && madvise(base, npages * 4096, MADV_HUGEPAGE) != 0) {
        printf("err madvise %s\n", strerror(errno));
        continue;
      }
      close(fd);
      printf("ok %p\n", (void *)base);
    } else if (!strcmp(cmd, "w")) {
      uint64_t epoch = ARG(), n = 0;
      char *t;
      while ((t = strtok_r(NULL, " \n", &save))) tag(epoch, strtoull(t, NULL, 0)), n++;
      printf("ok %llu\n", (unsigned long long)n);
    } else if (!strcmp(cmd, "wr")) {
      uint64_t epoch = ARG(), start = ARG(), count = ARG(), stride = ARG();
      for (uint64_t i = 0; i < count; i++) tag(epoch, start + i * (stride ?: 1));
      printf("ok %llu\n", (unsigned long long)count);
    } else if (!strcmp(cmd, "r")) {
      uint64_t pfn = ARG(), epoch = ARG();
      printf("ok %llu\n",
             pfn < npages ? (unsigned long long)*(volatile uint64_t *)(base + pfn * 4096 + (epoch % 512) * 8) : 0ULL);
    } else if (!strcmp(cmd, "pageout")) {
      uint64_t pfn = ARG(), count = ARG();
      int rc = madvise(base + pfn * 4096, count * 4096, MADV_PAGEOUT);
      printf("ok %d\n", rc == 0 ? 0 : errno);
    } else if (!strcmp(cmd, "collapse")) {
      uint64_t pfn = ARG(), count = ARG();
      int rc = madvise(base + pfn * 4096, count * 4096, MADV_COLLAPSE);
      printf("ok %d\n", rc == 0 ? 0 : errno);
    } else if (!strcmp(cmd, "incore")) {
      uint64_t pfn = ARG(), count = ARG(), in = 0;
      unsigned char *v = calloc(count ?: 1, 1);
      if (mincore(base + pfn * 4096, count * 4096, v) != 0) {
        printf("err mincore %s\n", strerror(errno));
        free(v);
        continue;
      }
      for (uint64_t i = 0; i < count; i++) in += v[i] & 1;
      free(v);
      printf("ok %llu\n", (unsigned long long)in);
    } else if (!strcmp(cmd, "mlock") || !strcmp(cmd, "munlock")) {
      int rc = cmd[0] == 'm' && cmd[1] == 'l' ? mlock(base, npages * 4096) : munlock(base, npages * 4096);
      printf(rc == 0 ? "ok 0\n" : "err %s\n", strerror(errno));
    } else if (!strcmp(cmd, "spin")) {
      spin_seed = ARG();
      atomic_store(&spinning, 1);
      if (pthread_create(&spinner, NULL, spin, NULL) != 0) {
        printf("err pthread_create\n");
        continue;
      }
      printf("ok 0\n");
    } else if (!strcmp(cmd, "spun")) {
      printf("ok %llu\n", (unsigned long long)atomic_load(&spun));
    } else if (!strcmp(cmd, "halt")) {
      atomic_store(&spinning, 0);
      pthread_join(spinner, NULL);
      printf("ok %llu\n", (unsigned long long)spin_writes);
    } else if (!strcmp(cmd, "quit")) {
      printf("ok 0\n");
      return 0;
    } else {
      printf("err unknown %s\n", cmd);
    }
  }
  return 0;
}
