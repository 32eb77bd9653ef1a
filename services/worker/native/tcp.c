/*
 * Pairs: the bytes of a proxied TCP connection, carried in C.
 *
 * The worker accepts and dials in JavaScript (rotation, retries, timeouts,
 * Nagle off, keep-alive), then hands both connected sockets here (`join`):
 * each is duplicated, the JavaScript sockets are destroyed, and libuv polls
 * the duplicates. A read goes into one shared scratch buffer and straight to
 * the other side; only what a full socket buffer refuses is kept (per side,
 * and that side's reader then waits: backpressure). Half-close passes
 * through (an EOF shuts the other side's write side once its queue is out);
 * an error on either side closes both. When both sides are closed, the
 * pair's callback gets the bytes written each way, once.
 *
 * Invariant: a pair is freed only after its callback ran; JavaScript drops
 * its handle in that callback, so `cut` never sees a freed pair.
 */
#define _GNU_SOURCE
#include <node_api.h>
#include <uv.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "native.h"

#define SCRATCH 65536
/* Reads per readable event before the loop gets a turn (other connections, timers). */
#define READS_PER_TURN 4

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
  int eof;          /* this side's reader saw EOF */
  int shut;         /* this side's write side is shut down */
  int closed;
} Side;

struct Pair {
  Side client, upstream;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
  int open_handles;
};

static void on_io(uv_poll_t *handle, int status, int events);

static void pair_closed(uv_handle_t *handle) {
  Pair *p = ((Side *)handle)->pair;
  if (--p->open_handles > 0) return;
  napi_env env = p->env;
  napi_handle_scope scope;
  napi_value callback, receiver, argv[2], result;
  napi_open_handle_scope(env, &scope);
  napi_get_reference_value(env, p->callback, &callback);
  napi_get_global(env, &receiver);
  napi_create_double(env, p->upstream.written, &argv[0]);
  napi_create_double(env, p->client.written, &argv[1]);
  if (napi_make_callback(env, p->context, receiver, callback, 2, argv, &result) == napi_pending_exception) {
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
  napi_close_handle_scope(env, scope);
  napi_delete_reference(env, p->callback);
  napi_async_destroy(env, p->context);
  free(p);
}

/* Closes both sides; idempotent. */
static void teardown(Pair *p) {
  Side *sides[2] = {&p->client, &p->upstream};
  for (int i = 0; i < 2; i++) {
    Side *s = sides[i];
    if (s->closed) continue;
    s->closed = 1;
    uv_poll_stop(&s->poll);
    close(s->fd);
    free(s->queued);
    s->queued = NULL;
    uv_close((uv_handle_t *)&s->poll, pair_closed);
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

static void free_unjoined(uv_handle_t *handle) { free(((Side *)handle)->pair); }

static int open_side(uv_loop_t *loop, Side *s, Pair *p, Side *peer, int fd) {
  s->pair = p;
  s->peer = peer;
  /* Close-on-exec, as Node's own sockets: a child spawned later (a relay) must not keep the connection alive. */
  s->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (s->fd < 0) return -errno;
  if (uv_poll_init(loop, &s->poll, s->fd) != 0) {
    close(s->fd);
    return -EBADF;
  }
  p->open_handles++;
  return 0;
}

/* join(clientFd, upstreamFd, onClosed(toBackend, toClient)) -> a handle, or -errno (nothing taken). */
static napi_value js_join(napi_env env, napi_callback_info info) {
  napi_value argv[3], name, external;
  int32_t client_fd, upstream_fd;
  uv_loop_t *loop;
  if (!native_args(env, info, 3, argv) || !native_int(env, argv[0], &client_fd) || !native_int(env, argv[1], &upstream_fd)) return NULL;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return native_number(env, -EINVAL);
  Pair *p = calloc(1, sizeof *p);
  if (!p) return native_number(env, -ENOMEM);
  int r = open_side(loop, &p->client, p, &p->upstream, client_fd);
  if (r == 0) r = open_side(loop, &p->upstream, p, &p->client, upstream_fd);
  if (r < 0) {
    /* Nothing was handed over: the JavaScript sockets still own the connection. */
    if (p->open_handles == 1) {
      close(p->client.fd);
      uv_close((uv_handle_t *)&p->client.poll, free_unjoined);
    } else free(p);
    return native_number(env, r);
  }
  p->env = env;
  napi_create_reference(env, argv[2], 1, &p->callback);
  napi_create_string_utf8(env, "harbor-pair", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &p->context);
  /* The handle first: a pair that polls must be reachable by cut. */
  if (napi_create_external(env, p, NULL, NULL, &external) != napi_ok) {
    teardown(p);
    return NULL;
  }
  update(&p->client);
  update(&p->upstream);
  return external;
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
    {"join", NULL, js_join, NULL, NULL, NULL, napi_default, NULL},
    {"cut", NULL, js_cut, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions);
}
