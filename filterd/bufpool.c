/* Per-worker pool of page-aligned data buffers.
 *
 * Buffers come in power-of-two classes from 4 KiB to the largest request
 * (32 MiB).  Freed buffers go on a per-class free list, capped so a burst
 * of large requests does not pin memory forever.  Page alignment lets the
 * same buffer be used with O_DIRECT.  One pool per worker thread: no lock.
 *
 * Idle memory goes back: bufpool_trim, called about once a second, frees
 * as many buffers of each class as stayed unused on its free list for the
 * whole time since the previous trim (the lowest the list got).  A
 * steady load keeps what it uses; a burst's buffers are gone a second or
 * two after it.
 */
#include <stdlib.h>

#include "internal.h"

#define MIN_SHIFT 12
#define MAX_SHIFT 25                 /* 32 MiB = CBT_NBD_MAX_BLOCK */
#define N_CLASSES (MAX_SHIFT - MIN_SHIFT + 1)
#define CACHE_BYTES_PER_CLASS (8u * 1024 * 1024)

struct free_buf {
  struct free_buf *next;
};

struct bufpool {
  struct free_buf *free[N_CLASSES];
  unsigned count[N_CLASSES];
  unsigned low[N_CLASSES];           /* lowest count since the last trim */
};

_Static_assert(CBT_NBD_MAX_BLOCK == (1u << MAX_SHIFT), "pool covers max block");

static unsigned
class_of(size_t len)
{
  unsigned shift = MIN_SHIFT;

  while (shift < MAX_SHIFT && ((size_t)1 << shift) < len)
    shift++;
  return shift - MIN_SHIFT;
}

struct bufpool *
bufpool_new(void)
{
  return g_new0(struct bufpool, 1);
}

void
bufpool_free(struct bufpool *p)
{
  if (!p)
    return;
  for (unsigned i = 0; i < N_CLASSES; i++) {
    while (p->free[i]) {
      struct free_buf *b = p->free[i];
      p->free[i] = b->next;
      free(b);
    }
  }
  g_free(p);
}

/* Returns a buffer of at least @len bytes (len <= 32 MiB), or NULL. */
void *
bufpool_get(struct bufpool *p, size_t len)
{
  unsigned c = class_of(len);
  void *buf;

  if (p->free[c]) {
    struct free_buf *b = p->free[c];
    p->free[c] = b->next;
    p->count[c]--;
    if (p->count[c] < p->low[c])
      p->low[c] = p->count[c];
    return b;
  }
  if (posix_memalign(&buf, 4096, (size_t)1 << (c + MIN_SHIFT)) != 0)
    return NULL;
  return buf;
}

/* Give back a buffer obtained with the same @len. */
void
bufpool_put(struct bufpool *p, void *buf, size_t len)
{
  unsigned c = class_of(len);
  size_t size = (size_t)1 << (c + MIN_SHIFT);

  if (!buf)
    return;
  if ((p->count[c] + 1) * size > CACHE_BYTES_PER_CLASS && p->count[c] >= 2) {
    free(buf);
    return;
  }
  ((struct free_buf *)buf)->next = p->free[c];
  p->free[c] = buf;
  p->count[c]++;
}

size_t
bufpool_trim(struct bufpool *p)
{
  size_t freed = 0;

  for (unsigned c = 0; c < N_CLASSES; c++) {
    for (unsigned n = p->low[c]; n > 0 && p->free[c]; n--) {
      struct free_buf *b = p->free[c];
      p->free[c] = b->next;
      p->count[c]--;
      free(b);
      freed += (size_t)1 << (c + MIN_SHIFT);
    }
    p->low[c] = p->count[c];
  }
  return freed;
}
