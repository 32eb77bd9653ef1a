/*
 * Pairs: the bytes of a proxied TCP connection, carried in C.
 *
 * A pair starts one of two ways. `dial`: the worker accepted the client here
 * (`listen`, `accept`), chose its backend in JavaScript, and this connects to
 * it (timeout included); a failed connect hands the client back to JavaScript
 * to try the next backend. `join`: JavaScript accepted and dialled with Node's
 * sockets and hands both over; each is duplicated and the JavaScript sockets
 * are destroyed.
 *
 * Every pair's descriptors sit in one epoll set of this module, registered
 * once, edge-triggered, for reading and writing: libuv polls that set's
 * descriptor, and nothing is re-armed as a pair's needs change (with libuv's
 * own poll handles, a connection cost some fifteen epoll_ctl calls). A side
 * is `readable` from an edge until a read finds nothing more, `writable`
 * from an edge until a write is refused. A read goes into one shared scratch
 * buffer and straight to the other side; only what a full socket buffer
 * refuses is kept (per side, and that side's reader then waits:
 * backpressure). A side whose read filled the scratch buffer is bulk: its
 * bytes are then spliced through a pipe to the other side, never copied
 * through this process (what the destination refuses waits in the pipe).
 * A flow holds a pipe only while it moves; empty pipes are kept for the
 * next, and past MAX_PIPES a flow is copied as before. Half-close passes through (an EOF shuts the other side's
 * write side once its queue is out); an error on either side closes both.
 * A pair that used its turn's reads with more to read goes on a ready list,
 * run in libuv's idle phase, so one busy pair does not hold up the others.
 *
 * The pair's callback gets (event, a, b): CONNECTED (1) when a dial's connect
 * succeeded; FAILED (-errno) when it did not, and the client descriptor is
 * the caller's again; ENDED (0, bytes to the backend, bytes to the client)
 * when both sides are closed. ENDED or FAILED comes once, last, from the idle
 * phase (never from inside `cut`).
 *
 * Invariants: a pair is freed only after its last callback ran and its timer
 * closed; JavaScript drops its handle in that callback, so `cut` never sees a
 * freed pair. An epoll registration lasts while any descriptor of its
 * socket is open, so a pair's descriptors leave the set before they are
 * closed wherever another may share the socket: join's duplicates (a relay's
 * client is still open in the worker that sent it until that send is done).
 * Dial's are the module's own (from accept4 and socket, close-on-exec,
 * which a child has applied before uv_spawn returns): their close is enough,
 * and saves a syscall per descriptor.
 */
#define _GNU_SOURCE
#include <node_api.h>
#include <uv.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include "native.h"

#define SCRATCH 65536
/* Reads per pair per turn before the others get theirs. */
#define READS_PER_TURN 4
/* Connections accepted per readable event of a listening socket. */
#define ACCEPTS_PER_TURN 64
/* Events taken from the epoll set per readable event of it. */
#define EVENTS_PER_TURN 256
/* Pipes for splicing: at most MAX_PIPES at once (two descriptors each), SPARE_PIPES of them kept empty for reuse. */
#define MAX_PIPES 1024
#define SPARE_PIPES 64
#define PIPE_BYTES (256 * 1024)

enum { ENDED = 0, CONNECTED = 1 };

static char scratch[SCRATCH];

typedef struct Pair Pair;
typedef struct Side {
  int fd;
  Pair *pair;
  struct Side *peer;
  char *queued;     /* bytes this side's socket has not taken yet */
  size_t queued_len, queued_off;
  int pipe[2];      /* while bulk flows to this side: the pipe its bytes are spliced through, else -1 */
  size_t piped;     /* bytes in that pipe, not yet taken by this side's socket */
  int bulk;         /* a read from this side filled the scratch buffer: its bytes go by splice */
  double written;   /* bytes written to this side */
  int registered;   /* in the epoll set (a dialling pair's client is not, yet) */
  int readable;     /* an edge said so and no read has found the socket empty since */
  int writable;     /* an edge said so and no write has been refused since */
  int eof_pending;  /* the peer's FIN is in (EPOLLRDHUP): a short read is the end */
  int urgent;       /* urgent data came (EPOLLPRI): a read stops short at its mark, so only EAGAIN or 0 says empty */
  int eof;          /* this side's reader saw EOF */
  int shut;         /* this side's write side is shut down */
} Side;

