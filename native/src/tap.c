/*
 * TAP devices for the packet gate: create/attach (TUNSETIFF), persistence, batched
 * writes, and a reader thread that hands frames to JS in batches.
 *
 * Data path (measured in tools/bench/gate.ts, decision in docs/network.md):
 *   read:  one pthread per TAP blocks in poll() on the TAP fd and an eventfd (stop);
 *          when readable it reads frames (one read() = one frame on a TAP) until
 *          EAGAIN or the batch is full, then passes the whole batch to JS with ONE
 *          napi_call_threadsafe_function. The batch memory becomes the JS Buffer
 *          (external buffer, freed by its finalizer): no copy, no per-frame allocation.
 *          The threadsafe function's queue is bounded; a full queue blocks the thread,
 *          the kernel's TAP queue then fills and the kernel drops (as a NIC would).
 *   write: tapWriteBatch(fd, frames[]) writes each frame with write() in one N-API
 *          call. A TAP write does not block (the frame enters the host stack/bridge);
 *          EAGAIN/ENOBUFS end the batch early, the caller retries the rest.
 *
 * Errors: JS Error with code ERR_TAP (errno, syscall properties) or ERR_MEM_NATIVE_ARGS.
 */
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#define TAP_MAX_FRAME 65553 /* 65535 + Ethernet header and one VLAN tag */
#define BATCH_FRAMES 64
#define BATCH_BYTES (256 * 1024)
#define TSFN_QUEUE 4

static void tap_throw(napi_env env, const char *code, int err, const char *syscall, const char *what) {
  char msg[256];
  if (err)
    snprintf(msg, sizeof msg, "%s: %s failed: %s", what, syscall, strerror(err));
  else
    snprintf(msg, sizeof msg, "%s", what);
  napi_value m, c, e, v;
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
  napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &c);
  napi_create_error(env, c, m, &e);
  if (err) {
    napi_create_int32(env, err, &v);
    napi_set_named_property(env, e, "errno", v);
    napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, e, "syscall", v);
  }
  napi_throw(env, e);
}

static int get_fd(napi_env env, napi_value v, int *fd) {
  int32_t x;
  if (napi_get_value_int32(env, v, &x) != napi_ok || x < 0) {
    tap_throw(env, "ERR_MEM_NATIVE_ARGS", 0, NULL, "fd must be a non-negative integer");
    return -1;
  }
  *fd = x;
  return 0;
}

/* tapOpen(name, nonblock): fd of TAP `name` (created if absent, attached if it exists and
 * is persistent), IFF_TAP|IFF_NO_PI, made persistent so that it outlives this process. */
static napi_value js_tap_open(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  char name[IFNAMSIZ + 1];
  size_t len = 0;
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], name, sizeof name, &len) != napi_ok || len == 0 || len >= IFNAMSIZ) {
    tap_throw(env, "ERR_MEM_NATIVE_ARGS", 0, NULL, "tapOpen(name): name must be 1-15 bytes");
    return NULL;
  }
  bool nonblock = true;
  if (argc >= 2) napi_get_value_bool(env, argv[1], &nonblock);
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | (nonblock ? O_NONBLOCK : 0));
  if (fd < 0) {
    tap_throw(env, "ERR_TAP", errno, "open", "/dev/net/tun");
    return NULL;
  }
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
  memcpy(ifr.ifr_name, name, len);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
    int e = errno;
    close(fd);
    tap_throw(env, "ERR_TAP", e, "ioctl(TUNSETIFF)", name);
    return NULL;
  }
  if (ioctl(fd, TUNSETPERSIST, 1) < 0) {
    int e = errno;
    close(fd);
    tap_throw(env, "ERR_TAP", e, "ioctl(TUNSETPERSIST)", name);
    return NULL;
  }
  napi_value r;
  napi_create_int32(env, fd, &r);
  return r;
}

/* tapClose(fd, remove): close; with remove the device is made non-persistent first, so
 * the kernel deletes it when the last fd closes. */
static napi_value js_tap_close(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int fd;
  if (argc < 1 || get_fd(env, argv[0], &fd)) return NULL;
  bool remove = false;
  if (argc >= 2) napi_get_value_bool(env, argv[1], &remove);
  if (remove && ioctl(fd, TUNSETPERSIST, 0) < 0) {
    int e = errno;
    close(fd);
    tap_throw(env, "ERR_TAP", e, "ioctl(TUNSETPERSIST)", "tapClose");
    return NULL;
  }
  close(fd);
  return NULL;
}

