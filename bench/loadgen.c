/*
 * loadgen: the load generator of sockproto's benchmark harness.
 *
 * Written in C so that the generator is never what limits a measurement: one
 * thread on epoll drives hundreds of thousands of round trips a second, several
 * times what any of the Python servers under test can answer.  The harness
 * compiles it with gcc at bench time (bench/loadgen.py) and reads the one JSON
 * line it prints.
 *
 *   loadgen strip HOST PORT CONNS DEPTH SECONDS WARMUP
 *       CONNS connections each keep DEPTH lines in flight (1: not pipelined)
 *       against a strip-whitespace server; reports round trips/s, p50/p99.
 *   loadgen udp HOST PORT SOURCES WINDOW SECONDS WARMUP
 *       SOURCES sockets (each bound to its own 127.0.x.y address when more
 *       than one) keep WINDOW datagrams in flight; reports answers/s.
 *   loadgen chat HOST PORT CLIENTS SENDERS WINDOW SECONDS WARMUP NONREADER
 *       CLIENTS connect to a chat room; SENDERS of them each keep WINDOW lines
 *       in flight (as seen by one observing client); NONREADER (0/1) adds one
 *       client that never reads.  Reports deliveries/s and delivery latency.
 *   loadgen serve PORT [udp|chat]
 *       A C strip server (LF -> NUL, whitespace dropped), with "udp" a C
 *       daytime-style UDP responder, with "chat" a C chat room: the
 *       references that show how fast the generator itself can go.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 512

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL, 0);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) die("fcntl");
}

static struct sockaddr_in address(const char *host, int port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "loadgen: not an IPv4 address: %s\n", host);
        exit(2);
    }
    return sa;
}

/* Blocking connect (the listen backlog then paces us), then non-blocking. */
static int tcp_connect(const struct sockaddr_in *sa, int rcvbuf) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) < 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    set_nonblocking(fd);
    return fd;
}

/* ---- latency samples ------------------------------------------------------ */

typedef struct {
    uint32_t *v; /* nanoseconds, saturated at ~4.29 s */
    size_t n, cap;
} samples_t;

#define MAX_SAMPLES (32u * 1024u * 1024u)

