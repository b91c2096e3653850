/*
 * netcheck <port> — a TCP server whose conversation a client verifies end to end.
 *
 * Every connection is served by its own forked process, so all of its state lives in
 * guest RAM of that process: a record counter and a chained SHA-256 over everything the
 * guest has sent on the connection. A rollback of the VM rewinds both (and the guest's
 * TCP state). Every record also carries a fresh random nonce (getrandom), so a record
 * the guest produces again after a rollback differs from the one it produced before:
 * a client that ever saw output of a rolled-back epoch finds its chain diverging from
 * the guest's (or the TCP stream stalling), never a silent consistent continuation.
 *
 * Wire format (ASCII lines, '\n' terminated). Client -> guest:
 *   Q <seq> <token>                 query; answered by one A record
 *   B <seq> <nbytes>                bulk: one D record, then <nbytes> raw payload bytes
 *   U <seq> <port> <count> <size>   send <count> UDP datagrams of <size> bytes to the
 *                                   client's address, port <port>; then one V record
 *   S <seq> <nbytes>                sink: <nbytes> raw payload bytes follow the line; once
 *                                   all arrived, one R record (bulk client -> guest)
 *   F <seq> <count> <size>          send <count> raw Ethernet frames of exactly <size>
 *                                   bytes (14..65535, header included) out of the interface
 *                                   the connection arrived on, to the broadcast address,
 *                                   EtherType 0x88b5; then one W record. Frames longer than
 *                                   the interface's MTU allows are sent with the MTU raised
 *                                   for the burst, then restored (a hostile guest's runts
 *                                   and maximal frames; TCP sessions keep their MSS)
 * Guest -> client, every record:
 *   <type> <counter> <seq> <nonce> <x> <chain>
 *     type     H (greeting, seq 0), A (answer), D (bulk header), V (UDP done),
 *              R (sink done), W (frames done), E (error)
 *     counter  records sent on this connection before this one (H has 0)
 *     seq      the request's seq (decimal, echoed)
 *     nonce    16 hex digits from getrandom
 *     x        H: connection id (16 hex); A: the request's token; D: nbytes;
 *              V: datagrams sent; R: payload bytes received; W: frames sent; E: reason
 *     chain    64 hex digits: SHA-256(previous chain (32 bytes) || the record's text up to,
 *              not including, the space before chain); the previous chain of H is 32
 *              zero bytes. Bulk payload bytes are not hashed (the D record names their
 *              count, which is).
 * UDP datagram i (0-based) of a U request: "u <connid> <seq> <i> <count>" then '.'
 * padding up to <size> bytes. Raw frame i of an F request: destination ff:ff:ff:ff:ff:ff,
 * the interface's own source address, EtherType 0x88b5, then as much of
 * "f <connid> <seq> <i> <count>" and '.' padding as <size> leaves room for.
 *
 * Console (stdout, one write(2) per line):
 *   netcheck listening port=<p>
 *   netcheck conn id=<id> peer=<ip>:<port>
 *   netcheck conn id=<id> closed records=<n>
 *   netcheck udp seq=<seq> sent=<n> retries=<ENOBUFS retries> failed=<n>
 *   netcheck frames seq=<seq> size=<size> sent=<n> failed=<n> mtu=<mtu during the burst>
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---------------- SHA-256 (FIPS 180-4) ---------------- */
struct sha256 { uint32_t h[8]; uint8_t buf[64]; uint64_t len; size_t n; };
static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
static void sha_block(struct sha256 *s, const uint8_t *p) {
    uint32_t w[64], a, b, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3]; e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d; s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}
static void sha_init(struct sha256 *s) {
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof iv);
    s->len = 0;
    s->n = 0;
}
static void sha_update(struct sha256 *s, const void *data, size_t len) {
    const uint8_t *p = data;
    s->len += len;
    while (len > 0) {
        size_t k = 64 - s->n < len ? 64 - s->n : len;
        memcpy(s->buf + s->n, p, k);
        s->n += k; p += k; len -= k;
        if (s->n == 64) { sha_block(s, s->buf); s->n = 0; }
    }
}
static void sha_final(struct sha256 *s, uint8_t out[32]) {
    uint64_t bits = s->len * 8;
    uint8_t pad = 0x80, z = 0, lenb[8];
    sha_update(s, &pad, 1);
    while (s->n != 56) sha_update(s, &z, 1);
    for (int i = 0; i < 8; i++) lenb[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha_update(s, lenb, 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24); out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8); out[4 * i + 3] = (uint8_t)s->h[i];
    }
}

