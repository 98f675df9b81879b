/* cbt restore: rebuild the image as of one backup.
 *
 * How: chain-map.c opens the manifest's chain of the backup (full backup
 * first, each file checked against the manifest) and says, for each file,
 * which of its host clusters are visible in the backup and at which guest
 * offset, and which guest ranges read as zeros.  stream.c then reads every
 * file of the chain front to back on one io_uring with a deep queue and
 * checks the manifest's SHA-256 of every chunk on hashing threads as the
 * bytes pass; each piece read is written at once to the guest offsets of
 * the visible clusters it holds.  So the files are read once, in order,
 * and the output is written while the next reads are in flight.  A chunk
 * whose checksum differs fails the restore with exit 4 naming the file and
 * byte range (--no-verify skips the check and then reads only the visible
 * clusters).
 *
 * Outputs (--output):
 *   nbd://..., nbd+unix://...  an NBD export of exactly the image size:
 *                              written over --connections connections
 *                              (one unless the server offers multi-conn),
 *                              each with a queue of requests in flight;
 *                              ranges that read as zeros are written with
 *                              NBD_CMD_WRITE_ZEROES (the export may hold
 *                              old data); then every connection flushes
 *   FILE.qcow2                 a flat qcow2 (no backing) via our writer,
 *                              from worker threads (it is thread-safe)
 *   anything else              a raw file, written on the stream's ring;
 *                              zero ranges and all-zero clusters stay
 *                              holes; written O_DIRECT where offset,
 *                              length and buffer are page aligned (all
 *                              but an odd end of the image), so there
 *                              is no copy into the page cache and no
 *                              writeback left for the final fsync, which
 *                              then only commits the metadata (starting
 *                              writeback every 64 MiB of buffered writes,
 *                              with sync_file_range on the ring, made
 *                              restores slower here, not faster)
 * A file output must not exist; it is created O_EXCL and removed again if
 * the restore fails, so a half restore never looks like a result.
 *
 * The repository is held with a shared lock so that pruning cannot delete
 * a file of the chain while we read it.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libnbd.h>

#include "cbt/qcow2-writer.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"
#include "cli.h"

#define DEFAULT_CONNECTIONS 4
#define MAX_CONNECTIONS     16
#define NBD_DEPTH           16             /* requests in flight per connection */
#define MAX_ZERO            (UINT64_C(1) << 30)   /* bytes per write-zeroes */
#define ZERO_BUF            (UINT64_C(1) << 20)
#define DIO_ALIGN           4096u          /* of an O_DIRECT write */

enum sink_kind { SINK_RAW, SINK_QCOW2, SINK_NBD };

enum job_kind { JOB_WRITE, JOB_ZERO };

struct job {
  enum job_kind kind;
  uint64_t off, len;
  const uint8_t *buf;             /* JOB_WRITE */
  struct stream_piece *p;         /* NULL: held on the stream */
  stream *s;
  struct conn *c;
};

struct conn {
  struct restore *rs;
  struct nbd_handle *h;
  GThread *thread;
  unsigned inflight;
  char *dead;                     /* why the connection failed, or NULL */
};

struct restore {
  /* options */
  const char *dir, *at, *out;
  bool verify, progress;
  unsigned connections;

  chain_map *map;
  enum sink_kind kind;
  int fd;                         /* raw */
  int dfd;                        /* raw, O_DIRECT, or -1 */
  cbt_qcow2_writer *w;            /* qcow2 */
  struct conn *conns;             /* nbd */
  unsigned nconns;
  bool can_zero;
  GAsyncQueue *jobs;              /* struct job *, for the worker threads */
  GThread **workers;              /* qcow2 */
  unsigned nworkers;
  uint8_t *zero_buf;              /* NBD without write-zeroes */
  bool created;                   /* a file we must remove on failure */

  _Atomic uint64_t written;       /* data bytes written */
  uint64_t total;                 /* bytes to read */
  gint64 start;
  const char *phase;
};

static struct job stop_job;

static bool
is_nbd_uri(const char *s)
{
  return g_str_has_prefix(s, "nbd://") || g_str_has_prefix(s, "nbd+unix://") ||
         g_str_has_prefix(s, "nbds://") || g_str_has_prefix(s, "nbds+unix://");
}

/* --- progress ------------------------------------------------------------ */