static void sample_add(samples_t *s, uint64_t ns) {
    if (s->n == s->cap) {
        if (s->cap >= MAX_SAMPLES) { /* enough: keep every other from here on */
            s->v[(s->n++ / 2) % s->cap] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
            return;
        }
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) die("realloc");
    }
    s->v[s->n++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile in microseconds; -1 when there are no samples. */
static double percentile_us(samples_t *s, double p) {
    size_t n = s->n < s->cap ? s->n : s->cap;
    if (n == 0) return -1;
    size_t rank = (size_t)(p / 100.0 * (double)n);
    if (rank >= n) rank = n - 1;
    return s->v[rank] / 1000.0;
}

static void sort_samples(samples_t *s) {
    size_t n = s->n < s->cap ? s->n : s->cap;
    if (n) qsort(s->v, n, sizeof *s->v, cmp_u32);
}

/* ---- output buffer per connection ---------------------------------------- */

typedef struct {
    char *data;
    size_t len, cap;
} outbuf_t;

static void out_append(outbuf_t *o, const char *data, size_t len) {
    if (o->len + len > o->cap) {
        o->cap = (o->len + len) * 2;
        o->data = realloc(o->data, o->cap);
        if (!o->data) die("realloc");
    }
    memcpy(o->data + o->len, data, len);
    o->len += len;
}

/* Writes what it can; returns -1 when the peer is gone. */
static int out_flush(int fd, outbuf_t *o) {
    while (o->len) {
        ssize_t n = send(fd, o->data, o->len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            if (errno == EINTR) continue;
            return -1;
        }
        memmove(o->data, o->data + n, o->len - (size_t)n);
        o->len -= (size_t)n;
    }
    return 0;
}

static void watch(int ep, int fd, uint32_t events, uint64_t tag, int op) {
    struct epoll_event ev = {.events = events, .data.u64 = tag};
    if (epoll_ctl(ep, op, fd, &ev) < 0) die("epoll_ctl");
}

/* ---- strip ---------------------------------------------------------------- */

static const char STRIP_LINE[] = "hello world bench\n";
#define STRIP_ANSWER_LEN 15 /* "helloworldbench" */

typedef struct {
    int fd;
    uint64_t *sent; /* ring of send times, DEPTH long */
    int head, inflight;
    int answer_len;
    int want_out;
    outbuf_t out;
} strip_conn_t;

static int run_strip(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: loadgen strip HOST PORT CONNS DEPTH SECONDS WARMUP\n");
        return 2;
    }
    struct sockaddr_in sa = address(argv[2], atoi(argv[3]));
    int conns = atoi(argv[4]), depth = atoi(argv[5]);
    double seconds = atof(argv[6]), warmup = atof(argv[7]);
    if (conns < 1 || depth < 1 || seconds <= 0) return 2;

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    strip_conn_t *c = calloc((size_t)conns, sizeof *c);
    for (int i = 0; i < conns; i++) {
        c[i].fd = tcp_connect(&sa, 0);
        c[i].sent = calloc((size_t)depth, sizeof *c[i].sent);
        watch(ep, c[i].fd, EPOLLIN, (uint64_t)i, EPOLL_CTL_ADD);
    }
    samples_t lat = {0};
    uint64_t start = now_ns();
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
    uint64_t end = measure_from + (uint64_t)(seconds * 1e9);
    uint64_t ops = 0, errors = 0, closed = 0;
    size_t line_len = sizeof STRIP_LINE - 1;

    for (int i = 0; i < conns; i++) {
        for (int k = 0; k < depth; k++) {
            c[i].sent[(c[i].head + c[i].inflight) % depth] = start;
            c[i].inflight++;
            out_append(&c[i].out, STRIP_LINE, line_len);
        }
        if (out_flush(c[i].fd, &c[i].out) < 0) closed++;
    }

    static char buf[65536];
    struct epoll_event events[MAX_EVENTS];
    uint64_t t = start;
    while (t < end) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 10);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        t = now_ns();
        for (int e = 0; e < n; e++) {
            strip_conn_t *k = &c[events[e].data.u64];
            if (k->fd < 0) continue;
            if (events[e].events & EPOLLOUT) {
                if (out_flush(k->fd, &k->out) < 0) goto gone;
            }
            if (!(events[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) goto rearm;
            ssize_t got = recv(k->fd, buf, sizeof buf, 0);
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) goto gone;
            if (got < 0) continue;
            int answered = 0;
            for (ssize_t j = 0; j < got; j++) {
                if (buf[j] != 0) {
                    k->answer_len++;
                    continue;
                }
                if (k->answer_len != STRIP_ANSWER_LEN) errors++;
                k->answer_len = 0;
                if (k->inflight == 0) {
                    errors++;
                    continue;
                }
                if (t >= measure_from && t < end) {
                    ops++;
                    sample_add(&lat, t - k->sent[k->head]);
                }
                k->head = (k->head + 1) % depth;
                k->inflight--;
                answered++;
            }
            if (answered && t < end) {
                while (k->inflight < depth) {
                    k->sent[(k->head + k->inflight) % depth] = t;
                    k->inflight++;
                    out_append(&k->out, STRIP_LINE, line_len);
                }
                if (out_flush(k->fd, &k->out) < 0) goto gone;
            }
        rearm:
            if ((k->out.len > 0) != k->want_out) {
                k->want_out = k->out.len > 0;
                watch(ep, k->fd, EPOLLIN | (k->want_out ? EPOLLOUT : 0), events[e].data.u64, EPOLL_CTL_MOD);
            }
            continue;
        gone:
            closed++;
            close(k->fd);
            k->fd = -1;
        }
    }
    sort_samples(&lat);
    printf("{\"mode\": \"strip\", \"ops\": %llu, \"seconds\": %.6f, \"rate\": %.1f, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f, \"errors\": %llu, \"closed\": %llu}\n",
           (unsigned long long)ops, seconds, ops / seconds, percentile_us(&lat, 50), percentile_us(&lat, 99),
           (unsigned long long)errors, (unsigned long long)closed);
    return 0;
}

