/* Request dispatch and reply construction.
 *
 * dispatch_request() runs a request that passed cbt_nbd_request_validate()
 * (and whose WRITE payload is in req->buf): it records the range in the
 * dirty tracker when the request changes data, then hands it to the image
 * backend.  The completion builds the reply as iovecs over req->hdr_bytes
 * and req->buf and queues it with conn_reply().
 *
 * Contract: every request ends in exactly one conn_reply().  An I/O error
 * becomes an NBD error reply and the connection stays usable; only a broken
 * stream (handled in worker.c) drops a connection.
 *
 * Ordering that protects backups: a change passes the checkpoint gate
 * (quiesce.c), its dirty bit is set -- and in crash-safe mode durable --
 * before the data write is submitted, and set again when it completes,
 * before the reply (tracking.c explains why both), so a write the client
 * saw acknowledged is always in the active bitmap.  A FLUSH is acknowledged only once the
 * image data and the bitmap are both durable.
 *
 * Requests on the @checkpoint export go to snapshot.c (reads of the
 * point-in-time view, TRIM releases); guest changes on the main export
 * first let snapshot.c save the old data of granules a running backup
 * still needs.
 *
 * During an instant restore (restore.c) reads, base:allocation, guest
 * changes (whose granules are copied from the backup first) and FLUSH/FUA
 * (which also make the restore progress durable) go through restore.c.
 *
 * READ replies with structured replies negotiated: the buffer is split at
 * 4 KiB boundaries into data chunks and hole chunks for runs of zeros, so
 * sparse areas cost 32 bytes on the wire instead of their length.  With
 * NBD_CMD_FLAG_DF the data goes in one chunk, as the client asked.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "cbt/qcow2.h"
#include "cbt/util.h"
#include "internal.h"

#define HOLE_GRAIN 4096u
#define MAX_BS_EXTENTS 1024u


static void
add_iov(struct request *req, void *base, size_t len)
{
  req->iov[req->niov].iov_base = base;
  req->iov[req->niov].iov_len = len;
  req->niov++;
}

static bool
uses_structured(const struct request *req)
{
  return conn_params(req->c)->structured &&
         (req->hdr.type == NBD_CMD_READ || req->hdr.type == NBD_CMD_BLOCK_STATUS);
}

void
reply_error(struct request *req)
{
  uint8_t *h = req->hdr_bytes;

  request_release_buf(req);
  req->niov = req->iov_pos = 0;
  if (req->error == NBD_SUCCESS)
    req->error = NBD_EIO;
  if (uses_structured(req)) {
    /* Error chunk: error (4) + message length (2), no message. */
    cbt_nbd_chunk_header_encode(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                                req->hdr.cookie, 6);
    cbt_put_be32(h + NBD_CHUNK_HEADER_SIZE, req->error);
    h[NBD_CHUNK_HEADER_SIZE + 4] = 0;
    h[NBD_CHUNK_HEADER_SIZE + 5] = 0;
    add_iov(req, h, NBD_CHUNK_HEADER_SIZE + 6);
  } else {
    cbt_nbd_simple_reply_encode(h, req->error, req->hdr.cookie);
    add_iov(req, h, NBD_SIMPLE_REPLY_SIZE);
  }
  conn_reply(req);
}

static void
reply_ok_simple(struct request *req)
{
  cbt_nbd_simple_reply_encode(req->hdr_bytes, NBD_SUCCESS, req->hdr.cookie);
  add_iov(req, req->hdr_bytes, NBD_SIMPLE_REPLY_SIZE);
  conn_reply(req);
}

