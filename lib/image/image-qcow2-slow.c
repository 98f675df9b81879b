/* qcow2 image backend, the metadata thread (one per writable or
 * backed image; see image-qcow2.c for why): it takes the requests the
 * fast path handed over, runs them to completion with synchronous
 * io_uring helpers, and signals each back to its worker's ring.  Reads
 * that need metadata, a backing file or decompression; writes that
 * allocate, copy on write or rewrite shared clusters; zeroes, trims,
 * flushes and FUA.  Allocating writes queued together are batched (see
 * "batched writes" below).
 */
#include "image-qcow2.h"

/* ---- slow-path reads (metadata thread) ------------------------------ */

static int
backing_read(struct q2 *q, uint8_t *buf, uint64_t n, uint64_t off)
{
  uint64_t have = 0;

  if (q->backing && off < q->backing->size) {
    have = q->backing->size - off < n ? q->backing->size - off : n;
    int r = cbt_image_run_sync(q->backing, CBT_IO_READ, 0, off, have, buf);
    if (r < 0)
      return r;
  }
  memset(buf + have, 0, n - have);
  return 0;
}

/* Decompress the cluster of @m into q->comp_buf (cached by entry). */
static int
read_compressed(struct q2 *q, const struct cbt_qcow2_map *m, uint64_t entry)
{
  g_autofree uint8_t *in = NULL;
  z_stream z;
  int r;

  if (q->comp_entry == entry && entry != 0)
    return 0;
  q->comp_entry = 0;
  in = g_malloc(m->comp_len);
  r = q2_pread(q, in, m->comp_len, m->host_offset);
  if (r < 0)
    return r;
  memset(&z, 0, sizeof z);
  if (inflateInit2(&z, -12) != Z_OK)
    return -ENOMEM;
  z.next_in = in;
  z.avail_in = (uInt)m->comp_len;
  z.next_out = q->comp_buf;
  z.avail_out = (uInt)q->csize;
  r = inflate(&z, Z_FINISH);
  inflateEnd(&z);
  /* Decompression ends when a whole cluster came out; trailing input is
   * the next compressed cluster's or padding. */
  if ((r != Z_STREAM_END && r != Z_OK && r != Z_BUF_ERROR) || z.avail_out != 0)
    return -EIO;
  q->comp_entry = entry;
  return 0;
}

static uint64_t
raw_entry(struct q2 *q, uint64_t vcl)
{
  uint64_t l1i = vcl / q->l2_entries, e = 0;
  struct q2_table *t;

  g_mutex_lock(&q->lock);
  t = q2_cache_get(&q->l2, l1i);
  if (t && (q->l1[l1i] & CBT_QCOW2_OFFSET_MASK))
    e = be64_at(t->buf, vcl % q->l2_entries);
  g_mutex_unlock(&q->lock);
  return e;
}

/* Read [@in, @in + @n) of guest cluster @vcl, mapped by @m, into @buf. */
static int
read_piece(struct q2 *q, uint64_t vcl, const struct cbt_qcow2_map *m,
           uint64_t in, uint64_t n, uint8_t *buf)
{
  int r;

  switch (m->type) {
  case CBT_QCOW2_NORMAL:
    return q2_pread(q, buf, n, m->host_offset + in);
  case CBT_QCOW2_COMPRESSED:
    r = read_compressed(q, m, raw_entry(q, vcl));
    if (r < 0)
      return r;
    memcpy(buf, q->comp_buf + in, n);
    return 0;
  case CBT_QCOW2_UNALLOCATED:
    return backing_read(q, buf, n, (vcl << q->cbits) + in);
  default:
    memset(buf, 0, n);
    return 0;
  }
}

static bool
same_run(const struct cbt_qcow2_map *a, const struct cbt_qcow2_map *b,
         uint64_t dist)
{
  if (a->type != b->type)
    return false;
  if (a->type == CBT_QCOW2_NORMAL)
    return b->host_offset == a->host_offset + dist && a->copied == b->copied;
  return a->type != CBT_QCOW2_COMPRESSED;
}

