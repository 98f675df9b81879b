/* Instant restore: serve the disk of a backup point read-write at once,
 * while its data streams into the output image in the background.
 *
 * The mirror image of snapshot.c.  There, the image is live and old data
 * is saved before a guest write replaces it; here, the output (srv.image)
 * is empty and the backup's data (the source: the point's qcow2 file and
 * its chain, opened read-only) is copied in before a guest write may
 * change it.  Per granule of the disk there is a *done* bit: 1 = the
 * output holds the granule's data (the backup's, or the guest's written
 * after it).  Bits go from 0 to 1 only.
 *
 * Reads (restore_read).  The range is split at the granules' done bits as
 * they are at the check: runs of done granules are read from the output,
 * the others from the source.  Exact without waiting: a guest write is
 * submitted only after its granules are done, so a granule not done at
 * the check holds no guest data that any write acknowledged before this
 * read could have put there, and the source is immutable.
 *
 * Guest changes (restore_before_write, before WRITE, WRITE_ZEROES, TRIM
 * is submitted).  A granule that is done costs one atomic load.  Any
 * other is claimed with a record under r->lock (or, if the copier or
 * another request has claimed it, the request waits on that record, so a
 * granule is copied once); claimed neighbours form one copy job of up to
 * RUN_MAX bytes on the request's worker ring.  A job asks the source's
 * block status, reads the run unless it is all zeros, and writes it to the
 * output, zero granules as WRITE_ZEROES (holes), the rest as data; then,
 * under the lock, it sets the done bits, drops the records and wakes the
 * waiters on their own workers.  Only then is the guest write submitted.
 * A failed copy fails the guest writes waiting for it (EIO): writing on
 * top of a granule that is not done would let a later copy destroy it.
 *
 * The copier (a thread with its own io_uring) walks the disk in order,
 * claiming runs of granules nobody has claimed, with COPIER_JOBS jobs in
 * flight, at most --restore-rate bytes per second (0: no limit).  After a
 * pass it rescans for granules left undone (a guest copy that failed) until
 * every bit is set.  A copier job that fails stops the copier: the restore
 * is then "failed" in status, never complete, and the state file says so.
 *
 * Durability: the state file (lib/restore-state.c) is the persistent copy
 * of the done bits.  Rule: a bit reaches the state file only after the
 * output data it covers is durable.  The syncer thread keeps it: it takes
 * a copy of the done bits, flushes the output (the image's FLUSH, which
 * covers qcow2 metadata), and only then writes the changed pages of the
 * copy and fdatasyncs; r->durable is what that left on disk.  It runs
 * once a second (--restore-sync-interval) when bits changed, and for every guest FLUSH and FUA
 * write before they are acknowledged (restore_flush, shared by all
 * waiting at that moment, as tracking.c shares bitmap write-outs).  So
 * after a crash no granule that holds flushed guest data can be copied
 * over again; unflushed guest writes may be lost as any unflushed write
 * may; and a granule whose copy was not durable is simply copied again.
 *
 * Completion.  When every bit is durable the restore is complete: the
 * output is a standalone image (the CLI created it without a backing
 * file), restore_active() turns false, and every path above is skipped.
 * The source is closed by the syncer once no read of it is in flight:
 * readers count themselves in r->src_users *before* they look at the
 * bits, and complete is set only after all bits are, so a reader that
 * counts itself after the syncer saw zero finds every granule done and
 * never touches the source.  --restore-release-fd (the repository lock
 * cbt restore --instant holds, and the private mount it reads the backup
 * through) is closed with it.
 *
 * Damage.  A read of the source that fails with EBADMSG found the backup
 * damaged: the image backends say so of a corrupt qcow2, and the private
 * mount of cbt restore --instant (cmd-mount.c) of a chunk that does not
 * match the manifest's checksum.  The read fails as any other (nothing
 * from it is written: the data never reaches the output, and a guest
 * gets EIO), and the restore can never complete from this backup, so
 * the daemon stops (SIGTERM to itself: the ordinary clean shutdown,
 * progress recorded) and exits with status 4, cbt's "damage found".
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cbt/nbd-proto.h"
#include "cbt/restore-state.h"
#include "cbt/util.h"
#include "internal.h"
#include "layer.h"

#define RUN_MAX       (UINT64_C(1) << 20)   /* bytes of one copy job, at most */
#define COPIER_JOBS   4u
#define COPIER_RING   64u
#define RESCAN_NS     (100 * 1000 * 1000)   /* between passes over leftovers */

/* A guest request waiting for the copies of its granules. */
struct rwait {
  struct exec *ex;
  atomic_uint pending;
  atomic_int err;
  void (*cont)(void *arg, int res);
  void *arg;
};

/* A granule being copied: its claim, and who waits for it. */
struct record {
  uint64_t g;                       /* hash key */
  GPtrArray *waiters;               /* struct rwait * */
};

struct job {
  struct exec *ex;                 /* NULL: the copier thread */
  struct io_uring *ring;
  uint64_t g0, n;                   /* granules [g0, g0 + n) */
  uint64_t off, len;                /* their bytes */
  uint64_t pos;                     /* output written up to off + pos */
  uint8_t *buf;                     /* NULL: the run is all zeros */
  struct cbt_image_io io;
};

