/* Small helpers shared by lib/, the daemon and the CLI. */
#ifndef CBT_UTIL_H
#define CBT_UTIL_H

#include <endian.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The struct that embeds @ptr as @member.  Goes through void * so that
 * -Wcast-align accepts it: the member really is inside such a struct. */
#define cbt_container_of(ptr, type, member) \
  ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

/* Big-endian fields in byte buffers (NBD and qcow2 are big-endian), read
 * and written with memcpy so no pointer into a buffer is ever misaligned. */
static inline uint16_t cbt_get_be16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t cbt_get_be32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t cbt_get_be64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void cbt_put_be16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void cbt_put_be32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void cbt_put_be64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

struct stat;

/* open(2) @path with @flags for a regular file, never blocking: it is
 * opened with O_NONBLOCK (a FIFO would otherwise wait for a writer),
 * checked to be a regular file (-EINVAL otherwise, *@why naming what it
 * is), and O_NONBLOCK is cleared again unless @flags has it.  *@st (may
 * be NULL) gets its fstat.  Returns the descriptor or -errno with *@why
 * set as cbt_fail does ("PATH: reason"). */
int cbt_open_regular(const char *path, int flags, struct stat *st, char **why);

/* A size as users write it: digits, then optionally K, M, G or T (powers
 * of 1024), "i" after the unit and a final "B": "65536", "64K", "512MiB",
 * "10G".  No sign, no blanks.  0, or -EINVAL when @s is not a size and
 * -ERANGE when it does not fit 64 bits.  Bounds are the caller's. */
int cbt_parse_size(const char *s, uint64_t *out);

/* Are all @len bytes at @p zero?  (True for @len 0.)  Fast on data:
 * most blocks fail on the first bytes, and the rest compares the buffer
 * with itself shifted by 16 bytes once the first 16 are known zero. */
bool cbt_is_zero(const void *p, size_t len);

/* For lib/ functions that return -errno and explain through a
 * `char **why` out-parameter: if @why is non-NULL and still NULL, set
 * *why to the formatted reason (g_free it).  Returns @err, so a failure
 * path reads `return cbt_fail(why, -EINVAL, "bad thing %d", x);`. */
int cbt_fail(char **why, int err, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

#endif