static int
slow_read(struct q2 *q, struct cbt_image_io *io)
{
  while (io->done < io->len) {
    uint64_t off = io->offset + io->done, rest = io->len - io->done;
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < rest ? q->csize - in : rest;
    struct cbt_qcow2_map m, m2;
    int r = q2_map_slow(q, vcl, &m);

    if (r < 0)
      return r;
    /* Extend over clusters of the same kind: one read for the run. */
    while (n < rest && m.type != CBT_QCOW2_COMPRESSED && n < MAX_SQE_BYTES) {
      uint64_t next = vcl + (in + n) / q->csize;

      r = q2_map_slow(q, next, &m2);
      if (r < 0)
        return r;
      if (!same_run(&m, &m2, (next - vcl) << q->cbits))
        break;
      n += q->csize < rest - n ? q->csize : rest - n;
    }
    r = read_piece(q, vcl, &m, in, n, (uint8_t *)io->buf + io->done);
    if (r < 0)
      return r;
    io->done += n;
  }
  return 0;
}

/* ---- slow-path writes (metadata thread) ----------------------------- */

bool
q2_reads_as_zero(const struct q2 *q, const struct cbt_qcow2_map *m)
{
  return m->type == CBT_QCOW2_ZERO_PLAIN || m->type == CBT_QCOW2_ZERO_ALLOC ||
         (m->type == CBT_QCOW2_UNALLOCATED && !q->backing);
}

/* Whether [@in, @in + @n) of the cluster at guest @off covers all of the
 * cluster that lies inside the disk. */
static bool
whole_cluster(const struct q2 *q, uint64_t off, uint64_t in, uint64_t n)
{
  return in == 0 && (n == q->csize || off + n >= q->pub.size);
}

/* Allocate @k host clusters at *@host for guest clusters from @vcl and
 * check them against the metadata set.  0 or -errno. */
static int
alloc_checked(struct q2 *q, uint64_t vcl, uint64_t k, uint64_t *host)
{
  int r = q2_alloc_run(q, k, host);

  return r < 0 ? r : q2_check_overlap(q, vcl, *host, k << q->cbits);
}

/* Allocate host clusters for a run of whole unallocated clusters that
 * starts at guest cluster @vcl (guest offset @off, @len bytes of data
 * from there, the first *@n bytes of it in the first cluster): the run
 * grows while the next clusters are whole in the request and read as
 * unallocated or plain zero, up to MAX_ALLOC_RUN and half a refcount
 * block.  On return *@n bytes / *@k clusters are in the run, allocated
 * at *@host and checked against the metadata set.  0 or -errno. */
static int
alloc_whole_run(struct q2 *q, uint64_t off, uint64_t vcl, uint64_t len, uint64_t *n,
                uint64_t *k, uint64_t *host)
{
  int r;

  *k = 1;
  while (*k < MAX_ALLOC_RUN && *k < q->rb_entries / 2 && *n < len) {
    struct cbt_qcow2_map m2;
    uint64_t step = q->csize < len - *n ? q->csize : len - *n;

    if (!whole_cluster(q, off + *n, 0, step))
      break;
    r = q2_map_slow(q, vcl + *k, &m2);
    if (r < 0)
      return r;
    if (m2.type != CBT_QCOW2_UNALLOCATED && m2.type != CBT_QCOW2_ZERO_PLAIN)
      break;
    *n += step;
    (*k)++;
  }
  return alloc_checked(q, vcl, *k, host);
}

/* Write @len bytes of @data at guest @off (allocating, copy-on-write).
 * Every host cluster data goes to, or whose reference is dropped, is
 * checked against the metadata set first (q2_check_overlap). */