/* Append one READ chunk covering [rel, rel+len) of the buffer. */
static void
add_read_chunk(struct request *req, unsigned *hpos, uint32_t rel, uint32_t len,
               bool hole, bool last)
{
  uint8_t *h = req->hdr_bytes + *hpos;
  uint16_t flags = last ? NBD_REPLY_FLAG_DONE : 0;

  if (hole) {
    cbt_nbd_chunk_header_encode(h, flags, NBD_REPLY_TYPE_OFFSET_HOLE,
                                req->hdr.cookie, 12);
    cbt_put_be64(h + NBD_CHUNK_HEADER_SIZE, req->hdr.offset + rel);
    cbt_put_be32(h + NBD_CHUNK_HEADER_SIZE + 8, len);
    add_iov(req, h, NBD_CHUNK_HEADER_SIZE + 12);
    *hpos += NBD_CHUNK_HEADER_SIZE + 12;
  } else {
    cbt_nbd_chunk_header_encode(h, flags, NBD_REPLY_TYPE_OFFSET_DATA,
                                req->hdr.cookie, 8 + len);
    cbt_put_be64(h + NBD_CHUNK_HEADER_SIZE, req->hdr.offset + rel);
    add_iov(req, h, NBD_CHUNK_HEADER_SIZE + 8);
    add_iov(req, (uint8_t *)req->buf + rel, len);
    *hpos += NBD_CHUNK_HEADER_SIZE + 8;
  }
}

static void
reply_read(struct request *req)
{
  const uint8_t *buf = req->buf;
  uint32_t len = req->hdr.length;
  unsigned hpos = 0, chunks = 0;
  uint32_t run_start = 0, pos = 0;
  bool run_hole;

  if (!conn_params(req->c)->structured) {
    cbt_nbd_simple_reply_encode(req->hdr_bytes, NBD_SUCCESS, req->hdr.cookie);
    add_iov(req, req->hdr_bytes, NBD_SIMPLE_REPLY_SIZE);
    add_iov(req, req->buf, len);
    conn_reply(req);
    return;
  }
  if ((req->hdr.flags & NBD_CMD_FLAG_DF) || len < HOLE_GRAIN) {
    add_read_chunk(req, &hpos, 0, len, false, true);
    conn_reply(req);
    return;
  }

  /* Split into runs of data and zeros at 4 KiB boundaries of the export.
   * The last permitted chunk takes the rest as data. */
  while (pos < len) {
    uint32_t step = HOLE_GRAIN - (uint32_t)((req->hdr.offset + pos) % HOLE_GRAIN);
    bool hole;

    if (step > len - pos)
      step = len - pos;
    /* A partial grain at either end is never worth a hole chunk. */
    hole = step == HOLE_GRAIN && cbt_is_zero(buf + pos, step);
    if (pos == 0) {
      run_hole = hole;
    } else if (hole != run_hole) {
      if (chunks == REQ_MAX_CHUNKS - 1) {
        run_hole = false;            /* the rest becomes one data chunk */
        pos = len;
        break;
      }
      add_read_chunk(req, &hpos, run_start, pos - run_start, run_hole, false);
      chunks++;
      run_start = pos;
      run_hole = hole;
    }
    pos += step;
  }
  add_read_chunk(req, &hpos, run_start, len - run_start, run_hole, true);
  conn_reply(req);
}

/* A qcow2 image that refused a write as corrupt says why, once. */
static void
log_corrupt_once(void)
{
  static atomic_bool said;
  const char *why = cbt_image_qcow2_corrupt(srv.image);

  if (why && !atomic_exchange(&said, true))
    log_error("%s: image marked corrupt, writes are refused from now on: %s "
              "(serve it --read-only to rescue data; qemu-img check -r all repairs it)",
              srv.image_path, why);
}

static bool
changes_data(uint16_t type)
{
  return type == NBD_CMD_WRITE || type == NBD_CMD_TRIM ||
         type == NBD_CMD_WRITE_ZEROES;
}

static void
flush_bitmap_done(void *arg, int res)
{
  struct request *req = arg;

  if (res < 0) {
    req->error = NBD_EIO;
    reply_error(req);
    return;
  }
  reply_ok_simple(req);
}

/* A FLUSH (or FUA change) whose restore progress is now durable: the
 * bitmap next, if any, then the reply. */
static void
flush_restore_done(void *arg, int res)
{
  struct request *req = arg;

  if (res < 0) {
    req->error = NBD_EIO;
    reply_error(req);
    return;
  }
  if (req->hdr.type == NBD_CMD_FLUSH && srv.tracking) {
    tracking_flush(srv.tracking, conn_worker(req->c), flush_bitmap_done, req);
    return;
  }
  request_release_buf(req);
  reply_ok_simple(req);
}