struct Pair {
  Side client, upstream;
  uv_timer_t connect_timer; /* a dial's, while `timer_open` */
  int timer_open;
  int dialing;              /* the upstream connect is in flight */
  int failed;               /* -errno of a failed connect: the client fd is the caller's again */
  int ended;                /* torn down: on the ended list, or notified */
  int keepalive_idle_s;
  int joined;               /* its descriptors are duplicates: another may share their sockets */
  Pair *ready_prev, *ready_next; /* on the ready list */
  int on_ready;
  Pair *ended_next;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
};

/* The module's epoll set, libuv's poll of it, and the idle handle that runs the ready and ended lists. */
static int epfd = -1;
static uv_poll_t epoll_poll;
static uv_idle_t later;
static Pair *ready_head;
/* Empty pipes kept for the next bulk flow, and how many pipes exist in all (in use or kept). */
static int spare_pipes[SPARE_PIPES][2];
static int spare_count, pipe_count;
/* Loop time before which no pipe is made: a second after making one failed (descriptors or the user's pipe allowance ran out). */
static uint64_t pipes_retry_at;
static double spliced_bytes; /* all bytes that went to a socket from a pipe */
static Pair *ended_head, *ended_tail;
/* Pairs not yet freed: while there are any, the set's poll keeps the loop alive. */
static size_t live_pairs;

static void pump(Pair *p);
static void unwatch_and_close(Side *s);
static void drop_pipe(Side *s);