int
q2_write_range(struct q2 *q, uint64_t off, const uint8_t *data, uint64_t len)
{
  while (len > 0) {
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < len ? q->csize - in : len;
    struct cbt_qcow2_map m;
    uint64_t host;
    int r = q2_map_slow(q, vcl, &m);

    if (r == 0)
      r = q2_check_mapping(q, vcl, &m);
    if (r < 0)
      return r;
    if (m.type == CBT_QCOW2_NORMAL && m.copied) {
      r = cbt_io_pwrite(q->fd, data, n, m.host_offset + in);
      if (r < 0)
        return r;
    } else if (whole_cluster(q, off, in, n) &&
               (m.type == CBT_QCOW2_UNALLOCATED || m.type == CBT_QCOW2_ZERO_PLAIN)) {
      /* A run of whole unallocated clusters: one allocation, one write. */
      uint64_t k;

      r = alloc_whole_run(q, off, vcl, len, &n, &k, &host);
      if (r < 0)
        return r;
      r = cbt_io_pwrite(q->fd, data, n, host);
      if (r < 0) {
        q2_alloc_undo(q, host, k);
        return r;
      }
      for (uint64_t i = 0; i < k; i++) {
        r = q2_set_l2(q, vcl + i, cbt_qcow2_l2_encode(host + (i << q->cbits), false));
        if (r < 0)
          return r;
      }
    } else {
      /* One cluster, copy-on-write of what the write does not cover. */
      const uint8_t *src = data;
      bool reuse = m.type == CBT_QCOW2_ZERO_ALLOC && m.copied;

      if (!whole_cluster(q, off, in, n)) {
        r = read_piece(q, vcl, &m, 0, q->csize, q->cow_buf);
        if (r < 0)
          return r;
        memcpy(q->cow_buf + in, data, n);
        src = q->cow_buf;
      }
      if (reuse) {
        host = m.host_offset;
      } else {
        r = alloc_checked(q, vcl, 1, &host);
        if (r < 0)
          return r;
      }
      r = cbt_io_pwrite(q->fd, src, src == data ? n : q->csize, host);
      if (r < 0) {
        if (!reuse)
          q2_alloc_undo(q, host, 1);
        return r;
      }
      r = q2_set_l2(q, vcl, cbt_qcow2_l2_encode(host, false));
      if (r < 0)
        return r;
      if (!reuse)
        q2_defer_free(q, &m);
    }
    off += n;
    data += n;
    len -= n;
  }
  return 0;
}

/* WRITE_ZEROES (@trim false) and TRIM.  On v3 whole clusters become zero
 * clusters (or unallocated without a backing file); partial clusters of
 * WRITE_ZEROES, and all of it on v2, are written as zeros unless they
 * already read as zeros.  TRIM leaves partial clusters and v2 alone. */
static int
slow_zero(struct q2 *q, struct cbt_image_io *io, bool trim)
{
  bool v3 = q->h.version >= 3;

  while (io->done < io->len) {
    uint64_t off = io->offset + io->done, rest = io->len - io->done;
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < rest ? q->csize - in : rest;
    struct cbt_qcow2_map m;
    int r = q2_map_slow(q, vcl, &m);

    if (r < 0)
      return r;
    if (v3 && whole_cluster(q, off, in, n)) {
      bool keep = !trim && (io->flags & CBT_IO_NO_HOLE) && m.copied &&
                  (m.type == CBT_QCOW2_NORMAL || m.type == CBT_QCOW2_ZERO_ALLOC);
      uint64_t want = keep ? m.host_offset | CBT_QCOW2_COPIED | CBT_QCOW2_ZERO_BIT
                           : q->backing ? CBT_QCOW2_ZERO_BIT : 0;

      if (keep ? m.type != CBT_QCOW2_ZERO_ALLOC
               : !(m.type == CBT_QCOW2_UNALLOCATED && !q->backing) &&
                 !(m.type == CBT_QCOW2_ZERO_PLAIN && q->backing)) {
        /* Dropping a reference to metadata would free it. */
        r = keep ? 0 : q2_check_mapping(q, vcl, &m);
        if (r == 0)
          r = q2_set_l2(q, vcl, want);
        if (r < 0)
          return r;
        if (!keep)
          q2_defer_free(q, &m);
      }
    } else if (!trim && !q2_reads_as_zero(q, &m)) {
      r = q2_write_range(q, off, q->zeros, n);
      if (r < 0)
        return r;
    }
    io->done += n;
  }
  return 0;
}

