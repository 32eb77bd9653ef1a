/*
 * Pairs: the bytes of a proxied TCP connection, carried in C.
 *
 * A pair starts one of two ways. `dial`: the worker accepted the client here
 * (`listen`, `accept`), chose its backend in JavaScript, and this connects to
 * it (timeout included); a failed connect hands the client back to JavaScript
 * to try the next backend. `join`: JavaScript accepted and dialled with Node's
 * sockets and hands both over; each is duplicated and the JavaScript sockets
 * are destroyed. Either way libuv polls the descriptors. A read goes into one shared scratch buffer and straight to
 * the other side; only what a full socket buffer refuses is kept (per side,
 * and that side's reader then waits: backpressure). Half-close passes
 * through (an EOF shuts the other side's write side once its queue is out);
 * an error on either side closes both. When both sides are closed, the
 * pair's callback gets the bytes written each way, once.
 *
 * The pair's callback gets (event, a, b): CONNECTED (1) when a dial's connect
 * succeeded; FAILED (-errno) when it did not, and the client descriptor is
 * the caller's again; ENDED (0, bytes to the backend, bytes to the client)
 * when both sides are closed. ENDED or FAILED comes once, last.
 *
 * Invariant: a pair is freed only after its last callback ran; JavaScript
 * drops its handle in that callback, so `cut` never sees a freed pair.
 */
#define _GNU_SOURCE
#include <node_api.h>
#include <uv.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "native.h"

#define SCRATCH 65536
/* Reads per readable event before the loop gets a turn (other connections, timers). */
#define READS_PER_TURN 4
/* Connections accepted per readable event of a listening socket. */
#define ACCEPTS_PER_TURN 64

enum { ENDED = 0, CONNECTED = 1 };

static char scratch[SCRATCH];

typedef struct Pair Pair;
typedef struct Side {
  uv_poll_t poll;
  int fd;
  int events;       /* what the poll asks for now */
  Pair *pair;
  struct Side *peer;
  char *queued;     /* bytes this side's socket has not taken yet */
  size_t queued_len, queued_off;
  double written;   /* bytes written to this side */
  int polled;       /* the poll handle is initialised (a dialling pair's client is not, yet) */
  int eof;          /* this side's reader saw EOF */
  int shut;         /* this side's write side is shut down */
  int closed;
} Side;

struct Pair {
  Side client, upstream;
  uv_timer_t connect_timer; /* a dial's; initialised only by dial */
  int dialing;              /* the upstream connect is in flight */
  int failed;               /* -errno of a failed connect: the client fd is not ours */
  int keepalive_idle_s;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
  int open_handles;
};

static void on_io(uv_poll_t *handle, int status, int events);

/* Calls the pair's callback with (event, a, b). */
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

static void pair_closed(uv_handle_t *handle) {
  Pair *p = handle->data;
  if (--p->open_handles > 0) return;
  napi_env env = p->env;
  if (p->failed) notify(p, p->failed, 0, 0);
  else notify(p, ENDED, p->upstream.written, p->client.written);
  napi_delete_reference(env, p->callback);
  napi_async_destroy(env, p->context);
  free(p);
}

static void stop_dialing(Pair *p) {
  if (!p->dialing) return;
  p->dialing = 0;
  uv_timer_stop(&p->connect_timer);
  uv_close((uv_handle_t *)&p->connect_timer, pair_closed);
}

/* Closes both sides (a failed dial: the upstream only); idempotent. */
static void teardown(Pair *p) {
  Side *sides[2] = {&p->client, &p->upstream};
  stop_dialing(p);
  for (int i = 0; i < 2; i++) {
    Side *s = sides[i];
    if (s->closed) continue;
    s->closed = 1;
    if (s == &p->client && p->failed) continue; /* handed back to the caller */
    if (s->polled) uv_poll_stop(&s->poll);
    close(s->fd);
    free(s->queued);
    s->queued = NULL;
    if (s->polled) uv_close((uv_handle_t *)&s->poll, pair_closed);
  }
}

/* Polls for what the side needs: reading while it has no EOF and its peer nothing queued; writing while it has something queued. */
static void update(Side *s) {
  if (s->closed) return;
  int want = 0;
  if (!s->eof && !s->peer->queued) want |= UV_READABLE;
  if (s->queued) want |= UV_WRITABLE;
  if (want == s->events) return;
  s->events = want;
  if (want) uv_poll_start(&s->poll, want, on_io);
  else uv_poll_stop(&s->poll);
}

/* Shuts `s`'s write side once its peer has sent EOF and nothing is queued for `s`. */
static void pass_eof(Side *s) {
  if (s->peer->eof && !s->queued && !s->shut) {
    shutdown(s->fd, SHUT_WR);
    s->shut = 1;
  }
}

static void finish_if_done(Pair *p) {
  if (p->client.eof && p->upstream.eof && !p->client.queued && !p->upstream.queued) teardown(p);
}

