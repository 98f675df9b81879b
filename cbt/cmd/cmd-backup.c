/* cbt backup: pull a full or incremental backup from cbt-filterd into a
 * repository (repo.c).
 *
 * Sequence, and why it is in this order:
 *   1. lock the repository (exclusive), remove what a killed run left;
 *   2. status: a checkpoint still in progress was left by an earlier run.
 *      If the newest backup in the manifest ends at it, that backup
 *      completed and only its commit was lost: commit it.  Otherwise the
 *      run that began it failed: abort it (its bits merge back);
 *   3. decide full or incremental from the status (why_not_incremental);
 *   4. checkpoint-begin: the frozen bitmap now holds every change since
 *      the newest backup; recheck that it continues our chain;
 *   5. connect over NBD to the checkpoint's point-in-time view
 *      (NAME@checkpoint: the disk as it was at begin, however the guest
 *      writes meanwhile; it and the frozen bitmap's meta context exist only
 *      now) and copy into the repository's new file (repo_wfile: in a
 *      directory NAME.qcow2.partial, on S3 a streaming multipart upload),
 *      releasing (TRIM) each range in the view once it is stored;
 *   6. complete the file (repo_wfile_commit: fsync and rename, or the
 *      upload completed; the checksums were computed as the bytes passed,
 *      see repo-write.c), add it to the manifest (atomic replace, one PUT
 *      on S3);
 *   7. checkpoint-commit.
 * Any failure before 6 completes aborts the checkpoint (the changes it
 * froze merge back into the active bitmap, so the next backup still sees
 * them) and removes the new file (or aborts the upload); the manifest is
 * untouched.  A failure of 7 leaves a complete, listed backup and a
 * checkpoint that step 2 of the next run commits.  On S3 the repository
 * lock is refreshed meanwhile by repo-s3.c; losing it stops the copy.
 *
 * SIGINT/SIGTERM set a flag that the copy and each step check; the second
 * signal has its default effect (SA_RESETHAND), and a killed run is
 * cleaned up by the next one.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cbt/qcow2-writer.h"
#include "cbt/util.h"
#include "cli.h"

#define MAX_CONNECTIONS     64
/* A copy of at least LARGE_COPY bytes is written back in windows of
 * LARGE_WINDOW; see run(). */
#define LARGE_COPY          (UINT64_C(256) << 20)
#define LARGE_WINDOW        (UINT64_C(64) << 20)

static volatile sig_atomic_t cancelled;

static void
on_signal(int sig)
{
  cancelled = sig;
}

static void
install_signals(void)
{
  struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_RESETHAND };

  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
}

static bool
check_cancel(GError **error)
{
  if (!cancelled)
    return true;
  g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "interrupted by %s",
              cancelled == SIGINT ? "SIGINT" : "SIGTERM");
  return false;
}

struct backup {
  /* options */
  const char *socket, *uri, *control_path, *repo_dir;
  bool full, incremental, json;
  unsigned connections;
  bool checksum_set;              /* --checksum given: */
  enum chunk_alg checksum;        /* its algorithm */

  repo *repo;
  control *ctl;
  struct control_status st;
  const repo_backup *newest;
  bool begun;                     /* a checkpoint of ours is in progress */
  char *cp_id;
  repo_wfile *wf;                 /* the file being written, until listed */
  char *path;                     /* its final path or URL (summary) */
  bool progress;                  /* draw a progress bar */
  /* The bar: bytes stored of planned, and what the run is doing.  The
   * copy counts bytes handed to writeback (the writer's write-behind
   * keeps the page cache at most two windows ahead of the disk); the bar
   * says 100% only when the run is complete, checkpoint committed. */
  GMutex bar_lock;
  uint64_t done, planned;
  const char *phase;
  GThread *ticker;
  bool ticking;
  bool point_in_time;             /* read from the daemon's view */
  uint64_t saved, scratch_peak;   /* the view's copy-before-write figures */
  gint64 start;
  char *file;
};

/* NULL when an incremental can continue @b->newest's chain given the
 * daemon status before begin; otherwise why not (caller frees). */