/* ---- udp ------------------------------------------------------------------ */

typedef struct {
    int fd;
    int inflight;
    uint64_t last_answer;
} udp_source_t;

static int run_udp(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: loadgen udp HOST PORT SOURCES WINDOW SECONDS WARMUP\n");
        return 2;
    }
    struct sockaddr_in sa = address(argv[2], atoi(argv[3]));
    int sources = atoi(argv[4]), window = atoi(argv[5]);
    double seconds = atof(argv[6]), warmup = atof(argv[7]);
    if (sources < 1 || sources > 250 * 250 || window < 1 || seconds <= 0) return 2;

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    udp_source_t *s = calloc((size_t)sources, sizeof *s);
    for (int i = 0; i < sources; i++) {
        s[i].fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (s[i].fd < 0) die("socket");
        if (sources > 1) { /* one loopback address per source: 127.0.1.1, 127.0.1.2, ... */
            struct sockaddr_in own;
            memset(&own, 0, sizeof own);
            own.sin_family = AF_INET;
            own.sin_addr.s_addr = htonl((127u << 24) | ((uint32_t)(1 + i / 250) << 8) | (uint32_t)(1 + i % 250));
            if (bind(s[i].fd, (struct sockaddr *)&own, sizeof own) < 0) die("bind");
        }
        if (connect(s[i].fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
        set_nonblocking(s[i].fd);
        watch(ep, s[i].fd, EPOLLIN, (uint64_t)i, EPOLL_CTL_ADD);
    }
    static const char ping[] = "Ping !";
    uint64_t start = now_ns();
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
    uint64_t end = measure_from + (uint64_t)(seconds * 1e9);
    uint64_t answers = 0, lost = 0, sent = 0;
    for (int i = 0; i < sources; i++) {
        for (int k = 0; k < window; k++)
            if (send(s[i].fd, ping, sizeof ping - 1, 0) > 0) sent++;
        s[i].inflight = window;
        s[i].last_answer = start;
    }
    static char buf[65536];
    struct epoll_event events[MAX_EVENTS];
    uint64_t t = start, last_check = start;
    while (t < end) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 5);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        t = now_ns();
        for (int e = 0; e < n; e++) {
            udp_source_t *k = &s[events[e].data.u64];
            for (;;) {
                ssize_t got = recv(k->fd, buf, sizeof buf, 0);
                if (got < 0) break;
                k->last_answer = t;
                if (t >= measure_from && t < end) answers++;
                if (k->inflight > 0) k->inflight--;
                if (t < end && send(k->fd, ping, sizeof ping - 1, 0) > 0) {
                    k->inflight++;
                    sent++;
                }
            }
        }
        /* A datagram lost (a full socket buffer) would shrink the window for
           good: a source silent for 50 ms starts its window again. */
        if (t - last_check > 20000000u) {
            last_check = t;
            for (int i = 0; i < sources; i++) {
                if (t - s[i].last_answer < 50000000u || t >= end) continue;
                lost += (uint64_t)s[i].inflight;
                s[i].inflight = 0;
                s[i].last_answer = t;
                for (int k = 0; k < window; k++)
                    if (send(s[i].fd, ping, sizeof ping - 1, 0) > 0) {
                        s[i].inflight++;
                        sent++;
                    }
            }
        }
    }
    printf("{\"mode\": \"udp\", \"ops\": %llu, \"seconds\": %.6f, \"rate\": %.1f, \"sent\": %llu, "
           "\"lost\": %llu, \"errors\": 0, \"closed\": 0}\n",
           (unsigned long long)answers, seconds, answers / seconds, (unsigned long long)sent,
           (unsigned long long)lost);
    return 0;
}

/* ---- chat ----------------------------------------------------------------- */

#define CHAT_LINE_MAX 8192
#define JOIN_BATCH 8 /* clients connecting at once: below ncat's listen backlog */

