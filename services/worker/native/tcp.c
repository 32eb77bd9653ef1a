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
 * from an edge until a write is refused (reads and writes are recv and
 * send: a socket's own calls, without read and write's file layer, and
 * without SIGPIPE). A read goes into one shared scratch buffer and straight
 * to the other side; only what a full socket buffer refuses is kept (per
 * side, and that side's reader then waits: backpressure). A side whose read
 * filled the scratch buffer is bulk: its bytes are then spliced through a
 * pipe to the other side, never copied through this process (what the
 * destination refuses waits in the pipe). A flow holds a pipe only while it
 * moves; empty pipes are kept for the next, and past MAX_PIPES a flow is
 * copied as before. Half-close passes through (an EOF shuts the other
 * side's write side once its queue is out); an error on either side closes
 * both. A pair that used its turn's reads with more to read goes on a ready
 * list, run in libuv's idle phase, so one busy pair does not hold up the
 * others.
 *
 * A pair is known to JavaScript by a small id (an index into its own table
 * of handlers). What happens to pairs reaches it in batches, as records of
 * four numbers in the Float64Array given to `pairEvents`: (id, event, a, b),
 * one call into JavaScript for a poll's connects and one for the idle
 * phase's ends (and one more each time the array fills). CONNECTED (1) when
 * a dial's connect succeeded; FAILED (-errno) when it did not, and the client
 * descriptor is the caller's again; ENDED (0, bytes to the backend, bytes to
 * the client) when both sides are closed. ENDED or FAILED is a pair's last
 * record and comes from the idle phase (never from inside `cut`). A dial's
 * connect timeout is its place in one list ordered by deadline, under one
 * timer.
 *
 * Invariants: a pair is freed, and its id given out again, only after the
 * call that delivered its last record returned; JavaScript drops the id in
 * that call, so `cut` never reaches a freed pair, and a record never names a
 * pair other than the one it was written for. An epoll registration lasts
 * while any descriptor of its socket is open, so a pair's descriptors leave
 * the set before they are closed wherever another may share the socket:
 * join's duplicates, and a relay's client, which came over the hand-off
 * channel and is still open in the worker until it closes its own (dial's
 * `clientShared`). Other dials' are the module's own (from accept4 and
 * socket, close-on-exec, which a child has applied before uv_spawn
 * returns): their close is enough, and saves a syscall per descriptor.
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
  uint32_t id;              /* JavaScript's name for it, unique among pairs not yet freed */
  int dialing;              /* the upstream connect is in flight: on the dialling list */
  uint64_t deadline;        /* loop time at which a dial's connect times out */
  Pair *dial_prev, *dial_next;
  int failed;               /* -errno of a failed connect: the client fd is the caller's again */
  int ended;                /* torn down: on the ended list, then retiring */
  int keepalive_idle_s;
  int joined;               /* its descriptors are duplicates: another may share their sockets */
  int client_shared;        /* dialled for a client another process may still hold (a relay's) */
  Pair *ready_prev, *ready_next; /* on the ready list */
  int on_ready;
  Pair *ended_next;         /* on the ended list, then on the retiring list */
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
/* Dialling pairs by deadline, earliest first, and the one timer for the earliest. */
static Pair *dial_head, *dial_tail;
static uv_timer_t dial_timer;

/* Pairs by id; ids of freed pairs wait on a stack to be given out again. */
static Pair **slots;
static uint32_t slot_cap, slots_used, *free_ids, free_count;

/* pairEvents: JavaScript's callback, the records array it reads, and records written since the last call. */
static napi_env events_env;
static napi_ref events_callback, events_records; /* the array's reference only keeps it alive */
static napi_async_context events_context;
static double *records;
static size_t record_cap, record_count;
/* Pairs whose last record is written: freed once the call that delivers it returned. */
static Pair *retiring;

static void pump(Pair *p);
static void unwatch_and_close(Side *s);
static void drop_pipe(Side *s);

static void free_pair(Pair *p) {
  slots[p->id] = NULL;
  free_ids[free_count++] = p->id;
  free(p);
  if (--live_pairs == 0) uv_unref((uv_handle_t *)&epoll_poll);
}

/* One call into JavaScript with the records written since the last; then the pairs they retired are freed. */
static void deliver(void) {
  if (record_count == 0) return;
  napi_env env = events_env;
  napi_handle_scope scope;
  napi_value callback, receiver, count, result;
  napi_open_handle_scope(env, &scope);
  napi_get_reference_value(env, events_callback, &callback);
  napi_get_global(env, &receiver);
  napi_create_uint32(env, (uint32_t)record_count, &count);
  /* Nothing JavaScript calls here writes a record: the count holds until the call returns. */
  if (napi_make_callback(env, events_context, receiver, callback, 1, &count, &result) == napi_pending_exception) {
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
  napi_close_handle_scope(env, scope);
  record_count = 0;
  while (retiring) {
    Pair *p = retiring;
    retiring = p->ended_next;
    free_pair(p);
  }
}

/* Writes a record for `p` (delivering the full array first); a last one retires it. */
static void emit(Pair *p, int event, double a, double b) {
  if (record_count == record_cap) {
    deliver();
    /* That call may have cut the pair whose connect this was: it is not reported connected. */
    if (p->ended && event == CONNECTED) return;
  }
  double *r = records + 4 * record_count++;
  r[0] = p->id;
  r[1] = event;
  r[2] = a;
  r[3] = b;
  if (event != CONNECTED) {
    p->ended_next = retiring;
    retiring = p;
  }
}

static void on_dial_timer(uv_timer_t *timer);

/* The timer set for the earliest deadline, or stopped when nothing dials. */
static void arm_dial_timer(void) {
  if (!dial_head) {
    uv_timer_stop(&dial_timer);
    return;
  }
  uint64_t now = uv_now(dial_timer.loop);
  uv_timer_start(&dial_timer, on_dial_timer, dial_head->deadline > now ? dial_head->deadline - now : 0, 0);
}

/* On the dialling list, in deadline order (from the end: deadlines mostly come in order). */
static void start_dialing(Pair *p, uint64_t deadline) {
  Pair *before = dial_tail;
  while (before && before->deadline > deadline) before = before->dial_prev;
  p->dialing = 1;
  p->deadline = deadline;
  p->dial_prev = before;
  p->dial_next = before ? before->dial_next : dial_head;
  if (p->dial_next) p->dial_next->dial_prev = p;
  else dial_tail = p;
  if (before) before->dial_next = p;
  else {
    dial_head = p;
    arm_dial_timer();
  }
}

/* Off the dialling list. The timer is left as it is (a firing with nothing due re-arms it) unless nothing dials. */
static void stop_dialing(Pair *p) {
  if (!p->dialing) return;
  p->dialing = 0;
  if (p->dial_prev) p->dial_prev->dial_next = p->dial_next;
  else dial_head = p->dial_next;
  if (p->dial_next) p->dial_next->dial_prev = p->dial_prev;
  else dial_tail = p->dial_prev;
  p->dial_prev = p->dial_next = NULL;
  if (!dial_head) uv_timer_stop(&dial_timer);
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

/* Closes both sides (a failed dial: the upstream only) and queues the last record; idempotent. */
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
    if (p->joined || (s == &p->client && p->client_shared)) unwatch_and_close(s);
    else close(s->fd);
  }
  p->ended_next = NULL;
  if (ended_tail) ended_tail->ended_next = p;
  else ended_head = p;
  ended_tail = p;
  start_later();
}

/* Ready pairs get another turn; ended pairs their last record, delivered with the turn's others. */
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
    if (p->failed) emit(p, p->failed, 0, 0);
    else emit(p, ENDED, p->upstream.written, p->client.written);
  }
  deliver();
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
  ssize_t w = to->writable ? send(to->fd, data, len, MSG_NOSIGNAL) : 0;
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
    ssize_t w = send(s->fd, s->queued + s->queued_off, s->queued_len - s->queued_off, MSG_NOSIGNAL);
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
  ssize_t r = recv(s->fd, scratch, SCRATCH, 0);
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
    ssize_t r = recv(s->fd, scratch, SCRATCH, 0);
    if (r <= 0) return;
    ssize_t w = send(peer->fd, scratch, (size_t)r, MSG_NOSIGNAL);
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
  emit(p, CONNECTED, 0, 0);
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
  /* Pairs retire only in the idle phase: a later event of this batch never meets a freed pair. */
  for (int i = 0; i < n; i++) on_event(ready[i].data.ptr, ready[i].events);
  deliver(); /* the batch's connects */
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
  uv_timer_init(loop, &dial_timer);
  uv_unref((uv_handle_t *)&dial_timer);
  uv_poll_start(&epoll_poll, UV_READABLE, on_epoll);
  uv_unref((uv_handle_t *)&epoll_poll);
  return 0;
}

