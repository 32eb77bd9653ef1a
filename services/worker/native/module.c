/*
 * dataplane: the worker's native module. `udp.c`: batched UDP I/O for UDP
 * ports; `tcp.c`: proxied TCP pairs carried in C. JavaScript keeps every
 * decision (rotation, sessions, ejections); this only moves bytes. Functions
 * return a count, or 0, or -errno for a failed syscall; they throw only for
 * arguments of the wrong type.
 */
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

NAPI_MODULE_INIT() {
  if (!udp_init(env, exports)) return NULL;
  tcp_init(env, exports);
  return exports;
}
