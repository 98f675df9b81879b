/* Meta contexts: what BLOCK_STATUS can describe.
 *
 * base:allocation comes from the image backend (SEEK_DATA/SEEK_HOLE on raw
 * files).  Dirty bitmaps (qemu:dirty-bitmap:NAME, QEMU's naming, so
 * existing backup tools read them unchanged) come from tracking.c.
 * Context ids are fixed for the life of the daemon: 1 is base:allocation,
 * 2 and up are dirty bitmaps in tracking.c's order.  The @checkpoint
 * export (snapshot.c) offers base:allocation of the point-in-time view and
 * the checkpoint's frozen bitmap.
 */
#include <errno.h>
#include <string.h>

#include "internal.h"

size_t
meta_list(struct meta_context *out, size_t max, bool view)
{
  size_t n = 0;

  if (n < max) {
    out[n].id = META_ID_BASE_ALLOCATION;
    g_strlcpy(out[n].name, NBD_META_BASE_ALLOCATION, sizeof out[n].name);
    n++;
  }
  if (srv.tracking)
    n += tracking_meta_list(srv.tracking, out + n, max - n, view);
  return n;
}

bool
meta_query_matches(const char *query, const char *name, bool list)
{
  size_t qlen = strlen(query);

  if (strcmp(query, name) == 0)
    return true;
  /* LIST accepts a namespace ("base:") or a leaf prefix ending in ':'
   * ("qemu:dirty-bitmap:") and returns everything under it. */
  return list && qlen > 0 && query[qlen - 1] == ':' &&
         strncmp(query, name, qlen) == 0;
}

int
meta_extents(struct snapshot *snap, uint32_t id, uint64_t offset, uint32_t len,
             bool req_one, struct cbt_extent *ext, size_t max)
{
  int n;

  if (req_one)
    max = 1;
  if (id == META_ID_BASE_ALLOCATION && snap) {
    n = snapshot_block_status(snap, offset, len, ext, max);
  } else if (id == META_ID_BASE_ALLOCATION) {
    n = srv.image->ops->block_status(srv.image, offset, len, ext, max);
  } else if (srv.tracking) {
    n = tracking_extents(srv.tracking, id, offset, len, ext, max);
  } else {
    n = -ENOENT;
  }
  if (n == 0)
    n = -EIO;
  return n;
}