static char *
why_not_incremental(const struct backup *b)
{
  const repo_backup *n = b->newest;
  const struct control_status *st = &b->st;

  if (!n)
    return g_strdup("the repository is empty");
  if (!st->has_bitmap)
    return g_strdup("the daemon tracks no dirty bitmap (started without --bitmap)");
  if (n->image_size != st->size)
    return g_strdup_printf("image size changed from %" PRIu64 " to %" PRIu64 " bytes",
                           n->image_size, st->size);
  if (!n->checkpoint || !n->bitmap_uuid)
    return g_strdup_printf("the newest backup %s was taken without a bitmap", n->file);
  if (strcmp(n->bitmap_uuid, st->uuid) != 0)
    return g_strdup_printf("bitmap was recreated (uuid changed from %s to %s)",
                           n->bitmap_uuid, st->uuid);
  if (!st->trusted)
    return g_strdup("bitmap not clean after unclean shutdown");
  if (!st->checkpoint || strcmp(st->checkpoint, n->checkpoint) != 0)
    return g_strdup_printf("checkpoint mismatch: the daemon's bitmap holds the changes "
                           "since checkpoint %s, the newest backup %s ends at %s",
                           st->checkpoint ? st->checkpoint : "(none)", n->file,
                           n->checkpoint);
  return NULL;
}

/* Step 2: settle a checkpoint left in progress by an earlier run.  Commit
 * it only if the newest backup ends at it.  The id of a checkpoint in
 * progress is the one its begin gave the active bitmap; a begin that
 * could not record that id (a bitmap write failed, or the daemon died
 * before the write was durable) leaves the active bitmap with the id it
 * had, which is the frozen bitmap's "previous" and also where the newest
 * backup ends: committing that would drop the frozen changes, so such a
 * checkpoint is aborted (its bits merge back).
 *
 * A begin killed earlier still, right after it created the frozen bitmap,
 * leaves one with no "previous" and no bits, and the id of the newest
 * backup: the state a lost commit of a backup that began the first
 * checkpoint of a bitmap leaves when nothing was written before it.  The
 * two cannot be told apart, and committing is right for both (it drops
 * an empty bitmap; aborting would give the active bitmap no checkpoint
 * and cost a full backup).  The message names the killed begin, which
 * is what a later backup finds (tests/test-backup-crash.sh), and the lost
 * commit as the other possibility. */
static bool
settle_leftover(struct backup *b, GError **error)
{
  g_autofree char *id = NULL;

  if (!b->st.in_progress)
    return true;
  /* A copy: control_execute clears b->st before it sends the request. */
  id = g_strdup(b->st.cp_id);
  if (b->st.cp_previous && strcmp(b->st.cp_previous, id) == 0) {
    cli_note("checkpoint %s was left in progress by a backup whose checkpoint-begin "
             "was never fully recorded: aborting it (its changes merge back into the "
             "bitmap)", id);
    return control_execute(b->ctl, "checkpoint-abort", id, &b->st, error);
  }
  if (b->newest && b->newest->checkpoint && strcmp(b->newest->checkpoint, id) == 0) {
    if (!b->st.cp_previous && b->st.cp_dirty_bytes == 0)
      cli_note("checkpoint %s was left in progress by a backup that did not finish: it "
               "stopped inside checkpoint-begin, before the checkpoint recorded where it "
               "starts or froze any change (a lost commit of backup %s, which ends at "
               "it, would look the same): committing it, every change since backup %s "
               "stays in the bitmap", id, b->newest->file, b->newest->file);
    else
      cli_note("checkpoint %s is still in progress, but backup %s that began it "
               "completed: committing it", id, b->newest->file);
    return control_execute(b->ctl, "checkpoint-commit", id, &b->st, error);
  }
  cli_note("checkpoint %s was left in progress by a backup that did not finish: "
           "aborting it (its changes merge back into the bitmap)", id);
  return control_execute(b->ctl, "checkpoint-abort", id, &b->st, error);
}

/* checkpoint-begin with a point-in-time view for a @mode backup; from
 * here on a failure must abort it (b->begun). */