typedef struct {
    int fd;
    char in[CHAT_LINE_MAX];
    size_t in_len;
    uint64_t next_seq; /* senders: next sequence number to send */
    int greeted;       /* the server has sent it something */
    int want_out;
    outbuf_t out;
} chat_client_t;

typedef struct {
    chat_client_t *c;
    int clients, senders, window;
    int observer;
    uint64_t *seen; /* per sender: the highest sequence number the observer got */
    unsigned run;
    uint64_t measure_from, end;
    uint64_t deliveries, sent, errors, closed;
    samples_t lat;
    int ep;
    int filling;         /* before measuring: fill the non-reader's buffers */
    uint64_t fill_bytes; /* sent to each client while filling */
} chat_t;

/* Enough to fill a non-reader's socket buffers (the kernel's send buffer
   autotunes up to a few MiB on loopback) and pass sockproto's 1 MiB cap. */
#define FILL_TARGET (6u * 1024u * 1024u)
#define FILL_PAD 3000

static void chat_fill(chat_t *ch, int i, uint64_t t) {
    chat_client_t *k = &ch->c[i];
    static char line[FILL_PAD + 256];
    while (k->next_seq - ch->seen[i] < (uint64_t)ch->window && t < ch->end) {
        if (ch->filling && ch->fill_bytes >= FILL_TARGET) return;
        int len = snprintf(line, 256, "~B %u %d %llu %llu the quick brown fox jumps", ch->run, i,
                           (unsigned long long)k->next_seq, (unsigned long long)t);
        if (ch->filling) {
            memset(line + len, 'x', FILL_PAD);
            len += FILL_PAD;
            ch->fill_bytes += (uint64_t)len + 1;
        }
        line[len++] = '\n';
        out_append(&k->out, line, (size_t)len);
        k->next_seq++;
        ch->sent++;
    }
}

/* A decimal number at *p, moving *p past it; -1 when there is none. */
static int parse_number(const char **p, const char *end, unsigned long long *value) {
    const char *q = *p;
    unsigned long long v = 0;
    while (q < end && *q == ' ') q++;
    const char *digits = q;
    while (q < end && *q >= '0' && *q <= '9') v = v * 10 + (unsigned long long)(*q++ - '0');
    if (q == digits) return -1;
    *p = q;
    *value = v;
    return 0;
}

/* Parsed by hand: sscanf cost the generator more than the server's work. */
static void chat_line(chat_t *ch, int reader, const char *line, size_t len, uint64_t t) {
    const char *m = memmem(line, len, "~B ", 3);
    if (!m) return;
    const char *p = m + 3, *end = line + len;
    unsigned long long fields[4];
    for (int f = 0; f < 4; f++)
        if (parse_number(&p, end, &fields[f]) < 0) {
            ch->errors++;
            return;
        }
    unsigned run = (unsigned)fields[0];
    int sender = fields[1] > (unsigned long long)ch->senders ? -1 : (int)fields[1];
    unsigned long long seq = fields[2], stamp = fields[3];
    if (run != ch->run || sender < 0 || sender >= ch->senders) return; /* history from an earlier run */
    if (t >= ch->measure_from && t < ch->end) {
        ch->deliveries++;
        sample_add(&ch->lat, t - stamp);
    }
    if (reader == ch->observer && seq + 1 > ch->seen[sender]) {
        ch->seen[sender] = seq + 1;
        chat_fill(ch, sender, t);
        chat_client_t *s = &ch->c[sender];
        if (s->fd >= 0 && out_flush(s->fd, &s->out) < 0) ch->errors++;
        if (s->fd >= 0 && (s->out.len > 0) != s->want_out) {
            s->want_out = s->out.len > 0;
            watch(ch->ep, s->fd, EPOLLIN | (s->want_out ? EPOLLOUT : 0), (uint64_t)sender, EPOLL_CTL_MOD);
        }
    }
}