/* A flush waiting for the done bits to be durable. */
struct flush_waiter {
  struct exec *ex;
  void (*done)(void *arg, int res);
  void *arg;
  int res;
};

struct restore {
  const char *src_path;
  const char *state_path;
  struct cbt_image *src;            /* NULL once closed (or never opened) */
  cbt_rstate *state;
  uint64_t size;
  uint32_t gran;
  unsigned shift;
  uint64_t nbits, nwords;
  uint64_t rate;                    /* bytes per second, 0: unlimited */
  gint64 sync_interval_us;
  int release_fd[RESTORE_RELEASE_MAX];  /* -1 once closed */
  unsigned n_release_fd;

  _Atomic uint64_t *done;           /* output holds the granule */
  _Atomic uint64_t *durable;        /* ... and the state file says so */
  atomic_uint_fast64_t ndone, ndurable;
  atomic_int src_users;             /* reads of the source in flight */
  atomic_bool active;               /* not complete */
  atomic_bool stopping;

  GMutex lock;                      /* records */
  GHashTable *recs;                 /* &record->g -> record */

  /* Copier thread. */
  GThread *copier;
  int efd;
  uint64_t efd_val;
  struct cbt_aio_op efd_op;
  unsigned copier_jobs;
  uint64_t cursor;
  atomic_int copier_state;          /* enum copier_state */
  gint64 rate_start;
  uint64_t rate_bytes;

  /* Syncer thread, and everything under sync_lock. */
  GThread *syncer;
  GMutex sync_lock;
  GCond sync_cond;
  GPtrArray *flushes;               /* struct flush_waiter * */
  bool sync_kick;
  char *failed;                     /* why the restore failed, or NULL */
  uint64_t guest_copies, copier_bytes, source_read_bytes;
};

enum copier_state { COPIER_IDLE, COPIER_COPYING, COPIER_DONE, COPIER_FAILED,
                    COPIER_STOPPED };

static struct restore *R;
static atomic_bool damaged;         /* outlives R: main's exit status */

/* ---- bits ---- */

static bool
bit_test(_Atomic uint64_t *words, uint64_t g)
{
  return (atomic_load_explicit(&words[g >> 6], memory_order_acquire) >> (g & 63)) & 1;
}

/* Bytes of the disk covered by @n granules, exact at the short last one
 * if @last is among them. */
static uint64_t
bytes_of(uint64_t n, bool last)
{
  uint64_t b = n << R->shift;

  return last ? b - ((R->nbits << R->shift) - R->size) : b;
}

bool
restore_active(void)
{
  return R && atomic_load_explicit(&R->active, memory_order_acquire);
}

bool
restore_is_durable(uint64_t offset, uint64_t len)
{
  if (!restore_active() || len == 0)
    return true;
  for (uint64_t g = offset >> R->shift;
       g <= MIN((offset + len - 1) >> R->shift, R->nbits - 1); g++)
    if (!bit_test(R->durable, g))
      return false;
  return true;
}