/* Whether pairEvents was called; throws when not (a pair's records would have nowhere to go). */
static int events_set(napi_env env) {
  if (records) return 1;
  napi_throw_error(env, NULL, "dataplane: pairEvents must be called before the first pair");
  return 0;
}

/* A pair with an id; NULL (nothing made) when out of memory. */
static Pair *new_pair(void) {
  if (free_count == 0 && slots_used == slot_cap) {
    uint32_t cap = slot_cap ? slot_cap * 2 : 1024;
    Pair **grown = realloc(slots, cap * sizeof *grown);
    if (!grown) return NULL;
    slots = grown;
    uint32_t *ids = realloc(free_ids, cap * sizeof *ids);
    if (!ids) return NULL; /* slots is larger already; it is grown again (to the same size) next time */
    free_ids = ids;
    slot_cap = cap;
  }
  Pair *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->id = free_count > 0 ? free_ids[--free_count] : slots_used++;
  slots[p->id] = p;
  p->client.pair = p->upstream.pair = p;
  p->client.peer = &p->upstream;
  p->upstream.peer = &p->client;
  p->client.fd = p->upstream.fd = -1;
  p->client.pipe[0] = p->client.pipe[1] = p->upstream.pipe[0] = p->upstream.pipe[1] = -1;
  if (live_pairs++ == 0) uv_ref((uv_handle_t *)&epoll_poll);
  return p;
}