/* ---------------- helpers ---------------- */
static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}
static void say(const char *s) { write_all(1, s, strlen(s)); }

static uint64_t random64(void) {
    uint64_t v;
    size_t got = 0;
    while (got < sizeof v) {
        ssize_t r = getrandom((char *)&v + got, sizeof v - got, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            say("netcheck getrandom failed\n");
            _exit(2);
        }
        got += (size_t)r;
    }
    return v;
}
static void hex(char *dst, const uint8_t *src, size_t n) {
    static const char d[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) { dst[2 * i] = d[src[i] >> 4]; dst[2 * i + 1] = d[src[i] & 15]; }
    dst[2 * n] = 0;
}

/* ---------------- one connection ---------------- */
/* The state a rollback must rewind: it lives in this process's memory. */
static struct {
    int fd;
    uint64_t counter;
    uint8_t chain[32];
    char id[17];
    struct sockaddr_in peer;
    /* S request in progress: payload bytes still to read, its seq and size. */
    unsigned long long sink_left, sink_total;
    char sink_seq[21];
} C;

static int send_record(char type, const char *seq, const char *x) {
    char line[512], nonce[17];
    uint64_t nv = random64();
    hex(nonce, (const uint8_t *)&nv, 8);
    int n = snprintf(line, sizeof line, "%c %llu %s %s %s", type, (unsigned long long)C.counter, seq, nonce, x);
    if (n < 0 || (size_t)n + 66 >= sizeof line) return -1;
    struct sha256 s;
    sha_init(&s);
    sha_update(&s, C.chain, 32);
    sha_update(&s, line, (size_t)n);
    sha_final(&s, C.chain);
    line[n++] = ' ';
    hex(line + n, C.chain, 32);
    n += 64;
    line[n++] = '\n';
    C.counter++;
    return write_all(C.fd, line, (size_t)n);
}

/* A decimal token of at most 20 digits. */
static int is_num(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 20) return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}
static int is_token(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 64) return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= ' ' || s[i] > '~') return 0;
    return 1;
}

static char payload[65536];

/* ---------------- sink (S): bulk client -> guest ---------------- */
static char sinkbuf[65536];

/* Parses an S request; the payload is consumed by sink_payload() from the serve loop. */
static int sink_request(int argc, char **argv) {
    const char *seq = argv[1];
    if (argc != 3 || !is_num(argv[2])) return send_record('E', seq, "bad-sink");
    C.sink_total = C.sink_left = strtoull(argv[2], NULL, 10);
    snprintf(C.sink_seq, sizeof C.sink_seq, "%s", seq);
    if (C.sink_left == 0) return send_record('R', seq, "0");
    return 0;
}

/*
 * Payload of the S request being served: first what the line buffer already holds after
 * the request line (*start up to end), then straight from the socket into a 64 KiB
 * buffer (the line buffer would cost a read(2) per 4 KiB). Discards the bytes (counted
 * only) and sends the R record once all arrived.
 */
static int sink_payload(char **start, char *end) {
    size_t avail = (size_t)(end - *start);
    size_t k = avail < C.sink_left ? avail : (size_t)C.sink_left;
    *start += k;
    C.sink_left -= k;
    while (C.sink_left > 0) {
        size_t want = C.sink_left < sizeof sinkbuf ? (size_t)C.sink_left : sizeof sinkbuf;
        ssize_t r = read(C.fd, sinkbuf, want);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        C.sink_left -= (size_t)r;
    }
    char x[24];
    snprintf(x, sizeof x, "%llu", C.sink_total);
    return send_record('R', C.sink_seq, x);
}

/* ---------------- raw frames (F): a hostile guest's runts and maximal frames ---------------- */
static uint8_t framebuf[65536];

/* The name of the interface holding the connection's local address, or -1. */
static int local_ifname(char name[IF_NAMESIZE]) {
    struct sockaddr_in me;
    socklen_t ml = sizeof me;
    if (getsockname(C.fd, (struct sockaddr *)&me, &ml) < 0) return -1;
    char buf[4096];
    struct ifconf ic = {.ifc_len = sizeof buf, .ifc_buf = buf};
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) return -1;
    int found = -1;
    if (ioctl(s, SIOCGIFCONF, &ic) == 0)
        for (struct ifreq *r = ic.ifc_req; (char *)r < buf + ic.ifc_len; r++)
            if (((struct sockaddr_in *)&r->ifr_addr)->sin_addr.s_addr == me.sin_addr.s_addr) {
                snprintf(name, IF_NAMESIZE, "%s", r->ifr_name);
                found = 0;
                break;
            }
    close(s);
    return found;
}

