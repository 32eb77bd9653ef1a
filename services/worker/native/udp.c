/*
 * Batched UDP I/O for the worker's UDP ports (Linux).
 *
 * Node's dgram costs, per datagram, a 64 KiB allocation, an address object,
 * a call into JavaScript and a send request; on a 2-core host that is more
 * CPU than nginx spends on the whole datagram. Here a port reads up to BATCH
 * datagrams with one recvmmsg into a shared arena and forwards each run with
 * one sendmmsg: JavaScript keeps every decision (sessions, FIFO, ejections)
 * and is called once per batch for reading, once per run for sending.
 *
 * Invariant: the arena holds the last batch read by any socket of this
 * process; everything sent from it (send, sendTo) happens before the next
 * recv. A datagram that must outlive its batch is copied out (copy).
 * Functions return a count or 0 on success and -errno on failure; they never
 * throw for a failing syscall.
 */
#define _GNU_SOURCE
#include <node_api.h>
#include <uv.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "native.h"

#define BATCH 64
#define SLOT 65536 /* the largest UDP payload, so no datagram is ever truncated */

static char *arena;
static unsigned lens[BATCH];

#define CALL(x) do { if ((x) != napi_ok) { napi_throw_error(env, NULL, "dataplane: bad arguments to " #x); return NULL; } } while (0)

/* socket(family 4|6) -> fd: non-blocking, close-on-exec. */
static napi_value js_socket(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t family;
  if (!native_args(env, info, 1, argv) || !native_int(env, argv[0], &family)) return NULL;
  int fd = socket(family == 6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  return native_number(env, fd < 0 ? -errno : fd);
}

static napi_value address_call(napi_env env, napi_callback_info info, int binding) {
  napi_value argv[3];
  int32_t fd, port;
  if (!native_args(env, info, 3, argv) || !native_int(env, argv[0], &fd) || !native_int(env, argv[2], &port)) return NULL;
  struct sockaddr_storage ss;
  socklen_t len = 0;
  int r = native_sockaddr(env, argv[1], port, &ss, &len);
  if (r == 0) r = (binding ? bind(fd, (struct sockaddr *)&ss, len) : connect(fd, (struct sockaddr *)&ss, len)) < 0 ? -errno : 0;
  return native_number(env, r);
}

/*
 * receiveBuffer(fd, bytes) -> the receive buffer the kernel now gives the
 * socket (Linux reports twice what it granted: the rest is its bookkeeping);
 * bytes 0 leaves it as it is. The kernel caps a request at net.core.rmem_max.
 */
static napi_value js_receive_buffer(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd, bytes;
  if (!native_args(env, info, 2, argv) || !native_int(env, argv[0], &fd) || !native_int(env, argv[1], &bytes)) return NULL;
  if (bytes > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes) < 0) return native_number(env, -errno);
  int size = 0;
  socklen_t len = sizeof size;
  return native_number(env, getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, &len) < 0 ? -errno : size);
}

/* bind(fd, address, port) / connect(fd, address, port) -> 0 */
static napi_value js_bind(napi_env env, napi_callback_info info) { return address_call(env, info, 1); }
static napi_value js_connect(napi_env env, napi_callback_info info) { return address_call(env, info, 0); }

static napi_value js_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!native_args(env, info, 1, argv) || !native_int(env, argv[0], &fd)) return NULL;
  return native_number(env, close(fd) < 0 ? -errno : 0);
}

/*
 * recv(fd, meta Int32Array(BATCH * 3)) -> datagrams read into slots 0..n-1.
 * meta[3i] = length, meta[3i+1] = source port, meta[3i+2] = source IPv4
 * address (host order; 0 for any other family).
 */