static bool
begin_checkpoint(struct backup *b, const char *mode, GError **error)
{
  if (!control_begin(b->ctl, mode, &b->st, error))
    return false;
  if (!b->st.in_progress) {
    g_set_error(error, CONTROL_ERROR, CONTROL_ERR_PROTOCOL,
                "checkpoint-begin returned no checkpoint");
    return false;
  }
  b->begun = true;
  b->cp_id = g_strdup(b->st.cp_id);
  return true;
}

/* After an incremental begin turned out unusable: abort it and begin a
 * checkpoint whose view protects the whole disk. */
static bool
restart_full(struct backup *b, GError **error)
{
  if (!control_execute(b->ctl, "checkpoint-abort", b->cp_id, NULL, error))
    return false;
  b->begun = false;
  g_clear_pointer(&b->cp_id, g_free);
  return begin_checkpoint(b, "full", error);
}

/* A copy failed: if the daemon's view failed (scratch limit, scratch I/O
 * error), that is the reason to report, not the read error it caused. */
static void
explain_view_failure(struct backup *b, GError **error)
{
  struct control_status st = { 0 };
  g_autoptr(GError) err = NULL;

  if (!b->st.pit_export || !control_execute(b->ctl, "status", NULL, &st, &err))
    return;
  if (st.pit_failed) {
    g_autofree char *old = g_strdup((*error)->message);

    g_clear_error(error);
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "the point-in-time view failed: %s (the guest was not affected; "
                "first error seen: %s)", st.pit_failed, old);
  }
  control_status_clear(&st);
}

/* Redraw the bar (any thread).  The rate is over the whole run so far,
 * so it falls while the run syncs and commits. */
static void
draw(struct backup *b)
{
  double secs = (double)(g_get_monotonic_time() - b->start) / 1e6;
  g_autofree char *d = NULL, *t = NULL;
  bool finished;
  double pct;
  char bar[31];
  unsigned fill;

  if (!b->progress || !b->phase)
    return;
  g_mutex_lock(&b->bar_lock);
  finished = strcmp(b->phase, "done") == 0;
  pct = cli_percent(b->done, b->planned);
  if (!finished)
    pct = MIN(pct, 99.9);
  else
    pct = 100;
  fill = (unsigned)(pct * 30 / 100);
  d = cli_format_size(b->done);
  t = cli_format_size(b->planned);
  memset(bar, '#', fill);
  memset(bar + fill, '.', 30 - fill);
  bar[30] = '\0';
  fprintf(stderr, "\rcbt: %s [%s] %5.1f%% %s of %s, %.1f MiB/s, %.1f s, %s\033[K", b->file,
          bar, pct, d, t, secs > 0 ? (double)b->done / secs / 1048576.0 : 0.0, secs,
          b->phase);
  fflush(stderr);
  g_mutex_unlock(&b->bar_lock);
}

static void
set_phase(struct backup *b, const char *phase)
{
  g_mutex_lock(&b->bar_lock);
  b->phase = phase;
  g_mutex_unlock(&b->bar_lock);
  draw(b);
}

static void
progress_cb(void *opaque, uint64_t done, uint64_t total)
{
  struct backup *b = opaque;

  g_mutex_lock(&b->bar_lock);
  b->done = done;
  b->planned = total;
  g_mutex_unlock(&b->bar_lock);
  draw(b);
}

/* After the copy the steps block (fdatasync, manifest, commit): a thread
 * keeps the bar's clock running meanwhile. */
static gpointer
ticker_main(gpointer opaque)
{
  struct backup *b = opaque;

  for (;;) {
    bool on;

    g_usleep(250 * 1000);
    g_mutex_lock(&b->bar_lock);
    on = b->ticking;
    g_mutex_unlock(&b->bar_lock);
    if (!on)
      break;
    draw(b);
  }
  return NULL;
}

static void
start_ticker(struct backup *b)
{
  if (!b->progress || b->ticker)
    return;
  b->ticking = true;
  b->ticker = g_thread_new("progress", ticker_main, b);
}