static int frames_request(int argc, char **argv) {
    const char *seq = argv[1];
    if (argc != 4 || !is_num(argv[2]) || !is_num(argv[3])) return send_record('E', seq, "bad-frames");
    unsigned long count = strtoul(argv[2], NULL, 10), size = strtoul(argv[3], NULL, 10);
    if (size < ETH_HLEN || size > 65535 || count > 1000000) return send_record('E', seq, "bad-frames");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (local_ifname(ifr.ifr_name) < 0) return send_record('E', seq, "frames-ifname");
    int ps = socket(AF_PACKET, SOCK_RAW, 0);
    if (ps < 0) return send_record('E', seq, "frames-socket");
    struct ifreq q = ifr;
    if (ioctl(ps, SIOCGIFINDEX, &q) < 0) { close(ps); return send_record('E', seq, "frames-ifindex"); }
    int ifindex = q.ifr_ifindex;
    q = ifr;
    if (ioctl(ps, SIOCGIFHWADDR, &q) < 0) { close(ps); return send_record('E', seq, "frames-hwaddr"); }
    uint8_t mac[6];
    memcpy(mac, q.ifr_hwaddr.sa_data, 6);
    q = ifr;
    if (ioctl(ps, SIOCGIFMTU, &q) < 0) { close(ps); return send_record('E', seq, "frames-mtu"); }
    int mtu0 = q.ifr_mtu, mtu = mtu0;
    if (size - ETH_HLEN > (unsigned long)mtu0) {
        q = ifr;
        q.ifr_mtu = (int)(size - ETH_HLEN);
        if (ioctl(ps, SIOCSIFMTU, &q) < 0) { close(ps); return send_record('E', seq, "frames-setmtu"); }
        mtu = q.ifr_mtu;
    }
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = ifindex, .sll_halen = 6};
    memset(to.sll_addr, 0xff, 6);
    unsigned long sent = 0, failed = 0;
    for (unsigned long i = 0; i < count; i++) {
        memset(framebuf, 0xff, 6);
        memcpy(framebuf + 6, mac, 6);
        framebuf[12] = 0x88;
        framebuf[13] = 0xb5;
        char tag[96];
        int h = snprintf(tag, sizeof tag, "f %s %s %lu %lu ", C.id, seq, i, count);
        size_t room = size - ETH_HLEN;
        memset(framebuf + ETH_HLEN, '.', room);
        memcpy(framebuf + ETH_HLEN, tag, (size_t)h < room ? (size_t)h : room);
        for (;;) {
            ssize_t w = sendto(ps, framebuf, size, 0, (struct sockaddr *)&to, sizeof to);
            if (w == (ssize_t)size) { sent++; break; }
            if (w < 0 && (errno == EINTR || errno == ENOBUFS || errno == EAGAIN)) { if (errno != EINTR) usleep(1000); continue; }
            failed++;
            break;
        }
    }
    if (mtu != mtu0) {
        q = ifr;
        q.ifr_mtu = mtu0;
        ioctl(ps, SIOCSIFMTU, &q);
    }
    close(ps);
    char msg[160];
    snprintf(msg, sizeof msg, "netcheck frames seq=%s size=%lu sent=%lu failed=%lu mtu=%d\n", seq, size, sent, failed, mtu);
    say(msg);
    char x[24];
    snprintf(x, sizeof x, "%lu", sent);
    return send_record('W', seq, x);
}