static napi_value js_recv(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd, *meta;
  size_t length;
  if (!native_args(env, info, 2, argv) || !native_int(env, argv[0], &fd) ||
      !native_int32_array(env, argv[1], BATCH * 3, &meta, &length, "dataplane: recv needs an Int32Array of BATCH * 3")) return NULL;
  struct mmsghdr msgs[BATCH];
  struct iovec iov[BATCH];
  struct sockaddr_storage from[BATCH];
  memset(msgs, 0, sizeof msgs);
  for (int i = 0; i < BATCH; i++) {
    iov[i].iov_base = arena + (size_t)i * SLOT;
    iov[i].iov_len = SLOT;
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
    msgs[i].msg_hdr.msg_name = &from[i];
    msgs[i].msg_hdr.msg_namelen = sizeof from[i];
  }
  int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
  if (n < 0) return native_number(env, -errno);
  for (int i = 0; i < n; i++) {
    struct sockaddr_in *a4 = (struct sockaddr_in *)&from[i];
    lens[i] = msgs[i].msg_len;
    meta[i * 3] = (int32_t)msgs[i].msg_len;
    meta[i * 3 + 1] = a4->sin_family == AF_INET ? ntohs(a4->sin_port) : ntohs(((struct sockaddr_in6 *)a4)->sin6_port);
    meta[i * 3 + 2] = a4->sin_family == AF_INET ? (int32_t)ntohl(a4->sin_addr.s_addr) : 0;
  }
  return native_number(env, n);
}

/* Sends slots first..first+count-1 of the last batch, to `to` when given (else the connected peer). */
static int send_slots(int fd, int32_t first, int32_t count, struct sockaddr_in *to) {
  if (first < 0 || count < 0 || first + count > BATCH) return -EINVAL;
  struct mmsghdr out[BATCH];
  struct iovec iov[BATCH];
  memset(out, 0, sizeof(struct mmsghdr) * (size_t)count);
  for (int i = 0; i < count; i++) {
    iov[i].iov_base = arena + (size_t)(first + i) * SLOT;
    iov[i].iov_len = lens[first + i];
    out[i].msg_hdr.msg_iov = &iov[i];
    out[i].msg_hdr.msg_iovlen = 1;
    if (to) {
      out[i].msg_hdr.msg_name = to;
      out[i].msg_hdr.msg_namelen = sizeof *to;
    }
  }
  int sent = 0;
  while (sent < count) {
    int r = sendmmsg(fd, out + sent, (unsigned)(count - sent), MSG_DONTWAIT);
    if (r < 0) return sent > 0 && errno == EAGAIN ? sent : -errno;
    sent += r;
  }
  return sent;
}

/* send(fd, first, count) -> datagrams sent on a connected socket */
static napi_value js_send(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd, first, count;
  if (!native_args(env, info, 3, argv) || !native_int(env, argv[0], &fd) || !native_int(env, argv[1], &first) || !native_int(env, argv[2], &count)) return NULL;
  return native_number(env, send_slots(fd, first, count, NULL));
}

/* sendTo(fd, first, count, ipv4 (host order), port) -> datagrams sent to that address */
static napi_value js_send_to(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int32_t fd, first, count, ip, port;
  if (!native_args(env, info, 5, argv) || !native_int(env, argv[0], &fd) || !native_int(env, argv[1], &first) || !native_int(env, argv[2], &count) ||
      !native_int(env, argv[3], &ip) || !native_int(env, argv[4], &port))
    return NULL;
  struct sockaddr_in to;
  memset(&to, 0, sizeof to);
  to.sin_family = AF_INET;
  to.sin_port = htons((uint16_t)port);
  to.sin_addr.s_addr = htonl((uint32_t)ip);
  return native_number(env, send_slots(fd, first, count, &to));
}

/* copy(slot) -> a Buffer holding that datagram of the last batch */
static napi_value js_copy(napi_env env, napi_callback_info info) {
  napi_value argv[1], result;
  int32_t slot;
  void *data;
  if (!native_args(env, info, 1, argv) || !native_int(env, argv[0], &slot)) return NULL;
  if (slot < 0 || slot >= BATCH) {
    napi_throw_range_error(env, NULL, "dataplane: no such slot");
    return NULL;
  }
  CALL(napi_create_buffer_copy(env, lens[slot], arena + (size_t)slot * SLOT, &data, &result));
  return result;
}

/* sendBuffer(fd, buffer) -> 0: one datagram from a Buffer on a connected socket */
static napi_value js_send_buffer(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  void *data;
  size_t length;
  if (!native_args(env, info, 2, argv) || !native_int(env, argv[0], &fd) || !native_buffer(env, argv[1], &data, &length)) return NULL;
  return native_number(env, send(fd, data, length, MSG_DONTWAIT) < 0 ? -errno : 0);
}