static void
set_failed(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

bool
restore_damaged(void)
{
  return atomic_load(&damaged);
}

/* A read of [@off, @off + @len) of the source failed with @res: if it
 * found the backup damaged, stop (see the top of the file); once. */
static void
source_failed(uint64_t off, uint64_t len, int res)
{
  if (res != -EBADMSG || atomic_exchange(&damaged, true))
    return;
  /* Before the failure reaches set_failed, whose words ("still served")
   * would not be true. */
  g_mutex_lock(&R->sync_lock);
  if (!R->failed)
    R->failed = g_strdup_printf("%s is damaged (guest bytes %" PRIu64 "..%" PRIu64 ")",
                                R->src_path, off, off + len - 1);
  g_mutex_unlock(&R->sync_lock);
  log_error("instant restore: %s: damaged (reading guest bytes %" PRIu64 "..%" PRIu64
            "): stopping with exit status %d; %s keeps what was copied, none of it "
            "damaged, and cannot be completed from this backup", R->src_path, off,
            off + len - 1, RESTORE_EXIT_DAMAGED, srv.image_path);
  kill(getpid(), SIGTERM);
}

/* Close the --restore-release-fd descriptors (once). */
static void
release_all(struct restore *r)
{
  for (unsigned i = 0; i < r->n_release_fd; i++)
    if (r->release_fd[i] >= 0) {
      close(r->release_fd[i]);
      r->release_fd[i] = -1;
    }
}

static void
set_failed(const char *fmt, ...)
{
  va_list ap;

  g_mutex_lock(&R->sync_lock);
  if (!R->failed) {
    va_start(ap, fmt);
    R->failed = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    log_error("instant restore failed: %s; the disk is still served (what "
              "was not copied reads as errors), the restore is not complete",
              R->failed);
  }
  g_mutex_unlock(&R->sync_lock);
}

/* ---- waiters ---- */

static void
run_wait(void *arg)
{
  struct rwait *rw = arg;

  rw->cont(rw->arg, atomic_load(&rw->err));
  g_free(rw);
}

static void
wait_put(struct rwait *rw, int res)
{
  if (res < 0)
    atomic_store(&rw->err, res);
  if (atomic_fetch_sub(&rw->pending, 1) == 1)
    exec_post(rw->ex, run_wait, rw);
}

/* ---- copy jobs ---- */

static void job_step(struct job *j);
static void copier_job_done(struct job *j, int res);

/* Under R->lock: claim granule @g (not done, no record) for a job. */
static struct record *
claim(uint64_t g)
{
  struct record *rec = g_new0(struct record, 1);

  rec->g = g;
  rec->waiters = g_ptr_array_new();
  g_hash_table_insert(R->recs, &rec->g, rec);
  return rec;
}

static void
free_record(gpointer p)
{
  struct record *rec = p;

  g_ptr_array_unref(rec->waiters);
  g_free(rec);
}

static void
job_finish(struct job *j, int res)
{
  GPtrArray *wake = g_ptr_array_new();
  struct exec *ex = j->ex;

  g_mutex_lock(&R->lock);
  for (uint64_t g = j->g0; g < j->g0 + j->n; g++) {
    struct record *rec = g_hash_table_lookup(R->recs, &g);

    if (res == 0) {
      /* Set before the waiters run: their writes need it. */
      atomic_fetch_or(&R->done[g >> 6], UINT64_C(1) << (g & 63));
      atomic_fetch_add(&R->ndone, 1);
    }
    if (rec) {
      for (guint i = 0; i < rec->waiters->len; i++)
        g_ptr_array_add(wake, rec->waiters->pdata[i]);
      g_hash_table_remove(R->recs, &g);
    }
  }
  g_mutex_unlock(&R->lock);
  for (guint i = 0; i < wake->len; i++)
    wait_put(wake->pdata[i], res < 0 ? -EIO : 0);
  g_ptr_array_unref(wake);
  if (res < 0)
    log_error("instant restore: copying %" PRIu64 " bytes at offset %" PRIu64
              " from %s: %s", j->len, j->off, R->src_path, g_strerror(-res));
  if (!ex) {
    copier_job_done(j, res);
    return;
  }
  free(j->buf);
  g_free(j);
  exec_unhold(ex);
}

/* Write the next piece of the run: a stretch of granules that are all
 * zeros (WRITE_ZEROES, which leaves holes) or all data. */
static void
job_write_done(struct cbt_image_io *io, int res)
{
  struct job *j = cbt_container_of(io, struct job, io);

  if (res < 0) {
    job_finish(j, res);
    return;
  }
  j->pos += io->len;
  job_step(j);
}

static void
job_step(struct job *j)
{
  uint64_t end = j->pos;
  bool zero;

  if (j->pos == j->len) {
    job_finish(j, 0);
    return;
  }
  zero = !j->buf || cbt_is_zero(j->buf + j->pos, (size_t)MIN((uint64_t)R->gran,
                                                              j->len - j->pos));
  while (end < j->len) {
    uint64_t n = MIN((uint64_t)R->gran, j->len - end);

    if (j->buf && cbt_is_zero(j->buf + end, (size_t)n) != zero)
      break;
    end += n;
  }
  memset(&j->io, 0, sizeof j->io);
  j->io.ring = j->ring;
  j->io.type = zero ? CBT_IO_ZERO : CBT_IO_WRITE;
  j->io.offset = j->off + j->pos;
  j->io.len = end - j->pos;
  j->io.buf = zero ? NULL : j->buf + j->pos;
  j->io.complete = job_write_done;
  cbt_image_submit(srv.image, &j->io);
}

static void
job_read_done(struct cbt_image_io *io, int res)
{
  struct job *j = cbt_container_of(io, struct job, io);

  if (res < 0) {
    source_failed(io->offset, io->len, res);
    job_finish(j, res);
    return;
  }
  job_step(j);
}

/* Is [off, off+len) of the source all zeros by its block status? */
static bool
source_zero(uint64_t off, uint64_t len)
{
  struct cbt_extent ext[16];
  uint64_t pos = off;

  while (pos < off + len) {
    int n = R->src->ops->block_status(R->src, pos, off + len - pos, ext, G_N_ELEMENTS(ext));

    if (n <= 0)
      return false;
    for (int i = 0; i < n; i++) {
      if (!(ext[i].flags & NBD_STATE_ZERO) || ext[i].length == 0)
        return false;
      pos += ext[i].length;
    }
  }
  return true;
}

/* Copy the claimed granules [g0, g0 + n) on @ring (of exec @ex, or the
 * copier's when @ex is NULL). */
static void
job_start(struct exec *ex, struct io_uring *ring, uint64_t g0, uint64_t n)
{
  struct job *j = g_new0(struct job, 1);

  j->ex = ex;
  j->ring = ring;
  j->g0 = g0;
  j->n = n;
  j->off = g0 << R->shift;
  j->len = bytes_of(n, g0 + n == R->nbits);
  if (ex)
    exec_hold(ex);
  if (source_zero(j->off, j->len)) {
    job_step(j);
    return;
  }
  /* Aligned, so an O_DIRECT output (--cache none) can take it. */
  if (posix_memalign((void **)&j->buf, 4096, (j->len + 4095) / 4096 * 4096) != 0) {
    j->buf = NULL;
    job_finish(j, -ENOMEM);
    return;
  }
  j->io.ring = ring;
  j->io.type = CBT_IO_READ;
  j->io.offset = j->off;
  j->io.len = j->len;
  j->io.buf = j->buf;
  j->io.complete = job_read_done;
  cbt_image_submit(R->src, &j->io);
}

/* ---- guest changes ---- */

bool
restore_before_write(struct exec *ex, uint64_t offset, uint64_t len,
                     void (*cont)(void *arg, int res), void *arg)
{
  uint64_t runs[2 * 64], nruns = 0;  /* (g0, n) pairs of new jobs */
  struct rwait *rw = NULL;
  bool locked = false;
  uint64_t g0, g1;

  if (!restore_active() || len == 0)
    return false;
  g0 = offset >> R->shift;
  g1 = MIN((offset + len - 1) >> R->shift, R->nbits - 1);
  for (uint64_t g = g0; g <= g1; g++) {
    struct record *rec;

    if (bit_test(R->done, g))
      continue;
    if (!locked) {
      g_mutex_lock(&R->lock);
      locked = true;
    }
    if (bit_test(R->done, g))
      continue;
    rec = g_hash_table_lookup(R->recs, &g);
    if (!rec) {
      rec = claim(g);
      if (nruns > 0 && runs[2 * nruns - 2] + runs[2 * nruns - 1] == g &&
          (runs[2 * nruns - 1] + 1) << R->shift <= RUN_MAX) {
        runs[2 * nruns - 1]++;
      } else if (nruns < G_N_ELEMENTS(runs) / 2) {
        runs[2 * nruns] = g;
        runs[2 * nruns + 1] = 1;
        nruns++;
      } else {
        /* Too many runs for this call: leave the rest to the next one
         * (the request comes back here after these copies). */
        g_hash_table_remove(R->recs, &g);
        break;
      }
    }
    if (!rw) {
      rw = g_new0(struct rwait, 1);
      rw->ex = ex;
      rw->cont = cont;
      rw->arg = arg;
      atomic_init(&rw->pending, 1);  /* our own hold, dropped below */
      atomic_init(&rw->err, 0);
    }
    atomic_fetch_add(&rw->pending, 1);
    g_ptr_array_add(rec->waiters, rw);
  }
  if (locked)
    g_mutex_unlock(&R->lock);
  if (!rw)
    return false;
  g_mutex_lock(&R->sync_lock);
  for (uint64_t i = 0; i < nruns; i++)
    R->guest_copies += runs[2 * i + 1];
  g_mutex_unlock(&R->sync_lock);
  for (uint64_t i = 0; i < nruns; i++)
    job_start(ex, exec_ring(ex), runs[2 * i], runs[2 * i + 1]);
  /* Copies complete on the ring, never inside job_start, and their
   * wake-ups are posted. */
  wait_put(rw, 0);
  return true;
}

/* ---- reads ---- */

struct piece {
  struct rread *rd;
  struct cbt_image_io io;
};

struct rread {
  void (*done)(void *arg, int res);
  void *arg;
  unsigned pending;
  int err;
  bool src_user;
  struct piece *pieces;
};

static void
read_put(struct rread *rd)
{
  if (--rd->pending > 0)
    return;
  if (rd->src_user)
    atomic_fetch_sub(&R->src_users, 1);
  rd->done(rd->arg, rd->err);
  g_free(rd->pieces);
  g_free(rd);
}

static void
piece_done(struct cbt_image_io *io, int res)
{
  struct piece *p = cbt_container_of(io, struct piece, io);

  if (res < 0 && io->img == R->src)
    source_failed(io->offset, io->len, res);
  if (res < 0 && !p->rd->err) {
    p->rd->err = res;
    log_error("instant restore: reading %s at offset %" PRIu64 " length %" PRIu64 ": %s",
              io->img == srv.image ? srv.image_path : R->src_path, io->offset, io->len,
              g_strerror(-res));
  }
  read_put(p->rd);
}

void
restore_read(struct exec *ex, uint64_t offset, uint32_t len, void *buf,
             void (*done)(void *arg, int res), void *arg)
{
  struct rread *rd = g_new0(struct rread, 1);
  uint64_t end = offset + len, pos = offset, src_bytes = 0;
  unsigned n = 0, max;

  rd->done = done;
  rd->arg = arg;
  /* Counted before the bits are looked at (see the top of the file). */
  atomic_fetch_add(&R->src_users, 1);
  rd->src_user = true;
  max = (unsigned)(((end - 1) >> R->shift) - (offset >> R->shift) + 1);
  rd->pieces = g_new0(struct piece, max);
  while (pos < end) {
    bool from_out = bit_test(R->done, pos >> R->shift);
    uint64_t stop = MIN(((pos >> R->shift) + 1) << R->shift, end);
    struct piece *p = &rd->pieces[n++];

    while (stop < end && bit_test(R->done, stop >> R->shift) == from_out)
      stop = MIN(stop + R->gran, end);
    p->rd = rd;
    p->io.ring = exec_ring(ex);
    p->io.type = CBT_IO_READ;
    p->io.offset = pos;
    p->io.len = stop - pos;
    p->io.buf = (uint8_t *)buf + (pos - offset);
    p->io.complete = piece_done;
    p->io.img = from_out ? srv.image : R->src;
    if (!from_out)
      src_bytes += stop - pos;
    pos = stop;
  }
  if (src_bytes == 0) {
    atomic_fetch_sub(&R->src_users, 1);
    rd->src_user = false;
  } else {
    g_mutex_lock(&R->sync_lock);
    R->source_read_bytes += src_bytes;
    g_mutex_unlock(&R->sync_lock);
  }
  rd->pending = n + 1;                 /* ours, so no piece ends it early */
  for (unsigned i = 0; i < n; i++)
    cbt_image_submit(rd->pieces[i].io.img, &rd->pieces[i].io);
  read_put(rd);
}

/* ---- block status ---- */

static void
push_extent(struct cbt_extent *ext, size_t *n, uint64_t len, uint32_t flags)
{
  if (*n > 0 && ext[*n - 1].flags == flags) {
    ext[*n - 1].length += len;
    return;
  }
  ext[*n].length = len;
  ext[*n].flags = flags;
  (*n)++;
}

int
restore_block_status(uint64_t offset, uint32_t len, struct cbt_extent *ext, size_t max)
{
  uint64_t pos = offset, end = offset + len;
  size_t n = 0;
  int r = 0;

  atomic_fetch_add(&R->src_users, 1);
  while (pos < end && n < max) {
    bool from_out = bit_test(R->done, pos >> R->shift);
    uint64_t stop = MIN(((pos >> R->shift) + 1) << R->shift, end), got = 0;
    struct cbt_image *img = from_out ? srv.image : R->src;
    struct cbt_extent tmp[64];
    int k;

    while (stop < end && bit_test(R->done, stop >> R->shift) == from_out)
      stop = MIN(stop + R->gran, end);
    k = img->ops->block_status(img, pos, stop - pos, tmp, MIN(G_N_ELEMENTS(tmp), max - n));
    if (k < 0) {
      r = k;
      break;
    }
    for (int i = 0; i < k && n < max; i++) {
      push_extent(ext, &n, tmp[i].length, tmp[i].flags);
      got += tmp[i].length;
    }
    pos += got;
    if (pos < stop || got == 0)
      break;                         /* a prefix answered: enough */
  }
  atomic_fetch_sub(&R->src_users, 1);
  if (r == 0 && n == 0)
    r = -EIO;
  return r < 0 ? r : (int)n;
}

/* ---- the copier ---- */

static void
copier_job_done(struct job *j, int res)
{
  if (res < 0)
    set_failed("copying offset %" PRIu64 " from %s: %s", j->off, R->src_path,
               g_strerror(-res));
  else {
    g_mutex_lock(&R->sync_lock);
    R->copier_bytes += j->len;
    g_mutex_unlock(&R->sync_lock);
  }
  R->copier_jobs--;
  free(j->buf);
  g_free(j);
}

/* Claim the next run at or after the cursor; false when the pass is over. */
static bool
copier_claim(uint64_t *g0, uint64_t *n)
{
  uint64_t max = MAX(RUN_MAX >> R->shift, 1);

  *n = 0;
  g_mutex_lock(&R->lock);
  while (R->cursor < R->nbits) {
    uint64_t g = R->cursor;

    if (bit_test(R->done, g) || g_hash_table_lookup(R->recs, &g)) {
      R->cursor++;
      if (*n > 0)
        break;
      continue;
    }
    if (*n == 0)
      *g0 = g;
    claim(g);
    (*n)++;
    R->cursor++;
    if (*n == max)
      break;
  }
  g_mutex_unlock(&R->lock);
  return *n > 0;
}

static void
efd_done(struct cbt_aio_op *op, int res)
{
  (void)op;
  (void)res;
}

static void
post_efd_read(struct io_uring *ring)
{
  struct io_uring_sqe *sqe = cbt_ring_get_sqe(ring);

  if (!sqe)
    return;
  io_uring_prep_read(sqe, R->efd, &R->efd_val, sizeof R->efd_val, 0);
  R->efd_op.done = efd_done;
  io_uring_sqe_set_data(sqe, &R->efd_op);
}

/* Nanoseconds until the rate allows another run, 0 if it does now. */
static int64_t
rate_wait_ns(void)
{
  gint64 elapsed;
  uint64_t allowed;

  if (R->rate == 0)
    return 0;
  elapsed = g_get_monotonic_time() - R->rate_start;
  allowed = (uint64_t)((double)R->rate * (double)elapsed / G_USEC_PER_SEC) + RUN_MAX;
  if (R->rate_bytes < allowed)
    return 0;
  return (int64_t)((double)(R->rate_bytes - allowed + 1) * 1e9 / (double)R->rate) + 1000;
}

static void
kick_syncer(void)
{
  g_mutex_lock(&R->sync_lock);
  R->sync_kick = true;
  g_cond_signal(&R->sync_cond);
  g_mutex_unlock(&R->sync_lock);
}

static gpointer
copier_main(gpointer arg)
{
  struct io_uring ring;
  int r = io_uring_queue_init(COPIER_RING, &ring, 0);

  (void)arg;
  if (r < 0) {
    set_failed("cannot set up the copier's io_uring: %s", g_strerror(-r));
    atomic_store(&R->copier_state, COPIER_FAILED);
    return NULL;
  }
  post_efd_read(&ring);
  R->rate_start = g_get_monotonic_time();
  atomic_store(&R->copier_state, COPIER_COPYING);
  for (;;) {
    struct __kernel_timespec ts = { 0 }, *tsp = NULL;
    struct io_uring_cqe *cqe;
    bool failed, stop = atomic_load(&R->stopping);
    int64_t wait_ns = 0;
    uint64_t g0, n;

    g_mutex_lock(&R->sync_lock);
    failed = R->failed != NULL;
    g_mutex_unlock(&R->sync_lock);
    while (!stop && !failed && R->copier_jobs < COPIER_JOBS &&
           (wait_ns = rate_wait_ns()) == 0 && copier_claim(&g0, &n)) {
      R->copier_jobs++;
      R->rate_bytes += n << R->shift;
      job_start(NULL, &ring, g0, n);
    }
    if (R->copier_jobs == 0) {
      if (stop)
        break;
      if (failed) {
        atomic_store(&R->copier_state, COPIER_FAILED);
        break;
      }
      if (atomic_load(&R->ndone) == R->nbits) {
        atomic_store(&R->copier_state, COPIER_DONE);
        kick_syncer();
        break;
      }
      if (R->cursor >= R->nbits) {
        /* Leftovers: granules a guest copy holds or failed to copy. */
        R->cursor = 0;
        wait_ns = RESCAN_NS;
      }
    }
    if (wait_ns > 0) {
      ts.tv_sec = wait_ns / 1000000000;
      ts.tv_nsec = wait_ns % 1000000000;
      tsp = &ts;
    }
    r = io_uring_submit_and_wait_timeout(&ring, &cqe, 1, tsp, NULL);
    if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
      set_failed("copier: io_uring: %s", g_strerror(-r));
      continue;
    }
    while (io_uring_peek_cqe(&ring, &cqe) == 0) {
      struct cbt_aio_op *op = io_uring_cqe_get_data(cqe);
      int res = cqe->res;

      io_uring_cqe_seen(&ring, cqe);
      if (op == &R->efd_op)
        post_efd_read(&ring);
      else if (op)
        op->done(op, res);
    }
  }
  if (atomic_load(&R->copier_state) == COPIER_COPYING)
    atomic_store(&R->copier_state, COPIER_STOPPED);
  io_uring_queue_exit(&ring);
  return NULL;
}

