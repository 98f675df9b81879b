/* Point-in-time view: copy-before-write while a checkpoint is open, and the
 * read side of the "<export>@checkpoint" NBD export a backup reads from.
 *
 * What it keeps.  checkpoint-begin (tracking.c) creates a view with a
 * *protect* bit per bitmap granule: 1 = the backup still needs this
 * granule's data as it was at the checkpoint and nobody has saved it yet.
 * A full backup protects every granule, an incremental the granules of the
 * frozen bitmap.  Granules that are being copied or have been copied have
 * a record (a hash table under s->lock).  The scratch file is an array of
 * granule-sized slots: a granule's old data gets a slot when its first
 * non-zero chunk is read (the zeros before it are only remembered, and a
 * granule that was all zeros takes no slot at all); a released slot is
 * reused by the next copy.  No space is given back to the file system
 * while the view lives (punching holes stalled guest writes behind the
 * file's lock, measured), so the file grows to the peak of what is held
 * at once; it is unlinked from the start (O_TMPFILE, else mkostemp +
 * unlink), so it vanishes with the view and a crash leaves nothing.
 *
 * Guest writes (WRITE, WRITE_ZEROES, TRIM on the main export), in
 * snapshot_before_write():
 *   - a granule whose protect bit is 0 costs one atomic load, no lock;
 *   - a protected granule gets a record (state QUEUED or COPYING) and the
 *     request waits on it; a second write to the same granule finds the
 *     record and waits on the same copy, so a granule is copied once;
 *   - a copy reads the granule from the image in chunks of at most 1 MiB
 *     (through the image backend on the worker's io_uring, so qcow2 works
 *     alike), writes the non-zero chunks to the scratch file, then, under
 *     the lock, marks the record COPIED, clears the protect bit and wakes
 *     every waiter on its own worker.  Only then is the guest write
 *     submitted.  The protect bit is cleared only under the lock, and only
 *     after the copy is complete (or when the view dies).
 *   - at most MAX_COPIES copies run at once per view (a 1 GiB TRIM of a
 *     protected range queues 16384 records, not 1 GiB of buffers).
 * A guest write never fails because of the view and never waits for
 * anything but the copies of its own granules: when a copy fails or would
 * pass --scratch-limit, the view *fails*: every protect bit is cleared,
 * queued records are dropped and their waiters woken, and the export
 * answers EIO from then on, so the backup (not the guest) fails.
 *
 * Backup reads (READ on the @checkpoint export), in snapshot_read(): read
 * the whole range from the image first, then, under the lock, overlay every
 * granule whose record is COPIED with its scratch data (or zeros).  Why
 * this is exact without making reads wait:
 *   - a granule with no record and its protect bit set has had no guest
 *     write submitted since the checkpoint (a write is submitted only after
 *     its granule is COPIED), so the image data is the checkpoint's;
 *   - a granule whose record is COPYING or QUEUED at the check: its
 *     waiting writes are not submitted yet either, so the image data read
 *     before the check is still the checkpoint's;
 *   - a granule COPIED at the check may have been overwritten before or
 *     during our image read: its scratch copy, complete and immutable
 *     since it became COPIED, replaces it.
 * A scratch read holds rec->readers, so a release (below) that races with
 * it frees the slot for reuse only after the read finished.  A read that finds the
 * view ended or failed when it completes returns an error rather than data
 * no longer protected.
 *
 * Release (TRIM on the @checkpoint export, what a backup sends for what it
 * has stored): every granule entirely inside the range loses its protect
 * bit and its record; its slot is free for the next copy.  So scratch use
 * stays near "what the guest overwrote that the backup has not read yet".  Reads of released granules return
 * the live image: the client said it no longer needs them.
 *
 * base:allocation on the @checkpoint export: COPIED granules are data (or
 * zero when their copy was all zeros); the rest comes from the image while
 * s->lock is held, so no granule can become COPIED (and then be
 * overwritten) between the lookup and the image's answer.
 *
 * Publication.  The one current view is published under cur_lock (a
 * GRWLock); writers take a reference under the read side, so commit/abort
 * (snapshot_end: unpublish under the write side, then end and drop the
 * publication reference) can never free a view a worker is using.  Copies,
 * reads and @checkpoint connections hold their own references; the scratch
 * file is closed with the last one.  The point in time is the moment the
 * view is published, which checkpoint-begin does while guest changes are
 * quiesced (quiesce.c): every change completed before it is in the view,
 * none after it.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cbt/bitmap.h"
#include "cbt/fault-inject.h"
#include "cbt/nbd-proto.h"
#include "cbt/util.h"
#include "internal.h"
#include "layer.h"

#define COPY_CHUNK   (1u << 20)
#define MAX_COPIES   16u

enum rec_state { REC_QUEUED, REC_COPYING, REC_COPIED };

struct record {
  uint64_t g;                       /* granule index; hash key */
  enum rec_state state;
  bool has_data;                    /* it has a scratch slot */
  uint64_t slot;                    /* which, if has_data */
  uint64_t data_from;               /* granule bytes before it were zeros */
  bool released;                    /* drop once copied / no longer read */
  unsigned readers;                 /* scratch reads in flight */
  GPtrArray *waiters;               /* struct snap_wait * */
};

