/* Dirty tracking: every range a client changes is remembered in the
 * persistent bitmap file (--bitmap, format in bitmap-format.md).
 *
 * Hot path.  tracking_mark() is an atomic OR into the active bitmap's
 * words, skipped when the bits are already set: no lock, no syscall.  The
 * bitmap library records which 4 KiB pages of words changed, so writing
 * the bitmap out costs what changed, not the bitmap's size.
 *
 * Marking order (dispatch.c calls us twice per change):
 *   1. before the data write is submitted, so the bit exists before the
 *      data can reach the disk (the crash-safe mode, where that bit must
 *      also be durable first, hooks in here);
 *   2. again when the write completes, before the reply, so a checkpoint
 *      that takes the active bits away while a write is in flight cannot
 *      lose that write: it is marked again in the new active bitmap.
 *
 * Durability.  A syncer thread writes the bitmap out (cbt_bmfile_sync,
 * which does its file I/O through io_uring and ends with fdatasync):
 *   - for NBD FLUSH: the flush reply waits until a write-out that started
 *     after the flush arrived has finished; every flush waiting at that
 *     moment shares the one write-out (as dm-era shares one commit);
 *   - every SYNC_INTERVAL seconds while anything changed;
 *   - at clean shutdown, cbt_bmfile_close_clean writes all bits, syncs,
 *     and only then sets the clean flag.
 * While the daemon runs the file is "not clean" (made durable at open,
 * before the first write is accepted), so a crash leaves a file the
 * backup tool will not trust.
 *
 * An untrusted bitmap (found not clean, or INCONSISTENT from an earlier
 * crash) keeps recording, but reports every granule dirty over NBD, so no
 * client can take an incremental from it by mistake.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>

#include "cbt/bitmap-file.h"
#include "cbt/uring-io.h"
#include "internal.h"

#define SYNC_INTERVAL 5                    /* seconds */

struct flush_waiter {
  struct worker *w;
  void (*done)(void *arg, int res);
  void *arg;
  int res;
};

struct tracking {
  cbt_bmfile *file;
  char *path;
  char *name;                              /* active bitmap name */
  char meta_name[256];                     /* qemu:dirty-bitmap:NAME */
  struct cbt_bitmap *active;
  unsigned active_idx;
  bool trusted;
  bool read_only;

  pthread_t syncer;
  GMutex lock;
  GCond cond;
  bool stop;
  bool sync_wanted;
  GPtrArray *waiters;                      /* struct flush_waiter * */
  unsigned ticks;
  bool last_sync_failed;
};

void
tracking_mark(struct tracking *t, uint64_t offset, uint64_t len)
{
  cbt_bitmap_set_range(t->active, offset, len);
}

static void
run_waiter(void *arg)
{
  struct flush_waiter *fw = arg;

  fw->done(fw->arg, fw->res);
  g_free(fw);
}

static void *
syncer_main(void *arg)
{
  struct tracking *t = arg;

  g_mutex_lock(&t->lock);
  for (;;) {
    g_autoptr(GPtrArray) batch = NULL;
    g_autofree char *why = NULL;
    int r;

    while (!t->stop && !t->sync_wanted && t->waiters->len == 0)
      g_cond_wait(&t->cond, &t->lock);
    if (t->stop && t->waiters->len == 0)
      break;
    /* Everyone waiting now is served by this write-out, which starts
     * after their flush arrived. */
    batch = g_steal_pointer(&t->waiters);
    t->waiters = g_ptr_array_new();
    t->sync_wanted = false;
    g_mutex_unlock(&t->lock);

    r = cbt_bmfile_sync(t->file, &why);
    if (r < 0 && !t->last_sync_failed)
      log_error("%s: writing the bitmap failed: %s", t->path, why ? why : g_strerror(-r));
    else if (r == 0 && t->last_sync_failed)
      log_info("%s: bitmap written again", t->path);
    t->last_sync_failed = r < 0;
    for (guint i = 0; i < batch->len; i++) {
      struct flush_waiter *fw = batch->pdata[i];
      fw->res = r;
      worker_post(fw->w, run_waiter, fw);
    }
    g_mutex_lock(&t->lock);
  }
  g_mutex_unlock(&t->lock);
  cbt_io_thread_cleanup();
  return NULL;
}