static void notify(Pair *p, int event, double a, double b) {
  napi_env env = p->env;
  napi_handle_scope scope;
  napi_value callback, receiver, argv[3], result;
  napi_open_handle_scope(env, &scope);
  napi_get_reference_value(env, p->callback, &callback);
  napi_get_global(env, &receiver);
  napi_create_int32(env, event, &argv[0]);
  napi_create_double(env, a, &argv[1]);
  napi_create_double(env, b, &argv[2]);
  if (napi_make_callback(env, p->context, receiver, callback, 3, argv, &result) == napi_pending_exception) {
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
  napi_close_handle_scope(env, scope);
}

static void pair_freed(void) {
  if (--live_pairs == 0) uv_unref((uv_handle_t *)&epoll_poll);
}

static void free_pair(Pair *p) {
  napi_delete_reference(p->env, p->callback);
  napi_async_destroy(p->env, p->context);
  free(p);
  pair_freed();
}

static void timer_closed(uv_handle_t *handle) {
  Pair *p = handle->data;
  p->timer_open = 0;
  if (p->ended == 2) free_pair(p);
}

static void run_later(uv_idle_t *idle);

static void start_later(void) {
  if (!uv_is_active((uv_handle_t *)&later)) uv_idle_start(&later, run_later);
}

static void unready(Pair *p) {
  if (!p->on_ready) return;
  p->on_ready = 0;
  if (p->ready_prev) p->ready_prev->ready_next = p->ready_next;
  else ready_head = p->ready_next;
  if (p->ready_next) p->ready_next->ready_prev = p->ready_prev;
  p->ready_prev = p->ready_next = NULL;
}

static void make_ready(Pair *p) {
  if (p->on_ready || p->ended) return;
  p->on_ready = 1;
  p->ready_prev = NULL;
  p->ready_next = ready_head;
  if (ready_head) ready_head->ready_prev = p;
  ready_head = p;
  start_later();
}

static void stop_dialing(Pair *p) {
  if (!p->dialing) return;
  p->dialing = 0;
  uv_timer_stop(&p->connect_timer);
  uv_close((uv_handle_t *)&p->connect_timer, timer_closed);
}

/* Closes both sides (a failed dial: the upstream only) and queues the last callback; idempotent. */
static void teardown(Pair *p) {
  if (p->ended) return;
  p->ended = 1;
  stop_dialing(p);
  unready(p);
  Side *sides[2] = {&p->client, &p->upstream};
  for (int i = 0; i < 2; i++) {
    Side *s = sides[i];
    free(s->queued);
    s->queued = NULL;
    drop_pipe(s);
    if (s == &p->client && p->failed) continue; /* handed back to the caller */
    if (p->joined) unwatch_and_close(s);
    else close(s->fd);
  }
  p->ended_next = NULL;
  if (ended_tail) ended_tail->ended_next = p;
  else ended_head = p;
  ended_tail = p;
  start_later();
}

/* Ready pairs get another turn; ended pairs their last callback, then they are freed. */
static void run_later(uv_idle_t *idle) {
  Pair *ready = ready_head;
  ready_head = NULL;
  while (ready) {
    Pair *p = ready;
    ready = p->ready_next;
    p->on_ready = 0;
    p->ready_prev = p->ready_next = NULL;
    if (!p->ended) pump(p);
  }
  Pair *ended = ended_head;
  ended_head = ended_tail = NULL;
  while (ended) {
    Pair *p = ended;
    ended = p->ended_next;
    if (p->failed) notify(p, p->failed, 0, 0);
    else notify(p, ENDED, p->upstream.written, p->client.written);
    p->ended = 2;
    if (!p->timer_open) free_pair(p);
  }
  if (!ready_head && !ended_head) uv_idle_stop(idle);
}

/* A pipe for bulk bytes to `s`: a spare one, or a new one while there are fewer than MAX_PIPES. 0 when there is none. */
static int take_pipe(Side *s) {
  if (spare_count > 0) {
    spare_count--;
    s->pipe[0] = spare_pipes[spare_count][0];
    s->pipe[1] = spare_pipes[spare_count][1];
    return 1;
  }
  s->pipe[0] = s->pipe[1] = -1;
  uv_loop_t *loop = uv_handle_get_loop((uv_handle_t *)&epoll_poll);
  if (pipe_count >= MAX_PIPES || uv_now(loop) < pipes_retry_at) return 0;
  int fds[2];
  if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) == 0) {
    /* A user past its pipe allowance (fs.pipe-user-pages-soft, unless privileged) gets pipes of
       two pages that it may not grow: splicing through those costs more calls than copying. */
    if (fcntl(fds[1], F_SETPIPE_SZ, PIPE_BYTES) >= 0 || fcntl(fds[1], F_GETPIPE_SZ) >= SCRATCH) {
      s->pipe[0] = fds[0];
      s->pipe[1] = fds[1];
      pipe_count++;
      return 1;
    }
    close(fds[0]);
    close(fds[1]);
  }
  pipes_retry_at = uv_now(loop) + 1000;
  return 0;
}

/* Gives up `s`'s pipe: kept as a spare if empty and there is room, else closed. */
static void drop_pipe(Side *s) {
  if (s->pipe[0] < 0) return;
  if (s->piped == 0 && spare_count < SPARE_PIPES) {
    spare_pipes[spare_count][0] = s->pipe[0];
    spare_pipes[spare_count][1] = s->pipe[1];
    spare_count++;
  } else {
    close(s->pipe[0]);
    close(s->pipe[1]);
    pipe_count--;
  }
  s->pipe[0] = s->pipe[1] = -1;
  s->piped = 0;
}

/* Shuts `s`'s write side once its peer has sent EOF and nothing is queued for `s` (not when `s` is done too: closing says it). */
static void pass_eof(Side *s) {
  if (s->peer->eof && !s->queued && !s->piped && !s->shut) {
    s->shut = 1;
    if (!s->eof) shutdown(s->fd, SHUT_WR);
  }
}

/* Writes `len` bytes to `to` as far as it takes them; keeps the rest. 0, or -1 on an error. */
static int forward(Side *to, const char *data, size_t len) {
  ssize_t w = to->writable ? write(to->fd, data, len) : 0;
  if (w < 0) {
    if (errno != EAGAIN && errno != EINTR) return -1;
    w = 0;
  }
  to->written += (double)w;
  if ((size_t)w < len) {
    to->writable = 0;
    to->queued_len = len - (size_t)w;
    to->queued_off = 0;
    to->queued = malloc(to->queued_len);
    if (!to->queued) return -1;
    memcpy(to->queued, data + w, to->queued_len);
  }
  return 0;
}