/* A guest request waiting for the copies of its granules. */
struct snap_wait {
  struct exec *ex;
  atomic_uint pending;
  layer_cont *cont;
  void *arg;
};

struct snapshot {
  atomic_int refs;
  enum snapshot_mode mode;
  uint64_t size;
  uint32_t gran;
  unsigned shift;
  uint64_t nbits;
  uint64_t nwords;
  _Atomic uint64_t *protect;
  int fd;
  char *dir;
  uint64_t limit;
  atomic_bool dead;                 /* ended or failed: stop copying */

  GMutex lock;                      /* everything below */
  GHashTable *recs;                 /* &record->g -> struct record * */
  GQueue queue;                     /* QUEUED records, oldest first */
  unsigned copying;
  uint64_t used, peak;              /* scratch bytes held (whole granules) */
  GArray *free_slots;               /* uint64_t: released, to reuse */
  uint64_t next_slot;               /* the file's slots so far */
  uint64_t copied_bytes, copies, released_bytes;
  bool ended, failed;
  char *fail_reason;
};

struct copy_job {
  struct snapshot *s;
  struct record *rec;
  struct exec *ex;                 /* runs on this worker's ring */
  struct io_uring *ring;
  uint64_t base;                    /* image offset of the granule */
  uint64_t glen;                    /* its length (the last may be short) */
  uint64_t pos;                     /* offset of the current chunk in it */
  uint32_t clen, wdone;
  uint8_t *buf;
  struct cbt_image_io io;
  struct cbt_aio_op op;
};

static GRWLock cur_lock;
static struct snapshot *current;
static atomic_bool have_current;

/* ---- references and small helpers ---- */

static struct snapshot *
snap_ref(struct snapshot *s)
{
  atomic_fetch_add(&s->refs, 1);
  return s;
}

static void
free_record(gpointer p)
{
  struct record *rec = p;

  g_ptr_array_unref(rec->waiters);
  g_free(rec);
}

void
snapshot_unref(struct snapshot *s)
{
  if (!s || atomic_fetch_sub(&s->refs, 1) != 1)
    return;
  if (s->fd >= 0)
    close(s->fd);
  g_hash_table_destroy(s->recs);
  g_queue_clear(&s->queue);
  g_array_unref(s->free_slots);
  g_mutex_clear(&s->lock);
  g_free(s->protect);
  g_free(s->dir);
  g_free(s->fail_reason);
  g_free(s);
}

static bool
prot_test(struct snapshot *s, uint64_t g)
{
  return (atomic_load_explicit(&s->protect[g >> 6], memory_order_acquire) >> (g & 63)) & 1;
}

/* Under s->lock. */
static bool
prot_clear(struct snapshot *s, uint64_t g)
{
  uint64_t bit = UINT64_C(1) << (g & 63);

  return atomic_fetch_and(&s->protect[g >> 6], ~bit) & bit;
}

static uint64_t
gran_len(const struct snapshot *s, uint64_t g)
{
  uint64_t base = g << s->shift;

  return MIN((uint64_t)s->gran, s->size - base);
}

static void
run_wait(void *arg)
{
  struct snap_wait *sw = arg;

  sw->cont(sw->arg, 0);
  g_free(sw);
}

/* Drop one hold on @sw; the last one resumes the request on its worker:
 * at once via @local (run by the caller on exec @self after unlocking)
 * when that is the request's own worker, else by a posted message. */