static void
draw(struct restore *rs, uint64_t done)
{
  double secs = (double)(g_get_monotonic_time() - rs->start) / 1e6;
  g_autofree char *d = cli_format_size(done);
  g_autofree char *t = cli_format_size(rs->total);
  double pct = cli_percent(done, rs->total);
  char bar[31];
  unsigned fill = (unsigned)(pct * 30 / 100);

  if (!rs->progress)
    return;
  memset(bar, '#', MIN(fill, 30u));
  memset(bar + MIN(fill, 30u), '.', 30 - MIN(fill, 30u));
  bar[30] = '\0';
  fprintf(stderr, "\rcbt: restore [%s] %5.1f%% %s of %s, %.1f MiB/s, %s   ", bar, pct, d,
          t, secs > 0 ? (double)done / secs / 1048576.0 : 0.0, rs->phase);
  fflush(stderr);
}

static void
progress_cb(void *opaque, uint64_t bytes)
{
  draw(opaque, bytes);
}

/* --- worker threads: qcow2 and NBD outputs --------------------------------- */

static void
job_finish(struct job *j, GError *err)
{
  if (j->p)
    stream_done(j->p, err);
  else
    stream_release(j->s, err);
  g_free(j);
}

static gpointer
qcow2_worker(gpointer opaque)
{
  struct restore *rs = opaque;
  struct job *j;

  while ((j = g_async_queue_pop(rs->jobs)) != &stop_job) {
    GError *err = NULL;
    int r = cbt_qcow2_writer_write(rs->w, j->off, j->buf, (size_t)j->len);

    if (r < 0)
      err = g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "%s: writing guest offset %" PRIu64
                        ": %s", rs->out, j->off, g_strerror(-r));
    else
      atomic_fetch_add(&rs->written, j->len);
    job_finish(j, err);
  }
  cbt_io_thread_cleanup();
  return NULL;
}

static int
nbd_job_done(void *opaque, int *error)
{
  struct job *j = opaque;
  struct restore *rs = j->c->rs;
  GError *err = NULL;

  j->c->inflight--;
  if (*error)
    err = g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: %s %" PRIu64 "+%" PRIu64 ": %s",
                      rs->out, j->kind == JOB_WRITE ? "writing" : "zeroing", j->off, j->len,
                      g_strerror(*error));
  else if (j->kind == JOB_WRITE && j->buf != rs->zero_buf)
    atomic_fetch_add(&rs->written, j->len);
  job_finish(j, err);
  return 1;
}

static gpointer
nbd_worker(gpointer opaque)
{
  struct conn *c = opaque;
  struct restore *rs = c->rs;
  bool stop = false;

  for (;;) {
    while (!stop && c->inflight < NBD_DEPTH) {
      struct job *j = c->inflight ? g_async_queue_try_pop(rs->jobs)
                                  : g_async_queue_pop(rs->jobs);
      nbd_completion_callback cb = { .callback = nbd_job_done, .user_data = j };
      int64_t r;

      if (!j)
        break;
      if (j == &stop_job) {
        stop = true;
        break;
      }
      j->c = c;
      if (c->dead) {
        job_finish(j, g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: %s", rs->out,
                                  c->dead));
        continue;
      }
      c->inflight++;
      r = j->kind == JOB_ZERO
        ? nbd_aio_zero(c->h, j->len, j->off, cb, 0)
        : nbd_aio_pwrite(c->h, j->buf, (size_t)j->len, j->off, cb, 0);
      if (r < 0) {
        c->inflight--;
        job_finish(j, g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: %s", rs->out,
                                  nbd_get_error()));
      }
    }
    if (c->inflight == 0 && stop)
      break;
    if (c->inflight > 0 && nbd_poll(c->h, -1) < 0 && nbd_get_errno() != EINTR) {
      /* The connection is gone; libnbd retires what was in flight with
       * an error (its callbacks ran).  Fail whatever comes next. */
      c->dead = g_strdup(nbd_get_error());
      if (c->inflight > 0) {
        cli_error("NBD %s: %s", rs->out, c->dead);
        _exit(CLI_EXIT_FAILED);   /* nothing can finish the run any more */
      }
    }
  }
  return NULL;
}

static void
queue_job(struct restore *rs, enum job_kind kind, uint64_t off, uint64_t len,
          const uint8_t *buf, struct stream_piece *p, stream *s)
{
  struct job *j = g_new0(struct job, 1);

  j->kind = kind;
  j->off = off;
  j->len = len;
  j->buf = buf;
  j->p = p;
  j->s = s;
  if (p)
    stream_ref(p);
  else
    stream_hold(s);
  g_async_queue_push(rs->jobs, j);
}

