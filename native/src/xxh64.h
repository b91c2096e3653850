/* XXH64 (seed 0), after the public xxHash specification by Yann Collet. */
#ifndef TETHER_XXH64_H
#define TETHER_XXH64_H

#include <stddef.h>
#include <stdint.h>

#include <string.h>

uint64_t tether_xxh64(const void *input, size_t len, uint64_t seed);

/* Little-endian 64-bit load/store, whatever the host's byte order. */
static inline uint64_t tether_load_le64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

static inline void tether_store_le64(uint8_t *p, uint64_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  memcpy(p, &v, 8);
}

#endif