typedef struct {
  uv_poll_t handle;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
} Poller;

static void on_readable(uv_poll_t *handle, int status, int events) {
  (void)events;
  Poller *p = (Poller *)handle;
  /* A socket error (an ICMP "port unreachable" on a connected socket) makes libuv stop the
     poll and report UV_EBADF. Poll on: the callback's recv returns the error and clears it. */
  if (status < 0) uv_poll_start(handle, UV_READABLE, on_readable);
  napi_handle_scope scope;
  napi_value callback, receiver, result;
  napi_open_handle_scope(p->env, &scope);
  napi_get_reference_value(p->env, p->callback, &callback);
  napi_get_global(p->env, &receiver); /* make_callback wants an object */
  /* make_callback, not call_function: next ticks and microtasks run after it, as after any I/O callback. */
  if (napi_make_callback(p->env, p->context, receiver, callback, 0, NULL, &result) == napi_pending_exception) {
    napi_value err;
    napi_get_and_clear_last_exception(p->env, &err);
    napi_fatal_exception(p->env, err);
  }
  napi_close_handle_scope(p->env, scope);
}

static void free_poller(uv_handle_t *handle) { free(handle); }

/* poll(fd, callback) -> a handle: callback() runs whenever fd is readable, until unpoll (UDP ports, TCP listening sockets). */
static napi_value js_poll(napi_env env, napi_callback_info info) {
  napi_value argv[2], name, external;
  int32_t fd;
  uv_loop_t *loop;
  if (!native_args(env, info, 2, argv) || !native_int(env, argv[0], &fd)) return NULL;
  Poller *p = calloc(1, sizeof *p);
  if (!p) {
    napi_throw_error(env, NULL, "dataplane: out of memory");
    return NULL;
  }
  p->env = env;
  CALL(napi_get_uv_event_loop(env, &loop));
  if (uv_poll_init(loop, &p->handle, fd) != 0) {
    free(p);
    napi_throw_error(env, NULL, "dataplane: cannot poll that descriptor");
    return NULL;
  }
  napi_create_reference(env, argv[1], 1, &p->callback);
  napi_create_string_utf8(env, "harbor-poll", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &p->context);
  uv_poll_start(&p->handle, UV_READABLE, on_readable);
  CALL(napi_create_external(env, p, NULL, NULL, &external));
  return external;
}

/* unpoll(handle): no more callbacks; the descriptor may be closed right after. Once per handle. */
static napi_value js_unpoll(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Poller *p;
  if (!native_args(env, info, 1, argv)) return NULL;
  CALL(napi_get_value_external(env, argv[0], (void **)&p));
  uv_poll_stop(&p->handle);
  napi_delete_reference(env, p->callback);
  napi_async_destroy(env, p->context);
  uv_close((uv_handle_t *)&p->handle, free_poller);
  return NULL;
}

int udp_init(napi_env env, napi_value exports) {
  arena = malloc((size_t)BATCH * SLOT);
  if (!arena) {
    napi_throw_error(env, NULL, "dataplane: cannot allocate the datagram arena");
    return 0;
  }
  napi_property_descriptor functions[] = {
    NATIVE_FUNCTION("socket", js_socket),
    NATIVE_FUNCTION("bind", js_bind),
    NATIVE_FUNCTION("receiveBuffer", js_receive_buffer),
    NATIVE_FUNCTION("connect", js_connect),
    NATIVE_FUNCTION("close", js_close),
    NATIVE_FUNCTION("recv", js_recv),
    NATIVE_FUNCTION("send", js_send),
    NATIVE_FUNCTION("sendTo", js_send_to),
    NATIVE_FUNCTION("copy", js_copy),
    NATIVE_FUNCTION("sendBuffer", js_send_buffer),
    NATIVE_FUNCTION("poll", js_poll),
    NATIVE_FUNCTION("unpoll", js_unpoll),
  };
  NATIVE_EXPORT(env, exports, functions);
  native_export_int(env, exports, "BATCH", BATCH);
  return 1;
}