static void
io_complete(struct cbt_image_io *io, int res)
{
  struct request *req = cbt_container_of(io, struct request, io);

  if (changes_data(req->hdr.type)) {
    if (srv.tracking)
      tracking_mark(srv.tracking, req->hdr.offset, req->hdr.length);
    quiesce_exit();
  }
  if (conn_linked_write_done(req, res))
    return;
  dispatch_io_reply(req, res);
}

void
dispatch_io_reply(struct request *req, int res)
{
  if (res < 0) {
    req->error = cbt_nbd_errno_to_wire(-res);
    if (res != -ENOTSUP || !(req->hdr.flags & NBD_CMD_FLAG_FAST_ZERO))
      log_error("%s: %s offset %" PRIu64 " length %" PRIu32 ": %s",
                conn_params(req->c)->peer, cbt_nbd_cmd_name(req->hdr.type),
                req->hdr.offset, req->hdr.length, g_strerror(-res));
    if (res == -EIO && changes_data(req->hdr.type))
      log_corrupt_once();
    reply_error(req);
    return;
  }
  if (req->hdr.type == NBD_CMD_READ)
    reply_read(req);
  else if (srv.restoring && restore_active() &&
           (req->hdr.type == NBD_CMD_FLUSH ||
            ((req->hdr.flags & NBD_CMD_FLAG_FUA) &&
             !restore_is_durable(req->hdr.offset, req->hdr.length))))
    restore_flush(conn_worker(req->c), flush_restore_done, req);
  else if (req->hdr.type == NBD_CMD_FLUSH && srv.tracking)
    tracking_flush(srv.tracking, conn_worker(req->c), flush_bitmap_done, req);
  else {
    request_release_buf(req);
    reply_ok_simple(req);
  }
}

/* BLOCK_STATUS: one chunk per selected meta context, the last one DONE. */
static void
do_block_status(struct request *req)
{
  const struct conn_params *p = conn_params(req->c);
  g_autofree struct cbt_extent *ext = g_new(struct cbt_extent, MAX_BS_EXTENTS);
  bool req_one = req->hdr.flags & NBD_CMD_FLAG_REQ_ONE;
  size_t total = (size_t)p->n_meta * (NBD_CHUNK_HEADER_SIZE + 4 + 8 * MAX_BS_EXTENTS);
  size_t pos = 0;
  uint8_t *out;

  if (!request_alloc_buf(req, total)) {
    req->error = NBD_ENOMEM;
    reply_error(req);
    return;
  }
  out = req->buf;
  for (unsigned i = 0; i < p->n_meta; i++) {
    int n = p->meta_ids[i] == META_ID_BASE_ALLOCATION && !p->snap && srv.restoring &&
            restore_active()
            ? restore_block_status(req->hdr.offset, req->hdr.length, ext,
                                   req_one ? 1 : MAX_BS_EXTENTS)
            : meta_extents(p->snap, p->meta_ids[i], req->hdr.offset, req->hdr.length,
                           req_one, ext, MAX_BS_EXTENTS);
    uint8_t *h = out + pos;

    if (n < 0) {
      req->error = cbt_nbd_errno_to_wire(-n);
      reply_error(req);
      return;
    }
    cbt_nbd_chunk_header_encode(h, i + 1 == p->n_meta ? NBD_REPLY_FLAG_DONE : 0,
                                NBD_REPLY_TYPE_BLOCK_STATUS, req->hdr.cookie,
                                4 + 8 * (uint32_t)n);
    cbt_put_be32(h + NBD_CHUNK_HEADER_SIZE, p->meta_ids[i]);
    pos += NBD_CHUNK_HEADER_SIZE + 4;
    for (int j = 0; j < n; j++) {
      cbt_put_be32(out + pos, (uint32_t)ext[j].length);
      cbt_put_be32(out + pos + 4, ext[j].flags);
      pos += 8;
    }
  }
  add_iov(req, out, pos);
  conn_reply(req);
}