/* ---- durability ---- */

/* Make the done bits durable in the state file: copy them, flush the
 * output, then write the copy.  Only the syncer (and restore_stop after
 * it) calls this. */
static int
persist(void)
{
  g_autofree uint64_t *tmp = g_new(uint64_t, R->nwords);
  g_autofree char *why = NULL;
  bool changed = false;
  uint64_t count = 0;
  int r;

  for (uint64_t i = 0; i < R->nwords; i++) {
    tmp[i] = atomic_load(&R->done[i]);
    changed |= tmp[i] != atomic_load(&R->durable[i]);
    count += (uint64_t)__builtin_popcountll(tmp[i]);
  }
  if (!changed)
    return 0;
  /* The data under every bit in tmp was written before the bit was set:
   * this flush makes it durable before the bit is. */
  r = cbt_image_run_sync(srv.image, CBT_IO_FLUSH, 0, 0, 0, NULL);
  if (r < 0) {
    log_error("%s: flush before recording restore progress: %s", srv.image_path,
              g_strerror(-r));
    return r;
  }
  r = cbt_rstate_store(R->state, tmp, &why);
  if (r < 0) {
    log_error("%s: %s", R->state_path, why ? why : g_strerror(-r));
    return r;
  }
  for (uint64_t i = 0; i < R->nwords; i++)
    atomic_store(&R->durable[i], tmp[i]);
  atomic_store(&R->ndurable, count);
  if (count == R->nbits && atomic_load(&R->active)) {
    atomic_store(&R->active, false);
    log_info("instant restore complete: %s is a standalone image (%" PRIu64
             " bytes copied in the background, %" PRIu64 " granules on demand)",
             srv.image_path, R->copier_bytes, R->guest_copies);
  }
  return 0;
}

