/* Dirty tracking: every range a client changes is remembered in the
 * persistent bitmap file (--bitmap, format in bitmap-format.md).
 *
 * Hot path.  tracking_mark() is an atomic OR into the active bitmap's
 * words, skipped when the bits are already set: no lock, no syscall.  The
 * bitmap library records which 4 KiB pages of words changed, so writing
 * the bitmap out costs what changed, not the bitmap's size.
 *
 * Marking order (the tracking layer, at the end of this file, is the last
 * of dispatch.c's stack before the image, and marks twice per change):
 *   1. before the data write is submitted, so the bit exists before the
 *      data can reach the disk; in crash-safe mode the write then waits
 *      until the bit is durable (tracking_commit) unless the in-memory
 *      "durable" set says it already is;
 *   2. again when the write completes, before the reply.  Since
 *      checkpoint-begin quiesces changes (quiesce.c) no checkpoint can
 *      take the bits away in between; the second mark is a cheap guard.
 *
 * Crash-safe mode (--tracking crash-safe, bitmap-format.md rules 6-8).
 * A first write to a granule in the interval queues a commit, which marks
 * the pages holding its bits for write-out whoever set them; the syncer
 * takes every commit queued at that moment, writes the changed data pages
 * and fdatasyncs once (cbt_bmfile_sync_data: no metadata update), and only
 * after that completed sets the commits' ranges in t->durable and resumes
 * their writes (the order dm-era got wrong once).  A failed commit fails
 * the writes with EIO.  t->durable is cleared when a checkpoint starts a
 * new interval, while no change is in flight.
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
 * before the first write is accepted), so in lazy mode a crash leaves a
 * file the backup tool will not trust; in crash-safe mode the file says
 * so, and is trusted.
 *
 * An untrusted bitmap (found not clean, or INCONSISTENT from an earlier
 * crash) keeps recording, but reports every granule dirty over NBD, so no
 * client can take an incremental from it by mistake.
 *
 * Checkpoints (driven by the control socket, one operation at a time under
 * op_lock).  checkpoint-begin adds a FROZEN entry "NAME-checkpoint" to the
 * file, quiesces guest changes, copies the active bits into it, makes them
 * durable (crash-safe mode: write rule 7), clears the active bits and
 * starts a new interval in the active bitmap, identified by a
 * fresh random checkpoint id stored in its directory entry.  The frozen
 * bitmap is exported as a second meta context while it exists, under a
 * context id that is never reused, so a connection that selected an older
 * checkpoint's context gets an error instead of another checkpoint's bits.
 * commit drops the frozen entry; abort merges its bits back and restores
 * the active bitmap's previous checkpoint id, so a failed backup loses
 * nothing.  Both live in the file, so a clean restart during a backup
 * keeps the checkpoint.  Workers read the frozen bitmap under cp_lock
 * (read side); commit/abort unpublish it under the write side before the
 * entry is freed.
 *
 * Point-in-time views.  A begin with a point-in-time mode creates the view
 * (snapshot.c: scratch file first, so a failure changes nothing), moves the
 * bits, then protects what the backup will read -- the frozen bits for an
 * incremental whose bits are trusted, else everything -- and publishes the
 * view: that is the moment the backup is of.  commit and abort end the
 * view before they touch the frozen bitmap; a view never outlives its
 * checkpoint, and a checkpoint found in the file at start-up has none
 * (its scratch data died with the process that made it).
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>

#include "cbt/bitmap-file.h"
#include "cbt/fault-inject.h"
#include "cbt/uring-io.h"
#include "internal.h"
#include "layer.h"

#define SYNC_INTERVAL 5                    /* seconds */
#define QUIESCE_TIMEOUT 30                 /* seconds begin waits for writes */

struct flush_waiter {
  struct exec *ex;
  void (*done)(void *arg, int res);
  void *arg;
  int res;
  uint64_t offset, len;                    /* commits: the bits to make durable */
};