static int handle(char *line) {
    char *argv[6];
    int argc = 0;
    for (char *save = NULL, *t = strtok_r(line, " ", &save); t && argc < 6; t = strtok_r(NULL, " ", &save)) argv[argc++] = t;
    if (argc < 2 || strlen(argv[0]) != 1 || !is_num(argv[1])) return send_record('E', "0", "bad-request");
    const char *seq = argv[1];
    switch (argv[0][0]) {
    case 'Q':
        if (argc != 3 || !is_token(argv[2])) return send_record('E', seq, "bad-query");
        return send_record('A', seq, argv[2]);
    case 'B': {
        if (argc != 3 || !is_num(argv[2])) return send_record('E', seq, "bad-bulk");
        unsigned long long n = strtoull(argv[2], NULL, 10);
        if (send_record('D', seq, argv[2]) < 0) return -1;
        while (n > 0) {
            size_t k = n < sizeof payload ? (size_t)n : sizeof payload;
            if (write_all(C.fd, payload, k) < 0) return -1;
            n -= k;
        }
        return 0;
    }
    case 'U': {
        if (argc != 5 || !is_num(argv[2]) || !is_num(argv[3]) || !is_num(argv[4])) return send_record('E', seq, "bad-udp");
        unsigned long port = strtoul(argv[2], NULL, 10), count = strtoul(argv[3], NULL, 10), size = strtoul(argv[4], NULL, 10);
        if (port == 0 || port > 65535 || size < 64 || size > 1400 || count > 10000000) return send_record('E', seq, "bad-udp");
        int u = socket(AF_INET, SOCK_DGRAM, 0);
        if (u < 0) return send_record('E', seq, "udp-socket");
        struct sockaddr_in to = C.peer;
        to.sin_port = htons((uint16_t)port);
        /* Without IP_RECVERR Linux reports a datagram dropped by a full device queue
         * (qdisc) as sent (sendto returns its size, only Udp SndbufErrors counts it);
         * with it, sendto fails with ENOBUFS and the datagram is sent again below. */
        int on = 1;
        setsockopt(u, IPPROTO_IP, IP_RECVERR, &on, sizeof on);
        char dg[1400];
        unsigned long sent = 0, retries = 0, failed = 0;
        for (unsigned long i = 0; i < count; i++) {
            int h = snprintf(dg, sizeof dg, "u %s %s %lu %lu ", C.id, seq, i, count);
            memset(dg + h, '.', size - (size_t)h);
            /* Blocking send: a full socket buffer (the NIC not taking frames) blocks here. */
            for (;;) {
                ssize_t w = sendto(u, dg, size, 0, (struct sockaddr *)&to, sizeof to);
                if (w == (ssize_t)size) { sent++; break; }
                if (w < 0 && (errno == EINTR || errno == ENOBUFS || errno == EAGAIN)) {
                    if (errno != EINTR) { retries++; usleep(1000); }
                    continue;
                }
                failed++;
                break;
            }
        }
        close(u);
        char msg[160];
        snprintf(msg, sizeof msg, "netcheck udp seq=%s sent=%lu retries=%lu failed=%lu\n", seq, sent, retries, failed);
        say(msg);
        char x[24];
        snprintf(x, sizeof x, "%lu", sent);
        return send_record('V', seq, x);
    }
    case 'S':
        return sink_request(argc, argv);
    case 'F':
        return frames_request(argc, argv);
    default:
        return send_record('E', seq, "unknown");
    }
}

static void serve(int fd, struct sockaddr_in peer) {
    C.fd = fd;
    C.peer = peer;
    C.counter = 0;
    memset(C.chain, 0, sizeof C.chain);
    uint64_t id = random64();
    hex(C.id, (const uint8_t *)&id, 8);
    char msg[128];
    snprintf(msg, sizeof msg, "netcheck conn id=%s peer=%s:%u\n", C.id, inet_ntoa(peer.sin_addr), ntohs(peer.sin_port));
    say(msg);
    for (size_t i = 0; i < sizeof payload; i++) payload[i] = (char)('a' + i % 26);
    if (send_record('H', "0", C.id) < 0) _exit(0);
    static char in[4096];
    size_t have = 0;
    for (;;) {
        ssize_t r = read(fd, in + have, sizeof in - have);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        have += (size_t)r;
        char *start = in, *nl;
        while ((nl = memchr(start, '\n', have - (size_t)(start - in))) != NULL) {
            *nl = 0;
            if (handle(start) < 0) goto done;
            start = nl + 1;
            if (C.sink_left > 0 && sink_payload(&start, in + have) < 0) goto done;
        }
        have -= (size_t)(start - in);
        memmove(in, start, have);
        if (have == sizeof in) { send_record('E', "0", "line-too-long"); break; }
    }
done:
    snprintf(msg, sizeof msg, "netcheck conn id=%s closed records=%llu\n", C.id, (unsigned long long)C.counter);
    say(msg);
    _exit(0);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7000;
    if (port <= 0 || port > 65535) { say("usage: netcheck <port>\n"); return 2; }
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 16) < 0) { say("netcheck bind/listen failed\n"); return 1; }
    char msg[64];
    snprintf(msg, sizeof msg, "netcheck listening port=%d\n", port);
    say(msg);
    for (;;) {
        struct sockaddr_in peer;
        socklen_t pl = sizeof peer;
        int fd = accept(ls, (struct sockaddr *)&peer, &pl);
        if (fd < 0) continue;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pid_t p = fork();
        if (p == 0) { close(ls); serve(fd, peer); }
        close(fd);
    }
}