static void
flush_done_run(void *arg)
{
  struct flush_waiter *fw = arg;

  fw->done(fw->arg, fw->res);
  g_free(fw);
}

/* Close the source once complete and unused (see the top of the file). */
static void
maybe_close_source(void)
{
  if (!R->src || atomic_load(&R->active) || atomic_load(&R->src_users) != 0)
    return;
  cbt_image_close(R->src);
  R->src = NULL;
  release_all(R);
  log_info("instant restore: %s closed", R->src_path);
}

static gpointer
syncer_main(gpointer arg)
{
  (void)arg;
  for (;;) {
    g_autoptr(GPtrArray) flushes = NULL;
    gint64 deadline = g_get_monotonic_time() + R->sync_interval_us;
    int r;

    g_mutex_lock(&R->sync_lock);
    while (!atomic_load(&R->stopping) && !R->sync_kick && R->flushes->len == 0)
      if (!g_cond_wait_until(&R->sync_cond, &R->sync_lock, deadline))
        break;
    flushes = g_steal_pointer(&R->flushes);
    R->flushes = g_ptr_array_new();
    R->sync_kick = false;
    g_mutex_unlock(&R->sync_lock);

    r = persist();
    for (guint i = 0; i < flushes->len; i++) {
      struct flush_waiter *fw = flushes->pdata[i];

      fw->res = r;
      exec_post(fw->ex, flush_done_run, fw);
    }
    maybe_close_source();
    if (atomic_load(&R->stopping))
      break;
  }
  return NULL;
}