/* Writes what is queued for `s` while its socket takes it. 0, or -1 on an error. */
static int flush(Side *s) {
  while (s->queued && s->writable) {
    ssize_t w = write(s->fd, s->queued + s->queued_off, s->queued_len - s->queued_off);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) return -1;
      s->writable = 0;
      break;
    }
    s->queued_off += (size_t)w;
    s->written += (double)w;
    if (s->queued_off == s->queued_len) {
      free(s->queued);
      s->queued = NULL;
      pass_eof(s);
    }
  }
  while (s->piped && s->writable) {
    ssize_t w = splice(s->pipe[0], NULL, s->fd, NULL, s->piped, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) return -1;
      s->writable = 0;
      break;
    }
    s->piped -= (size_t)w;
    s->written += (double)w;
    spliced_bytes += (double)w;
    if (!s->piped) pass_eof(s);
  }
  return 0;
}

/*
 * One splice from `s` through its peer's pipe to the peer: as carry. A splice
 * takes what fits the pipe's slots, not all it is asked for, so a short one
 * does not say the socket is empty; EAGAIN does (and then the pipe goes back:
 * a flow holds a pipe only while it moves).
 */
static int carry_spliced(Side *s) {
  Side *to = s->peer;
  ssize_t r = splice(s->fd, NULL, to->pipe[1], NULL, PIPE_BYTES, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
  if (r < 0) {
    if (errno == EINTR) return 1;
    if (errno != EAGAIN) return -1;
    s->readable = 0;
    drop_pipe(to);
    return 0;
  }
  if (r == 0) {
    /* The end, or an urgent mark at the head of the queue: a splice stops at a mark and, once
       the FIN is in, says 0 there, where a read skips the mark's byte and goes on. A read tells
       (urgent from here: that read path trusts only EAGAIN or 0). */
    drop_pipe(to);
    s->urgent = 1;
    return 1;
  }
  to->piped = (size_t)r;
  if (flush(to) < 0) return -1;
  return !to->piped;
}

/*
 * One read from `s` to its peer: 1 when `s` may have more now, 0 when it has
 * nothing more to give until an edge (or its peer's queue is out), -1 on an
 * error of either side.
 */
static int carry(Side *s) {
  Side *to = s->peer;
  if (!s->readable || s->eof || to->queued || to->piped) return 0;
  if (s->bulk && !s->urgent && (to->pipe[0] >= 0 || take_pipe(to))) return carry_spliced(s);
  drop_pipe(to); /* copied from here on (urgent data came): a flow holds a pipe only while it is spliced */
  ssize_t r = read(s->fd, scratch, SCRATCH);
  if (r < 0) {
    if (errno == EINTR) return 1;
    if (errno != EAGAIN) return -1;
    s->readable = 0;
    return 0;
  }
  if (r == 0) {
    s->eof = 1;
    s->readable = 0;
    pass_eof(to);
    return 0;
  }
  if (forward(to, scratch, (size_t)r) < 0) return -1;
  if (r == SCRATCH) s->bulk = 1;
  if (r < SCRATCH && !s->urgent) {
    /* A short read emptied the socket: what comes later brings an edge. If the FIN was
       already in (eof_pending), everything before it has been read: that is the EOF,
       without a read to be told so. */
    s->readable = 0;
    if (s->eof_pending) {
      s->eof = 1;
      pass_eof(to);
    }
  }
  return s->readable && !to->queued;
}

/*
 * Before a side that failed is closed: what it received before the error (a last message
 * sent just before a reset is still readable) goes to its peer, as far as the peer takes
 * it now. Nothing is queued: both sides close right after.
 */
static void salvage(Side *s) {
  Side *peer = s->peer;
  /* What is queued or piped for the peer first (tried even if its last write was refused). */
  peer->writable = 1;
  if (flush(peer) < 0 || peer->queued || peer->piped) return;
  for (;;) {
    ssize_t r = read(s->fd, scratch, SCRATCH);
    if (r <= 0) return;
    ssize_t w = write(peer->fd, scratch, (size_t)r);
    if (w > 0) peer->written += (double)w;
    if (w < r) return;
  }
}

/* Moves what both sides can move, up to the turn's reads; a pair with more goes on the ready list. */
static void pump(Pair *p) {
  Side *c = &p->client, *u = &p->upstream;
  int more = 0;
  for (int turn = 0; turn < READS_PER_TURN; turn++) {
    if (flush(c) < 0 || flush(u) < 0) {
      teardown(p);
      return;
    }
    int from_client = carry(c), from_upstream = carry(u);
    if (from_client < 0 || from_upstream < 0) {
      teardown(p);
      return;
    }
    more = from_client || from_upstream;
    if (!more) break;
  }
  if (c->eof && u->eof && !c->queued && !u->queued && !c->piped && !u->piped) teardown(p);
  else if (more) make_ready(p);
}

static int watch(Side *s) {
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET, .data.ptr = s};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) return -errno;
  s->registered = 1;
  return 0;
}