/* --- the output ---------------------------------------------------------- */

static bool
sink_open(struct restore *rs, GError **error)
{
  const char *out = rs->out;
  uint64_t size = rs->map->image_size;

  rs->fd = -1;
  rs->dfd = -1;
  if (is_nbd_uri(out)) {
    rs->kind = SINK_NBD;
    rs->nconns = rs->connections;
    rs->conns = g_new0(struct conn, rs->nconns);
    for (unsigned i = 0; i < rs->nconns; i++) {
      struct conn *c = &rs->conns[i];
      int64_t esize;

      c->rs = rs;
      c->h = nbd_create();
      /* nbds:// outputs may name their TLS files (tls-certificates=...). */
      if (!c->h || nbd_set_uri_allow_local_file(c->h, true) < 0 ||
          nbd_connect_uri(c->h, out) < 0) {
        g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: %s", out, nbd_get_error());
        return false;
      }
      if (i > 0)
        continue;
      esize = nbd_get_size(c->h);
      if (esize < 0 || (uint64_t)esize != size) {
        g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                    "NBD %s: export size %" PRId64 ", the backup is %" PRIu64 " bytes",
                    out, esize, size);
        return false;
      }
      if (nbd_is_read_only(c->h) == 1) {
        g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: the export is read-only",
                    out);
        return false;
      }
      rs->can_zero = nbd_can_zero(c->h) == 1;
      if (rs->nconns > 1 && nbd_can_multi_conn(c->h) != 1) {
        cli_debug("NBD %s: no multi-conn: one connection", out);
        rs->nconns = 1;
      }
    }
    if (!rs->can_zero)
      rs->zero_buf = g_malloc0(ZERO_BUF);
    rs->jobs = g_async_queue_new();
    for (unsigned i = 0; i < rs->nconns; i++)
      rs->conns[i].thread = g_thread_new("nbd-out", nbd_worker, &rs->conns[i]);
    return true;
  }
  if (g_str_has_suffix(out, ".qcow2")) {
    struct cbt_qcow2_writer_opts o = { .size = size,
                                       .cluster_size = (uint32_t)rs->map->cluster_size };
    g_autofree char *why = NULL;
    int r;

    rs->kind = SINK_QCOW2;
    r = cbt_qcow2_writer_create(out, &o, &rs->w, &why);
    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", out,
                  r == -EEXIST ? "exists (remove it or choose another name)"
                               : why ? why : g_strerror(-r));
      return false;
    }
    rs->created = true;
    rs->jobs = g_async_queue_new();
    rs->nworkers = cli_copy_threads();
    rs->workers = g_new0(GThread *, rs->nworkers);
    for (unsigned i = 0; i < rs->nworkers; i++)
      rs->workers[i] = g_thread_new("qcow2-out", qcow2_worker, rs);
    return true;
  }
  rs->kind = SINK_RAW;
  rs->fd = open(out, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (rs->fd < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", out,
                errno == EEXIST ? "exists (remove it or choose another name)"
                                : g_strerror(errno));
    return false;
  }
  rs->created = true;
  if (ftruncate(rs->fd, (off_t)size) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: truncate to %" PRIu64 ": %s", out,
                size, g_strerror(errno));
    return false;
  }
  {
    /* Only where the file system says it takes direct writes of our
     * alignment: a refused write would fail the restore. */
    struct statx stx;
    char path[64];

    if (statx(rs->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0 ||
        !(stx.stx_mask & STATX_DIOALIGN) || stx.stx_dio_offset_align == 0 ||
        stx.stx_dio_offset_align > DIO_ALIGN || stx.stx_dio_mem_align > DIO_ALIGN) {
      cli_debug("%s: no direct I/O of %u-byte alignment: writing through the page cache",
                out, DIO_ALIGN);
      return true;
    }
    snprintf(path, sizeof path, "/proc/self/fd/%d", rs->fd);
    rs->dfd = open(path, O_WRONLY | O_DIRECT | O_CLOEXEC);
    if (rs->dfd < 0)
      cli_debug("%s: no O_DIRECT (%s): writing through the page cache", out,
                g_strerror(errno));
  }
  return true;
}