void
restore_flush(struct exec *ex, void (*done)(void *arg, int res), void *arg)
{
  struct flush_waiter *fw = g_new0(struct flush_waiter, 1);

  fw->ex = ex;
  fw->done = done;
  fw->arg = arg;
  g_mutex_lock(&R->sync_lock);
  g_ptr_array_add(R->flushes, fw);
  g_cond_signal(&R->sync_cond);
  g_mutex_unlock(&R->sync_lock);
}

/* ---- life cycle ---- */

bool
restore_open(const struct restore_config *cfg, GError **error)
{
  g_autofree char *why = NULL;
  const struct cbt_rstate_info *info;
  struct restore *r;
  struct stat st;
  int rc;

  r = g_new0(struct restore, 1);
  R = r;
  r->src_path = cfg->source;
  r->state_path = cfg->state;
  r->rate = cfg->rate;
  r->sync_interval_us = (gint64)cfg->sync_interval * G_USEC_PER_SEC;
  r->n_release_fd = cfg->n_release_fd;
  memcpy(r->release_fd, cfg->release_fd, sizeof r->release_fd);
  r->efd = -1;
  g_mutex_init(&r->lock);
  g_mutex_init(&r->sync_lock);
  g_cond_init(&r->sync_cond);
  r->flushes = g_ptr_array_new();
  r->recs = g_hash_table_new_full(g_int64_hash, g_int64_equal, NULL, free_record);

  rc = cbt_rstate_open(cfg->state, true, &r->state, &why);
  if (rc < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-rc), "--restore-state %s",
                why ? why : g_strerror(-rc));
    return false;
  }
  info = cbt_rstate_get_info(r->state);
  if (info->image_size != srv.image->size || info->output_ino != srv.image->ino) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "--restore-state %s: made for another output (size %" PRIu64 ", inode %"
                PRIu64 "), not %s (size %" PRIu64 ", inode %" PRIu64 ")", cfg->state,
                info->image_size, info->output_ino, srv.image_path, srv.image->size,
                srv.image->ino);
    return false;
  }
  r->size = info->image_size;
  r->gran = info->granularity;
  r->shift = (unsigned)__builtin_ctz(r->gran);
  r->nbits = cbt_rstate_nbits(r->size, r->gran);
  r->nwords = (r->nbits + 63) / 64;
  r->done = g_new0(_Atomic uint64_t, r->nwords);
  r->durable = g_new0(_Atomic uint64_t, r->nwords);
  for (uint64_t i = 0; i < r->nwords; i++) {
    atomic_init(&r->done[i], cbt_rstate_words(r->state)[i]);
    atomic_init(&r->durable[i], cbt_rstate_words(r->state)[i]);
  }
  atomic_init(&r->ndone, cbt_rstate_count(r->state));
  atomic_init(&r->ndurable, cbt_rstate_count(r->state));
  if (cbt_rstate_complete(r->state)) {
    log_info("instant restore of %s into %s: complete already", info->source_name,
             srv.image_path);
    atomic_init(&r->active, false);
    atomic_init(&r->copier_state, COPIER_DONE);
    release_all(r);
    return true;
  }

  /* The source: it must be the file the state was made for. */
  if (stat(cfg->source, &st) < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                "--restore-from %s: %s", cfg->source, g_strerror(errno));
    return false;
  }
  if ((uint64_t)st.st_ino != info->source_ino) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "--restore-from %s: not the backup file %s that --restore-state %s "
                "was made for", cfg->source, info->source_name, cfg->state);
    return false;
  }
  rc = cbt_image_open(cfg->source, cfg->source_format, true, false, &r->src, &why);
  if (rc < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-rc), "--restore-from %s",
                why ? why : g_strerror(-rc));
    return false;
  }
  if (r->src->size < r->size) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "--restore-from %s: %" PRIu64 " bytes, smaller than the output's %" PRIu64,
                cfg->source, r->src->size, r->size);
    return false;
  }
  atomic_init(&r->active, true);
  log_info("instant restore of %s into %s: %" PRIu64 " of %" PRIu64 " bytes there already",
           cfg->source, srv.image_path,
           bytes_of(atomic_load(&r->ndone), bit_test(r->done, r->nbits - 1)), r->size);
  return true;
}