static void unwatch_and_close(Side *s) {
  if (s->fd < 0) return;
  if (s->registered) epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
  close(s->fd);
}

/* Nagle off (a proxy adds no delay of its own) and TCP keep-alive, so a peer that vanished without a FIN is found. */
static void tune(int fd, int keepalive_idle_s) {
  int on = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &keepalive_idle_s, sizeof keepalive_idle_s);
}

static void dial_failed(Pair *p, int err) {
  if (p->ended) return; /* cut first: the client was closed with the rest, and ENDED is owed */
  p->failed = -err;
  teardown(p);
}

/* The connect's outcome, from the upstream's first event: writable alone is success (no call to ask). */
static void connect_done(Pair *p, uint32_t events) {
  if (events & (EPOLLERR | EPOLLHUP)) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(p->upstream.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) {
      dial_failed(p, err);
      return;
    }
  }
  stop_dialing(p);
  tune(p->upstream.fd, p->keepalive_idle_s);
  /* The client was accepted from a listener with the same options: it has them already. */
  if (watch(&p->client) < 0) {
    teardown(p);
    return;
  }
  /* Both fresh: their send buffers are empty (a refused write would clear it, and the next edge set it again). */
  p->upstream.writable = p->client.writable = 1;
  notify(p, CONNECTED, 0, 0);
  /* A request the client sent already comes with the client's first edge. */
}

static void on_event(Side *s, uint32_t events) {
  Pair *p = s->pair;
  if (p->ended) return;
  if (p->dialing) {
    if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
    connect_done(p, events);
    /* Connected: the same event may bring the backend's first bytes, and no other edge will. */
    if (p->ended) return;
  }
  if (events & EPOLLERR) { /* a reset, or unreachable */
    salvage(s);
    teardown(p);
    return;
  }
  if (events & EPOLLPRI) s->urgent = 1; /* for the connection's life: rare, and then one more read per wake-up */
  if (events & (EPOLLRDHUP | EPOLLHUP)) s->eof_pending = 1;
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) s->readable = 1;
  if (events & EPOLLOUT) s->writable = 1;
  pump(p);
}

static void on_epoll(uv_poll_t *handle, int status, int events) {
  (void)handle;
  (void)status;
  (void)events;
  struct epoll_event ready[EVENTS_PER_TURN];
  int n = epoll_wait(epfd, ready, EVENTS_PER_TURN, 0);
  /* Pairs are freed only in the idle phase: a later event of this batch never meets a freed pair. */
  for (int i = 0; i < n; i++) on_event(ready[i].data.ptr, ready[i].events);
}

/* The epoll set and its poll, at the first pair. 0, or -errno. */
static int ensure_epoll(uv_loop_t *loop) {
  if (epfd >= 0) return 0;
  int fd = epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) return -errno;
  if (uv_poll_init(loop, &epoll_poll, fd) != 0) {
    close(fd);
    return -EBADF;
  }
  epfd = fd;
  uv_idle_init(loop, &later);
  uv_poll_start(&epoll_poll, UV_READABLE, on_epoll);
  uv_unref((uv_handle_t *)&epoll_poll);
  return 0;
}