/* Run the rest of @io on the metadata thread.  Returns 0 or -errno. */
int
q2_slow_run(struct q2 *q, struct cbt_image_io *io)
{
  bool changes = io->type == CBT_IO_WRITE || io->type == CBT_IO_ZERO ||
                 io->type == CBT_IO_TRIM;
  int r = 0;

  if (changes && q->broken)
    return q->broken;
  if (changes && g_atomic_int_get(&q->corrupt))
    return -EIO;
  if (io->stage == ST_FUA_FLUSH)
    return q2_writeback(q);
  switch (io->type) {
  case CBT_IO_READ:
    return slow_read(q, io);
  case CBT_IO_WRITE:
    r = q2_write_range(q, io->offset + io->done, (const uint8_t *)io->buf + io->done,
                    io->len - io->done);
    io->done = io->len;
    break;
  case CBT_IO_ZERO:
  case CBT_IO_TRIM:
    r = slow_zero(q, io, io->type == CBT_IO_TRIM);
    break;
  case CBT_IO_FLUSH:
    return q2_writeback(q);
  default:
    return 0;
  }
  if (r == 0 && (io->flags & CBT_IO_FUA))
    r = q2_writeback(q);
  return r;
}

/* ---- batched writes (metadata thread) ------------------------------- */

/* Allocating writes arrive one per request, a queue depth of them at a
 * time.  Run one by one, each waited for its data write before the next
 * was looked at.  Instead the metadata thread takes every job queued
 * (q2_slow_thread) and plans the writes among them that need no copy-on-write
 * read: in-place writes, and writes into clusters that read as zeros.
 * Planning allocates in memory and queues the data write; batch_run
 * submits all of them with one system call, waits for all, and only then
 * installs the L2 entries (an entry never points at data not yet written)
 * and completes the jobs.  The ordering of image-qcow2-meta.c's top
 * comment is unchanged: data, refcounts, L2 tables and L1 still reach the
 * disk in q2_writeback's order, and a FUA job in the batch costs one
 * writeback for the whole batch.
 *
 * Two jobs of one batch never touch the same guest cluster: a job that
 * would is planned only after the batch before it has run, so every
 * lookup sees the mapping the earlier writes left.  Any other job (reads,
 * zeroes, trims, flushes, copy-on-write from a backing file or a shared
 * cluster) runs the batch first and then runs synchronously, so the jobs
 * keep their order.
 *
 * Zeros around the data.  A 4 KiB write into a new 64 KiB cluster would
 * otherwise write 60 KiB of zeros.  A cluster at or past q->fresh_from
 * has never held anything (q2_note_alloc): it reads as zeros already, so
 * only the data is written, at its place in the cluster.  The file may
 * then end inside the last cluster (qemu-img check allows less than one
 * cluster missing at the end, and reads past the end give zeros), and
 * holes stay holes.  A reused cluster gets data and zeros in one write of
 * the whole cluster, as before. */

/* How many batch ops the rest of WRITE @io needs, or 0 if it needs a
 * copy-on-write read (or a lookup failed): it then runs synchronously. */
