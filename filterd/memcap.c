/* The daemon-wide cap on request buffers (--max-memory).
 *
 * Each connection already stops reading at 64 MiB of buffers in flight
 * (worker.c), but that bounds one client, not the daemon: 16 clients that
 * queue 32 MiB READs and never read their replies would pin 1 GiB.  So
 * every READ and WRITE also takes its payload's bytes from one budget
 * before its header is consumed.  When the budget is spent, the
 * connection stops reading (the client's requests wait in the socket,
 * which is NBD's own back-pressure) and its worker is told when buffers
 * are given back (memcap_give says when someone waits), from any thread.  Small buffers (block status replies)
 * are charged without waiting: they are bounded per request.
 *
 * A header waits only for memory that other requests hold and will give
 * back: the budget (at least 64M, main.c) is twice the largest payload a
 * request may carry (CBT_NBD_MAX_BLOCK, 32 MiB; a WRITE over it closes
 * its connection, a READ over it is refused without a buffer, worker.c),
 * so any one request fits once the others are done.  worker.c closes a
 * connection whose request could never fit, should the limits change.
 *
 * Memory held by clients that do not read their replies comes back only
 * when they do or go; worker.c closes such a client after SEND_STALL
 * seconds without progress, but only while others wait for memory.
 *
 * Lock-free: one atomic counter of bytes in use, one of connections
 * waiting.
 */
#include "internal.h"

static atomic_uint_fast64_t used;
static atomic_uint waiting;

bool
memcap_take(size_t len)
{
  uint_fast64_t cur = atomic_load(&used);

  do {
    if (cur + len > srv.max_memory && len > 0)
      return false;
  } while (!atomic_compare_exchange_weak(&used, &cur, cur + len));
  return true;
}

void
memcap_charge(size_t len)
{
  atomic_fetch_add(&used, len);
}

bool
memcap_give(size_t len)
{
  if (len == 0)
    return false;
  atomic_fetch_sub(&used, len);
  return atomic_load(&waiting) > 0;
}

void
memcap_wait(void)
{
  atomic_fetch_add(&waiting, 1);
}

void
memcap_unwait(void)
{
  atomic_fetch_sub(&waiting, 1);
}

bool
memcap_pressure(void)
{
  return atomic_load(&waiting) > 0;
}

uint64_t
memcap_used(void)
{
  return atomic_load(&used);
}