/* A pair with its callback and async context, and a handle for JavaScript; NULL (nothing made) on failure. */
static Pair *new_pair(napi_env env, napi_value callback, napi_value *external) {
  napi_value name;
  Pair *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  if (napi_create_external(env, p, NULL, NULL, external) != napi_ok) {
    free(p);
    return NULL;
  }
  p->env = env;
  p->client.pair = p->upstream.pair = p;
  p->client.peer = &p->upstream;
  p->upstream.peer = &p->client;
  p->client.fd = p->upstream.fd = -1;
  p->client.pipe[0] = p->client.pipe[1] = p->upstream.pipe[0] = p->upstream.pipe[1] = -1;
  napi_create_reference(env, callback, 1, &p->callback);
  napi_create_string_utf8(env, "harbor-pair", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &p->context);
  if (live_pairs++ == 0) uv_ref((uv_handle_t *)&epoll_poll);
  return p;
}


/* join(clientFd, upstreamFd, onEvent(event, a, b)) -> a handle, or -errno (nothing taken). */
static napi_value js_join(napi_env env, napi_callback_info info) {
  napi_value argv[3], external;
  int32_t client_fd, upstream_fd;
  uv_loop_t *loop;
  if (!native_args(env, info, 3, argv) || !native_int(env, argv[0], &client_fd) || !native_int(env, argv[1], &upstream_fd)) return NULL;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return native_number(env, -EINVAL);
  int r = ensure_epoll(loop);
  if (r < 0) return native_number(env, r);
  Pair *p = new_pair(env, argv[2], &external);
  if (!p) return native_number(env, -ENOMEM);
  p->joined = 1;
  /* Duplicates, close-on-exec as Node's own sockets: Node's sockets own the originals and are destroyed next. */
  p->client.fd = fcntl(client_fd, F_DUPFD_CLOEXEC, 0);
  p->upstream.fd = p->client.fd < 0 ? -1 : fcntl(upstream_fd, F_DUPFD_CLOEXEC, 0);
  r = p->client.fd < 0 || p->upstream.fd < 0 ? -errno : 0;
  if (r == 0) r = watch(&p->client);
  if (r == 0) r = watch(&p->upstream);
  p->client.writable = p->upstream.writable = 1;
  if (r < 0) {
    /* Nothing was handed over: the JavaScript sockets still own the connection. Their
       descriptors share the duplicates' sockets, so closing a duplicate would leave its
       registration in the set, pointing at a freed pair: it is taken out first. */
    unwatch_and_close(&p->client);
    unwatch_and_close(&p->upstream);
    free_pair(p); /* it never started: no callback is owed */
    return native_number(env, r);
  }
  return external;
}

static void on_connect_timeout(uv_timer_t *timer) { dial_failed(timer->data, ETIMEDOUT); }

/*
 * dial(clientFd, address, port, timeoutMs, keepAliveIdleS, onEvent) -> a handle, or -errno
 * when the connect failed at once (the client is still the caller's). The address is a
 * literal IPv4 or IPv6 one; the client comes from `accept` of a `listen` socket here.
 */
static napi_value js_dial(napi_env env, napi_callback_info info) {
  napi_value argv[6], external;
  int32_t client_fd, port, timeout_ms, keepalive_idle_s;
  uv_loop_t *loop;
  if (!native_args(env, info, 6, argv) || !native_int(env, argv[0], &client_fd) || !native_int(env, argv[2], &port) ||
      !native_int(env, argv[3], &timeout_ms) || !native_int(env, argv[4], &keepalive_idle_s)) return NULL;
  struct sockaddr_storage ss;
  socklen_t len;
  int r = native_sockaddr(env, argv[1], port, &ss, &len);
  if (r < 0) return native_number(env, r);
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return native_number(env, -EINVAL);
  if ((r = ensure_epoll(loop)) < 0) return native_number(env, r);
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return native_number(env, -errno);
  if (connect(fd, (struct sockaddr *)&ss, len) < 0 && errno != EINPROGRESS) {
    r = -errno;
    close(fd);
    return native_number(env, r);
  }
  Pair *p = new_pair(env, argv[5], &external);
  if (!p) {
    close(fd);
    return native_number(env, -ENOMEM);
  }
  p->client.fd = client_fd;
  p->upstream.fd = fd;
  p->keepalive_idle_s = keepalive_idle_s;
  /* Writable once connected, or once the connect failed (SO_ERROR says which). */
  if ((r = watch(&p->upstream)) < 0) {
    close(fd);
    free_pair(p); /* it never started: no callback is owed */
    return native_number(env, r);
  }
  uv_timer_init(loop, &p->connect_timer);
  p->connect_timer.data = p;
  p->timer_open = 1;
  p->dialing = 1;
  uv_timer_start(&p->connect_timer, on_connect_timeout, (uint64_t)timeout_ms, 0);
  return external;
}

