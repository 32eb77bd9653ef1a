/*
 * dataplane: the worker's native module. `udp.c`: batched UDP I/O for UDP
 * ports, and `poll`, which TCP's listening sockets use too; `tcp.c`: TCP
 * listened on, accepted, dialled and carried in C; `handoff.c`: accepted
 * clients passed to relay processes as descriptors. JavaScript keeps every
 * decision (rotation, sessions, ejections); this only moves bytes. Functions
 * return a count, or 0, or -errno for a failed syscall; they throw only for
 * arguments of the wrong type.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <net/if.h>
#include <stdlib.h>
#include <string.h>
#include "native.h"

napi_value native_number(napi_env env, double v) {
  napi_value r;
  napi_create_double(env, v, &r);
  return r;
}

int native_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "dataplane: too few arguments");
    return 0;
  }
  return 1;
}

int native_int(napi_env env, napi_value v, int32_t *out) {
  if (napi_get_value_int32(env, v, out) != napi_ok) {
    napi_throw_type_error(env, NULL, "dataplane: expected a number");
    return 0;
  }
  return 1;
}

int native_int32_array(napi_env env, napi_value v, size_t min_length, int32_t **data, size_t *length, const char *message) {
  napi_typedarray_type type;
  void *bytes;
  if (napi_get_typedarray_info(env, v, &type, length, &bytes, NULL, NULL) != napi_ok || type != napi_int32_array || *length < min_length) {
    napi_throw_type_error(env, NULL, message);
    return 0;
  }
  *data = bytes;
  return 1;
}

int native_buffer(napi_env env, napi_value v, void **data, size_t *length) {
  if (napi_get_buffer_info(env, v, data, length) != napi_ok) {
    napi_throw_type_error(env, NULL, "dataplane: expected a Buffer");
    return 0;
  }
  return 1;
}

void native_export_int(napi_env env, napi_value exports, const char *name, int32_t value) {
  napi_value v;
  napi_create_int32(env, value, &v);
  napi_set_named_property(env, exports, name, v);
}

int native_sockaddr(napi_env env, napi_value host, int32_t port, struct sockaddr_storage *ss, socklen_t *len) {
  char text[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
  size_t n;
  if (napi_get_value_string_utf8(env, host, text, sizeof text, &n) != napi_ok || port < 0 || port > 65535) return -EINVAL;
  memset(ss, 0, sizeof *ss);
  struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
  if (inet_pton(AF_INET, text, &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    *len = sizeof *a4;
    return 0;
  }
  /* A link-local address may name its interface: fe80::1%eth0 (or %2). */
  char *zone = strchr(text, '%');
  if (zone) *zone++ = '\0';
  if (inet_pton(AF_INET6, text, &a6->sin6_addr) == 1) {
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons((uint16_t)port);
    if (zone) {
      char *end;
      unsigned long index = strtoul(zone, &end, 10);
      a6->sin6_scope_id = *zone && !*end ? (uint32_t)index : if_nametoindex(zone);
      if (a6->sin6_scope_id == 0) return -EINVAL;
    }
    *len = sizeof *a6;
    return 0;
  }
  return -EINVAL;
}

/* glibc keeps freed pages inside its arenas (one per thread that called
 * malloc); start-up leaves some in each. 1 when memory went back to the system. */
static napi_value trim_memory(napi_env env, napi_callback_info info) {
  (void)info;
  return native_number(env, malloc_trim(0));
}

NAPI_MODULE_INIT() {
  if (!udp_init(env, exports)) return NULL;
  tcp_init(env, exports);
  handoff_init(env, exports);
  napi_property_descriptor functions[] = {NATIVE_FUNCTION("trimMemory", trim_memory)};
  NATIVE_EXPORT(env, exports, functions);
  return exports;
}
