/* qcow2 image backend, the worker side: q2_submit looks every cluster
 * of a READ or WRITE up in the L2 cache and does the I/O of mapped runs
 * on the worker's own ring (the fast path, see image-qcow2.c); anything
 * else is handed to the metadata thread (image-qcow2-slow.c), whose
 * completion comes back through the worker's ring.
 */
#include "image-qcow2.h"

/* ---- worker side ---------------------------------------------------- */

static void fast_step(struct q2 *q, struct cbt_image_io *io);

static void
job_done(struct cbt_aio_op *op, int res)
{
  struct q2_job *job = cbt_container_of(op, struct q2_job, op);
  struct cbt_image_io *io = job->io;

  if (res == -EINTR || res == -EAGAIN) {
    struct io_uring_sqe *sqe = cbt_ring_get_sqe(io->ring);

    if (sqe) {
      io_uring_prep_read(sqe, job->efd, &job->val, sizeof job->val, 0);
      io_uring_sqe_set_data(sqe, &job->op);
      return;
    }
  }
  if (res < 0) {
    /* The read failed (cancelled?) but the thread may still be running
     * the request: wait for it, in this one pathological case blocking. */
    eventfd_t val;

    while (eventfd_read(job->efd, &val) < 0 && errno == EINTR)
      ;
  }
  res = job->res;
  close(job->efd);
  g_free(job);
  io->complete(io, res);
}

/* The metadata thread's message (q2_jobs_signal): the job is done. */
static void
job_msg_done(struct cbt_aio_op *op, int res)
{
  struct q2_job *job = cbt_container_of(op, struct q2_job, op);
  struct cbt_image_io *io = job->io;

  (void)res;
  res = job->res;
  g_free(job);
  io->complete(io, res);
}

/* Hand the rest of @io to the metadata thread. */
static void
handoff(struct q2 *q, struct cbt_image_io *io)
{
  struct q2_job *job = g_new0(struct q2_job, 1);
  struct io_uring_sqe *sqe;

  job->io = io;
  if (q->msg_ring) {
    job->efd = -1;
    job->op.done = job_msg_done;
    g_async_queue_push(q->queue, job);
    return;
  }
  job->op.done = job_done;
  job->efd = eventfd(0, EFD_CLOEXEC);
  if (job->efd < 0) {
    int err = -errno;
    g_free(job);
    io->complete(io, err);
    return;
  }
  sqe = cbt_ring_get_sqe(io->ring);
  if (!sqe) {
    close(job->efd);
    g_free(job);
    io->complete(io, -EBUSY);
    return;
  }
  io_uring_prep_read(sqe, job->efd, &job->val, sizeof job->val, 0);
  io_uring_sqe_set_data(sqe, &job->op);
  g_async_queue_push(q->queue, job);
}

static void
fast_done(struct cbt_aio_op *op, int res)
{
  struct cbt_image_io *io = cbt_container_of(op, struct cbt_image_io, op);
  struct q2 *q = to_q2(io->img);

  (void)g_atomic_int_add(&q->fast_inflight, -1);
  if (res == -EAGAIN || res == -EINTR) {
    fast_step(q, io);
    return;
  }
  if (res < 0) {
    io->complete(io, res);
    return;
  }
  if (res == 0) {
    if (io->type != CBT_IO_READ) {
      io->complete(io, -EIO);
      return;
    }
    /* Allocated cluster past the end of the file: reads as zeros. */
    uint64_t off = io->offset + io->done;
    uint64_t n = q->csize - (off & (q->csize - 1));

    if (n > io->len - io->done)
      n = io->len - io->done;
    memset((uint8_t *)io->buf + io->done, 0, n);
    res = (int)n;
  }
  io->done += (unsigned)res;
  fast_step(q, io);
}

enum fast_kind { FK_SLOW, FK_ZERO, FK_HOST };

/* Under q->lock: classify the cluster at guest @off for @io. */
static enum fast_kind
fast_classify(struct q2 *q, const struct cbt_image_io *io, uint64_t vcl,
              struct cbt_qcow2_map *m)
{
  if (q2_map_locked(q, vcl, m) != 1)
    return FK_SLOW;
  /* A write onto metadata, or to an image found corrupt, goes to the
   * metadata thread, which refuses it (q2_write_range, q2_slow_run). */
  if (io->type == CBT_IO_WRITE)
    return m->type == CBT_QCOW2_NORMAL && m->copied && !g_atomic_int_get(&q->corrupt) &&
           !cbt_qcow2_metaset_has(&q->meta, m->host_offset >> q->cbits)
               ? FK_HOST : FK_SLOW;
  if (m->type == CBT_QCOW2_NORMAL)
    return FK_HOST;
  return q2_reads_as_zero(q, m) ? FK_ZERO : FK_SLOW;
}