/* Stop the worker threads (every job is done: stream_run waited). */
static void
stop_workers(struct restore *rs)
{
  for (unsigned i = 0; i < rs->nworkers; i++)
    g_async_queue_push(rs->jobs, &stop_job);
  for (unsigned i = 0; i < rs->nworkers; i++)
    g_thread_join(rs->workers[i]);
  rs->nworkers = 0;
  for (unsigned i = 0; i < rs->nconns; i++)
    if (rs->conns[i].thread)
      g_async_queue_push(rs->jobs, &stop_job);
  for (unsigned i = 0; i < rs->nconns; i++)
    if (rs->conns[i].thread) {
      g_thread_join(rs->conns[i].thread);
      rs->conns[i].thread = NULL;
    }
}

/* Make the output durable and close it. */
static bool
sink_finish(struct restore *rs, GError **error)
{
  g_autofree char *why = NULL;
  int r;

  switch (rs->kind) {
  case SINK_RAW:
    r = cbt_io_fsync(rs->fd);
    close(rs->fd);
    rs->fd = -1;
    if (rs->dfd >= 0)
      close(rs->dfd);
    rs->dfd = -1;
    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: fsync: %s", rs->out,
                  g_strerror(-r));
      return false;
    }
    break;
  case SINK_QCOW2:
    /* What the file stores, not what was handed over. */
    rs->written = cbt_qcow2_writer_data_bytes(rs->w);
    r = cbt_qcow2_writer_finish(rs->w, &why);
    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", rs->out,
                  why ? why : g_strerror(-r));
      return false;
    }
    break;
  case SINK_NBD:
    /* Without multi-conn there is one connection; with it, a flush on
     * each covers what that connection wrote. */
    for (unsigned i = 0; i < rs->nconns; i++) {
      struct nbd_handle *h = rs->conns[i].h;

      if (nbd_can_flush(h) == 1 && nbd_flush(h, 0) < 0) {
        g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: flush: %s", rs->out,
                    nbd_get_error());
        return false;
      }
      if (nbd_shutdown(h, 0) < 0)
        cli_debug("NBD %s: shutdown: %s", rs->out, nbd_get_error());
    }
    break;
  }
  rs->created = false;
  return true;
}

static void
sink_close(struct restore *rs)
{
  if (rs->jobs)
    stop_workers(rs);
  if (rs->fd >= 0)
    close(rs->fd);
  if (rs->dfd >= 0)
    close(rs->dfd);
  cbt_qcow2_writer_free(rs->w);
  for (unsigned i = 0; i < rs->connections && rs->conns; i++)
    if (rs->conns[i].h) {
      nbd_close(rs->conns[i].h);
      g_free(rs->conns[i].dead);
    }
  g_free(rs->conns);
  g_free(rs->workers);
  g_free(rs->zero_buf);
  if (rs->jobs)
    g_async_queue_unref(rs->jobs);
  if (rs->created && unlink(rs->out) < 0 && errno != ENOENT)
    cli_error("%s: cannot remove the incomplete output: %s", rs->out, g_strerror(errno));
}

/* --- the stream's callbacks ---------------------------------------------- */

/* An NBD export may hold old data: write zeros over what reads as zeros.
 * New files read zeros there already. */
static bool
start_cb(void *opaque, stream *s, GError **error)
{
  struct restore *rs = opaque;

  (void)error;
  if (rs->kind != SINK_NBD)
    return true;
  for (guint i = 0; i < rs->map->zeros->len; i++) {
    const struct stream_range *z = &g_array_index(rs->map->zeros, struct stream_range, i);

    for (uint64_t o = 0; o < z->len;) {
      uint64_t n = MIN(z->len - o, rs->can_zero ? MAX_ZERO : ZERO_BUF);

      queue_job(rs, rs->can_zero ? JOB_ZERO : JOB_WRITE, z->off + o, n, rs->zero_buf,
                NULL, s);
      o += n;
    }
  }
  return true;
}

/* Write @len bytes of guest data at @goff from @buf (cluster aligned, the
 * last cluster may be partial). */