static unsigned
batch_ops_for(struct q2 *q, const struct cbt_image_io *io)
{
  uint64_t off = io->offset + io->done, len = io->len - io->done;
  unsigned n = 0;

  while (len > 0) {
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t piece = q->csize - in < len ? q->csize - in : len;
    struct cbt_qcow2_map m;

    if (n == BATCH_OPS || q2_map_slow(q, vcl, &m) < 0)
      return 0;
    if (!(m.type == CBT_QCOW2_NORMAL && m.copied) &&
        !((m.type == CBT_QCOW2_UNALLOCATED || m.type == CBT_QCOW2_ZERO_PLAIN) &&
          (whole_cluster(q, off, in, piece) || q2_reads_as_zero(q, &m))))
      return 0;
    n++;
    off += piece;
    len -= piece;
  }
  return n;
}

/* Whether a queued op writes into guest clusters [@first, @last]. */
static bool
batch_touches(const struct q2_batch *b, uint64_t first, uint64_t last)
{
  for (unsigned i = 0; i < b->n; i++) {
    const struct q2_bop *op = &b->ops[i];
    uint64_t k = op->k ? op->k : 1;

    if (op->vcl <= last && first < op->vcl + k)
      return true;
  }
  return false;
}

/* Plan the rest of WRITE @job (batch_ops_for said it fits) into the
 * batch: allocate and queue, as q2_write_range does synchronously.  Returns
 * 0 or -errno; on an error the job fails, and what it queued already
 * still runs. */
static int
batch_plan(struct q2 *q, struct q2_job *job)
{
  struct q2_batch *b = q->batch;
  struct cbt_image_io *io = job->io;
  uint64_t off = io->offset + io->done, len = io->len - io->done;
  const uint8_t *data = (const uint8_t *)io->buf + io->done;

  while (len > 0) {
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < len ? q->csize - in : len;
    struct q2_bop *op = &b->ops[b->n];
    struct cbt_qcow2_map m;
    uint64_t host, fresh = q->fresh_from;
    int r = q2_map_slow(q, vcl, &m);

    if (r == 0)
      r = q2_check_mapping(q, vcl, &m);
    if (r < 0)
      return r;
    memset(op, 0, sizeof *op);
    op->q = q;
    op->job = job;
    op->vcl = vcl;
    op->buf = data;
    op->old = m;
    if (m.type == CBT_QCOW2_NORMAL && m.copied) {
      op->host = m.host_offset + in;
    } else if (whole_cluster(q, off, in, n)) {
      /* A run of whole unallocated clusters: one allocation, one write. */
      uint64_t k;

      r = alloc_whole_run(q, off, vcl, len, &n, &k, &host);
      if (r < 0)
        return r;
      op->host = op->cluster = host;
      op->k = k;
    } else {
      /* Part of a cluster that reads as zeros. */
      r = alloc_checked(q, vcl, 1, &host);
      if (r < 0)
        return r;
      op->cluster = host;
      op->k = 1;
      if ((host >> q->cbits) >= fresh) {
        op->host = host + in;
      } else {
        op->own = g_malloc0(q->csize);
        memcpy(op->own + in, data, n);
        op->buf = op->own;
        op->host = host;
      }
    }
    op->len = op->own ? q->csize : n;
    b->n++;
    off += n;
    data += n;
    len -= n;
  }
  return 0;
}

static void batch_submit(struct q2 *q, struct q2_bop *op);

static void
bop_done(struct cbt_aio_op *aop, int res)
{
  struct q2_bop *op = cbt_container_of(aop, struct q2_bop, op);

  op->q->batch->inflight--;
  if (res == -EAGAIN || res == -EINTR) {
    batch_submit(op->q, op);
    return;
  }
  if (res <= 0) {
    op->res = res < 0 ? res : -EIO;
    return;
  }
  op->done += (uint64_t)res;
  if (op->done < op->len)
    batch_submit(op->q, op);        /* short write: the rest */
}