/* tapWriteBatch(fd, frames: Buffer[]): frames written, in order. Stops at the first frame
 * the kernel does not take now (EAGAIN/ENOBUFS) and returns the count before it, so the
 * caller can retry the rest later: a released frame is never dropped here. Other errors throw. */
static napi_value js_tap_write_batch(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int fd;
  if (argc < 2 || get_fd(env, argv[0], &fd)) return NULL;
  uint32_t n;
  if (napi_get_array_length(env, argv[1], &n) != napi_ok) {
    tap_throw(env, "ERR_MEM_NATIVE_ARGS", 0, NULL, "tapWriteBatch(fd, frames): frames must be an array");
    return NULL;
  }
  uint32_t written = 0;
  for (uint32_t i = 0; i < n; i++) {
    napi_value el;
    void *data;
    size_t len;
    napi_get_element(env, argv[1], i, &el);
    if (napi_get_buffer_info(env, el, &data, &len) != napi_ok) {
      tap_throw(env, "ERR_MEM_NATIVE_ARGS", 0, NULL, "tapWriteBatch: frames must be Buffers");
      return NULL;
    }
    ssize_t r;
    do r = write(fd, data, len);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
      if (errno == EAGAIN || errno == ENOBUFS) break;
      tap_throw(env, "ERR_TAP", errno, "write", "TAP");
      return NULL;
    }
    written++;
  }
  napi_value r;
  napi_create_uint32(env, written, &r);
  return r;
}

/* ---------- reader thread ---------- */

typedef struct {
  uint8_t *data; /* BATCH_BYTES, becomes the JS Buffer */
  uint32_t lens[BATCH_FRAMES];
  uint32_t count;
  size_t used;
} batch_t;

typedef struct {
  int fd;
  int stopfd;
  pthread_t thread;
  napi_threadsafe_function tsfn;
  int err;      /* errno that ended the thread, 0 = stopped */
  bool joined;
} reader_t;

static void *reader_main(void *arg) {
  reader_t *r = arg;
  batch_t *b = NULL;
  for (;;) {
    struct pollfd p[2] = {{.fd = r->fd, .events = POLLIN}, {.fd = r->stopfd, .events = POLLIN}};
    int pr = poll(p, 2, -1);
    if (pr < 0) {
      if (errno == EINTR) continue;
      r->err = errno;
      break;
    }
    if (p[1].revents) break;
    if (p[0].revents & (POLLERR | POLLNVAL | POLLHUP)) {
      r->err = EIO;
      break;
    }
    for (;;) {
      if (!b) {
        b = malloc(sizeof *b);
        if (b) b->data = malloc(BATCH_BYTES);
        if (!b || !b->data) {
          r->err = ENOMEM;
          goto out;
        }
        b->count = 0;
        b->used = 0;
      }
      /* Room for a whole maximal frame, or hand the batch over first. */
      if (b->count == BATCH_FRAMES || BATCH_BYTES - b->used < TAP_MAX_FRAME) goto deliver;
      ssize_t n = read(r->fd, b->data + b->used, BATCH_BYTES - b->used);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        r->err = errno;
        goto out;
      }
      if (n == 0) continue;
      b->lens[b->count++] = (uint32_t)n;
      b->used += (size_t)n;
      continue;
    deliver:
      if (napi_call_threadsafe_function(r->tsfn, b, napi_tsfn_blocking) != napi_ok) {
        free(b->data);
        free(b);
        b = NULL;
        goto out;
      }
      b = NULL;
    }
    if (b && b->count > 0) {
      if (napi_call_threadsafe_function(r->tsfn, b, napi_tsfn_blocking) != napi_ok) {
        free(b->data);
        free(b);
        b = NULL;
        break;
      }
      b = NULL;
    }
  }
out:
  if (b) {
    free(b->data);
    free(b);
  }
  napi_release_threadsafe_function(r->tsfn, napi_tsfn_release);
  return NULL;
}

static void free_batch_data(napi_env env, void *data, void *hint) { free(data); }