static void
wait_put(struct snap_wait *sw, struct exec *self, GPtrArray **local)
{
  if (atomic_fetch_sub(&sw->pending, 1) != 1)
    return;
  if (local && sw->ex == self) {
    if (!*local)
      *local = g_ptr_array_new();
    g_ptr_array_add(*local, sw);
    return;
  }
  exec_post(sw->ex, run_wait, sw);
}

/* Under s->lock: wake everyone waiting for @rec's copy (see wait_put). */
static void
wake_waiters(struct record *rec, struct exec *self, GPtrArray **local)
{
  for (guint i = 0; i < rec->waiters->len; i++)
    wait_put(rec->waiters->pdata[i], self, local);
  g_ptr_array_set_size(rec->waiters, 0);
}

/* Not under the lock: resume the requests wake_waiters kept for us. */
static void
run_local(GPtrArray *local)
{
  for (guint i = 0; local && i < local->len; i++)
    run_wait(local->pdata[i]);
  if (local)
    g_ptr_array_unref(local);
}

/* ---- scratch slots ---- */

/* Under s->lock: forget @rec and give its slot back for reuse.  A slot is
 * freed only when no read of it is in flight (callers check readers). */
static void
drop_record(struct snapshot *s, struct record *rec)
{
  if (rec->has_data) {
    g_array_append_val(s->free_slots, rec->slot);
    s->used -= s->gran;
  }
  g_hash_table_remove(s->recs, &rec->g);
}

/* ---- failure and end ---- */

/* Under s->lock: stop protecting anything.  Queued copies are dropped and
 * their writers go on; running copies finish and wake theirs. */
static void
stop_protecting(struct snapshot *s)
{
  struct record *rec;

  atomic_store(&s->dead, true);
  for (uint64_t i = 0; i < s->nwords; i++)
    atomic_store(&s->protect[i], 0);
  while ((rec = g_queue_pop_head(&s->queue))) {
    wake_waiters(rec, NULL, NULL);
    g_hash_table_remove(s->recs, &rec->g);
  }
}