/* Queue the rest of @op's write; a failure to get an sqe fails the op. */
static void
batch_submit(struct q2 *q, struct q2_bop *op)
{
  struct io_uring *ring = &q->batch->ring;
  struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
  uint64_t rest = op->len - op->done;

  if (!sqe) {
    int r = io_uring_submit(ring);

    sqe = r < 0 ? NULL : io_uring_get_sqe(ring);
    if (!sqe) {
      op->res = r < 0 ? r : -EBUSY;
      return;
    }
  }
  io_uring_prep_write(sqe, q->fd, op->buf + op->done,
                      rest > MAX_SQE_BYTES ? MAX_SQE_BYTES : (unsigned)rest,
                      op->host + op->done);
  op->op.done = bop_done;
  io_uring_sqe_set_data(sqe, &op->op);
  cbt_fi_sqe(CBT_FI_IMAGE, sqe);       /* tests: may fail it */
  q->batch->inflight++;
}

/* Write the batch's data, then install what it allocated (or give it back
 * if its write failed) and set each job's result.  The jobs are not
 * signalled here. */
static void
batch_run(struct q2 *q)
{
  struct q2_batch *b = q->batch;

  if (b->n == 0)
    return;
  for (unsigned i = 0; i < b->n; i++)
    batch_submit(q, &b->ops[i]);
  while (b->inflight > 0) {
    struct io_uring_cqe *cqe;
    struct cbt_aio_op *aop;
    int r = io_uring_submit_and_wait(&b->ring, 1);

    if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
      /* The ring is unusable and writes may still run: nothing can be
       * installed safely, and giving clusters back could let another
       * write land in them.  Fail the jobs; the clusters leak. */
      q->broken = r;
      for (unsigned i = 0; i < b->n; i++) {
        if (b->ops[i].res == 0)
          b->ops[i].res = r;
        b->ops[i].k = 0;
        b->ops[i].cluster = 0;
      }
      b->inflight = 0;
      break;
    }
    while (io_uring_peek_cqe(&b->ring, &cqe) == 0) {
      aop = io_uring_cqe_get_data(cqe);
      r = cqe->res;
      io_uring_cqe_seen(&b->ring, cqe);
      aop->done(aop, r);
    }
  }
  for (unsigned i = 0; i < b->n; i++) {
    struct q2_bop *op = &b->ops[i];
    int r = op->res;

    if (r < 0 && op->cluster) {
      q2_alloc_undo(q, op->cluster, op->k);
    } else if (r == 0) {
      for (uint64_t j = 0; j < op->k && r == 0; j++)
        r = q2_set_l2(q, op->vcl + j,
                   cbt_qcow2_l2_encode(op->cluster + (j << q->cbits), false));
      if (r == 0 && op->k == 1)
        q2_defer_free(q, &op->old);
    }
    if (r < 0 && op->job->res == 0)
      op->job->res = r;
    g_free(op->own);
  }
  b->n = 0;
}

/* Run @job: plan it into the batch if it can be (0), else run the batch
 * and then the job synchronously (1: the job is done). */
static bool
batch_or_run(struct q2 *q, struct q2_job *job)
{
  struct cbt_image_io *io = job->io;
  struct q2_batch *b = q->batch;
  unsigned nops = 0;

  if (b && io->type == CBT_IO_WRITE && io->stage != ST_FUA_FLUSH && !q->broken &&
      !g_atomic_int_get(&q->corrupt)) {
    uint64_t first = (io->offset + io->done) >> q->cbits;
    uint64_t last = (io->offset + io->len - 1) >> q->cbits;

    if (batch_touches(b, first, last) || b->n == BATCH_OPS)
      batch_run(q);
    nops = batch_ops_for(q, io);
    if (nops > BATCH_OPS - b->n) {
      batch_run(q);
      nops = batch_ops_for(q, io);
    }
  }
  if (nops == 0) {
    if (b)
      batch_run(q);
    job->res = q2_slow_run(q, io);
    return true;
  }
  job->res = batch_plan(q, job);
  io->done = io->len;
  return false;
}