/* Runs on the JS thread: callback(buffer, lengths: Uint32Array) per batch, callback(null, errno) at the end. */
static void reader_call_js(napi_env env, napi_value cb, void *context, void *data) {
  batch_t *b = data;
  if (env == NULL) {
    if (b) {
      free(b->data);
      free(b);
    }
    return;
  }
  napi_value argv[2], undef;
  napi_get_undefined(env, &undef);
  napi_value ab;
  void *lens_mem;
  napi_create_external_buffer(env, b->used, b->data, free_batch_data, NULL, &argv[0]);
  napi_create_arraybuffer(env, b->count * sizeof(uint32_t), &lens_mem, &ab);
  memcpy(lens_mem, b->lens, b->count * sizeof(uint32_t));
  napi_create_typedarray(env, napi_uint32_array, b->count, ab, 0, &argv[1]);
  free(b);
  napi_call_function(env, undef, cb, 2, argv, NULL);
}

static void reader_finalize(napi_env env, void *data, void *hint) {
  reader_t *r = data;
  if (!r->joined) {
    pthread_join(r->thread, NULL);
    r->joined = true;
  }
  /* tell JS the reader ended (errno 0 = stopped) */
  napi_value cb = NULL, argv[2], undef;
  if (hint) {
    napi_get_reference_value(env, (napi_ref)hint, &cb);
    napi_delete_reference(env, (napi_ref)hint);
  }
  if (cb) {
    napi_get_undefined(env, &undef);
    napi_get_null(env, &argv[0]);
    napi_create_int32(env, r->err, &argv[1]);
    napi_call_function(env, undef, cb, 2, argv, NULL);
  }
  close(r->stopfd);
  free(r);
}

static void handle_finalize(napi_env env, void *data, void *hint) { /* reader freed by tsfn finalizer */ }

/* tapStartReader(fd, onBatch(buf, lens) | onBatch(null, errno)) -> handle (an external). */
static napi_value js_tap_start_reader(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int fd;
  if (argc < 2 || get_fd(env, argv[0], &fd)) return NULL;
  reader_t *r = calloc(1, sizeof *r);
  if (!r) {
    tap_throw(env, "ERR_TAP", ENOMEM, "calloc", "tapStartReader");
    return NULL;
  }
  r->fd = fd;
  r->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (r->stopfd < 0) {
    int e = errno;
    free(r);
    tap_throw(env, "ERR_TAP", e, "eventfd", "tapStartReader");
    return NULL;
  }
  napi_ref cbref;
  napi_create_reference(env, argv[1], 1, &cbref);
  napi_value name;
  napi_create_string_utf8(env, "tap-reader", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[1], NULL, name, TSFN_QUEUE, 1, r, reader_finalize, cbref, reader_call_js,
                                      &r->tsfn) != napi_ok) {
    close(r->stopfd);
    free(r);
    tap_throw(env, "ERR_TAP", 0, NULL, "tapStartReader: cannot create threadsafe function");
    return NULL;
  }
  if (pthread_create(&r->thread, NULL, reader_main, r) != 0) {
    napi_release_threadsafe_function(r->tsfn, napi_tsfn_abort);
    tap_throw(env, "ERR_TAP", EAGAIN, "pthread_create", "tapStartReader");
    return NULL;
  }
  napi_value h;
  napi_create_external(env, r, handle_finalize, NULL, &h);
  return h;
}

/* tapStopReader(handle): wake the thread; it delivers what it has and ends. The final
 * callback(null, errno) comes once every queued batch has been delivered. */
static napi_value js_tap_stop_reader(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  reader_t *r;
  if (argc < 1 || napi_get_value_external(env, argv[0], (void **)&r) != napi_ok) {
    tap_throw(env, "ERR_MEM_NATIVE_ARGS", 0, NULL, "tapStopReader(handle)");
    return NULL;
  }
  uint64_t one = 1;
  if (write(r->stopfd, &one, sizeof one) < 0) { /* already signalled */
  }
  return NULL;
}

/* The int an ioctl reports for socket argv[0] (sockOutq, sockInq). */
static napi_value sock_ioctl_int(napi_env env, napi_callback_info info, unsigned long req, const char *syscall,
                                 const char *fn) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int fd;
  if (argc < 1 || get_fd(env, argv[0], &fd)) return NULL;
  int n = 0;
  if (ioctl(fd, req, &n) < 0) {
    tap_throw(env, "ERR_TAP", errno, syscall, fn);
    return NULL;
  }
  napi_value r;
  napi_create_int32(env, n, &r);
  return r;
}

/* sockOutq(fd): bytes this end of a socket sent that the peer has not read yet (TIOCOUTQ;
 * on a unix stream socket the sent skbs stay charged to the sender until the receiver
 * consumes them). The relay's detach waits for 0 on QEMU's in0 socket. */