struct tracking {
  cbt_bmfile *file;
  char *path;
  char *name;                              /* active bitmap name */
  char meta_name[256];                     /* qemu:dirty-bitmap:NAME */
  struct cbt_bitmap *active;               /* never moves (bitmap-file.h) */
  atomic_bool trusted;
  bool read_only;
  bool found_clean;
  bool found_crash_safe;
  bool crash_safe;                         /* --tracking crash-safe */
  /* Crash-safe mode: granules whose bit in the active bitmap is known to
   * be on disk.  Set only after the commit that wrote them completed;
   * cleared when a checkpoint starts a new interval (no write in flight). */
  struct cbt_bitmap durable;

  /* Checkpoint: op_lock serialises control operations; cp_lock guards
   * the frozen bitmap's publication against readers on worker threads. */
  GMutex op_lock;
  GRWLock cp_lock;
  char frozen_name[CBT_BMF_NAME_MAX + 1];
  char frozen_meta[256];
  struct cbt_bitmap *frozen;               /* NULL: no checkpoint */
  bool frozen_trusted;
  uint32_t frozen_ctx_id;
  uint32_t next_ctx_id;

  pthread_t syncer;
  GMutex lock;
  GCond cond;
  bool stop;
  bool sync_wanted;
  GPtrArray *waiters;                      /* struct flush_waiter * */
  GPtrArray *commits;                      /* struct flush_waiter *, with a range */
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

/* Run every waiter of a GPtrArray posted to one worker. */
static void
run_waiters(void *arg)
{
  GPtrArray *list = arg;

  for (guint i = 0; i < list->len; i++)
    run_waiter(list->pdata[i]);
  g_ptr_array_unref(list);
}

/* Hand each waiter of @batch its result on its worker, one message per
 * worker; commits that succeeded first record their bits as durable. */
static void
finish_batch(struct tracking *t, GPtrArray *batch, int r)
{
  while (batch->len > 0) {
    struct exec *ex = ((struct flush_waiter *)batch->pdata[0])->ex;
    GPtrArray *mine = g_ptr_array_new();

    for (guint i = 0; i < batch->len;) {
      struct flush_waiter *fw = batch->pdata[i];

      if (fw->ex != ex) {
        i++;
        continue;
      }
      if (r == 0 && fw->len > 0)
        cbt_bitmap_set_range(&t->durable, fw->offset, fw->len);
      fw->res = r;
      g_ptr_array_add(mine, fw);
      g_ptr_array_remove_index_fast(batch, i);
    }
    exec_post(ex, run_waiters, mine);
  }
}

static void *
syncer_main(void *arg)
{
  struct tracking *t = arg;

  g_mutex_lock(&t->lock);
  for (;;) {
    g_autoptr(GPtrArray) flushes = NULL;
    g_autoptr(GPtrArray) commits = NULL;
    g_autofree char *why = NULL;
    bool full;
    int r;

    while (!t->stop && !t->sync_wanted && t->waiters->len == 0 && t->commits->len == 0)
      g_cond_wait(&t->cond, &t->lock);
    if (t->stop && t->waiters->len == 0 && t->commits->len == 0)
      break;
    /* Everyone waiting now is served by this write-out, which starts
     * after their bits were set (group commit: one write + fdatasync for
     * all of them, as dm-era does). */
    flushes = g_steal_pointer(&t->waiters);
    t->waiters = g_ptr_array_new();
    commits = g_steal_pointer(&t->commits);
    t->commits = g_ptr_array_new();
    full = t->sync_wanted || flushes->len > 0;
    t->sync_wanted = false;
    g_mutex_unlock(&t->lock);

    /* A commit needs only the data pages; flushes and the periodic
     * write-out also refresh the metadata's checksums. */
    r = full ? cbt_bmfile_sync(t->file, &why) : cbt_bmfile_sync_data(t->file, &why);
    if (r < 0 && !t->last_sync_failed)
      log_error("%s: writing the bitmap failed: %s%s", t->path, why ? why : g_strerror(-r),
                commits->len ? "; guest writes waiting for their bits fail with EIO" : "");
    else if (r == 0 && t->last_sync_failed)
      log_info("%s: bitmap written again", t->path);
    t->last_sync_failed = r < 0;
    finish_batch(t, commits, r);
    finish_batch(t, flushes, r);
    g_mutex_lock(&t->lock);
  }
  g_mutex_unlock(&t->lock);
  cbt_io_thread_cleanup();
  return NULL;
}

bool
tracking_is_durable(struct tracking *t, uint64_t offset, uint64_t len)
{
  return !t->crash_safe || cbt_bitmap_all_set(&t->durable, offset, len);
}

void
tracking_commit(struct tracking *t, struct exec *ex, uint64_t offset, uint64_t len,
                void (*done)(void *arg, int res), void *arg)
{
  struct flush_waiter *fw = g_new0(struct flush_waiter, 1);

  fw->ex = ex;
  fw->done = done;
  fw->arg = arg;
  fw->offset = offset;
  fw->len = len;
  /* The bits are set (tracking_mark returned), but the page holding them
   * may be unmarked still: another thread's set_range can have changed
   * them and not yet marked the page, and ours then found nothing to do.
   * Mark it ourselves, so the write-out that serves this commit copies
   * the page and syncs it: durability never waits on another thread. */
  cbt_bitmap_mark_range(t->active, offset, len);
  g_mutex_lock(&t->lock);
  g_ptr_array_add(t->commits, fw);
  g_cond_signal(&t->cond);
  g_mutex_unlock(&t->lock);
}

void
tracking_flush(struct tracking *t, struct exec *ex,
               void (*done)(void *arg, int res), void *arg)
{
  struct flush_waiter *fw = g_new0(struct flush_waiter, 1);

  fw->ex = ex;
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
tracking_meta_list(struct tracking *t, struct meta_context *out, size_t max,
                   bool frozen_only)
{
  size_t n = 0;

  if (max < 1)
    return 0;
  if (!frozen_only) {
    out[n].id = META_ID_DIRTY_FIRST;
    g_strlcpy(out[n].name, t->meta_name, sizeof out[n].name);
    n++;
  }
  g_rw_lock_reader_lock(&t->cp_lock);
  if (t->frozen && n < max) {
    out[n].id = t->frozen_ctx_id;
    g_strlcpy(out[n].name, t->frozen_meta, sizeof out[n].name);
    n++;
  }
  g_rw_lock_reader_unlock(&t->cp_lock);
  return n;
}

static int
bitmap_extents(const struct cbt_bitmap *bm, bool trusted, uint64_t offset,
               uint32_t len, struct cbt_extent *ext, size_t max)
{
  uint64_t end = offset + len;
  size_t n = 0;

  if (!trusted) {
    ext[0].length = len;
    ext[0].flags = NBD_STATE_DIRTY;
    return 1;
  }
  while (offset < end && n < max) {
    bool dirty;
    uint64_t run = cbt_bitmap_extent(bm, offset, end - offset, &dirty);

    if (run == 0)
      break;
    ext[n].length = run;
    ext[n].flags = dirty ? NBD_STATE_DIRTY : 0;
    n++;
    offset += run;
  }
  return (int)n;
}

int
tracking_extents(struct tracking *t, uint32_t id, uint64_t offset,
                 uint32_t len, struct cbt_extent *ext, size_t max)
{
  int n;

  if (id == META_ID_DIRTY_FIRST)
    return bitmap_extents(t->active, atomic_load(&t->trusted), offset, len, ext, max);
  g_rw_lock_reader_lock(&t->cp_lock);
  if (t->frozen && id == t->frozen_ctx_id)
    n = bitmap_extents(t->frozen, t->frozen_trusted, offset, len, ext, max);
  else
    n = -EINVAL;                           /* that checkpoint has ended */
  g_rw_lock_reader_unlock(&t->cp_lock);
  return n;
}

bool
tracking_is_trusted(struct tracking *t)
{
  return atomic_load(&t->trusted);
}

G_DEFINE_QUARK(cbt-control-error-quark, ctl_error)

static int
active_index(struct tracking *t)
{
  return cbt_bmfile_find(t->file, t->name);
}

static bool
file_error(GError **error, int r, const char *what, const char *why)
{
  g_set_error(error, CTL_ERROR, CTL_ERR_GENERIC, "%s: %s: %s", "bitmap file",
              what, why ? why : g_strerror(-r));
  return false;
}

/* May entry @idx's bits be used for an incremental backup?  The file
 * decides (clean, or crash-safe, and not INCONSISTENT); a checkpoint begun
 * by this daemon in an untrusted interval carries INCONSISTENT itself. */
static bool
entry_trusted(struct tracking *t, unsigned idx)
{
  return cbt_bmfile_entry_trusted(t->file, idx, NULL);
}

/* Publish or unpublish the frozen bitmap for readers on worker threads. */
static void
publish_frozen(struct tracking *t, int fidx)
{
  g_rw_lock_writer_lock(&t->cp_lock);
  if (fidx < 0) {
    t->frozen = NULL;
  } else {
    t->frozen = cbt_bmfile_entry_bitmap(t->file, (unsigned)fidx);
    t->frozen_trusted = entry_trusted(t, (unsigned)fidx);
    t->frozen_ctx_id = t->next_ctx_id++;
  }
  g_rw_lock_writer_unlock(&t->cp_lock);
}

static uint64_t
new_checkpoint_id(void)
{
  uint64_t id = 0;

  while (id == 0) {
    if (getrandom(&id, sizeof id, 0) != sizeof id)
      id = g_get_real_time() ^ ((uint64_t)g_random_int() << 32);
  }
  return id;
}

/* --scratch-limit's default: a quarter of the disk, at least 1 GiB, never
 * more than the disk (the view never needs more than one copy of it). */
static uint64_t
default_scratch_limit(uint64_t size)
{
  uint64_t lim = MAX(size / 4, UINT64_C(1) << 30);

  return MIN(lim, size);
}

static struct snapshot *
new_view(struct tracking *t, enum snapshot_mode mode, GError **error)
{
  g_autofree char *dir = NULL;
  uint64_t limit = srv.scratch_limit ? srv.scratch_limit
                                     : default_scratch_limit(srv.image->size);

  if (srv.scratch_dir) {
    dir = g_canonicalize_filename(srv.scratch_dir, NULL);
  } else {
    g_autofree char *bm = g_canonicalize_filename(t->path, NULL);
    dir = g_path_get_dirname(bm);
  }
  return snapshot_new(mode, srv.image->size, t->active->granularity, dir, limit, error);
}

bool
tracking_checkpoint_begin(struct tracking *t, enum snapshot_mode mode,
                          struct tracking_status *out, GError **error)
{
  g_autofree char *why = NULL;
  g_autoptr(snapshot) view = NULL;
  struct cbt_bitmap *frozen;
  uint64_t old_id, new_id;
  uint32_t aflags, fflags;
  int aidx, fidx, r;
  bool ok = false;

  g_mutex_lock(&t->op_lock);
  if (t->read_only) {
    g_set_error(error, CTL_ERROR, CTL_ERR_READ_ONLY,
                "the daemon serves the image read-only: nothing to checkpoint");
    goto out;
  }
  if (t->frozen) {
    g_set_error(error, CTL_ERROR, CTL_ERR_IN_PROGRESS,
                "a checkpoint is already in progress (commit or abort it first)");
    goto out;
  }
  if (mode != SNAP_OFF && !(view = new_view(t, mode, error)))
    goto out;
  aidx = active_index(t);
  old_id = cbt_bmfile_entry_checkpoint(t->file, (unsigned)aidx);
  aflags = cbt_bmfile_entry_flags(t->file, (unsigned)aidx);
  fflags = CBT_BMF_FROZEN;
  if (!atomic_load(&t->trusted))
    fflags |= CBT_BMF_INCONSISTENT;
  fidx = cbt_bmfile_add(t->file, t->frozen_name, fflags, t->active->granularity, &why);
  if (fidx < 0) {
    file_error(error, fidx, "cannot add the checkpoint bitmap", why);
    goto out;
  }
  r = cbt_bmfile_set_checkpoint(t->file, (unsigned)fidx, old_id, &why);
  if (r < 0) {
    cbt_bmfile_remove(t->file, t->frozen_name, NULL);
    file_error(error, r, "cannot record the checkpoint", why);
    goto out;
  }
  /* The point in time: no guest change is in flight from here until
   * quiesce_end (quiesce.c), so the bits and the view describe exactly the
   * changes completed before it. */
  if (!quiesce_begin(QUIESCE_TIMEOUT)) {
    g_set_error(error, CTL_ERROR, CTL_ERR_GENERIC,
                "guest writes in flight did not complete within %u s", QUIESCE_TIMEOUT);
    cbt_bmfile_remove(t->file, t->frozen_name, NULL);
    goto out;
  }
  frozen = cbt_bmfile_entry_bitmap(t->file, (unsigned)fidx);
  cbt_bitmap_merge(frozen, t->active);
  if (t->crash_safe) {
    /* Write rule 7: the frozen copy of the bits is durable before the
     * active bitmap's are cleared on disk. */
    r = cbt_bmfile_sync_data(t->file, &why);
    if (r < 0) {
      quiesce_end();
      cbt_bmfile_remove(t->file, t->frozen_name, NULL);
      file_error(error, r, "cannot write the checkpoint bitmap", why);
      goto out;
    }
  }
  /* From here on nothing may fail in a way that loses bits: every later
   * failure leaves the bits in one of the two bitmaps, both kept. */
  cbt_bitmap_clear_all(t->active);
  if (t->crash_safe)
    cbt_bitmap_clear_all(&t->durable);       /* a new interval on disk */
  publish_frozen(t, fidx);
  if (view) {
    /* The point in time: from here every guest change of a granule the
     * backup needs saves the old data first.  An incremental needs the
     * frozen bits, unless they cannot be trusted (then it will be full). */
    snapshot_protect(view, mode == SNAP_INCREMENTAL && t->frozen_trusted ? t->frozen : NULL);
    snapshot_publish(g_steal_pointer(&view));
  }
  quiesce_end();

  new_id = new_checkpoint_id();
  aidx = active_index(t);
  r = cbt_bmfile_set_checkpoint(t->file, (unsigned)aidx, new_id, &why);
  if (r == 0 && (aflags & CBT_BMF_INCONSISTENT))
    r = cbt_bmfile_set_flags(t->file, (unsigned)aidx, aflags & ~CBT_BMF_INCONSISTENT, &why);
  if (r == 0)
    r = cbt_bmfile_sync(t->file, &why);
  if (r < 0) {
    log_error("%s: checkpoint begun but not fully recorded: %s", t->path,
              why ? why : g_strerror(-r));
    file_error(error, r, "cannot record the new interval", why);
    /* The backup that asked gives up and will not read the view, and the
     * next one aborts this checkpoint (cmd-backup.c): protecting the disk
     * until then would only fill the scratch file. */
    snapshot_end();
    goto out;
  }
  /* Every write from now on is in the active bitmap. */
  atomic_store(&t->trusted, true);
  log_info("%s: checkpoint %016" PRIx64 " begun (%s)", t->path, new_id,
           t->frozen_trusted ? "incremental possible" : "previous bits untrusted: full backup needed");
  ok = true;
out:
  g_mutex_unlock(&t->op_lock);
  if (ok && out)
    tracking_get_status(t, out);
  return ok;
}

/* Shared by commit and abort: check that @id names the running
 * checkpoint (NULL: any). */
static bool
check_running(struct tracking *t, const uint64_t *id, GError **error)
{
  uint64_t cur;

  if (!t->frozen) {
    g_set_error(error, CTL_ERROR, CTL_ERR_NO_CHECKPOINT, "no checkpoint in progress");
    return false;
  }
  cur = cbt_bmfile_entry_checkpoint(t->file, (unsigned)active_index(t));
  if (id && *id != cur) {
    g_set_error(error, CTL_ERROR, CTL_ERR_MISMATCH,
                "checkpoint %016" PRIx64 " is not the one in progress (%016" PRIx64 ")",
                *id, cur);
    return false;
  }
  return true;
}

bool
tracking_checkpoint_commit(struct tracking *t, uint64_t id, GError **error)
{
  g_autofree char *why = NULL;
  bool ok = false;
  int r;

  g_mutex_lock(&t->op_lock);
  if (!check_running(t, &id, error))
    goto out;
  snapshot_end();
  publish_frozen(t, -1);
  r = cbt_bmfile_remove(t->file, t->frozen_name, &why);
  if (r < 0) {
    file_error(error, r, "cannot drop the checkpoint bitmap", why);
    goto out;
  }
  log_info("%s: checkpoint %016" PRIx64 " committed", t->path, id);
  ok = true;
out:
  g_mutex_unlock(&t->op_lock);
  return ok;
}

bool
tracking_checkpoint_abort(struct tracking *t, const uint64_t *id, GError **error)
{
  g_autofree char *why = NULL;
  struct cbt_bitmap *frozen;
  uint64_t prev;
  uint32_t fflags, aflags;
  int fidx, aidx, r;
  bool ok = false;

  g_mutex_lock(&t->op_lock);
  if (!check_running(t, id, error))
    goto out;
  snapshot_end();
  fidx = cbt_bmfile_find(t->file, t->frozen_name);
  frozen = cbt_bmfile_entry_bitmap(t->file, (unsigned)fidx);
  fflags = cbt_bmfile_entry_flags(t->file, (unsigned)fidx);
  prev = cbt_bmfile_entry_checkpoint(t->file, (unsigned)fidx);
  /* Bits first: the active bitmap again covers everything since the
   * previous checkpoint, whose id it takes back.  In crash-safe mode the
   * merged bits are durable before the frozen bitmap can go (rule 7). */
  cbt_bitmap_merge(t->active, frozen);
  if (t->crash_safe && (r = cbt_bmfile_sync_data(t->file, &why)) < 0) {
    file_error(error, r, "cannot write the merged bits", why);
    goto out;
  }
  aidx = active_index(t);
  aflags = cbt_bmfile_entry_flags(t->file, (unsigned)aidx);
  r = cbt_bmfile_set_checkpoint(t->file, (unsigned)aidx, prev, &why);
  if (r == 0 && (fflags & CBT_BMF_INCONSISTENT)) {
    atomic_store(&t->trusted, false);
    r = cbt_bmfile_set_flags(t->file, (unsigned)aidx, aflags | CBT_BMF_INCONSISTENT, &why);
  }
  if (r < 0) {
    file_error(error, r, "cannot restore the previous interval", why);
    goto out;
  }
  publish_frozen(t, -1);
  r = cbt_bmfile_remove(t->file, t->frozen_name, &why);
  if (r == 0)
    r = cbt_bmfile_sync(t->file, &why);
  if (r < 0) {
    file_error(error, r, "cannot drop the checkpoint bitmap", why);
    goto out;
  }
  log_info("%s: checkpoint aborted; its changes are back in '%s'", t->path, t->name);
  ok = true;
out:
  g_mutex_unlock(&t->op_lock);
  return ok;
}

void
tracking_get_status(struct tracking *t, struct tracking_status *st)
{
  int aidx;

  memset(st, 0, sizeof *st);
  g_mutex_lock(&t->op_lock);
  aidx = active_index(t);
  st->path = t->path;
  st->name = t->name;
  st->granularity = t->active->granularity;
  st->trusted = atomic_load(&t->trusted);
  st->found_clean = t->found_clean;
  st->found_crash_safe = t->found_crash_safe;
  st->crash_safe = t->crash_safe;
  st->dirty_bytes = cbt_bitmap_dirty_bytes(t->active);
  st->checkpoint = cbt_bmfile_entry_checkpoint(t->file, (unsigned)aidx);
  cbt_bmfile_uuid(t->file, st->uuid);
  g_strlcpy(st->context, t->meta_name, sizeof st->context);
  g_rw_lock_reader_lock(&t->cp_lock);
  if (t->frozen) {
    int fidx = cbt_bmfile_find(t->file, t->frozen_name);
    st->cp_in_progress = true;
    st->cp_previous = cbt_bmfile_entry_checkpoint(t->file, (unsigned)fidx);
    st->cp_trusted = t->frozen_trusted;
    st->cp_dirty_bytes = cbt_bitmap_dirty_bytes(t->frozen);
    g_strlcpy(st->cp_context, t->frozen_meta, sizeof st->cp_context);
  }
  g_rw_lock_reader_unlock(&t->cp_lock);
  g_mutex_unlock(&t->op_lock);
}

static bool
open_or_create(struct tracking *t, const struct tracking_config *cfg,
               GError **error)
{
  g_autofree char *why = NULL;
  struct stat st;
  int r;

  if (strcmp(srv.image->format, "memory") == 0 && stat(cfg->path, &st) == 0) {
    /* The disk starts empty at every run: an earlier run's bits would
     * claim that only some of it changed. */
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                "%s: exists, but %s starts empty at every run; give a bitmap "
                "path that does not exist yet", cfg->path, srv.image_path);
    return false;
  }
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
  /* The image's identity is checked before any bit is loaded: a file made
   * for another image, or claiming a huge one, costs nothing. */
  r = cbt_bmfile_open_image(cfg->path, !cfg->read_only, srv.image->size,
                            srv.image->ino, &t->file, &why);
  if (r == -ESTALE) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                "%s: does not belong to %s: %s", cfg->path, srv.image_path,
                why ? why : g_strerror(-r));
    return false;
  }
  if (r < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                "%s: %s", cfg->path, why ? why : g_strerror(-r));
    return false;
  }
  return true;
}