/* Queue the message that completes @job in its worker's ring: the
 * worker's loop calls job->op.done, as for any of its own sqes.  Our
 * cqe for it carries the job too, to resend it. */
static void
msg_post(struct io_uring *ring, struct q2_job *job)
{
  struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

  /* q2_jobs_signal keeps fewer messages queued than the ring has entries. */
  if (!sqe)
    abort();
  io_uring_prep_msg_ring(sqe, job->io->ring->ring_fd, 0,
                         (uint64_t)(uintptr_t)&job->op, 0);
  io_uring_sqe_set_data(sqe, job);
}

/* Post the queued messages and wait for all @queued of them.  A message
 * the target ring could not take (its CQ overflowing) is sent again; any
 * other failure would leave a request hanging for good. */
static void
msg_flush(struct io_uring *ring, unsigned queued)
{
  while (queued > 0) {
    struct io_uring_cqe *cqe;
    int r = io_uring_submit_and_wait(ring, 1);

    if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY)
      abort();
    while (io_uring_peek_cqe(ring, &cqe) == 0) {
      struct q2_job *job = io_uring_cqe_get_data(cqe);
      int res = cqe->res;

      io_uring_cqe_seen(ring, cqe);
      if (res == -EOVERFLOW || res == -EAGAIN || res == -EINTR) {
        g_usleep(1000);
        msg_post(ring, job);
      } else if (res < 0) {
        abort();
      } else {
        queued--;
      }
    }
  }
}

/* Tell the workers that @n jobs are done.  The worker may free a job as
 * soon as it learns that, so nothing of a job is touched after. */
void
q2_jobs_signal(struct q2 *q, struct q2_job **jobs, unsigned n)
{
  unsigned queued = 0;

  for (unsigned i = 0; i < n; i++) {
    struct q2_job *job = jobs[i];

    if (!job->io) {
      g_free(job);
    } else if (job->efd >= 0) {
      if (eventfd_write(job->efd, 1) < 0)
        abort();                 /* cannot happen for a valid eventfd */
    } else {
      /* Straight into the worker's ring: no eventfd to make, read and
       * close per request, and one system call for the whole batch. */
      if (queued == BATCH_RING / 2) {
        msg_flush(&q->batch->ring, queued);
        queued = 0;
      }
      msg_post(&q->batch->ring, job);
      queued++;
    }
  }
  msg_flush(q->batch ? &q->batch->ring : NULL, queued);
}

gpointer
q2_slow_thread(gpointer arg)
{
  struct q2 *q = arg;
  struct q2_job **jobs = g_new(struct q2_job *, BATCH_JOBS);
  bool stop = false;

  while (!stop) {
    unsigned n = 0;
    bool fua = false;

    jobs[n++] = g_async_queue_pop(q->queue);
    while (n < BATCH_JOBS && (jobs[n] = g_async_queue_try_pop(q->queue)))
      n++;
    for (unsigned i = 0; i < n; i++) {
      if (!jobs[i]->io) {
        stop = true;
        continue;
      }
      jobs[i]->res = 0;
      if (!batch_or_run(q, jobs[i]))
        fua |= (jobs[i]->io->flags & CBT_IO_FUA) != 0;
    }
    if (q->batch)
      batch_run(q);
    if (fua) {
      /* One writeback makes every FUA write of the batch durable. */
      int r = q2_writeback(q);

      for (unsigned i = 0; r < 0 && i < n; i++) {
        if (jobs[i]->io && (jobs[i]->io->flags & CBT_IO_FUA) && jobs[i]->res == 0)
          jobs[i]->res = r;
      }
    }
    if (!q->pub.read_only && !q->broken && q2_too_dirty(q))
      q2_writeback(q);              /* an error marks the image broken */
    q2_jobs_signal(q, jobs, n);
  }
  g_free(jobs);
  cbt_io_thread_cleanup();
  return NULL;
}