void
tracking_flush(struct tracking *t, struct worker *w,
               void (*done)(void *arg, int res), void *arg)
{
  struct flush_waiter *fw = g_new0(struct flush_waiter, 1);

  fw->w = w;
  fw->done = done;
  fw->arg = arg;
  g_mutex_lock(&t->lock);
  g_ptr_array_add(t->waiters, fw);
  g_cond_signal(&t->cond);
  g_mutex_unlock(&t->lock);
}

void
tracking_tick(struct tracking *t)
{
  if (t->read_only || ++t->ticks % SYNC_INTERVAL != 0)
    return;
  g_mutex_lock(&t->lock);
  t->sync_wanted = true;                   /* a no-op if nothing changed */
  g_cond_signal(&t->cond);
  g_mutex_unlock(&t->lock);
}

size_t
tracking_meta_list(struct tracking *t, struct meta_context *out, size_t max)
{
  if (max < 1)
    return 0;
  out[0].id = META_ID_DIRTY_FIRST;
  g_strlcpy(out[0].name, t->meta_name, sizeof out[0].name);
  return 1;
}

int
tracking_extents(struct tracking *t, uint32_t id, uint64_t offset,
                 uint32_t len, struct cbt_extent *ext, size_t max)
{
  uint64_t end = offset + len;
  size_t n = 0;

  if (id != META_ID_DIRTY_FIRST)
    return -ENOENT;
  if (!t->trusted) {
    ext[0].length = len;
    ext[0].flags = NBD_STATE_DIRTY;
    return 1;
  }
  while (offset < end && n < max) {
    bool dirty;
    uint64_t run = cbt_bitmap_extent(t->active, offset, end - offset, &dirty);

    if (run == 0)
      break;
    ext[n].length = run;
    ext[n].flags = dirty ? NBD_STATE_DIRTY : 0;
    n++;
    offset += run;
  }
  return (int)n;
}

bool
tracking_is_trusted(const struct tracking *t)
{
  return t->trusted;
}

static bool
open_or_create(struct tracking *t, const struct tracking_config *cfg,
               GError **error)
{
  g_autofree char *why = NULL;
  struct stat st;
  int r;

  if (stat(cfg->path, &st) < 0 && errno == ENOENT) {
    if (cfg->read_only) {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_NOENT,
                  "%s: no such bitmap (it is not created in --read-only mode)",
                  cfg->path);
      return false;
    }
    r = cbt_bmfile_create(cfg->path, srv.image->size, srv.image->ino,
                          cfg->granularity, cfg->name, &t->file, &why);
    if (r < 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                  "%s: cannot create bitmap: %s", cfg->path, why ? why : g_strerror(-r));
      return false;
    }
    log_info("%s: created bitmap '%s' (granularity %" PRIu32 ")", cfg->path,
             cfg->name, cfg->granularity ? cfg->granularity : CBT_BITMAP_DEFAULT_GRANULARITY);
    return true;
  }
  r = cbt_bmfile_open(cfg->path, !cfg->read_only, &t->file, &why);
  if (r < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                "%s: %s", cfg->path, why ? why : g_strerror(-r));
    return false;
  }
  r = cbt_bmfile_check_image(t->file, srv.image->size, srv.image->ino, &why);
  if (r < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                "%s: does not belong to %s: %s", cfg->path, srv.image_path,
                why ? why : g_strerror(-r));
    return false;
  }
  return true;
}