/* Reads what is there; returns -1 when the connection is gone. */
static int chat_read(chat_t *ch, int i, uint64_t t, int *got_any) {
    chat_client_t *k = &ch->c[i];
    for (;;) {
        ssize_t got = recv(k->fd, k->in + k->in_len, sizeof k->in - k->in_len, 0);
        if (got == 0) return -1;
        if (got < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        *got_any = 1;
        k->greeted = 1;
        k->in_len += (size_t)got;
        char *p = k->in, *end = k->in + k->in_len, *nl;
        while ((nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
            chat_line(ch, i, p, (size_t)(nl - p), t);
            p = nl + 1;
        }
        if (p == k->in && k->in_len == sizeof k->in) p = end; /* an over-long line: drop it */
        k->in_len = (size_t)(end - p);
        memmove(k->in, p, k->in_len);
    }
}

/* One wait: flushes what can go out, reads whatever came, notes when
   anything last came, and forgets connections that are gone. */
static void chat_pump(chat_t *ch, int timeout_ms, uint64_t *t, uint64_t *quiet_since) {
    struct epoll_event events[MAX_EVENTS];
    int n = epoll_wait(ch->ep, events, MAX_EVENTS, timeout_ms);
    if (n < 0 && errno != EINTR) die("epoll_wait");
    *t = now_ns();
    for (int e = 0; e < n; e++) {
        int i = (int)events[e].data.u64, got_any = 0;
        chat_client_t *k = &ch->c[i];
        if (k->fd < 0) continue;
        if (((events[e].events & EPOLLOUT) && out_flush(k->fd, &k->out) < 0) ||
            chat_read(ch, i, *t, &got_any) < 0) {
            ch->closed++;
            close(k->fd);
            k->fd = -1;
            continue;
        }
        if (got_any) *quiet_since = *t;
        if ((k->out.len > 0) != k->want_out) {
            k->want_out = k->out.len > 0;
            watch(ch->ep, k->fd, EPOLLIN | (k->want_out ? EPOLLOUT : 0), (uint64_t)i, EPOLL_CTL_MOD);
        }
    }
}

static int run_chat(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: loadgen chat HOST PORT CLIENTS SENDERS WINDOW SECONDS WARMUP NONREADER\n");
        return 2;
    }
    struct sockaddr_in sa = address(argv[2], atoi(argv[3]));
    chat_t ch;
    memset(&ch, 0, sizeof ch);
    ch.clients = atoi(argv[4]);
    ch.senders = atoi(argv[5]);
    ch.window = atoi(argv[6]);
    double seconds = atof(argv[7]), warmup = atof(argv[8]);
    int nonreader = atoi(argv[9]);
    if (ch.clients < 2 || ch.senders < 1 || ch.senders >= ch.clients || ch.window < 1 || seconds <= 0) return 2;
    ch.observer = ch.clients - 1;
    ch.run = (unsigned)(getpid() ^ (unsigned)now_ns());
    ch.seen = calloc((size_t)ch.senders, sizeof *ch.seen);
    ch.c = calloc((size_t)ch.clients, sizeof *ch.c);
    ch.ep = epoll_create1(0);
    if (ch.ep < 0) die("epoll_create1");

    uint64_t began = now_ns();
    int silent = -1;
    if (nonreader) silent = tcp_connect(&sa, 4096);
    /* Join the clients a few at a time, each batch once the server has
       greeted the one before (or after a second), reading everything
       meanwhile: a burst of connects overflows a small listen backlog (ncat's
       is small), and SYN retries would cost whole seconds that have nothing to
       do with the chat. */
    ch.measure_from = ch.end = UINT64_MAX;
    uint64_t t = now_ns(), quiet_since = t, join_limit = t + 30000000000ull;
    int joined = 0;
    while (joined < ch.clients && t < join_limit) {
        int first = joined, last = joined + JOIN_BATCH < ch.clients ? joined + JOIN_BATCH : ch.clients;
        for (int i = first; i < last; i++) {
            ch.c[i].fd = tcp_connect(&sa, 0);
            watch(ch.ep, ch.c[i].fd, EPOLLIN, (uint64_t)i, EPOLL_CTL_ADD);
        }
        joined = last;
        uint64_t greet_by = now_ns() + 1000000000ull;
        for (;;) {
            int waiting = 0;
            for (int i = first; i < last; i++) waiting += ch.c[i].fd >= 0 && !ch.c[i].greeted;
            if (!waiting || t >= greet_by || t >= join_limit) break;
            chat_pump(&ch, 10, &t, &quiet_since);
        }
    }
    double join_s = (double)(t - began) / 1e9;
    /* Then let the join announcements and history replays settle. */
    uint64_t settle_limit = t + 15000000000ull;
    while (t - quiet_since < 300000000u && t < settle_limit) chat_pump(&ch, 50, &t, &quiet_since);
    int settled = t < settle_limit && joined == ch.clients;
    double settle_s = (double)(t - began) / 1e9;
    double fill_s = 0;
    if (silent >= 0 && joined == ch.clients) {
        uint64_t fill_start = now_ns(), fill_by = fill_start + 4000000000ull;
        ch.filling = 1;
        chat_fill(&ch, 0, fill_start);
        if (out_flush(ch.c[0].fd, &ch.c[0].out) < 0) ch.errors++;
        while (t < fill_by && (ch.fill_bytes < FILL_TARGET || ch.c[0].next_seq > ch.seen[0]))
            chat_pump(&ch, 10, &t, &quiet_since);
        ch.filling = 0;
        fill_s = (double)(t - fill_start) / 1e9;
    }
    uint64_t start = now_ns();
    if (joined < ch.clients) seconds = warmup = 0; /* nothing fair to measure */
    ch.measure_from = start + (uint64_t)(warmup * 1e9);
    ch.end = ch.measure_from + (uint64_t)(seconds * 1e9);
    for (int i = 0; i < ch.senders; i++) {
        chat_fill(&ch, i, start);
        if (ch.c[i].fd >= 0 && out_flush(ch.c[i].fd, &ch.c[i].out) < 0) ch.errors++;
    }
    t = start;
    while (t < ch.end) chat_pump(&ch, 10, &t, &quiet_since);
    sort_samples(&ch.lat);
    printf("{\"mode\": \"chat\", \"ops\": %llu, \"seconds\": %.6f, \"rate\": %.1f, \"sent\": %llu, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f, \"errors\": %llu, \"closed\": %llu, "
           "\"joined\": %d, \"join_s\": %.3f, \"settle_s\": %.3f, \"settled\": %s, "
           "\"fill_s\": %.3f, \"filled_bytes\": %llu}\n",
           (unsigned long long)ch.deliveries, seconds, seconds > 0 ? ch.deliveries / seconds : 0.0, (unsigned long long)ch.sent,
           percentile_us(&ch.lat, 50), percentile_us(&ch.lat, 99), (unsigned long long)ch.errors,
           (unsigned long long)ch.closed, joined, join_s, settle_s, settled ? "true" : "false", fill_s,
           (unsigned long long)ch.fill_bytes);
    fflush(stdout);
    /* Leave politely: half-close, then read until the server closes too, so
       that no connection ends in a reset (ncat --chat quits when
       getpeername fails on a reset client). */
    for (int i = 0; i < ch.clients; i++)
        if (ch.c[i].fd >= 0) shutdown(ch.c[i].fd, SHUT_WR);
    if (silent >= 0) {
        shutdown(silent, SHUT_WR);
        set_nonblocking(silent);
    }
    uint64_t leave_by = now_ns() + 3000000000ull;
    ch.measure_from = ch.end = 0; /* count nothing more, send nothing more */
    for (;;) {
        int open_fds = 0;
        for (int i = 0; i < ch.clients; i++) open_fds += ch.c[i].fd >= 0;
        if (silent >= 0) {
            static char sink[65536];
            ssize_t got;
            while ((got = recv(silent, sink, sizeof sink, 0)) > 0) continue;
            if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(silent);
                silent = -1;
            }
        }
        if ((open_fds == 0 && silent < 0) || t >= leave_by) break;
        chat_pump(&ch, 50, &t, &quiet_since);
    }
    if (silent >= 0) close(silent);
    return 0;
}