static void
fail(struct snapshot *s, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static void
fail(struct snapshot *s, const char *fmt, ...)
{
  va_list ap;

  g_mutex_lock(&s->lock);
  if (!s->failed && !s->ended) {
    va_start(ap, fmt);
    s->fail_reason = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    s->failed = true;
    stop_protecting(s);
    log_error("point-in-time view failed: %s; the backup reading it fails, "
              "guest writes go on", s->fail_reason);
  }
  g_mutex_unlock(&s->lock);
}

/* ---- copy-before-write ---- */

static void copy_chunk(struct copy_job *j);
static void copy_start(struct snapshot *s, struct record *rec, struct exec *ex);

/* Under s->lock: move queued records into the copy slots that are free;
 * returns them for the caller to start after unlocking. */
static GPtrArray *
take_queued(struct snapshot *s)
{
  GPtrArray *out = NULL;

  while (s->copying < MAX_COPIES && !g_queue_is_empty(&s->queue)) {
    struct record *rec = g_queue_pop_head(&s->queue);

    rec->state = REC_COPYING;
    s->copying++;
    if (!out)
      out = g_ptr_array_new();
    g_ptr_array_add(out, rec);
  }
  return out;
}

struct start_msg {
  struct snapshot *s;
  struct record *rec;
  struct exec *ex;
};

static void
start_msg_run(void *arg)
{
  struct start_msg *m = arg;

  copy_start(m->s, m->rec, m->ex);
  snapshot_unref(m->s);
  g_free(m);
}

/* Start the copies of @recs.  Each runs on the worker of its first
 * waiter, whose request keeps that worker (and its ring) alive until the
 * copy is done; @ex is the calling thread's exec. */
static void
start_all(struct snapshot *s, GPtrArray *recs, struct exec *ex)
{
  if (!recs)
    return;
  for (guint i = 0; i < recs->len; i++) {
    struct record *rec = recs->pdata[i];
    struct snap_wait *first = rec->waiters->len ? rec->waiters->pdata[0] : NULL;
    struct exec *target = first ? first->ex : ex;

    if (target == ex) {
      copy_start(s, rec, ex);
    } else {
      struct start_msg *m = g_new(struct start_msg, 1);

      m->s = snap_ref(s);
      m->rec = rec;
      m->ex = target;
      exec_post(target, start_msg_run, m);
    }
  }
  g_ptr_array_unref(recs);
}

static void
copy_finish(struct copy_job *j, int res)
{
  struct snapshot *s = j->s;
  struct record *rec = j->rec;
  struct exec *ex = j->ex;
  GPtrArray *next, *local = NULL;
  uint64_t g = rec->g;

  g_mutex_lock(&s->lock);
  s->copying--;
  if (res == 0 && !s->dead) {
    rec->state = REC_COPIED;
    s->copies++;
    s->copied_bytes += j->glen;
    /* The waiters may now write: every reader from here on must find the
     * record COPIED (both happen under the lock). */
    prot_clear(s, g);
    wake_waiters(rec, ex, &local);
    if (rec->released)
      drop_record(s, rec);
  } else {
    wake_waiters(rec, ex, &local);
    drop_record(s, rec);
  }
  next = s->dead ? NULL : take_queued(s);
  g_mutex_unlock(&s->lock);
  start_all(s, next, ex);
  run_local(local);
  free(j->buf);
  g_free(j);
  exec_unhold(ex);
  snapshot_unref(s);
}

static void scratch_write(struct copy_job *j);

static void
scratch_write_done(struct cbt_aio_op *op, int res)
{
  struct copy_job *j = cbt_container_of(op, struct copy_job, op);

  if (res == -EINTR || res == -EAGAIN) {
    scratch_write(j);
    return;
  }
  if (res <= 0) {
    res = res < 0 ? res : -EIO;
    fail(j->s, "writing the scratch file in %s: %s", j->s->dir, g_strerror(-res));
    copy_finish(j, res);
    return;
  }
  j->wdone += (uint32_t)res;
  if (j->wdone < j->clen) {
    scratch_write(j);
    return;
  }
  j->pos += j->clen;
  copy_chunk(j);
}

static void
scratch_write(struct copy_job *j)
{
  struct io_uring_sqe *sqe = cbt_ring_get_sqe(j->ring);

  if (!sqe) {
    fail(j->s, "cannot queue a scratch write (io_uring)");
    copy_finish(j, -EIO);
    return;
  }
  io_uring_prep_write(sqe, j->s->fd, j->buf + j->wdone, j->clen - j->wdone,
                      (j->rec->slot << j->s->shift) + j->pos + j->wdone);
  j->op.done = scratch_write_done;
  io_uring_sqe_set_data(sqe, &j->op);
  cbt_fi_sqe(CBT_FI_SCRATCH, sqe);     /* tests: may fail it */
}

static void
copy_read_done(struct cbt_image_io *io, int res)
{
  struct copy_job *j = cbt_container_of(io, struct copy_job, io);
  struct snapshot *s = j->s;

  if (res < 0) {
    fail(s, "reading the image at offset %" PRIu64 " to save it: %s",
         j->base + j->pos, g_strerror(-res));
    copy_finish(j, res);
    return;
  }
  if (!j->rec->has_data && cbt_is_zero(j->buf, j->clen)) {
    /* Zeros before the first data need no slot; reads fill them in. */
    j->pos += j->clen;
    j->rec->data_from = j->pos;
    copy_chunk(j);
    return;
  }
  if (!j->rec->has_data) {
    bool over;

    g_mutex_lock(&s->lock);
    over = s->used + s->gran > s->limit;
    if (!over) {
      s->used += s->gran;
      s->peak = MAX(s->peak, s->used);
      if (s->free_slots->len > 0) {
        j->rec->slot = g_array_index(s->free_slots, uint64_t, s->free_slots->len - 1);
        g_array_set_size(s->free_slots, s->free_slots->len - 1);
      } else {
        j->rec->slot = s->next_slot++;
      }
      j->rec->has_data = true;
    }
    g_mutex_unlock(&s->lock);
    if (over) {
      fail(s, "the scratch limit of %" PRIu64 " bytes (--scratch-limit) is reached: "
           "the guest overwrote more than that of what the backup had not read yet",
           s->limit);
      copy_finish(j, -ENOSPC);
      return;
    }
  }
  j->wdone = 0;
  scratch_write(j);
}

static void
copy_chunk(struct copy_job *j)
{
  if (j->pos == j->glen) {
    copy_finish(j, 0);
    return;
  }
  if (atomic_load(&j->s->dead)) {
    copy_finish(j, -ECANCELED);
    return;
  }
  j->clen = (uint32_t)MIN((uint64_t)COPY_CHUNK, j->glen - j->pos);
  memset(&j->io, 0, sizeof j->io);
  j->io.ring = j->ring;
  j->io.type = CBT_IO_READ;
  j->io.offset = j->base + j->pos;
  j->io.len = j->clen;
  j->io.buf = j->buf;
  j->io.complete = copy_read_done;
  cbt_image_submit(srv.image, &j->io);
}

static void
copy_start(struct snapshot *s, struct record *rec, struct exec *ex)
{
  struct copy_job *j = g_new0(struct copy_job, 1);
  size_t blen;

  j->s = snap_ref(s);
  j->rec = rec;
  j->ex = ex;
  j->ring = exec_ring(ex);
  exec_hold(ex);
  j->base = rec->g << s->shift;
  j->glen = gran_len(s, rec->g);
  blen = (size_t)MIN((uint64_t)COPY_CHUNK, j->glen);
  /* Aligned, so an O_DIRECT image (--cache none) can read into it. */
  if (posix_memalign((void **)&j->buf, 4096, (blen + 4095) / 4096 * 4096) != 0) {
    j->buf = NULL;
    fail(s, "out of memory for a copy-before-write buffer");
    copy_finish(j, -ENOMEM);
    return;
  }
  copy_chunk(j);
}

bool
snapshot_before_write(struct exec *ex, uint64_t offset, uint64_t len,
                      layer_cont *cont, void *arg)
{
  struct snap_wait *sw = NULL;
  GPtrArray *start = NULL;
  struct snapshot *s;
  bool locked = false;
  uint64_t g0, g1;

  if (!atomic_load_explicit(&have_current, memory_order_acquire) || len == 0)
    return false;
  if (!(s = snapshot_get()))
    return false;
  g0 = offset >> s->shift;
  g1 = MIN((offset + len - 1) >> s->shift, s->nbits - 1);
  for (uint64_t g = g0; g <= g1; g++) {
    struct record *rec;

    if (!prot_test(s, g))
      continue;
    if (!locked) {
      g_mutex_lock(&s->lock);
      locked = true;
    }
    if (!prot_test(s, g))            /* copied or released meanwhile */
      continue;
    rec = g_hash_table_lookup(s->recs, &g);
    if (!rec) {
      rec = g_new0(struct record, 1);
      rec->g = g;
      rec->state = REC_QUEUED;
      rec->waiters = g_ptr_array_new();
      g_hash_table_insert(s->recs, &rec->g, rec);
      g_queue_push_tail(&s->queue, rec);
    }
    if (!sw) {
      sw = g_new0(struct snap_wait, 1);
      sw->ex = ex;
      sw->cont = cont;
      sw->arg = arg;
      atomic_init(&sw->pending, 1);  /* our own hold, dropped below */
    }
    atomic_fetch_add(&sw->pending, 1);
    g_ptr_array_add(rec->waiters, sw);
  }
  if (locked) {
    start = take_queued(s);
    g_mutex_unlock(&s->lock);
  }
  start_all(s, start, ex);
  snapshot_unref(s);
  if (!sw)
    return false;
  /* Copies complete on the ring, never inside this call, and their
   * wake-ups are posted; if every copy is somehow done already (a failed
   * view), resume inline. */
  if (atomic_fetch_sub(&sw->pending, 1) == 1) {
    g_free(sw);
    return false;
  }
  return true;
}

/* ---- reads from the @checkpoint export ---- */

struct overlay {
  struct snap_read *rd;
  struct record *rec;
  uint8_t *dst;
  uint64_t foff;
  uint32_t len, done;
  struct cbt_aio_op op;
};

struct snap_read {
  struct snapshot *s;
  struct io_uring *ring;
  uint64_t off;
  uint32_t len;
  uint8_t *buf;
  void (*done)(void *arg, int res);
  void *arg;
  struct cbt_image_io io;
  struct overlay *ov;
  unsigned nov, pending;
  int err;
};

static int
dead_error(struct snapshot *s)
{
  return s->failed ? -EIO : -ESHUTDOWN;
}

static void
read_finish(struct snap_read *rd, int res)
{
  struct snapshot *s = rd->s;

  if (res == 0) {
    g_mutex_lock(&s->lock);
    if (s->dead)
      res = dead_error(s);
    g_mutex_unlock(&s->lock);
  }
  rd->done(rd->arg, res);
  g_free(rd->ov);
  g_free(rd);
  snapshot_unref(s);
}

static void overlay_submit(struct overlay *o);

static void
overlay_done(struct cbt_aio_op *op, int res)
{
  struct overlay *o = cbt_container_of(op, struct overlay, op);
  struct snap_read *rd = o->rd;
  struct snapshot *s = rd->s;

  if (res == -EINTR || res == -EAGAIN) {
    overlay_submit(o);
    return;
  }
  if (res < 0) {
    rd->err = rd->err ? rd->err : res;
  } else if (res == 0) {
    /* Past the end of the sparse scratch file: zero chunks. */
    memset(o->dst + o->done, 0, o->len - o->done);
    o->done = o->len;
  } else {
    o->done += (uint32_t)res;
    if (o->done < o->len) {
      overlay_submit(o);
      return;
    }
  }
  if (--rd->pending > 0)
    return;

  g_mutex_lock(&s->lock);
  for (unsigned i = 0; i < rd->nov; i++) {
    struct record *rec = rd->ov[i].rec;

    if (--rec->readers == 0 && rec->released)
      drop_record(s, rec);
  }
  g_mutex_unlock(&s->lock);
  if (rd->err)
    log_error("scratch file: reading saved data: %s", g_strerror(-rd->err));
  read_finish(rd, rd->err);
}

static void
overlay_submit(struct overlay *o)
{
  struct snap_read *rd = o->rd;
  struct io_uring_sqe *sqe = cbt_ring_get_sqe(rd->ring);

  if (!sqe) {
    overlay_done(&o->op, -EIO);
    return;
  }
  io_uring_prep_read(sqe, rd->s->fd, o->dst + o->done, o->len - o->done,
                     o->foff + o->done);
  o->op.done = overlay_done;
  io_uring_sqe_set_data(sqe, &o->op);
  cbt_fi_sqe(CBT_FI_SCRATCH, sqe);     /* tests: may fail it */
}

static void
read_image_done(struct cbt_image_io *io, int res)
{
  struct snap_read *rd = cbt_container_of(io, struct snap_read, io);
  struct snapshot *s = rd->s;
  uint64_t end = rd->off + rd->len;

  if (res < 0) {
    /* The disk failed, not the view: say so, as for the main export. */
    log_error("reading the image at offset %" PRIu64 " length %" PRIu32
              " for the point-in-time view: %s", rd->off, rd->len, g_strerror(-res));
    read_finish(rd, res);
    return;
  }
  g_mutex_lock(&s->lock);
  if (s->dead) {
    res = dead_error(s);
    g_mutex_unlock(&s->lock);
    read_finish(rd, res);
    return;
  }
  if (g_hash_table_size(s->recs) > 0) {
    for (uint64_t g = rd->off >> s->shift; (g << s->shift) < end; g++) {
      struct record *rec = g_hash_table_lookup(s->recs, &g);
      uint64_t a, b, zend;

      if (!rec || rec->state != REC_COPIED)
        continue;
      a = MAX(rd->off, g << s->shift);
      b = MIN(end, (g + 1) << s->shift);
      /* Bytes of the granule before data_from were zeros; the rest is in
       * its slot (zero chunks after the first data are written too, as a
       * reused slot holds an older granule's bytes). */
      zend = rec->has_data ? MIN(b, (g << s->shift) + rec->data_from) : b;
      if (zend > a) {
        memset(rd->buf + (a - rd->off), 0, zend - a);
        a = zend;
      }
      if (a >= b)
        continue;
      if (!rd->ov)
        rd->ov = g_new0(struct overlay, (rd->len >> s->shift) + 2);
      rec->readers++;
      rd->ov[rd->nov++] = (struct overlay){
        .rd = rd, .rec = rec, .dst = rd->buf + (a - rd->off),
        .foff = (rec->slot << s->shift) + (a - (g << s->shift)),
        .len = (uint32_t)(b - a),
      };
    }
  }
  g_mutex_unlock(&s->lock);
  if (rd->nov == 0) {
    read_finish(rd, 0);
    return;
  }
  rd->pending = rd->nov;
  for (unsigned i = 0; i < rd->nov; i++)
    overlay_submit(&rd->ov[i]);
}

void
snapshot_read(struct snapshot *s, struct exec *ex, uint64_t offset,
              uint32_t len, void *buf, void (*done)(void *arg, int res), void *arg)
{
  struct snap_read *rd = g_new0(struct snap_read, 1);

  rd->s = snap_ref(s);
  rd->ring = exec_ring(ex);
  rd->off = offset;
  rd->len = len;
  rd->buf = buf;
  rd->done = done;
  rd->arg = arg;
  if (atomic_load(&s->dead)) {
    g_mutex_lock(&s->lock);
    int r = dead_error(s);
    g_mutex_unlock(&s->lock);
    read_finish(rd, r);
    return;
  }
  rd->io.ring = rd->ring;
  rd->io.type = CBT_IO_READ;
  rd->io.offset = offset;
  rd->io.len = len;
  rd->io.buf = buf;
  rd->io.complete = read_image_done;
  cbt_image_submit(srv.image, &rd->io);
}

/* ---- release ---- */

int
snapshot_release(struct snapshot *s, uint64_t offset, uint64_t len)
{
  uint64_t end = offset + len;
  uint64_t g0 = (offset + s->gran - 1) >> s->shift;
  uint64_t g1 = end >= s->size ? s->nbits : end >> s->shift;
  int r = 0;

  g_mutex_lock(&s->lock);
  if (s->dead) {
    r = dead_error(s);
    goto out;
  }
  for (uint64_t g = g0; g < g1; g++) {
    bool was = prot_clear(s, g);
    struct record *rec = g_hash_table_size(s->recs) == 0 ? NULL
                         : g_hash_table_lookup(s->recs, &g);

    if (was || (rec && !rec->released))
      s->released_bytes += gran_len(s, g);
    if (!rec)
      continue;
    switch (rec->state) {
    case REC_QUEUED:
      g_queue_remove(&s->queue, rec);
      wake_waiters(rec, NULL, NULL);
      g_hash_table_remove(s->recs, &g);
      break;
    case REC_COPYING:
      rec->released = true;          /* copy_finish drops it */
      break;
    case REC_COPIED:
      if (rec->readers > 0)
        rec->released = true;        /* the last reader drops it */
      else
        drop_record(s, rec);
      break;
    }
  }
out:
  g_mutex_unlock(&s->lock);
  return r;
}

/* ---- base:allocation of the @checkpoint export ---- */

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

static struct record *
copied(struct snapshot *s, uint64_t g)
{
  struct record *rec = g_hash_table_lookup(s->recs, &g);

  return rec && rec->state == REC_COPIED ? rec : NULL;
}

int
snapshot_block_status(struct snapshot *s, uint64_t offset, uint32_t len,
                      struct cbt_extent *ext, size_t max)
{
  uint64_t pos = offset, end = offset + len;
  size_t n = 0;
  int r = 0;

  g_mutex_lock(&s->lock);
  if (s->dead) {
    r = dead_error(s);
    goto out;
  }
  if (g_hash_table_size(s->recs) == 0) {
    r = srv.image->ops->block_status(srv.image, offset, len, ext, max);
    goto out;
  }
  while (pos < end && n < max) {
    uint64_t g = pos >> s->shift;
    uint64_t gend = MIN((g + 1) << s->shift, end);
    struct record *rec = copied(s, g);
    struct cbt_extent tmp[64];
    uint64_t run_end, got = 0;
    int k;

    if (rec) {
      push_extent(ext, &n, gend - pos,
                  rec->has_data ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO);
      pos = gend;
      continue;
    }
    run_end = gend;
    while (run_end < end && !copied(s, run_end >> s->shift))
      run_end = MIN(run_end + s->gran, end);
    k = srv.image->ops->block_status(srv.image, pos, run_end - pos, tmp,
                                     MIN(G_N_ELEMENTS(tmp), max - n));
    if (k < 0) {
      r = k;
      goto out;
    }
    for (int i = 0; i < k && n < max; i++) {
      push_extent(ext, &n, tmp[i].length, tmp[i].flags);
      got += tmp[i].length;
    }
    pos += got;
    if (pos < run_end)
      break;                       /* the image answered a prefix */
  }
  r = (int)n;
out:
  g_mutex_unlock(&s->lock);
  return r;
}

/* ---- life cycle ---- */

/* An unlinked file in @dir: O_TMPFILE where the file system has it. */
static int
open_scratch(const char *dir, GError **error)
{
  g_autofree char *tmpl = NULL;
  int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);

  if (fd >= 0)
    return fd;
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                "scratch directory %s: %s", dir, g_strerror(errno));
    return -1;
  }
  tmpl = g_build_filename(dir, ".cbt-scratch-XXXXXX", NULL);
  fd = g_mkstemp_full(tmpl, O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                "scratch directory %s: %s", dir, g_strerror(errno));
    return -1;
  }
  unlink(tmpl);
  return fd;
}

