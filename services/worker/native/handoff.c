/*
 * The hand-off channel between the worker and one relay process: a
 * SOCK_SEQPACKET socketpair. The worker sends each accepted client as its
 * descriptor (SCM_RIGHTS) with a small header, and its control messages
 * (JSON bytes: rotations, forgets, stop) on the same channel, so a relay
 * reads them in the order they were sent: a connection's rotation always
 * comes before the connection. Node's IPC passes one handle per round trip
 * (it waits for the child's acknowledgement before the next); here a
 * connection costs one sendmsg in the worker and part of a recvmsg batch in
 * the relay. Functions return a count, or 0, or -errno; they throw only for
 * arguments of the wrong type.
 *
 * A message: four int32 (kind, a, b, c), then for KIND_CONTROL `a` bytes of
 * payload. KIND_CLIENT carries exactly one descriptor; anything else is
 * malformed, and its descriptors are closed here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include "native.h"

/* KIND_CLIENT_LOST is never sent: a client's header whose descriptor did not come (the relay out of descriptors: MSG_CTRUNC, the kernel closed it). */
enum { KIND_MALFORMED = 0, KIND_CLIENT = 1, KIND_CONTROL = 2, KIND_CLIENT_LOST = 3 };
#define HEADER_INTS 4
/* Per message in receive's `meta`: kind, a, b, c, descriptor (-1 for none). */
#define META_INTS 5
/* Descriptors one message may bring before MSG_CTRUNC: one is expected, more are closed. */
#define MAX_FDS 8

/*
 * channel() -> [worker's end, relay's end, largest control payload]: the ends
 * non-blocking, close-on-exec (the relay's end is given to the child by
 * fork's stdio). The kernel refuses (EMSGSIZE) a message longer than the
 * sender's send buffer less 32 bytes; the buffer is left as it is, since it
 * also bounds how many clients wait for a relay that is behind.
 */
static napi_value js_channel(napi_env env, napi_callback_info info) {
  (void)info;
  int sv[2], sndbuf = 0;
  socklen_t len = sizeof sndbuf;
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) return native_number(env, -errno);
  if (getsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, &len) < 0) {
    int err = errno;
    close(sv[0]);
    close(sv[1]);
    return native_number(env, -err);
  }
  napi_value ends;
  napi_create_array_with_length(env, 3, &ends);
  napi_set_element(env, ends, 0, native_number(env, sv[0]));
  napi_set_element(env, ends, 1, native_number(env, sv[1]));
  napi_set_element(env, ends, 2, native_number(env, sndbuf - 32 - (int)(HEADER_INTS * sizeof(int32_t))));
  return ends;
}

/*
 * sendClient(channel, clientFd, a, b, c) -> 0 when the relay has it (a
 * duplicate: the caller closes its descriptor, or the Node socket it is
 * under), or -errno (EAGAIN: the relay is behind; EPIPE: it is gone).
 */
static napi_value js_send_client(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int32_t channel, fd, header[HEADER_INTS] = {KIND_CLIENT, 0, 0, 0};
  if (!native_args(env, info, 5, argv) || !native_int(env, argv[0], &channel) || !native_int(env, argv[1], &fd) ||
      !native_int(env, argv[2], &header[1]) || !native_int(env, argv[3], &header[2]) || !native_int(env, argv[4], &header[3]))
    return NULL;
  union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } control;
  memset(&control, 0, sizeof control);
  struct iovec iov = {header, sizeof header};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
  struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);
  return native_number(env, sendmsg(channel, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 ? -errno : 0);
}

/* sendControl(channel, bytes: Buffer) -> 0, or -errno (nothing sent). */
static napi_value js_send_control(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t channel;
  void *data;
  size_t length;
  if (!native_args(env, info, 2, argv) || !native_int(env, argv[0], &channel) || !native_buffer(env, argv[1], &data, &length)) return NULL;
  int32_t header[HEADER_INTS] = {KIND_CONTROL, (int32_t)length, 0, 0};
  struct iovec iov[2] = {{header, sizeof header}, {data, length}};
  struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
  return native_number(env, sendmsg(channel, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 ? -errno : 0);
}

/* Closes every descriptor a message brought (a malformed one's, or the extras). */
static void close_all(struct msghdr *msg) {
  for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < n; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      close(fd);
    }
  }
}