/* Free what tracking_open set up, except the file (closed or freed by
 * the caller) and the syncer (joined by the caller, if it started).  The
 * locks too: g_rw_lock_init allocates. */
static void
tracking_free(struct tracking *t)
{
  g_ptr_array_free(t->waiters, TRUE);
  g_ptr_array_free(t->commits, TRUE);
  cbt_bitmap_destroy(&t->durable);
  g_free(t->path);
  g_free(t->name);
  g_mutex_clear(&t->lock);
  g_cond_clear(&t->cond);
  g_mutex_clear(&t->op_lock);
  g_rw_lock_clear(&t->cp_lock);
  g_free(t);
}

struct tracking *
tracking_open(const struct tracking_config *cfg, GError **error)
{
  g_autofree char *why = NULL;
  struct tracking *t = g_new0(struct tracking, 1);
  int idx, r;

  t->path = g_strdup(cfg->path);
  t->name = g_strdup(cfg->name);
  t->read_only = cfg->read_only;
  g_mutex_init(&t->lock);
  g_cond_init(&t->cond);
  g_mutex_init(&t->op_lock);
  g_rw_lock_init(&t->cp_lock);
  t->next_ctx_id = META_ID_DIRTY_FIRST + 1;
  t->waiters = g_ptr_array_new();
  t->commits = g_ptr_array_new();
  t->crash_safe = cfg->crash_safe && !cfg->read_only;
  g_snprintf(t->meta_name, sizeof t->meta_name, "%s%s", NBD_META_DIRTY_PREFIX, t->name);
  g_snprintf(t->frozen_name, sizeof t->frozen_name, "%s-checkpoint", t->name);
  g_snprintf(t->frozen_meta, sizeof t->frozen_meta, "%s%s", NBD_META_DIRTY_PREFIX,
             t->frozen_name);
  if (strlen(cfg->name) > TRACKING_NAME_MAX) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--bitmap-name '%s': longer than %d bytes", cfg->name, TRACKING_NAME_MAX);
    goto fail;
  }

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
  t->active = cbt_bmfile_entry_bitmap(t->file, (unsigned)idx);
  if (cfg->granularity && t->active->granularity != cfg->granularity) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "%s: bitmap '%s' has granularity %" PRIu32 ", not %" PRIu32
                " (--granularity only applies when creating)",
                cfg->path, cfg->name, t->active->granularity, cfg->granularity);
    goto fail;
  }

  t->found_clean = cbt_bmfile_found_clean(t->file);
  t->found_crash_safe = cbt_bmfile_found_crash_safe(t->file);
  if (t->found_crash_safe)
    log_info("%s: bitmap was not shut down cleanly, but it was written in crash-safe "
             "mode: every change is in it and incremental backups go on", cfg->path);
  else if (!t->found_clean)
    log_error("%s: bitmap was not shut down cleanly (daemon crash or power loss) and "
              "was not written in crash-safe mode: its contents cannot be trusted; "
              "the next backup will be full", cfg->path);
  if (!cfg->read_only) {
    /* The mode is in the file from the "not clean" generation on, before
     * any bit changes (write rule 6). */
    cbt_bmfile_set_crash_safe(t->file, t->crash_safe);
    /* "Not clean" must be durable before the first write is accepted. */
    r = cbt_bmfile_mark_dirty(t->file, &why);
    if (r < 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                  "%s: cannot mark the bitmap in use: %s", cfg->path,
                  why ? why : g_strerror(-r));
      goto fail;
    }
  }
  idx = active_index(t);
  atomic_store(&t->trusted, entry_trusted(t, (unsigned)idx));
  if (t->crash_safe) {
    /* What was loaded is on disk already. */
    r = cbt_bitmap_init(&t->durable, t->active->size, t->active->granularity);
    if (r < 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                  "%s: cannot set up crash-safe tracking: %s", cfg->path, g_strerror(-r));
      goto fail;
    }
    cbt_bitmap_merge(&t->durable, t->active);
  }
  idx = cbt_bmfile_find(t->file, t->frozen_name);
  if (idx >= 0) {
    publish_frozen(t, idx);
    log_info("%s: checkpoint from a previous run is still in progress "
             "(the backup tool commits or aborts it)", cfg->path);
  }
  if (!atomic_load(&t->trusted))
    log_error("%s: bitmap '%s' is untrusted: it reports every block dirty "
              "until a full backup starts a fresh one", cfg->path, cfg->name);
  if (!cfg->read_only) {
    /* Tests: the bitmap's I/O from here on may be made to fail. */
    cbt_fi_tag_path(cfg->path, CBT_FI_BITMAP);
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
  tracking_free(t);
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
  snapshot_end();
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
  tracking_free(t);
  return ok;
}

/* ---- the layer ---- */

static bool
layer_active(void)
{
  return srv.tracking != NULL;
}

/* The bits are set before the change goes to the image and, in crash-safe
 * mode, durable: a commit is waited for unless they already are. */
static bool
layer_before_change(const struct layer_req *r, layer_cont *k, void *arg)
{
  struct tracking *t = srv.tracking;

  tracking_mark(t, r->offset, r->length);
  if (tracking_is_durable(t, r->offset, r->length))
    return false;
  tracking_commit(t, r->ex, r->offset, r->length, k, arg);
  return true;
}

/* Marked again once the I/O completed, before the reply (see the top). */
static void
layer_after_change(const struct layer_req *r, int res)
{
  (void)res;
  tracking_mark(srv.tracking, r->offset, r->length);
}

static bool
layer_flush(const struct layer_req *r, layer_cont *k, void *arg)
{
  if (r->type != NBD_CMD_FLUSH)
    return false;
  tracking_flush(srv.tracking, r->ex, k, arg);
  return true;
}

const struct layer tracking_layer = {
  .name = "tracking",
  .active = layer_active,
  .before_change = layer_before_change,
  .after_change = layer_after_change,
  .flush = layer_flush,
};