static void
put(struct restore *rs, struct stream_piece *p, uint64_t goff, const uint8_t *buf,
    uint64_t len)
{
  const uint64_t cs = rs->map->cluster_size;

  if (rs->kind == SINK_QCOW2) {
    queue_job(rs, JOB_WRITE, goff, len, buf, p, NULL);
    return;
  }
  /* Raw and NBD: all-zero clusters become holes (raw) or write-zeroes. */
  for (uint64_t i = 0; i < len;) {
    uint64_t j = i;
    bool zero = cbt_is_zero(buf + i, (size_t)MIN(cs, len - i));

    while (j < len && cbt_is_zero(buf + j, (size_t)MIN(cs, len - j)) == zero)
      j += MIN(cs, len - j);
    if (rs->kind == SINK_RAW) {
      if (!zero) {
        bool direct = rs->dfd >= 0 &&
          ((uintptr_t)(buf + i) | (goff + i) | (j - i)) % DIO_ALIGN == 0;

        stream_write(p, direct ? rs->dfd : rs->fd, rs->out, buf + i, j - i, goff + i);
        atomic_fetch_add(&rs->written, j - i);
      }
    } else if (!zero) {
      queue_job(rs, JOB_WRITE, goff + i, j - i, buf + i, p, NULL);
    } else if (rs->can_zero) {
      queue_job(rs, JOB_ZERO, goff + i, j - i, NULL, p, NULL);
    } else {
      queue_job(rs, JOB_WRITE, goff + i, j - i, rs->zero_buf, p, NULL);
    }
    i = j;
  }
}

static bool
piece_cb(void *opaque, struct stream_piece *p, GError **error)
{
  struct restore *rs = opaque;
  const uint64_t cs = rs->map->cluster_size;
  unsigned fi;
  uint64_t off, len;
  const uint8_t *buf = stream_piece_data(p, &fi, &off, &len);
  const struct chain_file *f = &rs->map->files[fi];

  (void)error;
  for (guint k = chain_file_find(f, off, cs); k < f->runs->len; k++) {
    const struct chain_run *run = &g_array_index(f->runs, struct chain_run, k);
    uint64_t h0 = MAX(run->host, off);
    uint64_t h1 = MIN(run->host + run->clusters * cs, off + len);
    uint64_t g0, glen;

    if (run->host >= off + len)
      break;
    if (h0 >= h1)
      continue;
    /* Pieces and runs are cluster aligned in the file. */
    g0 = run->guest * cs + (h0 - run->host);
    if (g0 >= rs->map->image_size)
      continue;
    glen = MIN(h1 - h0, rs->map->image_size - g0);
    put(rs, p, g0, buf + (h0 - off), glen);
  }
  return true;
}

/* --- the command ----------------------------------------------------------- */

static bool
restore(struct restore *rs, GError **error)
{
  g_autoptr(repo) r = NULL;
  g_autoptr(chain_map) map = NULL;
  g_autofree struct stream_file *files = NULL;
  const repo_backup *b = NULL;
  struct stream_opts so = { .start = start_cb, .piece = piece_cb, .opaque = rs };
  bool ok = false;

  rs->start = g_get_monotonic_time();
  if (!repo_open(rs->dir, REPO_LOCK_SHARED, false, &r, error) ||
      !repo_find(r, rs->at, &b, error) ||
      !chain_map_build(r, b, &map, error))
    return false;
  rs->map = map;
  files = g_new0(struct stream_file, map->nfiles);
  for (unsigned i = 0; i < map->nfiles; i++) {
    struct chain_file *f = &map->files[i];
    struct stream_file *sf = &files[i];

    sf->rf = f->rf;
    sf->size = f->size;
    sf->ranges = g_array_new(FALSE, FALSE, sizeof(struct stream_range));
    if (rs->verify) {
      /* The checksums cover every byte: read all of it. */
      struct stream_range all = { 0, f->size };

      g_array_append_val(sf->ranges, all);
      sf->sums = f->backup->sums;
      sf->chunk_size = f->backup->chunk_size;
      sf->checksum = f->backup->checksum;
    } else {
      /* Only the visible clusters, in file order, merged. */
      for (guint k = 0; k < f->runs->len; k++) {
        const struct chain_run *run = &g_array_index(f->runs, struct chain_run, k);
        struct stream_range *last = sf->ranges->len ?
          &g_array_index(sf->ranges, struct stream_range, sf->ranges->len - 1) : NULL;
        uint64_t len = run->clusters * map->cluster_size;

        if (last && last->off + last->len == run->host) {
          last->len += len;
        } else {
          struct stream_range rr = { run->host, len };

          g_array_append_val(sf->ranges, rr);
        }
      }
    }
    for (guint k = 0; k < sf->ranges->len; k++)
      rs->total += g_array_index(sf->ranges, struct stream_range, k).len;
  }
  if (!sink_open(rs, error))
    goto out;
  rs->phase = "reading and writing";
  if (rs->progress)
    so.progress = progress_cb;
  if (!stream_run(&so, files, map->nfiles, error)) {
    if (g_error_matches(*error, CLI_ERROR, CLI_EXIT_DAMAGED))
      g_prefix_error(error, "not restoring %s: ", b->file);
    goto out;
  }
  stop_workers(rs);
  rs->phase = "syncing";
  draw(rs, rs->total);
  if (!sink_finish(rs, error))
    goto out;
  rs->phase = "done";
  draw(rs, rs->total);
  if (rs->progress)
    fputc('\n', stderr);
  ok = true;
  {
    g_autofree char *size = cli_format_size(map->image_size);
    g_autofree char *data = cli_format_size(rs->written);

    cli_note("restored %s (%s, %s of data) to %s in %.1f s%s", b->file, size, data,
             rs->out, (double)(g_get_monotonic_time() - rs->start) / 1e6,
             rs->verify ? ", checksums verified" : ", checksums NOT verified");
  }
out:
  if (!ok && rs->progress)
    fputc('\n', stderr);
  sink_close(rs);
  for (unsigned i = 0; files && i < map->nfiles; i++)
    if (files[i].ranges)
      g_array_unref(files[i].ranges);
  rs->map = NULL;
  return ok;
}