struct snapshot *
snapshot_new(enum snapshot_mode mode, uint64_t size, uint32_t granularity,
             const char *dir, uint64_t limit, GError **error)
{
  struct snapshot *s;
  int fd = open_scratch(dir, error);

  if (fd < 0)
    return NULL;
  s = g_new0(struct snapshot, 1);
  atomic_init(&s->refs, 1);
  s->mode = mode;
  s->size = size;
  s->gran = granularity;
  s->shift = (unsigned)__builtin_ctz(granularity);
  s->nbits = size ? ((size - 1) >> s->shift) + 1 : 0;
  s->nwords = (s->nbits + 63) / 64;
  s->protect = g_new0(_Atomic uint64_t, MAX(s->nwords, 1));
  s->fd = fd;
  s->dir = g_strdup(dir);
  s->limit = limit;
  g_mutex_init(&s->lock);
  s->recs = g_hash_table_new_full(g_int64_hash, g_int64_equal, NULL, free_record);
  g_queue_init(&s->queue);
  s->free_slots = g_array_new(FALSE, FALSE, sizeof(uint64_t));
  return s;
}

void
snapshot_protect(struct snapshot *s, const struct cbt_bitmap *needed)
{
  for (uint64_t i = 0; i < s->nwords; i++) {
    uint64_t v = needed ? cbt_bitmap_word(needed, i) : ~UINT64_C(0);

    if (i == s->nwords - 1 && s->nbits % 64)
      v &= (UINT64_C(1) << (s->nbits % 64)) - 1;
    atomic_store(&s->protect[i], v);
  }
}

