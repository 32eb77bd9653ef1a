{
  "targets": [
    {
      "target_name": "dataplane",
      "sources": ["native/module.c", "native/udp.c", "native/tcp.c", "native/handoff.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