bool
restore_start(GError **error)
{
  if (!R || !atomic_load(&R->active))
    return true;
  R->efd = eventfd(0, EFD_CLOEXEC);
  if (R->efd < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno), "eventfd: %s",
                g_strerror(errno));
    return false;
  }
  R->syncer = g_thread_try_new("restore-sync", syncer_main, NULL, error);
  if (!R->syncer)
    return false;
  R->copier = g_thread_try_new("restore-copy", copier_main, NULL, error);
  return R->copier != NULL;
}

bool
restore_stop(GError **error)
{
  uint64_t one = 1;
  int r = 0;

  if (!R)
    return true;
  atomic_store(&R->stopping, true);
  if (R->copier) {
    if (write(R->efd, &one, sizeof one) < 0)
      log_error("restore: eventfd: %s", g_strerror(errno));
    g_thread_join(R->copier);
  }
  if (R->syncer) {
    kick_syncer();
    g_thread_join(R->syncer);
  }
  if (atomic_load(&R->active) || atomic_load(&R->ndurable) != atomic_load(&R->ndone))
    r = persist();
  if (R->src) {
    cbt_image_close(R->src);
    R->src = NULL;
  }
  if (atomic_load(&R->active))
    log_info("instant restore stopped at %" PRIu64 " of %" PRIu64 " bytes; %s",
             bytes_of(atomic_load(&R->ndurable), bit_test(R->durable, R->nbits - 1)),
             R->size, atomic_load(&damaged) ? "the backup is damaged"
                                            : "run the same command again to go on");
  if (R->efd >= 0)
    close(R->efd);
  release_all(R);
  cbt_rstate_free(R->state);
  g_hash_table_destroy(R->recs);
  g_ptr_array_unref(R->flushes);
  g_free(R->done);
  g_free(R->durable);
  g_free(R->failed);
  g_mutex_clear(&R->lock);
  g_mutex_clear(&R->sync_lock);
  g_cond_clear(&R->sync_cond);
  g_clear_pointer(&R, g_free);
  if (r < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                "recording the restore progress at shutdown: %s", g_strerror(-r));
    return false;
  }
  return true;
}