/* End the bar: "done" at 100% when @ok, else where it stopped. */
static void
end_bar(struct backup *b, bool ok)
{
  if (b->ticker) {
    g_mutex_lock(&b->bar_lock);
    b->ticking = false;
    g_mutex_unlock(&b->bar_lock);
    g_thread_join(b->ticker);
    b->ticker = NULL;
  }
  if (!b->progress || !b->phase)
    return;
  if (ok)
    set_phase(b, "done");
  fputc('\n', stderr);
}

/* Undo everything of a failed run: the checkpoint and the new file. */
static void
roll_back(struct backup *b)
{
  g_clear_pointer(&b->wf, repo_wfile_free);   /* removes what it wrote */
  if (b->begun) {
    g_autoptr(GError) err = NULL;

    if (control_execute(b->ctl, "checkpoint-abort", b->cp_id, NULL, &err))
      cli_note("checkpoint %s aborted: its changes merged back into the bitmap", b->cp_id);
    else
      cli_error("cannot abort checkpoint %s: %s (the next backup aborts it)", b->cp_id,
                err->message);
  }
}

/* @secs: the whole run, checkpoint commit included. */
static void
summary(const struct backup *b, const repo_backup *e, const char *reason,
        uint64_t dirty, double secs)
{
  double mibs = secs > 0 ? (double)e->bytes_copied / secs / 1048576.0 : 0;

  if (b->json) {
    g_autoptr(json_object) o = repo_backup_to_json(e);
    g_autoptr(GError) err = NULL;

    json_object_object_del(o, chunk_alg_name(e->checksum));   /* "checksum" stays */
    cli_json_add_str(o, "repository", b->repo_dir);
    cli_json_add_str(o, "path", b->path);
    cli_json_add_str(o, "full-reason", reason);
    cli_json_add_u64(o, "dirty-bytes", dirty);
    cli_json_add_percent(o, "mib-per-second", mibs);
    /* "seconds" is the manifest's: until the file was complete. */
    cli_json_add_percent(o, "total-seconds", secs);
    json_object_object_add(o, "point-in-time", json_object_new_boolean(b->point_in_time));
    if (b->point_in_time) {
      cli_json_add_u64(o, "saved-before-overwrite-bytes", b->saved);
      cli_json_add_u64(o, "scratch-peak-bytes", b->scratch_peak);
    }
    if (!cli_json_print(o, &err))
      cli_error("%s", err->message);
  } else if (!cli_quiet) {
    g_autofree char *copied = cli_format_size(e->bytes_copied);
    g_autofree char *zero = cli_format_size(e->zero_bytes);
    g_autofree char *fsize = cli_format_size(e->file_size);

    g_autofree char *saved = cli_format_size(b->saved);
    g_autofree char *peak = cli_format_size(b->scratch_peak);

    printf("backup %s: %s, %s copied, %s zeroed, file %s, %.1f s, %.1f MiB/s, %s\n",
           e->file, e->kind, copied, zero, fsize, secs, mibs,
           b->point_in_time ? "point in time" : "NOT point in time (live reads)");
    if (b->point_in_time && b->saved > 0)
      printf("backup %s: the guest overwrote %s during the backup; the old data was "
             "saved first (scratch peak %s)\n", e->file, saved,
             peak);
    fflush(stdout);
  }
}

