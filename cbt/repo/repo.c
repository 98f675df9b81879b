/* The backup repository: its manifest (manifest.c) on storage, a
 * directory (repo-dir.c) or an S3 bucket (repo-s3.c), each a backend
 * behind struct repo_backend (repo.h).  This file opens a repository on
 * the backend its name asks for and runs what changes it: adding a
 * backup, pruning, cleaning what a killed run left.
 *
 * Either backend lists a file in the manifest only once it is complete
 * and replaces the manifest atomically, so the manifest lists only
 * complete files; a crash leaves at most a partial file or upload, or an
 * unlisted file whose seq is >= next-seq, and repo_clean_stale removes
 * them under the lock.  Pruning (repo_prune) rewrites the manifest before
 * it deletes files, so a crash there leaves unlisted files older than
 * every listed one, which repo_clean_stale removes too.
 *
 * Locking: backup and prune hold the repository exclusively, restore and
 * verify shared (S3 has no shared lock), list not at all; the backends
 * say how.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cbt/util.h"
#include "repo.h"

void
repo_free(repo *r)
{
  if (!r)
    return;
  if (r->backend)
    r->backend->close(r);
  g_free(r->dir);
  if (r->backups)
    g_ptr_array_unref(r->backups);
  g_free(r);
}

bool
repo_open(const char *dir, enum repo_lock lock, bool create, repo **out,
          GError **error)
{
  g_autoptr(repo) r = g_new0(repo, 1);

  r->lock_fd = -1;
  r->backups = g_ptr_array_new_with_free_func((GDestroyNotify)repo_backup_free);
  r->next_seq = 1;
  r->backend = g_ascii_strncasecmp(dir, "s3://", 5) == 0 ? &repo_s3_backend
                                                         : &repo_dir_backend;
  if (!r->backend->open(r, dir, lock, create, error))
    return false;
  *out = g_steal_pointer(&r);
  return true;
}

bool
repo_clean_stale(repo *r, GError **error)
{
  return r->backend->clean_stale(r, error);
}

/* Replace the manifest with @text: atomically in a directory (see
 * write_atomic), with one PUT on S3 (which S3 makes visible at once). */
static bool
put_manifest(repo *r, const char *text, GError **error)
{
  return r->backend->put_manifest(r, text, error);
}

bool
repo_add(repo *r, repo_backup *b, GError **error)
{
  g_autofree char *text = NULL;

  g_ptr_array_add(r->backups, b);
  text = repo_manifest_text(r, b->seq + 1);
  if (!put_manifest(r, text, error)) {
    g_ptr_array_remove_index(r->backups, r->backups->len - 1);
    return false;
  }
  r->next_seq = b->seq + 1;
  return true;
}

bool
repo_lock_check(repo *r, GError **error)
{
  return r->backend->lock_check(r, error);
}

bool
repo_delete_file(repo *r, const char *file, GError **error)
{
  return r->backend->delete_file(r, file, error);
}

bool
repo_prune(repo *r, guint count, GError **error)
{
  g_autoptr(GPtrArray) gone = NULL;
  g_autofree char *text = NULL;

  g_assert(count <= r->backups->len);
  g_assert(count == r->backups->len ||
           strcmp(((repo_backup *)g_ptr_array_index(r->backups, count))->kind,
                  "full") == 0);
  gone = g_ptr_array_new_with_free_func((GDestroyNotify)repo_backup_free);
  for (guint i = 0; i < count; i++)
    g_ptr_array_add(gone, g_ptr_array_steal_index(r->backups, 0));
  /* The manifest first: a crash after it leaves files that no manifest
   * lists (and nothing reads), never a manifest naming missing ones. */
  text = repo_manifest_text(r, r->next_seq);
  if (!put_manifest(r, text, error)) {
    for (guint i = gone->len; i > 0; i--)
      g_ptr_array_insert(r->backups, 0, g_ptr_array_steal_index(gone, i - 1));
    return false;
  }
  for (guint i = 0; i < gone->len; i++) {
    const repo_backup *b = g_ptr_array_index(gone, i);

    if (!repo_delete_file(r, b->file, error)) {
      g_prefix_error(error, "the manifest no longer lists it, but: ");
      return false;
    }
    cli_debug("%s: deleted", b->file);
  }
  return true;
}
