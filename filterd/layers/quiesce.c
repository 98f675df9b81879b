/* Quiescing guest changes for a checkpoint.
 *
 * checkpoint-begin must cut the stream of guest changes at one point: the
 * frozen bitmap, the point-in-time view and (in crash-safe mode) the order
 * of bitmap writes all assume that no WRITE, WRITE_ZEROES or TRIM is
 * between "marked" and "completed" while the bits move.  So every such
 * request passes a gate when it is dispatched and leaves it when its image
 * I/O has completed (the first layer of dispatch.c's stack, layer.h).  quiesce_begin() closes the gate and
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
#include "layer.h"

struct parked {
  struct exec *ex;
  layer_cont *cont;
  void *arg;
};

static atomic_bool closed;
static atomic_uint inside;
static GMutex lock;                 /* parked, and the wait for inside == 0 */
static GCond drained;
static GPtrArray *parked;           /* struct parked * */

bool
quiesce_enter(struct exec *ex, layer_cont *cont, void *arg)
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
  p->ex = ex;
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
quiesce_begin(unsigned timeout_s)
{
  gint64 deadline = g_get_monotonic_time() + (gint64)timeout_s * G_TIME_SPAN_SECOND;

  g_mutex_lock(&lock);
  atomic_store(&closed, true);
  while (atomic_load(&inside) > 0) {
    if (!g_cond_wait_until(&drained, &lock, deadline) && atomic_load(&inside) > 0) {
      g_mutex_unlock(&lock);
      quiesce_end();
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

  p->cont(p->arg, 0);
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
    exec_post(p->ex, resume, p);
  }
}

/* ---- the layer ---- */

static bool
layer_before_change(const struct layer_req *r, layer_cont *k, void *arg)
{
  return !quiesce_enter(r->ex, k, arg);
}

static void
layer_after_change(const struct layer_req *r, int res)
{
  (void)r;
  (void)res;
  quiesce_exit();
}

const struct layer quiesce_layer = {
  .name = "quiesce",
  .before_change = layer_before_change,
  .after_change = layer_after_change,
};