/*
 * pairEvents(records Float64Array, onRecords(count)): where pairs' records go, once per
 * process, before the first pair. onRecords reads records[0 .. 4 * count) as (id, event,
 * a, b) and must not keep them: the array is written again after it returns.
 */
static napi_value js_pair_events(napi_env env, napi_callback_info info) {
  napi_value argv[2], name;
  napi_typedarray_type type;
  napi_valuetype kind;
  size_t length;
  void *data;
  if (!native_args(env, info, 2, argv)) return NULL;
  if (napi_get_typedarray_info(env, argv[0], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_float64_array || length < 4 ||
      napi_typeof(env, argv[1], &kind) != napi_ok || kind != napi_function) {
    napi_throw_type_error(env, NULL, "dataplane: pairEvents takes a Float64Array of at least 4 and a function");
    return NULL;
  }
  if (records) {
    napi_throw_error(env, NULL, "dataplane: pairEvents was called already");
    return NULL;
  }
  napi_create_reference(env, argv[0], 1, &events_records);
  napi_create_reference(env, argv[1], 1, &events_callback);
  napi_create_string_utf8(env, "harbor-pairs", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &events_context);
  events_env = env;
  records = data;
  record_cap = length / 4;
  return NULL;
}

/* join(clientFd, upstreamFd) -> the pair's id, or -errno (nothing taken). */
static napi_value js_join(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t client_fd, upstream_fd;
  uv_loop_t *loop;
  if (!native_args(env, info, 2, argv) || !native_int(env, argv[0], &client_fd) || !native_int(env, argv[1], &upstream_fd) || !events_set(env)) return NULL;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return native_number(env, -EINVAL);
  int r = ensure_epoll(loop);
  if (r < 0) return native_number(env, r);
  Pair *p = new_pair();
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
    free_pair(p); /* it never started: no record is owed */
    return native_number(env, r);
  }
  return native_number(env, p->id);
}

/* Every dial whose deadline has come fails; the timer is set for the next. */
static void on_dial_timer(uv_timer_t *timer) {
  uint64_t now = uv_now(timer->loop);
  while (dial_head && dial_head->deadline <= now) dial_failed(dial_head, ETIMEDOUT);
  arm_dial_timer();
}

/*
 * dial(clientFd, address, port, timeoutMs, keepAliveIdleS, clientShared) -> the pair's id,
 * or -errno when the connect failed at once (the client is still the caller's). The address
 * is a literal IPv4 or IPv6 one; the client comes from `accept` of a `listen` socket here,
 * or (clientShared) from another process that may not have closed its own yet.
 */
static napi_value js_dial(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  int32_t client_fd, port, timeout_ms, keepalive_idle_s, client_shared;
  uv_loop_t *loop;
  if (!native_args(env, info, 6, argv) || !native_int(env, argv[0], &client_fd) || !native_int(env, argv[2], &port) ||
      !native_int(env, argv[3], &timeout_ms) || !native_int(env, argv[4], &keepalive_idle_s) || !native_int(env, argv[5], &client_shared) ||
      !events_set(env)) return NULL;
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
  Pair *p = new_pair();
  if (!p) {
    close(fd);
    return native_number(env, -ENOMEM);
  }
  p->client.fd = client_fd;
  p->client_shared = client_shared != 0;
  p->upstream.fd = fd;
  p->keepalive_idle_s = keepalive_idle_s;
  /* Writable once connected, or once the connect failed (SO_ERROR says which). */
  if ((r = watch(&p->upstream)) < 0) {
    close(fd);
    free_pair(p); /* it never started: no record is owed */
    return native_number(env, r);
  }
  start_dialing(p, uv_now(loop) + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0));
  return native_number(env, p->id);
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

/* cut(id): closes both sides now (a drain's deadline); the last record still comes, once. */
static napi_value js_cut(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t id;
  if (!native_args(env, info, 1, argv) || !native_int(env, argv[0], &id)) return NULL;
  if (id < 0 || (uint32_t)id >= slots_used || !slots[id]) {
    napi_throw_range_error(env, NULL, "dataplane: cut takes the id of a pair whose last record has not been delivered");
    return NULL;
  }
  teardown(slots[id]);
  return NULL;
}

void tcp_init(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
    NATIVE_FUNCTION("listen", js_listen),
    NATIVE_FUNCTION("accept", js_accept),
    NATIVE_FUNCTION("dial", js_dial),
    NATIVE_FUNCTION("join", js_join),
    NATIVE_FUNCTION("cut", js_cut),
    NATIVE_FUNCTION("pairEvents", js_pair_events),
    NATIVE_FUNCTION("pipes", js_pipes),
  };
  NATIVE_EXPORT(env, exports, functions);
}
