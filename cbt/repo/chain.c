/* The image of one backup point: its qcow2 file opened on top of the
 * manifest's chain, for the commands that read a backup in place (cbt
 * mount, cbt serve).
 *
 * The chain is the manifest's, never the backing names written in the
 * files: each file the manifest lists is opened in the repository as a
 * regular file (repo_open_file: no symbolic link can lead out of it), the
 * full backup first, and every header must name exactly the manifest's
 * backing file, or the chain is refused as damaged.  This is how cbt
 * restore opens the chain (cbt/cmd/cmd-restore.c, open_chain), kept in a
 * file of its own so that every reader of a backup resolves it the same
 * way.
 *
 * The caller holds the repository with at least a shared lock for as long
 * as it reads the image, so that pruning cannot remove a file under it.
 */
#include <errno.h>
#include <inttypes.h>

#include "cbt/image.h"
#include "cbt/qcow2.h"
#include "repo.h"

typedef struct cbt_image cbt_image;
G_DEFINE_AUTOPTR_CLEANUP_FUNC(cbt_image, cbt_image_close)

bool
chain_open(repo *r, const repo_backup *b, struct cbt_image **out, GError **error)
{
  g_autoptr(cbt_image) below = NULL;

  for (guint i = repo_chain_start(r, b); ; i++) {
    const repo_backup *c = g_ptr_array_index(r->backups, i);
    g_autofree char *p = repo_path(r, c->file);
    g_autofree char *why = NULL;
    g_autoptr(GError) err = NULL;
    struct cbt_qcow2_link link = { .backing_name = c->backing };
    cbt_image *img = NULL;
    int rc;

    link.fd = repo_open_file(r, c->file, &err);
    if (link.fd < 0) {
      g_set_error(error, CLI_ERROR, err->code, "%s (needed to read %s)", err->message,
                  b->file);
      return false;
    }
    /* The link owns the descriptor and the image below from here on. */
    link.backing = g_steal_pointer(&below);
    rc = cbt_image_open_qcow2_link(p, &link, &img, &why);
    if (rc < 0) {
      g_set_error(error, CLI_ERROR, rc == -EBADMSG ? CLI_EXIT_DAMAGED : CLI_EXIT_FAILED,
                  "%s (in the manifest's chain of %s)", why ? why : g_strerror(-rc),
                  b->file);
      return false;
    }
    below = img;
    if (c == b)
      break;
  }
  /* qcow2 counts in 512-byte sectors; the manifest has the exact size. */
  if (below->size < b->image_size || below->size - b->image_size >= 512) {
    g_autofree char *p = repo_path(r, b->file);

    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: virtual size %" PRIu64
                " does not match the manifest's %" PRIu64, p, below->size, b->image_size);
    return false;
  }
  *out = g_steal_pointer(&below);
  return true;
}
