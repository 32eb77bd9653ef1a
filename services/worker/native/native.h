/* The worker's native data-plane module: what its parts share. */
#ifndef HARBOR_NATIVE_H
#define HARBOR_NATIVE_H
#include <node_api.h>
#include <sys/socket.h>

napi_value native_number(napi_env env, double v);
/* Fills argv with `want` arguments; throws a TypeError and returns 0 when fewer came. */
int native_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv);
/* Reads a whole number; throws a TypeError and returns 0 for anything else. */
int native_int(napi_env env, napi_value v, int32_t *out);

/* An Int32Array of at least min_length elements; throws a TypeError with `message` and returns 0 for anything else. */
int native_int32_array(napi_env env, napi_value v, size_t min_length, int32_t **data, size_t *length, const char *message);
/* A Buffer's bytes; throws a TypeError and returns 0 for anything else. */
int native_buffer(napi_env env, napi_value v, void **data, size_t *length);
/* exports[name] = value, a whole number. */
void native_export_int(napi_env env, napi_value exports, const char *name, int32_t value);
/* A literal IPv4 or IPv6 address and a port; -EINVAL for anything else. */
int native_sockaddr(napi_env env, napi_value host, int32_t port, struct sockaddr_storage *ss, socklen_t *len);

/* An exported function, for a part's table of them. */
#define NATIVE_FUNCTION(name, fn) {name, NULL, fn, NULL, NULL, NULL, napi_default, NULL}
/* Adds a part's table of NATIVE_FUNCTIONs (an array, not a pointer) to the exports. */
#define NATIVE_EXPORT(env, exports, table) napi_define_properties(env, exports, sizeof(table) / sizeof((table)[0]), table)

/* Each part adds its functions to the exports; 0 (with an exception pending) on failure. */
int udp_init(napi_env env, napi_value exports);
void tcp_init(napi_env env, napi_value exports);
void handoff_init(napi_env env, napi_value exports);
#endif
