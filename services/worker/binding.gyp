{
  "targets": [
    {
      "target_name": "udpio",
      "sources": ["native/udpio.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
