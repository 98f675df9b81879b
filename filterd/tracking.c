/* Dirty tracking: remembers every range a client changes.
 *
 * Filled in by the persistent bitmap work; until a --bitmap is given the
 * server runs without a tracker (srv.tracking == NULL).
 */
#include <errno.h>

#include "internal.h"

void
tracking_mark(struct tracking *t, uint64_t offset, uint64_t len)
{
  (void)t; (void)offset; (void)len;
}

size_t
tracking_meta_list(struct tracking *t, struct meta_context *out, size_t max)
{
  (void)t; (void)out; (void)max;
  return 0;
}

int
tracking_extents(struct tracking *t, uint32_t id, uint64_t offset,
                 uint32_t len, struct cbt_extent *ext, size_t max)
{
  (void)t; (void)id; (void)offset; (void)len; (void)ext; (void)max;
  return -ENOENT;
}

void
tracking_tick(struct tracking *t)
{
  (void)t;
}