static napi_value js_sock_outq(napi_env env, napi_callback_info info) {
  return sock_ioctl_int(env, info, TIOCOUTQ, "ioctl(TIOCOUTQ)", "sockOutq");
}

/* sockInq(fd): bytes queued on socket `fd` for this end to read (FIONREAD/SIOCINQ). The
 * relay-pause fault logs what QEMU queued while the relay did not read. */
static napi_value js_sock_inq(napi_env env, napi_callback_info info) {
  return sock_ioctl_int(env, info, FIONREAD, "ioctl(FIONREAD)", "sockInq");
}

/* peerSndbuf(pid, path, bytes): raise the send buffer of the connected unix stream socket
 * that process `pid` accepted on `path` (QEMU's end of a relay socket: a unix stream
 * socket's queued bytes are charged to the WRITER and limited by its sk_sndbuf, so the
 * reader's SO_RCVBUF changes nothing). The socket is reached with pidfd_getfd (a second
 * fd on the same open socket) and set with SO_SNDBUFFORCE (CAP_NET_ADMIN; the kernel
 * doubles the value). Returns the resulting SO_SNDBUF of the last socket set, 0 if none
 * matched (QEMU has not accepted yet). Listening sockets on `path` are skipped. */
static napi_value js_peer_sndbuf(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t pid, bytes;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
  size_t plen = 0;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &pid) != napi_ok || pid <= 0 ||
      napi_get_value_string_utf8(env, argv[1], path, sizeof path, &plen) != napi_ok || plen == 0 ||
      plen >= sizeof path - 1 || napi_get_value_int32(env, argv[2], &bytes) != napi_ok || bytes <= 0) {
    tap_throw(env, "ERR_MEM_NATIVE_ARGS", 0, NULL, "peerSndbuf(pid > 0, socket path, bytes > 0)");
    return NULL;
  }
  int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
  if (pidfd < 0) {
    tap_throw(env, "ERR_TAP", errno, "pidfd_open", "peerSndbuf");
    return NULL;
  }
  char dir[64];
  snprintf(dir, sizeof dir, "/proc/%d/fd", pid);
  DIR *d = opendir(dir);
  if (!d) {
    int e = errno;
    close(pidfd);
    tap_throw(env, "ERR_TAP", e, "opendir", "peerSndbuf");
    return NULL;
  }
  int result = 0, err = 0;
  const char *failed = NULL;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    char *end;
    long target = strtol(de->d_name, &end, 10);
    if (*de->d_name == '\0' || *end != '\0') continue;
    char link[64], lpath[64 + 256 + 2];
    snprintf(lpath, sizeof lpath, "%s/%s", dir, de->d_name);
    ssize_t n = readlink(lpath, link, sizeof link - 1);
    if (n <= 0) continue;
    link[n] = '\0';
    if (strncmp(link, "socket:", 7) != 0) continue;
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, (int)target, 0);
    if (fd < 0) continue; /* closed meanwhile */
    int v = 0;
    socklen_t vl = sizeof v;
    struct sockaddr_un a;
    socklen_t al = sizeof a;
    memset(&a, 0, sizeof a);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &vl) == 0 && v == AF_UNIX && (vl = sizeof v, getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &vl) == 0) &&
        v == SOCK_STREAM && (vl = sizeof v, getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &vl) == 0) && v == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &al) == 0 && al > offsetof(struct sockaddr_un, sun_path) &&
        strncmp(a.sun_path, path, sizeof a.sun_path) == 0) {
      if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0) {
        err = errno;
        failed = "setsockopt(SO_SNDBUFFORCE)";
      } else {
        vl = sizeof v;
        if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, &vl) == 0) result = v;
      }
    }
    close(fd);
    if (failed) break;
  }
  closedir(d);
  close(pidfd);
  if (failed) {
    tap_throw(env, "ERR_TAP", err, failed, "peerSndbuf");
    return NULL;
  }
  napi_value r;
  napi_create_int32(env, result, &r);
  return r;
}

void tap_register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"tapOpen", NULL, js_tap_open, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tapClose", NULL, js_tap_close, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tapWriteBatch", NULL, js_tap_write_batch, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tapStartReader", NULL, js_tap_start_reader, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tapStopReader", NULL, js_tap_stop_reader, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sockOutq", NULL, js_sock_outq, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sockInq", NULL, js_sock_inq, NULL, NULL, NULL, napi_enumerable, NULL},
      {"peerSndbuf", NULL, js_peer_sndbuf, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