struct tracking *
tracking_open(const struct tracking_config *cfg, GError **error)
{
  g_autofree char *why = NULL;
  struct tracking *t = g_new0(struct tracking, 1);
  uint32_t flags;
  int idx, r;

  t->path = g_strdup(cfg->path);
  t->name = g_strdup(cfg->name);
  t->read_only = cfg->read_only;
  g_mutex_init(&t->lock);
  g_cond_init(&t->cond);
  t->waiters = g_ptr_array_new();
  g_snprintf(t->meta_name, sizeof t->meta_name, "%s%s", NBD_META_DIRTY_PREFIX, t->name);

  if (!open_or_create(t, cfg, error))
    goto fail;

  idx = cbt_bmfile_find(t->file, cfg->name);
  if (idx < 0) {
    if (cfg->read_only) {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_NOENT,
                  "%s: has no bitmap named '%s'", cfg->path, cfg->name);
      goto fail;
    }
    /* A bitmap that starts now knows nothing of earlier writes: the first
     * backup taken from it must be full. */
    idx = cbt_bmfile_add(t->file, cfg->name,
                         CBT_BMF_ACTIVE | CBT_BMF_INCONSISTENT, cfg->granularity, &why);
    if (idx < 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-idx),
                  "%s: cannot add bitmap '%s': %s", cfg->path, cfg->name,
                  why ? why : g_strerror(-idx));
      goto fail;
    }
    log_info("%s: added bitmap '%s'; the next backup will be full", cfg->path, cfg->name);
  }
  t->active_idx = (unsigned)idx;
  t->active = cbt_bmfile_entry_bitmap(t->file, t->active_idx);
  if (cfg->granularity && t->active->granularity != cfg->granularity) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "%s: bitmap '%s' has granularity %" PRIu32 ", not %" PRIu32
                " (--granularity only applies when creating)",
                cfg->path, cfg->name, t->active->granularity, cfg->granularity);
    goto fail;
  }

  if (!cbt_bmfile_found_clean(t->file))
    log_error("%s: bitmap was not shut down cleanly (daemon crash or power loss): "
              "its contents cannot be trusted; the next backup will be full",
              cfg->path);
  if (!cfg->read_only) {
    /* "Not clean" must be durable before the first write is accepted. */
    r = cbt_bmfile_mark_dirty(t->file, &why);
    if (r < 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                  "%s: cannot mark the bitmap in use: %s", cfg->path,
                  why ? why : g_strerror(-r));
      goto fail;
    }
  }
  flags = cbt_bmfile_entry_flags(t->file, t->active_idx);
  t->trusted = !(flags & CBT_BMF_INCONSISTENT) &&
               cbt_bmfile_entry_data_ok(t->file, t->active_idx) &&
               (cfg->read_only ? cbt_bmfile_found_clean(t->file) : true);
  if (!t->trusted)
    log_error("%s: bitmap '%s' is untrusted: it reports every block dirty "
              "until a full backup starts a fresh one", cfg->path, cfg->name);
  if (!cfg->read_only) {
    r = pthread_create(&t->syncer, NULL, syncer_main, t);
    if (r != 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(r),
                  "cannot start the bitmap thread: %s", g_strerror(r));
      goto fail;
    }
  }
  return t;

fail:
  cbt_bmfile_free(t->file);
  g_ptr_array_free(t->waiters, TRUE);
  g_free(t->path);
  g_free(t->name);
  g_free(t);
  return NULL;
}

bool
tracking_close(struct tracking *t, bool mark_clean, GError **error)
{
  g_autofree char *why = NULL;
  bool ok = true;
  int r;

  if (!t)
    return true;
  if (!t->read_only) {
    g_mutex_lock(&t->lock);
    t->stop = true;
    g_cond_signal(&t->cond);
    g_mutex_unlock(&t->lock);
    pthread_join(t->syncer, NULL);
  }
  if (!t->read_only && mark_clean) {
    r = cbt_bmfile_close_clean(t->file, &why);
    if (r < 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                  "%s: could not write the bitmap out at shutdown: %s; "
                  "it stays not clean and the next backup will be full",
                  t->path, why ? why : g_strerror(-r));
      ok = false;
    }
  } else {
    cbt_bmfile_free(t->file);
  }
  g_ptr_array_free(t->waiters, TRUE);
  g_free(t->path);
  g_free(t->name);
  g_mutex_clear(&t->lock);
  g_cond_clear(&t->cond);
  g_free(t);
  return ok;
}
