{
  "targets": [
    {
      "target_name": "tether_native",
      "sources": ["src/tether_native.c", "src/xxh64.c", "src/tap.c"],
      "cflags": ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
      "cflags!": ["-O2", "-O0"],
      "ldflags": ["-pthread"],
      "defines": ["_GNU_SOURCE", "_FILE_OFFSET_BITS=64", "NAPI_VERSION=8"]
    }
  ]
}