/* ---- serve: the C reference strip server ---------------------------------- */

typedef struct {
    int fd;
    int want_out;
    outbuf_t out;
} serve_conn_t;

/* Answers every datagram with a fixed line as long as a daytime answer. */
static _Noreturn void run_serve_udp(const struct sockaddr_in *sa) {
    static const char answer[] = "Sun Nov 22 04:03:05 2026\r\n";
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    if (bind(fd, (const struct sockaddr *)sa, sizeof *sa) < 0) die("bind");
    static char buf[65536];
    for (;;) {
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t got = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (got < 0) {
            if (errno == EINTR) continue;
            die("recvfrom");
        }
        sendto(fd, answer, sizeof answer - 1, 0, (struct sockaddr *)&from, len);
    }
}

static int listen_on(const struct sockaddr_in *sa) {
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (lfd < 0) die("socket");
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (const struct sockaddr *)sa, sizeof *sa) < 0) die("bind");
    if (listen(lfd, 1024) < 0) die("listen");
    set_nonblocking(lfd);
    return lfd;
}

/* A chat room: greets each client with a line, then sends every complete
   line a client sends to all the others.  The lines of one epoll wait go
   out together, one send per client (as sockproto does with a reactor
   turn); output a client does not read waits in its buffer, unbounded. */