void
snapshot_publish(struct snapshot *s)
{
  g_rw_lock_writer_lock(&cur_lock);
  current = s;
  atomic_store_explicit(&have_current, true, memory_order_release);
  g_rw_lock_writer_unlock(&cur_lock);
}

struct snapshot *
snapshot_get(void)
{
  struct snapshot *s;

  g_rw_lock_reader_lock(&cur_lock);
  s = current ? snap_ref(current) : NULL;
  g_rw_lock_reader_unlock(&cur_lock);
  return s;
}

void
snapshot_end(void)
{
  struct snapshot *s;

  g_rw_lock_writer_lock(&cur_lock);
  s = current;
  current = NULL;
  atomic_store(&have_current, false);
  g_rw_lock_writer_unlock(&cur_lock);
  if (!s)
    return;
  g_mutex_lock(&s->lock);
  s->ended = true;
  stop_protecting(s);
  log_info("point-in-time view ended: %" PRIu64 " granules saved before being "
           "overwritten, scratch peak %" PRIu64 " bytes, %" PRIu64 " bytes released "
           "by the reader", s->copies, s->peak, s->released_bytes);
  g_mutex_unlock(&s->lock);
  snapshot_unref(s);
}

const char *
snapshot_mode_name(enum snapshot_mode m)
{
  switch (m) {
  case SNAP_FULL: return "full";
  case SNAP_INCREMENTAL: return "incremental";
  default: return "off";
  }
}