/*
 * listen(address, port, backlog, keepAliveIdleS) -> a listening, non-blocking descriptor,
 * or -errno. Its connections inherit Nagle off and keep-alive (set here once, not per
 * connection).
 */
static napi_value js_listen(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int32_t port, backlog, keepalive_idle_s;
  if (!native_args(env, info, 4, argv) || !native_int(env, argv[1], &port) || !native_int(env, argv[2], &backlog) ||
      !native_int(env, argv[3], &keepalive_idle_s)) return NULL;
  struct sockaddr_storage ss;
  socklen_t len;
  int r = native_sockaddr(env, argv[0], port, &ss, &len);
  if (r < 0) return native_number(env, r);
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return native_number(env, -errno);
  int on = 1;
  /* As Node's listening sockets: a port whose last connections are in TIME_WAIT can be bound again. */
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  tune(fd, keepalive_idle_s);
  if (bind(fd, (struct sockaddr *)&ss, len) < 0 || listen(fd, backlog) < 0) {
    r = -errno;
    close(fd);
    return native_number(env, r);
  }
  return native_number(env, fd);
}

/*
 * accept(listeningFd, fds Int32Array) -> how many connections were accepted into fds
 * (non-blocking, close-on-exec), up to its length and ACCEPTS_PER_TURN; -errno when
 * the first accept failed (-EAGAIN: none waiting).
 */
static napi_value js_accept(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd, *fds;
  size_t length;
  if (!native_args(env, info, 2, argv) || !native_int(env, argv[0], &fd) ||
      !native_int32_array(env, argv[1], 1, &fds, &length, "dataplane: accept needs an Int32Array")) return NULL;
  size_t n = 0;
  if (length > ACCEPTS_PER_TURN) length = ACCEPTS_PER_TURN;
  while (n < length) {
    int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (n == 0) return native_number(env, -errno);
      break;
    }
    fds[n++] = c;
  }
  return native_number(env, (double)n);
}

/* pipes() -> { open, spare, splicedBytes }: the pipes that exist (two descriptors each), how many of them wait empty, and the bytes carried through them. */
static napi_value js_pipes(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value result, value;
  napi_create_object(env, &result);
  napi_create_int32(env, pipe_count, &value);
  napi_set_named_property(env, result, "open", value);
  napi_create_int32(env, spare_count, &value);
  napi_set_named_property(env, result, "spare", value);
  napi_create_double(env, spliced_bytes, &value);
  napi_set_named_property(env, result, "splicedBytes", value);
  return result;
}

/* cut(handle): closes both sides now (a drain's deadline); the callback still runs, once. */
static napi_value js_cut(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Pair *p;
  if (!native_args(env, info, 1, argv)) return NULL;
  if (napi_get_value_external(env, argv[0], (void **)&p) != napi_ok) {
    napi_throw_type_error(env, NULL, "dataplane: cut takes a pair handle");
    return NULL;
  }
  teardown(p);
  return NULL;
}

void tcp_init(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
    NATIVE_FUNCTION("listen", js_listen),
    NATIVE_FUNCTION("accept", js_accept),
    NATIVE_FUNCTION("dial", js_dial),
    NATIVE_FUNCTION("join", js_join),
    NATIVE_FUNCTION("cut", js_cut),
    NATIVE_FUNCTION("pipes", js_pipes),
  };
  napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions);
}
