/* XXH64 (seed 0), after the public xxHash specification by Yann Collet. */
#ifndef TETHER_XXH64_H
#define TETHER_XXH64_H

#include <stddef.h>
#include <stdint.h>

uint64_t tether_xxh64(const void *input, size_t len, uint64_t seed);

#endif