/* The one descriptor a message brought, or -1 (none, or more than one: then all are closed). */
static int only_descriptor(struct msghdr *msg) {
  int found = -1, count = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    if (n >= 1 && count == 0) memcpy(&found, CMSG_DATA(c), sizeof found);
    count += n;
  }
  if (count == 1 && !(msg->msg_flags & MSG_CTRUNC)) return found;
  close_all(msg);
  return -1;
}

/*
 * receive(channel, meta: Int32Array, payload: Buffer) -> messages read, 0
 * when none waits, -EPIPE when the worker's end is closed, or -errno. Each
 * fills META_INTS of meta: kind, a, b, c, descriptor. A control message's
 * payload is copied to `payload` (its length is `a`) and ends the batch, so
 * it is handled before anything sent after it. A client whose descriptor
 * did not come (or came with others) is KIND_CLIENT_LOST with its numbers,
 * so the relay can count it ended; any other malformed message (short, cut)
 * comes as KIND_MALFORMED. Descriptors of either are closed.
 */
static napi_value js_receive(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t channel, *meta;
  size_t meta_length, payload_length;
  void *payload;
  if (!native_args(env, info, 3, argv) || !native_int(env, argv[0], &channel) ||
      !native_int32_array(env, argv[1], META_INTS, &meta, &meta_length, "dataplane: receive wants an Int32Array of at least 5") ||
      !native_buffer(env, argv[2], &payload, &payload_length))
    return NULL;
  size_t room = meta_length / META_INTS, count = 0;
  while (count < room) {
    int32_t header[HEADER_INTS];
    union {
      char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
      struct cmsghdr align;
    } control;
    struct iovec iov[2] = {{header, sizeof header}, {payload, payload_length}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    ssize_t n = recvmsg(channel, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (count > 0 || errno == EAGAIN || errno == EWOULDBLOCK) break;
      return native_number(env, -errno);
    }
    if (n == 0 && msg.msg_controllen == 0) {
      if (count > 0) break;
      return native_number(env, -EPIPE);
    }
    int32_t *m = meta + count * META_INTS;
    count++;
    int whole = (size_t)n >= sizeof header && !(msg.msg_flags & MSG_TRUNC);
    if (whole && header[0] == KIND_CLIENT && (size_t)n == sizeof header) {
      int fd = only_descriptor(&msg);
      m[0] = fd >= 0 ? KIND_CLIENT : KIND_CLIENT_LOST;
      m[1] = header[1], m[2] = header[2], m[3] = header[3], m[4] = fd;
      continue;
    }
    close_all(&msg);
    m[4] = -1;
    if (whole && header[0] == KIND_CONTROL && header[1] >= 0 && (size_t)n == sizeof header + (size_t)header[1]) {
      m[0] = KIND_CONTROL, m[1] = header[1], m[2] = 0, m[3] = 0;
      break;
    }
    m[0] = KIND_MALFORMED, m[1] = (int32_t)n, m[2] = 0, m[3] = 0;
  }
  return native_number(env, (double)count);
}

void handoff_init(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
    NATIVE_FUNCTION("channel", js_channel),
    NATIVE_FUNCTION("sendClient", js_send_client),
    NATIVE_FUNCTION("sendControl", js_send_control),
    NATIVE_FUNCTION("receive", js_receive),
  };
  NATIVE_EXPORT(env, exports, functions);
  native_export_int(env, exports, "HANDOFF_CLIENT", KIND_CLIENT);
  native_export_int(env, exports, "HANDOFF_CONTROL", KIND_CONTROL);
  native_export_int(env, exports, "HANDOFF_CLIENT_LOST", KIND_CLIENT_LOST);
}