/* Advance @io on the fast path: zero-fill, queue one sqe, finish, or hand
 * the rest to the metadata thread. */
static void
fast_step(struct q2 *q, struct cbt_image_io *io)
{
  while (io->done < io->len) {
    uint64_t off = io->offset + io->done, rest = io->len - io->done;
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < rest ? q->csize - in : rest;
    struct cbt_qcow2_map m, m2;
    struct io_uring_sqe *sqe;
    enum fast_kind k;

    g_mutex_lock(&q->lock);
    k = fast_classify(q, io, vcl, &m);
    while (k != FK_SLOW && n < rest && n < MAX_SQE_BYTES - q->csize) {
      uint64_t next = vcl + (in + n) / q->csize;

      if (fast_classify(q, io, next, &m2) != k ||
          (k == FK_HOST && m2.host_offset != m.host_offset + ((next - vcl) << q->cbits)))
        break;
      n += q->csize < rest - n ? q->csize : rest - n;
    }
    if (k == FK_HOST)
      g_atomic_int_inc(&q->fast_inflight);
    g_mutex_unlock(&q->lock);

    if (k == FK_SLOW) {
      handoff(q, io);
      return;
    }
    if (k == FK_ZERO) {
      memset((uint8_t *)io->buf + io->done, 0, n);
      io->done += n;
      continue;
    }
    sqe = cbt_ring_get_sqe(io->ring);
    if (!sqe) {
      (void)g_atomic_int_add(&q->fast_inflight, -1);
      io->complete(io, -EBUSY);
      return;
    }
    if (io->type == CBT_IO_READ)
      io_uring_prep_read(sqe, q->fd, (uint8_t *)io->buf + io->done, (unsigned)n,
                         m.host_offset + in);
    else
      io_uring_prep_write(sqe, q->fd, (const uint8_t *)io->buf + io->done,
                          (unsigned)n, m.host_offset + in);
    io->op.done = fast_done;
    io_uring_sqe_set_data(sqe, &io->op);
    cbt_fi_sqe(CBT_FI_IMAGE, sqe);     /* tests: may fail it */
    cbt_image_io_link(io, sqe);        /* an overwrite in place, in one piece */
    return;
  }
  if (io->type == CBT_IO_WRITE && (io->flags & CBT_IO_FUA)) {
    /* The data is written; its metadata may not be durable yet. */
    io->stage = ST_FUA_FLUSH;
    handoff(q, io);
    return;
  }
  io->complete(io, 0);
}

void
q2_submit(struct cbt_image *img, struct cbt_image_io *io)
{
  struct q2 *q = to_q2(img);

  if (io->type != CBT_IO_FLUSH &&
      (io->offset > img->size || io->len > img->size - io->offset)) {
    io->complete(io, -EINVAL);
    return;
  }
  if (io->len == 0 && io->type != CBT_IO_FLUSH) {
    io->complete(io, 0);
    return;
  }
  if (img->read_only && io->type != CBT_IO_READ && io->type != CBT_IO_CACHE &&
      io->type != CBT_IO_FLUSH) {
    io->complete(io, -EROFS);
    return;
  }
  if ((io->type == CBT_IO_WRITE || io->type == CBT_IO_ZERO || io->type == CBT_IO_TRIM) &&
      g_atomic_int_get(&q->corrupt)) {
    io->complete(io, -EIO);
    return;
  }
  switch (io->type) {
  case CBT_IO_READ:
  case CBT_IO_WRITE:
    fast_step(q, io);
    return;
  case CBT_IO_CACHE:
    io->complete(io, 0);
    return;
  case CBT_IO_ZERO:
    if ((io->flags & CBT_IO_FAST_ZERO) &&
        (q->h.version < 3 || io->offset % q->csize != 0 ||
         ((io->offset + io->len) % q->csize != 0 && io->offset + io->len != img->size))) {
      io->complete(io, -ENOTSUP);
      return;
    }
    handoff(q, io);
    return;
  case CBT_IO_FLUSH:
    if (img->read_only) {
      io->complete(io, 0);
      return;
    }
    handoff(q, io);
    return;
  case CBT_IO_TRIM:
  default:
    handoff(q, io);
    return;
  }
}