/* Writes `len` bytes to `to`; keeps what it refuses. 0, or -1 when the pair is torn down. */
static int forward(Side *to, const char *data, size_t len) {
  ssize_t w = write(to->fd, data, len);
  if (w < 0) {
    if (errno != EAGAIN && errno != EINTR) return -1;
    w = 0;
  }
  to->written += (double)w;
  if ((size_t)w < len) {
    to->queued_len = len - (size_t)w;
    to->queued_off = 0;
    to->queued = malloc(to->queued_len);
    if (!to->queued) return -1;
    memcpy(to->queued, data + w, to->queued_len);
  }
  return 0;
}

/*
 * Before a side that failed is closed: what it received before the error (a last message
 * sent just before a reset is still readable) goes to its peer, as far as the peer takes
 * it now. Nothing is queued: both sides close right after.
 */
static void salvage(Side *s) {
  Side *peer = s->peer;
  if (peer->closed) return;
  if (peer->queued) {
    ssize_t w = write(peer->fd, peer->queued + peer->queued_off, peer->queued_len - peer->queued_off);
    if (w > 0) peer->written += (double)w;
    if (w < 0 || (size_t)w < peer->queued_len - peer->queued_off) return;
  }
  for (;;) {
    ssize_t r = read(s->fd, scratch, SCRATCH);
    if (r <= 0) return;
    ssize_t w = write(peer->fd, scratch, (size_t)r);
    if (w > 0) peer->written += (double)w;
    if (w < r) return;
  }
}

static void on_io(uv_poll_t *handle, int status, int events) {
  Side *s = (Side *)handle;
  Pair *p = s->pair;
  Side *peer = s->peer;
  if (status < 0) { /* a socket error (reset, unreachable) */
    salvage(s);
    teardown(p);
    return;
  }
  if ((events & UV_WRITABLE) && s->queued) {
    ssize_t w = write(s->fd, s->queued + s->queued_off, s->queued_len - s->queued_off);
    if (w < 0 && errno != EAGAIN && errno != EINTR) {
      teardown(p);
      return;
    }
    if (w > 0) {
      s->queued_off += (size_t)w;
      s->written += (double)w;
    }
    if (s->queued_off == s->queued_len) {
      free(s->queued);
      s->queued = NULL;
      pass_eof(s);
    }
    update(s);
    update(peer);
    finish_if_done(p);
    if (s->closed) return;
  }
  if (!(events & UV_READABLE) || s->eof || peer->queued) return;
  for (int turn = 0; turn < READS_PER_TURN; turn++) {
    ssize_t r = read(s->fd, scratch, SCRATCH);
    if (r < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      teardown(p);
      return;
    }
    if (r == 0) {
      s->eof = 1;
      pass_eof(peer);
      update(s);
      finish_if_done(p);
      return;
    }
    if (forward(peer, scratch, (size_t)r) < 0) {
      teardown(p);
      return;
    }
    if (peer->queued) { /* backpressure: read no more until the peer took it */
      update(s);
      update(peer);
      return;
    }
    if (r < SCRATCH) break;
  }
}

static void free_unjoined(uv_handle_t *handle) { free(handle->data); }

static void init_side(Side *s, Pair *p, Side *peer, int fd) {
  s->pair = p;
  s->peer = peer;
  s->fd = fd;
  s->poll.data = p;
}

/* Starts polling a side's descriptor (not yet for any event); -errno, and nothing changed, on failure. */
static int poll_side(uv_loop_t *loop, Side *s) {
  if (uv_poll_init(loop, &s->poll, s->fd) != 0) return -EBADF;
  s->polled = 1;
  s->pair->open_handles++;
  return 0;
}

/* join's sides are duplicates: Node's sockets own the originals. */
static int open_duplicate(uv_loop_t *loop, Side *s, Pair *p, Side *peer, int fd) {
  /* Close-on-exec, as Node's own sockets: a child spawned later (a relay) must not keep the connection alive. */
  int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return -errno;
  init_side(s, p, peer, dup);
  int r = poll_side(loop, s);
  if (r < 0) close(dup);
  return r;
}

/* The callback and its async context; a handle for JavaScript. 0, or with an exception pending. */
static int start_callbacks(napi_env env, Pair *p, napi_value callback, napi_value *external) {
  napi_value name;
  p->env = env;
  napi_create_reference(env, callback, 1, &p->callback);
  napi_create_string_utf8(env, "harbor-pair", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &p->context);
  /* The handle before any poll: a pair that polls must be reachable by cut. */
  return napi_create_external(env, p, NULL, NULL, external) == napi_ok;
}