static void
snap_read_done(void *arg, int res)
{
  struct request *req = arg;

  if (res < 0) {
    req->error = cbt_nbd_errno_to_wire(-res);
    debug("%s: READ of the point-in-time view at %" PRIu64 ": %s",
          conn_params(req->c)->peer, req->hdr.offset, g_strerror(-res));
    reply_error(req);
    return;
  }
  reply_read(req);
}

static bool
read_empty(struct request *req)
{
  if (req->hdr.length != 0)
    return false;
  /* Nothing to read: a structured reply still needs one chunk. */
  if (conn_params(req->c)->structured) {
    cbt_nbd_chunk_header_encode(req->hdr_bytes, NBD_REPLY_FLAG_DONE,
                                NBD_REPLY_TYPE_NONE, req->hdr.cookie, 0);
    add_iov(req, req->hdr_bytes, NBD_CHUNK_HEADER_SIZE);
    conn_reply(req);
  } else {
    reply_ok_simple(req);
  }
  return true;
}

/* Start of every READ: a zero-length one is answered here (true), else
 * the buffer is allocated (false to go on; true if it failed and the
 * error reply is sent). */
static bool
read_prepare(struct request *req)
{
  if (read_empty(req))
    return true;
  if (!request_alloc_buf(req, req->hdr.length)) {
    req->error = NBD_ENOMEM;
    reply_error(req);
    return true;
  }
  return false;
}

/* A request on the @checkpoint export (snapshot.c): reads of the
 * point-in-time view, TRIM to release what the backup has stored. */
static void
dispatch_snapshot(struct request *req)
{
  struct snapshot *snap = conn_params(req->c)->snap;
  const struct cbt_nbd_request *h = &req->hdr;
  int r;

  switch (h->type) {
  case NBD_CMD_READ:
    if (read_prepare(req))
      return;
    snapshot_read(snap, conn_worker(req->c), h->offset, h->length, req->buf,
                  snap_read_done, req);
    return;
  case NBD_CMD_BLOCK_STATUS:
    do_block_status(req);
    return;
  case NBD_CMD_TRIM:
    r = snapshot_release(snap, h->offset, h->length);
    if (r < 0) {
      req->error = cbt_nbd_errno_to_wire(-r);
      reply_error(req);
      return;
    }
    reply_ok_simple(req);
    return;
  case NBD_CMD_FLUSH:
  case NBD_CMD_CACHE:
    reply_ok_simple(req);
    return;
  default:
    req->error = NBD_EPERM;          /* the view is read-only */
    reply_error(req);
    return;
  }
}

static void
restore_read_done(void *arg, int res)
{
  struct request *req = arg;

  if (res < 0) {
    req->error = cbt_nbd_errno_to_wire(-res);
    reply_error(req);
    return;
  }
  reply_read(req);
}

/* cbt_image_io.link of a WRITE: its success reply, sent by the kernel
 * once the data is written (worker.c, conn_prep_linked_reply). */
static void
link_reply(struct cbt_image_io *io, struct io_uring_sqe *sqe)
{
  struct request *req = cbt_container_of(io, struct request, io);

  cbt_nbd_simple_reply_encode(req->hdr_bytes, NBD_SUCCESS, req->hdr.cookie);
  conn_prep_linked_reply(req, sqe);
}

/* The image I/O of a change.  A plain WRITE on a connection with nothing
 * else in flight has its reply linked to the write (worker.c). */
static void
submit_change(struct request *req)
{
  if (req->hdr.type == NBD_CMD_WRITE && !(req->hdr.flags & NBD_CMD_FLAG_FUA) &&
      conn_can_link_reply(req->c))
    req->io.link = link_reply;
  cbt_image_submit(srv.image, &req->io);
}

/* Resume a guest change once the copies of its protected granules are
 * saved (snapshot_before_write). */
static void
submit_after_copy(void *arg)
{
  submit_change(arg);
}