static bool
run(struct backup *b, GError **error)
{
  g_autoptr(repo_backup) e = repo_backup_new();
  g_autoptr(GDateTime) now = NULL;
  g_autofree char *reason = NULL;
  struct cbt_qcow2_writer_opts wo = { 0 };
  struct pull_opts po = { 0 };
  struct pull_stats ps;
  const repo_backup *listed = NULL;
  cbt_qcow2_writer *w;
  bool incremental;

  b->start = g_get_monotonic_time();
  if (!repo_open(b->repo_dir, REPO_LOCK_EXCLUSIVE, true, &b->repo, error) ||
      !repo_clean_stale(b->repo, error) ||
      !control_connect(b->control_path, &b->ctl, error) ||
      !control_execute(b->ctl, "status", NULL, &b->st, error))
    return false;
  b->newest = repo_newest(b->repo);
  if (!settle_leftover(b, error))
    return false;

  /* Step 3. */
  reason = why_not_incremental(b);
  if (reason && b->incremental) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_NO_INCREMENTAL,
                "incremental backup impossible: %s", reason);
    return false;
  }
  incremental = !reason && !b->full;
  if (b->full && !reason)
    reason = g_strdup("--full given");
  if (reason && !b->full)
    cli_note("%s: taking a full backup", reason);
  if (!check_cancel(error))
    return false;

  /* Step 4. */
  if (b->st.has_bitmap) {
    if (!begin_checkpoint(b, incremental ? "incremental" : "full", error))
      return false;
    if (incremental &&
        (!b->st.cp_trusted || !b->st.cp_previous ||
         strcmp(b->st.cp_previous, b->newest->checkpoint) != 0)) {
      g_free(reason);
      reason = g_strdup_printf("checkpoint mismatch: the frozen bitmap %s the changes "
                               "since %s, the newest backup ends at %s",
                               b->st.cp_trusted ? "holds" : "does not reliably hold",
                               b->st.cp_previous ? b->st.cp_previous : "(none)",
                               b->newest->checkpoint);
      if (b->incremental) {
        g_set_error(error, CLI_ERROR, CLI_EXIT_NO_INCREMENTAL,
                    "incremental backup impossible: %s", reason);
        return false;
      }
      cli_note("%s: taking a full backup", reason);
      incremental = false;
      /* The view protects only the frozen bits: begin again, for a full
       * backup (the abort merges the bits back first). */
      if (b->st.pit_export && !restart_full(b, error))
        return false;
    }
  } else if (b->incremental) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_NO_INCREMENTAL,
                "incremental backup impossible: the daemon tracks no dirty bitmap");
    return false;
  }

  /* Step 5. */
  now = g_date_time_new_now_utc();
  e->seq = b->repo->next_seq;
  e->kind = g_strdup(incremental ? "incremental" : "full");
  e->file = repo_next_file(b->repo, e->kind, now);
  e->backing = incremental ? g_strdup(b->newest->file) : NULL;
  e->time = g_date_time_format(now, "%Y-%m-%dT%H:%M:%SZ");
  e->time_unix = g_date_time_to_unix(now);
  e->checkpoint = g_strdup(b->cp_id);
  e->bitmap_uuid = g_strdup(b->st.uuid);
  e->image_size = b->st.size;
  e->granularity = b->st.has_bitmap ? b->st.granularity : 0;
  e->cluster_size = b->st.has_bitmap ? MIN(b->st.granularity, UINT64_C(65536)) : 65536;
  e->chunk_size = REPO_CHUNK_SIZE;
  /* xxh128 is ~10x cheaper on the CPU; S3 keeps sha256, which its part
   * uploads reuse as their payload hash (repo-write.c). */
  e->checksum = b->checksum_set ? b->checksum
                                : repo_is_s3(b->repo) ? CHUNK_SHA256 : CHUNK_XXH128;
  b->file = g_strdup(e->file);
  b->path = repo_path(b->repo, e->file);

  wo.size = e->image_size;
  wo.cluster_size = (uint32_t)e->cluster_size;
  wo.backing_file = e->backing;
  wo.backing_format = e->backing ? "qcow2" : NULL;
  if (!repo_wfile_new(b->repo, e->file, &wo, e->checksum, &b->wf, error))
    return false;
  w = repo_wfile_writer(b->wf);
  /* A large copy is written back in larger windows than repo-write.c's
   * default (which keeps a small incremental's final fdatasync short):
   * the disk then gets large writes, many in flight, while the copy goes
   * on, and the windows written back leave the page cache
   * (qcow2-writer.c), so memory use stays bounded.  A 2 GiB full on the
   * project's machine (XXH128 checksums), four runs each, alternating:
   * 8 MiB windows 1.09-1.14 s, 64 MiB 1.01-1.10 s, O_DIRECT (used before,
   * when SHA-256 made the CPU the bound and the page-cache copy cost
   * CPU) 1.24-1.38 s, nbdcopy --flush 1.08-1.14 s.  On S3 there is no
   * file: the writer ignores the window. */
  if ((incremental ? b->st.cp_dirty_bytes : e->image_size) >= LARGE_COPY)
    cbt_qcow2_writer_set_write_behind(w, LARGE_WINDOW);
  if (b->st.pit_export) {
    po.export_name = b->st.pit_export;
    po.release = true;
  } else if (b->begun) {
    cli_note("the daemon offers no point-in-time view (an older cbt-filterd?): "
             "the backup reads the disk while the guest writes to it");
  }
  po.socket = b->socket;
  po.uri = b->uri;
  po.connections = b->connections;
  po.size = e->image_size;
  po.dirty_context = incremental ? b->st.cp_context : NULL;
  po.writer = w;
  po.cluster_size = (uint32_t)e->cluster_size;
  po.cancel = &cancelled;
  po.progress = progress_cb;
  po.opaque = b;
  set_phase(b, "copying");
  if (!pull_run(&po, &ps, error)) {
    GError *cause = NULL;

    /* The store's own reason (an S3 error, a lost lock) beats the
     * writer's errno. */
    if (!repo_wfile_check(b->wf, &cause)) {
      g_clear_error(error);
      g_propagate_error(error, cause);
    }
    explain_view_failure(b, error);
    return false;
  }
  start_ticker(b);
  if (!check_cancel(error))
    return false;
  cli_debug("copy: %.2f s", (double)(g_get_monotonic_time() - b->start) / 1e6);

  /* The view's figures for the summary.  A view that failed after our
   * last read does not matter: the daemon checks at the end of every read
   * that the view was still intact, so all we stored is the checkpoint's. */
  if (b->st.pit_export) {
    if (!control_execute(b->ctl, "status", NULL, &b->st, error))
      return false;
    if (b->st.pit_failed)
      cli_note("the point-in-time view failed after the backup had read everything: %s",
               b->st.pit_failed);
    b->saved = b->st.pit_copied;
    b->scratch_peak = b->st.pit_scratch_peak;
    b->point_in_time = true;
  }

  /* Step 6. */
  set_phase(b, repo_is_s3(b->repo) ? "completing the upload" : "syncing the file");
  e->bytes_copied = ps.copied;
  e->data_bytes = cbt_qcow2_writer_data_bytes(w);
  e->zero_bytes = cbt_qcow2_writer_zero_bytes(w);
  g_ptr_array_unref(e->sums);
  e->sums = NULL;
  if (!repo_wfile_commit(b->wf, &e->sums, &e->file_size, error) ||
      !check_cancel(error))
    return false;
  cli_debug("file complete at %.2f s", (double)(g_get_monotonic_time() - b->start) / 1e6);
  e->seconds = (double)(g_get_monotonic_time() - b->start) / 1e6;
  set_phase(b, "manifest");
  {
    repo_backup *entry = g_steal_pointer(&e);

    if (!repo_add(b->repo, entry, error))
      return false;
    /* Listed: nothing to roll back any more. */
    listed = entry;
  }
  repo_wfile_keep(b->wf);
  g_clear_pointer(&b->wf, repo_wfile_free);

  /* Step 7. */
  if (b->begun) {
    g_autoptr(GError) err = NULL;

    set_phase(b, "checkpoint commit");
    b->begun = false;
    if (!control_execute(b->ctl, "checkpoint-commit", b->cp_id, NULL, &err))
      cli_error("backup %s is complete, but committing checkpoint %s failed: %s "
                "(the next backup commits it)", b->file, b->cp_id, err->message);
  }
  end_bar(b, true);
  summary(b, listed, incremental ? NULL : reason, ps.dirty,
          (double)(g_get_monotonic_time() - b->start) / 1e6);
  return true;
}