#define SERVE_CHAT_MAX 16384
typedef struct {
    int fd, want_out;
    char in[65536];
    size_t in_len;
    outbuf_t out;
} room_client_t;

/* EPOLLOUT is level-triggered: left on once the buffer is empty, it fires
   on every wait and the room spins. */
static void room_want_out(int ep, room_client_t *k, int index) {
    if ((k->out.len > 0) != k->want_out) {
        k->want_out = k->out.len > 0;
        watch(ep, k->fd, EPOLLIN | (k->want_out ? EPOLLOUT : 0), (uint64_t)index, EPOLL_CTL_MOD);
    }
}

static _Noreturn void run_serve_chat(const struct sockaddr_in *sa) {
    static const char greeting[] = "*** welcome to the C reference room\r\n";
    int lfd = listen_on(sa), one = 1;
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    watch(ep, lfd, EPOLLIN, UINT64_MAX, EPOLL_CTL_ADD);
    static room_client_t *clients[SERVE_CHAT_MAX];
    static int free_slots[SERVE_CHAT_MAX]; /* of clients that left */
    int free_count = 0;
    static int senders[MAX_EVENTS];
    static size_t starts[MAX_EVENTS + 1];
    int count = 0;
    outbuf_t turn = {0};
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        int said = 0;
        turn.len = 0;
        for (int e = 0; e < n; e++) {
            if (events[e].data.u64 == UINT64_MAX) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int slot = free_count ? free_slots[--free_count] : count;
                    if (slot == SERVE_CHAT_MAX) {
                        close(fd);
                        continue;
                    }
                    if (slot == count) count++;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    room_client_t *k = calloc(1, sizeof *k);
                    k->fd = fd;
                    clients[slot] = k;
                    watch(ep, fd, EPOLLIN, (uint64_t)slot, EPOLL_CTL_ADD);
                    out_append(&k->out, greeting, sizeof greeting - 1);
                    out_flush(fd, &k->out);
                }
                continue;
            }
            int index = (int)events[e].data.u64;
            room_client_t *k = clients[index];
            if (!k) continue;
            ssize_t got = 0;
            if (!(events[e].events & EPOLLOUT) || out_flush(k->fd, &k->out) == 0) {
                room_want_out(ep, k, index); /* a turn where nobody speaks has no fan-out to do it */
                got = recv(k->fd, k->in + k->in_len, sizeof k->in - k->in_len, 0);
            }
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (got <= 0) { /* gone: close it too (a probe waits for that) */
                close(k->fd);
                free(k->out.data);
                free(k);
                clients[index] = NULL;
                free_slots[free_count++] = index;
                continue;
            }
            k->in_len += (size_t)got;
            char *last = memrchr(k->in, '\n', k->in_len);
            if (!last) {
                if (k->in_len == sizeof k->in) k->in_len = 0; /* an over-long line: dropped */
                continue;
            }
            size_t whole = (size_t)(last - k->in) + 1;
            senders[said] = index;
            starts[said++] = turn.len;
            out_append(&turn, k->in, whole);
            memmove(k->in, k->in + whole, k->in_len - whole);
            k->in_len -= whole;
        }
        starts[said] = turn.len;
        for (int i = 0; said && i < count; i++) {
            room_client_t *k = clients[i];
            if (!k) continue;
            int own = 0;
            for (int j = 0; j < said; j++) own |= senders[j] == i;
            if (!own)
                out_append(&k->out, turn.data, turn.len);
            else
                for (int j = 0; j < said; j++)
                    if (senders[j] != i) out_append(&k->out, turn.data + starts[j], starts[j + 1] - starts[j]);
            out_flush(k->fd, &k->out);
            room_want_out(ep, k, i);
        }
    }
}

