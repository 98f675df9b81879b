/* The daemon's features as a stack of layers over the image.
 *
 * A guest request on the main export passes down one fixed stack
 * (dispatch.c, `stack[]`):
 *
 *     quiesce -> instant restore -> point-in-time view -> tracking -> image
 *
 * Each layer implements the hooks it needs of one small interface, struct
 * layer, and knows nothing of the layers around it nor of the worker
 * threads: dispatch.c owns the request's life and walks the stack; a
 * layer that has to wait gets a continuation from it and an execution
 * context (struct exec) to resume it on, never a worker.  So a new layer
 * (a rate limit, a compressed view) is one file and one line in stack[].
 *
 * Order, and why:
 *   - quiesce first: a checkpoint cuts the stream of changes before any
 *     layer below has seen a change of the next interval;
 *   - instant restore and the point-in-time view next: a change waits
 *     until the backup's data is in its granules (restore) and the old
 *     data a running backup still needs is saved (view);
 *   - tracking last: the change's dirty bit is set -- and in crash-safe
 *     mode durable -- right before the data write is submitted, whatever
 *     the layers above did meanwhile (bitmap-format.md's rule).
 * After the image I/O, after_change runs bottom-up (tracking marks the
 * bits again, quiesce lets the change out); a FLUSH, or a FUA change,
 * runs flush top-down before its reply (restore progress, then bitmap).
 *
 * The one callback pair among the daemon's files is worker.c <->
 * dispatch.c: the worker hands each request to dispatch_request() and
 * dispatch.c queues the reply with conn_reply(); struct exec's operations
 * are worker.c's, reached through the table each exec carries.
 */
#ifndef CBT_FILTERD_LAYER_H
#define CBT_FILTERD_LAYER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <liburing.h>

#include "cbt/image.h"

/* ---- execution context ---- */

/* Where a request runs: one thread with one io_uring.  A layer resumes a
 * waiting request with exec_post() on the request's exec; I/O it submits
 * itself goes on exec_ring() under exec_hold() (a stopping thread waits
 * until every hold is dropped). */
struct exec;
struct exec_ops {
  /* Run fn(arg) on @ex's thread (any thread may call). */
  void (*post)(struct exec *ex, void (*fn)(void *arg), void *arg);
  /* @ex's ring, for I/O submitted on its thread. */
  struct io_uring *(*ring)(struct exec *ex);
  /* On @ex's thread: I/O not owned by a request is in flight / done. */
  void (*hold)(struct exec *ex);
  void (*unhold)(struct exec *ex);
};
struct exec {
  const struct exec_ops *ops;
};

static inline void
exec_post(struct exec *ex, void (*fn)(void *arg), void *arg)
{
  ex->ops->post(ex, fn, arg);
}

static inline struct io_uring *
exec_ring(struct exec *ex)
{
  return ex->ops->ring(ex);
}

static inline void
exec_hold(struct exec *ex)
{
  ex->ops->hold(ex);
}

static inline void
exec_unhold(struct exec *ex)
{
  ex->ops->unhold(ex);
}

/* ---- the layer interface ---- */

/* What a layer sees of a request: its range and kind, and where it runs.
 * For a READ, @buf receives the data. */
struct layer_req {
  struct exec *ex;
  uint16_t type;                 /* NBD_CMD_* */
  uint16_t flags;                /* NBD_CMD_FLAG_* */
  uint64_t offset;
  uint32_t length;
  void *buf;
};

/* A continuation: @k(@arg, 0 or -errno), run on the request's exec,
 * never inside the hook that took it. */
typedef void layer_cont(void *arg, int res);

struct layer {
  const char *name;
  /* Is the layer in the stack now?  NULL: always.  Lock-free; a layer
   * that is not in it is skipped by every hook below. */
  bool (*active)(void);
  /* A WRITE, WRITE_ZEROES or TRIM is about to go down.  false: go on to
   * the next layer now.  true: the layer waits for something; @k runs
   * once with 0, and then this hook is asked again (more may be needed:
   * another checkpoint, more granules to copy), or with -errno, and the
   * change fails with EIO. */
  bool (*before_change)(const struct layer_req *r, layer_cont *k, void *arg);
  /* The change's image I/O completed with @res, or a layer below this one
   * refused it (@res < 0).  Runs bottom-up, on the request's thread. */
  void (*after_change)(const struct layer_req *r, int res);
  /* A READ of the main export.  false: the layer below serves it.  true:
   * this layer fills r->buf and then @k runs with 0 or -errno. */
  bool (*read)(const struct layer_req *r, layer_cont *k, void *arg);
  /* base:allocation of the main export: the number of extents written to
   * @ext (at most @max), -errno, or -ENOTSUP to let the layer below
   * answer.  Lock-free. */
  int (*block_status)(uint64_t offset, uint32_t len, struct cbt_extent *ext,
                      size_t max);
  /* A FLUSH, or a change with FUA, completed on the image: make this
   * layer's state durable before the reply.  false: nothing to do.  true:
   * @k runs once with 0 (done) or -errno (the reply is EIO). */
  bool (*flush)(const struct layer_req *r, layer_cont *k, void *arg);
};

/* The layers, each defined at the end of its own file. */
extern const struct layer quiesce_layer;     /* quiesce.c */
extern const struct layer restore_layer;     /* restore.c */
extern const struct layer snapshot_layer;    /* snapshot.c */
extern const struct layer tracking_layer;    /* tracking.c */

#endif
