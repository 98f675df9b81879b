/* Quiescing guest changes for a checkpoint.
 *
 * checkpoint-begin must cut the stream of guest changes at one point: the
 * frozen bitmap, the point-in-time view and (in crash-safe mode) the order
 * of bitmap writes all assume that no WRITE, WRITE_ZEROES or TRIM is
 * between "marked" and "completed" while the bits move.  So every such
 * request passes a gate when it is dispatched and leaves it when its image
 * I/O has completed (dispatch.c).  quiesce_begin() closes the gate and
 * waits until nothing is inside; requests that arrive meanwhile are parked
 * and resumed on their own worker by quiesce_end().  Reads never pass the
 * gate.  The pause lasts as long as the slowest change already in flight
 * (a copy-before-write or a bitmap commit included) plus the checkpoint's
 * own bitmap writes.
 *
 * Fast path: one atomic increment and one load on enter, one decrement on
 * exit.  The increment comes before the check of the closed flag and the
 * closer sets the flag before it reads the count (both sequentially
 * consistent), so either the closer sees our increment and waits for us,
 * or we see the flag and park.
 */
#include <errno.h>

#include "internal.h"

struct parked {
  struct worker *w;
  void (*cont)(void *arg);
  void *arg;
};

static atomic_bool closed;
static atomic_uint inside;
static GMutex lock;                 /* parked, and the wait for inside == 0 */
static GCond drained;
static GPtrArray *parked;           /* struct parked * */

bool
quiesce_enter(struct worker *w, void (*cont)(void *arg), void *arg)
{
  struct parked *p;

  atomic_fetch_add(&inside, 1);
  if (!atomic_load(&closed))
    return true;
  quiesce_exit();
  g_mutex_lock(&lock);
  if (!atomic_load(&closed)) {       /* reopened meanwhile */
    g_mutex_unlock(&lock);
    atomic_fetch_add(&inside, 1);
    return true;
  }
  p = g_new(struct parked, 1);
  p->w = w;
  p->cont = cont;
  p->arg = arg;
  if (!parked)
    parked = g_ptr_array_new();
  g_ptr_array_add(parked, p);
  g_mutex_unlock(&lock);
  return false;
}

void
quiesce_exit(void)
{
  if (atomic_fetch_sub(&inside, 1) == 1 && atomic_load(&closed)) {
    g_mutex_lock(&lock);
    g_cond_broadcast(&drained);
    g_mutex_unlock(&lock);
  }
}

bool
quiesce_begin(unsigned timeout_s, GError **error)
{
  gint64 deadline = g_get_monotonic_time() + (gint64)timeout_s * G_TIME_SPAN_SECOND;

  g_mutex_lock(&lock);
  atomic_store(&closed, true);
  while (atomic_load(&inside) > 0) {
    if (!g_cond_wait_until(&drained, &lock, deadline) && atomic_load(&inside) > 0) {
      g_mutex_unlock(&lock);
      quiesce_end();
      g_set_error(error, CTL_ERROR, CTL_ERR_GENERIC,
                  "guest writes in flight did not complete within %u s", timeout_s);
      return false;
    }
  }
  g_mutex_unlock(&lock);
  return true;
}

static void
resume(void *arg)
{
  struct parked *p = arg;

  p->cont(p->arg);
  g_free(p);
}

void
quiesce_end(void)
{
  g_autoptr(GPtrArray) list = NULL;

  g_mutex_lock(&lock);
  atomic_store(&closed, false);
  list = g_steal_pointer(&parked);
  g_mutex_unlock(&lock);
  /* A resumed request enters again: it may meet the next begin. */
  for (guint i = 0; list && i < list->len; i++) {
    struct parked *p = list->pdata[i];
    worker_post(p->w, resume, p);
  }
}