int
cmd_backup(int argc, char **argv)
{
  struct backup b = { 0 };
  g_autofree char *socket_path = NULL, *uri = NULL, *ctl = NULL, *dir = NULL;
  g_autofree char *checksum = NULL;
  gboolean full = FALSE, incremental = FALSE, autom = FALSE, json = FALSE;
  g_autofree char *conns_arg = NULL;   /* NULL: cli_copy_threads() */
  gint64 conns;
  GError *error = NULL;
  int rc = CLI_EXIT_OK;
  GOptionEntry entries[] = {
    { "socket", 's', 0, G_OPTION_ARG_FILENAME, &socket_path, "NBD unix socket of cbt-filterd", "PATH" },
    { "uri", 'u', 0, G_OPTION_ARG_STRING, &uri, "NBD URI (nbd://HOST:PORT/NAME, nbd+unix://...)", "URI" },
    { "control", 'c', 0, G_OPTION_ARG_FILENAME, &ctl, "control socket of cbt-filterd", "PATH" },
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository: a directory (created if missing) or s3://BUCKET/PREFIX", "DIR" },
    { "full", 'f', 0, G_OPTION_ARG_NONE, &full, "take a full backup", NULL },
    { "incremental", 'i', 0, G_OPTION_ARG_NONE, &incremental, "take an incremental backup or fail with exit status 3", NULL },
    { "auto", 'a', 0, G_OPTION_ARG_NONE, &autom, "incremental when possible, else full, saying why (default)", NULL },
    { "connections", 'n', 0, G_OPTION_ARG_STRING, &conns_arg, "NBD connections (default: one per CPU, 2 to 4)", "N" },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &json, "print a JSON summary on stdout", NULL },
    { "checksum", 0, 0, G_OPTION_ARG_STRING, &checksum, "chunk checksums: xxh128 (default for a directory) or sha256 (default for S3)", "ALG" },
    CLI_S3_OPTION,
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("backup", "",
                       "Pull a backup from cbt-filterd into a repository.",
                       "The first backup is full; later ones are incremental when the\n"
                       "daemon's bitmap continues the repository's newest backup, full\n"
                       "otherwise (the reason is printed).  On a terminal a progress bar\n"
                       "is drawn on stderr; otherwise only a summary line is printed.\n"
                       "Any failure aborts the daemon's checkpoint (no change is lost)\n"
                       "and leaves the repository as it was.\n\n" CLI_EXIT_CODES_HELP,
                       entries);
  bool ok;

  if (!cli_parse(octx, "backup", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc > 1)
    return cli_usage_error("backup", "unexpected argument '%s'", argv[1]);
  if (!socket_path == !uri)
    return cli_usage_error("backup", "give exactly one of --socket and --uri");
  if (!ctl || !dir)
    return cli_usage_error("backup", "--control and --repo are required");
  if (full + incremental + autom > 1)
    return cli_usage_error("backup", "--full, --incremental and --auto exclude each other");
  if (!conns_arg)
    conns = cli_copy_threads();     /* one copy thread per connection */
  else if (!g_ascii_string_to_signed(conns_arg, 10, 1, MAX_CONNECTIONS, &conns, NULL))
    return cli_usage_error("backup", "--connections must be 1 to %d", MAX_CONNECTIONS);
  b.checksum_set = checksum != NULL;
  if (checksum && !chunk_alg_parse(checksum, &b.checksum))
    return cli_usage_error("backup", "--checksum must be xxh128 or sha256, not '%s'",
                           checksum);

  b.socket = socket_path;
  b.uri = uri;
  b.control_path = ctl;
  b.repo_dir = dir;
  b.full = full;
  b.incremental = incremental;
  b.json = json;
  b.connections = (unsigned)conns;
  b.progress = !cli_quiet && !json && isatty(STDERR_FILENO);
  install_signals();
  cli_s3_cancel = &cancelled;   /* S3 requests stop on the signal too */

  g_mutex_init(&b.bar_lock);
  ok = run(&b, &error);
  if (!ok) {
    end_bar(&b, false);
    /* The cause first, then what the roll-back did about it. */
    rc = cli_report(error);
    roll_back(&b);
  }
  g_mutex_clear(&b.bar_lock);
  control_status_clear(&b.st);
  control_close(b.ctl);
  repo_free(b.repo);
  g_free(b.cp_id);
  repo_wfile_free(b.wf);
  g_free(b.path);
  g_free(b.file);
  return ok ? CLI_EXIT_OK : rc;
}