bool
snapshot_get_status(struct snapshot_status *st)
{
  struct snapshot *s = snapshot_get();

  memset(st, 0, sizeof *st);
  if (!s)
    return false;
  g_mutex_lock(&s->lock);
  st->mode = s->mode;
  g_strlcpy(st->dir, s->dir, sizeof st->dir);
  st->limit = s->limit;
  st->used = s->used;
  st->peak = s->peak;
  st->copied_bytes = s->copied_bytes;
  st->copies = s->copies;
  st->released_bytes = s->released_bytes;
  st->copying = s->copying + g_queue_get_length(&s->queue);
  if (s->failed)
    g_strlcpy(st->failed, s->fail_reason, sizeof st->failed);
  g_mutex_unlock(&s->lock);
  snapshot_unref(s);
  return true;
}

/* ---- the layer ---- */

/* Guest changes on the main export wait for the copies of the granules a
 * running backup still needs; reads of the main export are not the
 * view's business (its own export is served by dispatch_snapshot). */
static bool
layer_before_change(const struct layer_req *r, layer_cont *k, void *arg)
{
  return snapshot_before_write(r->ex, r->offset, r->length, k, arg);
}

const struct layer snapshot_layer = {
  .name = "point-in-time view",
  .before_change = layer_before_change,
};