/* Step 4 of a change: during an instant restore its granules hold the
 * backup's data (restore.c copies them first; asked again after every
 * wait until nothing is left to copy); while a point-in-time view is
 * open, the old data of protected granules is saved; then the image I/O. */
static void
change_restored(void *arg, int res)
{
  struct request *req = arg;
  const struct cbt_nbd_request *h = &req->hdr;

  if (res < 0) {
    /* Writing over a granule that is not copied yet would let the copy
     * destroy the write later: refuse it. */
    req->error = NBD_EIO;
    quiesce_exit();
    reply_error(req);
    return;
  }
  if (srv.restoring && restore_before_write(conn_worker(req->c), h->offset, h->length,
                                            change_restored, req))
    return;
  if (snapshot_before_write(conn_worker(req->c), h->offset, h->length,
                            submit_after_copy, req))
    return;
  submit_change(req);
}

/* Step 3 of a change: its bits are durable (crash-safe mode). */
static void
change_committed(void *arg, int res)
{
  struct request *req = arg;

  if (res < 0) {
    /* Never let data change without its bit on disk: refuse the write. */
    req->error = NBD_EIO;
    quiesce_exit();
    reply_error(req);
    return;
  }
  change_restored(req, 0);
}

/* Steps 1 and 2 of a WRITE, WRITE_ZEROES or TRIM: pass the checkpoint
 * gate (quiesce.c), set the dirty bits, and in crash-safe mode wait for
 * them to be durable unless they already are (group commit, tracking.c).
 * The order -- bit durable, then old data saved, then data written -- is
 * what makes both a crash and a running backup safe. */
static void
change_start(void *arg)
{
  struct request *req = arg;
  const struct cbt_nbd_request *h = &req->hdr;

  if (!quiesce_enter(conn_worker(req->c), change_start, req))
    return;
  if (srv.tracking) {
    tracking_mark(srv.tracking, h->offset, h->length);
    if (!tracking_is_durable(srv.tracking, h->offset, h->length)) {
      tracking_commit(srv.tracking, conn_worker(req->c), h->offset, h->length,
                      change_committed, req);
      return;
    }
  }
  change_committed(req, 0);
}

void
dispatch_request(struct request *req)
{
  struct cbt_image_io *io = &req->io;
  const struct cbt_nbd_request *h = &req->hdr;

  if (conn_params(req->c)->snap) {
    dispatch_snapshot(req);
    return;
  }

  io->ring = conn_ring(req->c);
  io->complete = io_complete;
  io->offset = h->offset;
  io->len = h->length;
  io->buf = NULL;
  io->flags = (h->flags & NBD_CMD_FLAG_FUA) ? CBT_IO_FUA : 0;

  switch (h->type) {
  case NBD_CMD_READ:
    if (read_prepare(req))
      return;
    if (srv.restoring && restore_active()) {
      restore_read(conn_worker(req->c), h->offset, h->length, req->buf,
                   restore_read_done, req);
      return;
    }
    io->type = CBT_IO_READ;
    io->buf = req->buf;
    break;
  case NBD_CMD_WRITE:
    io->type = CBT_IO_WRITE;
    io->buf = req->buf;
    break;
  case NBD_CMD_FLUSH:
    io->type = CBT_IO_FLUSH;
    break;
  case NBD_CMD_TRIM:
    io->type = CBT_IO_TRIM;
    break;
  case NBD_CMD_WRITE_ZEROES:
    io->type = CBT_IO_ZERO;
    if (h->flags & NBD_CMD_FLAG_NO_HOLE)
      io->flags |= CBT_IO_NO_HOLE;
    if (h->flags & NBD_CMD_FLAG_FAST_ZERO)
      io->flags |= CBT_IO_FAST_ZERO;
    break;
  case NBD_CMD_CACHE:
    io->type = CBT_IO_CACHE;
    break;
  case NBD_CMD_BLOCK_STATUS:
    do_block_status(req);
    return;
  default:
    req->error = NBD_EINVAL;         /* validation lets none through */
    reply_error(req);
    return;
  }

  if (changes_data(h->type)) {
    change_start(req);
    return;
  }
  cbt_image_submit(srv.image, io);
}