int
cmd_restore(int argc, char **argv)
{
  for (int i = 1; i < argc && strcmp(argv[i], "--") != 0; i++)
    if (strcmp(argv[i], "--instant") == 0)
      return cmd_restore_instant(argc, argv);   /* cmd-restore-instant.c */
  g_autofree char *dir = NULL, *at = NULL, *out = NULL;
  gboolean no_verify = FALSE;
  gint conns = DEFAULT_CONNECTIONS;
  GError *error = NULL;
  struct restore rs = { 0 };
  GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository: a directory or s3://BUCKET/PREFIX", "DIR" },
    CLI_S3_OPTION,
    { "at", 'a', 0, G_OPTION_ARG_STRING, &at, "the backup to restore: seq number, file name or 'latest' (default)", "BACKUP" },
    { "output", 'o', 0, G_OPTION_ARG_FILENAME, &out, "FILE.raw, FILE.qcow2 or an NBD URI", "OUTPUT" },
    { "no-verify", 0, 0, G_OPTION_ARG_NONE, &no_verify, "do not check the manifest's checksums while reading", NULL },
    { "connections", 'n', 0, G_OPTION_ARG_INT, &conns, "NBD connections for an NBD output (default 4)", "N" },
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("restore", "",
                       "Rebuild the disk image as of one backup.",
                       "A file output must not exist yet; it is written sparse and\n"
                       "removed again if the restore fails.  An NBD export must have\n"
                       "the image's size; all of it is overwritten.\n"
                       "Only the files of the manifest's chain are read, as regular\n"
                       "files in DIR; one whose backing file disagrees with the\n"
                       "manifest, a symbolic link or a FIFO is refused (exit 4).\n"
                       "From s3://BUCKET/PREFIX the objects are read with parallel\n"
                       "ranged GETs; a missing object, or one that changes while it is\n"
                       "read, is refused the same way (exit 4).\n"
                       "Every chunk of every file of the chain is checked against the\n"
                       "manifest's SHA-256 while it is read; a mismatch fails the\n"
                       "restore with exit 4 naming the file and byte range (a file\n"
                       "output is removed; an NBD export keeps what was written).\n\n"
                       CLI_EXIT_CODES_HELP,
                       entries);

  if (!cli_parse(octx, "restore", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc > 1)
    return cli_usage_error("restore", "unexpected argument '%s'", argv[1]);
  if (!dir || !out)
    return cli_usage_error("restore", "--repo and --output are required");
  if (conns < 1 || conns > MAX_CONNECTIONS)
    return cli_usage_error("restore", "--connections must be 1 to %d", MAX_CONNECTIONS);
  signal(SIGPIPE, SIG_IGN);
  rs.dir = dir;
  rs.at = at;
  rs.out = out;
  rs.verify = !no_verify;
  rs.connections = (unsigned)conns;
  rs.progress = !cli_quiet && isatty(STDERR_FILENO);
  return restore(&rs, &error) ? CLI_EXIT_OK : cli_report(error);
}