/* join(clientFd, upstreamFd, onEvent(event, a, b)) -> a handle, or -errno (nothing taken). */
static napi_value js_join(napi_env env, napi_callback_info info) {
  napi_value argv[3], external;
  int32_t client_fd, upstream_fd;
  uv_loop_t *loop;
  if (!native_args(env, info, 3, argv) || !native_int(env, argv[0], &client_fd) || !native_int(env, argv[1], &upstream_fd)) return NULL;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return native_number(env, -EINVAL);
  Pair *p = calloc(1, sizeof *p);
  if (!p) return native_number(env, -ENOMEM);
  int r = open_duplicate(loop, &p->client, p, &p->upstream, client_fd);
  if (r == 0) r = open_duplicate(loop, &p->upstream, p, &p->client, upstream_fd);
  if (r < 0) {
    /* Nothing was handed over: the JavaScript sockets still own the connection. */
    if (p->open_handles == 1) {
      close(p->client.fd);
      uv_close((uv_handle_t *)&p->client.poll, free_unjoined);
    } else free(p);
    return native_number(env, r);
  }
  if (!start_callbacks(env, p, argv[2], &external)) {
    teardown(p);
    return NULL;
  }
  update(&p->client);
  update(&p->upstream);
  return external;
}

/* Nagle off (a proxy adds no delay of its own) and TCP keep-alive, so a peer that vanished without a FIN is found. */
static void tune(int fd, int keepalive_idle_s) {
  int on = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &keepalive_idle_s, sizeof keepalive_idle_s);
}

static void dial_failed(Pair *p, int err) {
  p->failed = -err;
  teardown(p);
}

static void on_connect(uv_poll_t *handle, int status, int events) {
  (void)status;
  (void)events;
  Pair *p = handle->data;
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(p->upstream.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
  if (err == 0 && status < 0) err = ECONNREFUSED;
  if (err) {
    dial_failed(p, err);
    return;
  }
  uv_loop_t *loop = handle->loop;
  stop_dialing(p);
  tune(p->client.fd, p->keepalive_idle_s);
  tune(p->upstream.fd, p->keepalive_idle_s);
  p->upstream.events = 0;
  uv_poll_stop(handle);
  if (poll_side(loop, &p->client) < 0) {
    teardown(p);
    return;
  }
  update(&p->client);
  update(&p->upstream);
  notify(p, CONNECTED, 0, 0);
}

static void on_connect_timeout(uv_timer_t *timer) { dial_failed(timer->data, ETIMEDOUT); }

/*
 * dial(clientFd, address, port, timeoutMs, keepAliveIdleS, onEvent) -> a handle, or -errno
 * when the connect failed at once (the client is still the caller's). The address is a
 * literal IPv4 or IPv6 one.
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
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return native_number(env, -errno);
  if (connect(fd, (struct sockaddr *)&ss, len) < 0 && errno != EINPROGRESS) {
    r = -errno;
    close(fd);
    return native_number(env, r);
  }
  Pair *p = calloc(1, sizeof *p);
  if (!p) {
    close(fd);
    return native_number(env, -ENOMEM);
  }
  init_side(&p->client, p, &p->upstream, client_fd);
  init_side(&p->upstream, p, &p->client, fd);
  p->keepalive_idle_s = keepalive_idle_s;
  if (poll_side(loop, &p->upstream) < 0) {
    close(fd);
    free(p);
    return native_number(env, -EBADF);
  }
  uv_timer_init(loop, &p->connect_timer);
  p->connect_timer.data = p;
  p->open_handles++;
  p->dialing = 1;
  if (!start_callbacks(env, p, argv[5], &external)) {
    dial_failed(p, ENOMEM);
    return NULL;
  }
  /* Writable once connected, or once the connect failed (SO_ERROR says which). */
  p->upstream.events = UV_WRITABLE;
  uv_poll_start(&p->upstream.poll, UV_WRITABLE, on_connect);
  uv_timer_start(&p->connect_timer, on_connect_timeout, (uint64_t)timeout_ms, 0);
  return external;
}

/* listen(address, port, backlog) -> a listening, non-blocking descriptor, or -errno. */
static napi_value js_listen(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t port, backlog;
  if (!native_args(env, info, 3, argv) || !native_int(env, argv[1], &port) || !native_int(env, argv[2], &backlog)) return NULL;
  struct sockaddr_storage ss;
  socklen_t len;
  int r = native_sockaddr(env, argv[0], port, &ss, &len);
  if (r < 0) return native_number(env, r);
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return native_number(env, -errno);
  int on = 1;
  /* As Node's listening sockets: a port whose last connections are in TIME_WAIT can be bound again. */
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
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
  int32_t fd;
  napi_typedarray_type type;
  size_t length;
  void *data;
  if (!native_args(env, info, 2, argv) || !native_int(env, argv[0], &fd)) return NULL;
  if (napi_get_typedarray_info(env, argv[1], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_int32_array) {
    napi_throw_type_error(env, NULL, "dataplane: accept needs an Int32Array");
    return NULL;
  }
  int32_t *fds = data;
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
    {"listen", NULL, js_listen, NULL, NULL, NULL, napi_default, NULL},
    {"accept", NULL, js_accept, NULL, NULL, NULL, napi_default, NULL},
    {"dial", NULL, js_dial, NULL, NULL, NULL, napi_default, NULL},
    {"join", NULL, js_join, NULL, NULL, NULL, napi_default, NULL},
    {"cut", NULL, js_cut, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions);
}