static int run_serve(int argc, char **argv) {
    int udp = argc == 4 && strcmp(argv[3], "udp") == 0, chat = argc == 4 && strcmp(argv[3], "chat") == 0;
    if (argc != 3 && !udp && !chat) {
        fprintf(stderr, "usage: loadgen serve PORT [udp|chat]\n");
        return 2;
    }
    struct sockaddr_in sa = address("127.0.0.1", atoi(argv[2]));
    if (udp) run_serve_udp(&sa);
    if (chat) run_serve_chat(&sa);
    int lfd = listen_on(&sa), one = 1;
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    watch(ep, lfd, EPOLLIN, UINT64_MAX, EPOLL_CTL_ADD);
    size_t cap = 1024;
    serve_conn_t **conns = calloc(cap, sizeof *conns);
    static char in[65536], out[65536];
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            if (events[e].data.u64 == UINT64_MAX) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    if ((size_t)fd >= cap) {
                        size_t bigger = (size_t)fd * 2;
                        conns = realloc(conns, bigger * sizeof *conns);
                        memset(conns + cap, 0, (bigger - cap) * sizeof *conns);
                        cap = bigger;
                    }
                    conns[fd] = calloc(1, sizeof **conns);
                    conns[fd]->fd = fd;
                    watch(ep, fd, EPOLLIN, (uint64_t)fd, EPOLL_CTL_ADD);
                }
                continue;
            }
            serve_conn_t *k = conns[events[e].data.u64];
            if ((events[e].events & EPOLLOUT) && out_flush(k->fd, &k->out) < 0) goto gone;
            for (;;) {
                ssize_t got = recv(k->fd, in, sizeof in, 0);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) goto gone;
                if (got < 0) break;
                size_t m = 0;
                for (ssize_t j = 0; j < got; j++) {
                    char b = in[j];
                    if (b == ' ' || b == '\t' || b == '\r') continue;
                    out[m++] = b == '\n' ? '\0' : b;
                }
                out_append(&k->out, out, m);
                if (out_flush(k->fd, &k->out) < 0) goto gone;
            }
            if ((k->out.len > 0) != k->want_out) {
                k->want_out = k->out.len > 0;
                watch(ep, k->fd, EPOLLIN | (k->want_out ? EPOLLOUT : 0), (uint64_t)k->fd, EPOLL_CTL_MOD);
            }
            continue;
        gone:
            conns[k->fd] = NULL;
            close(k->fd);
            free(k->out.data);
            free(k);
        }
    }
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    if (argc >= 2 && strcmp(argv[1], "strip") == 0) return run_strip(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "udp") == 0) return run_udp(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "chat") == 0) return run_chat(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "serve") == 0) return run_serve(argc, argv);
    fprintf(stderr, "usage: loadgen strip|udp|chat|serve ... (see the comment at the top of loadgen.c)\n");
    return 2;
}