bool
restore_get_status(struct restore_status *st)
{
  memset(st, 0, sizeof *st);
  if (!R)
    return false;
  g_strlcpy(st->source, R->src_path, sizeof st->source);
  g_strlcpy(st->state, R->state_path, sizeof st->state);
  st->size = R->size;
  st->granularity = R->gran;
  st->restored_bytes = bytes_of(atomic_load(&R->ndone), bit_test(R->done, R->nbits - 1));
  st->durable_bytes = bytes_of(atomic_load(&R->ndurable),
                               bit_test(R->durable, R->nbits - 1));
  st->complete = !atomic_load(&R->active);
  st->rate = R->rate;
  switch (atomic_load(&R->copier_state)) {
  case COPIER_IDLE: st->copier = "starting"; break;
  case COPIER_COPYING: st->copier = "copying"; break;
  case COPIER_DONE: st->copier = "done"; break;
  case COPIER_FAILED: st->copier = "failed"; break;
  default: st->copier = "stopped"; break;
  }
  g_mutex_lock(&R->sync_lock);
  if (R->failed)
    g_strlcpy(st->failed, R->failed, sizeof st->failed);
  st->guest_copy_bytes = R->guest_copies << R->shift;
  st->copier_bytes = R->copier_bytes;
  st->source_read_bytes = R->source_read_bytes;
  g_mutex_unlock(&R->sync_lock);
  st->source_open = R->src != NULL;
  return true;
}

/* ---- the layer ---- */

static bool
layer_active(void)
{
  return srv.restoring && restore_active();
}

static bool
layer_before_change(const struct layer_req *r, layer_cont *k, void *arg)
{
  return restore_before_write(r->ex, r->offset, r->length, k, arg);
}

static bool
layer_read(const struct layer_req *r, layer_cont *k, void *arg)
{
  restore_read(r->ex, r->offset, r->length, r->buf, k, arg);
  return true;
}

/* A FLUSH, and a FUA change whose copied granules are not on record yet,
 * make the restore progress durable before their reply. */
static bool
layer_flush(const struct layer_req *r, layer_cont *k, void *arg)
{
  if (r->type != NBD_CMD_FLUSH &&
      (!(r->flags & NBD_CMD_FLAG_FUA) || restore_is_durable(r->offset, r->length)))
    return false;
  restore_flush(r->ex, k, arg);
  return true;
}

const struct layer restore_layer = {
  .name = "instant restore",
  .active = layer_active,
  .before_change = layer_before_change,
  .read = layer_read,
  .block_status = restore_block_status,
  .flush = layer_flush,
};
