/* Request dispatch and reply construction: a request's whole life.
 *
 * dispatch_request() runs a request that passed cbt_nbd_request_validate()
 * (and whose WRITE payload is in req->buf).  On the main export it passes
 * down the stack of layers (layer.h: quiesce, instant restore,
 * point-in-time view, tracking) to the image backend; the completion
 * builds the reply as iovecs over req->hdr_bytes and req->buf and queues
 * it with conn_reply().
 *
 * Contract: every request ends in exactly one conn_reply().  An I/O error
 * becomes an NBD error reply and the connection stays usable; only a broken
 * stream (handled in worker.c) drops a connection.
 *
 * The walk over the stack (req->layer is where the request is):
 *   - a change (WRITE, WRITE_ZEROES, TRIM) asks each active layer's
 *     before_change top-down; a layer that waits resumes it through a
 *     continuation and is asked again; then the image I/O, then
 *     after_change bottom-up, then the reply.  A layer that fails the
 *     change (a bit that could not be made durable, a granule that could
 *     not be copied) fails it with EIO, and the layers above it get
 *     after_change with the error: data never changes past a layer that
 *     could not do its part.
 *   - a READ goes to the first active layer that serves reads (instant
 *     restore), else to the image;
 *   - base:allocation asks the layers' block_status, else the image;
 *   - a FLUSH, or a change with FUA, asks each layer's flush top-down
 *     after the image I/O: the reply waits until restore progress and
 *     bitmap are durable too.
 *
 * Requests on the @checkpoint export are the point-in-time view's own
 * (reads of the view, TRIM releases) and go to snapshot.c directly.
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
#include "worker.h"

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

/* ---- the stack ---- */

/* Top to bottom; layer.h says why in this order.  A new layer is one line
 * here and one file. */
static const struct layer *const stack[] = {
  &quiesce_layer,
  &restore_layer,
  &snapshot_layer,
  &tracking_layer,
};
#define N_LAYERS ((uint8_t)G_N_ELEMENTS(stack))

static bool
layer_on(const struct layer *l)
{
  return !l->active || l->active();
}

/* after_change of the active layers above @below (exclusive), bottom-up. */
static void
change_up(struct request *req, uint8_t below, int res)
{
  for (uint8_t i = below; i-- > 0;) {
    const struct layer *l = stack[i];

    if (l->after_change && layer_on(l))
      l->after_change(&req->lr, res);
  }
}

static void flush_down(struct request *req);

/* A layer's flush finished: on to the next one, or the error reply. */
static void
flush_resumed(void *arg, int res)
{
  struct request *req = arg;

  if (res < 0) {
    req->error = NBD_EIO;
    reply_error(req);
    return;
  }
  req->layer++;
  flush_down(req);
}

/* From req->layer down: every layer's flush, then the success reply. */
static void
flush_down(struct request *req)
{
  for (; req->layer < N_LAYERS; req->layer++) {
    const struct layer *l = stack[req->layer];

    if (l->flush && layer_on(l) && l->flush(&req->lr, flush_resumed, req))
      return;
  }
  request_release_buf(req);
  reply_ok_simple(req);
}

static void
io_complete(struct cbt_image_io *io, int res)
{
  struct request *req = cbt_container_of(io, struct request, io);

  if (changes_data(req->hdr.type))
    change_up(req, N_LAYERS, res);
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
  if (req->hdr.type == NBD_CMD_READ) {
    reply_read(req);
  } else if (req->hdr.type == NBD_CMD_FLUSH || (req->hdr.flags & NBD_CMD_FLAG_FUA)) {
    req->layer = 0;
    flush_down(req);
  } else {
    request_release_buf(req);
    reply_ok_simple(req);
  }
}

/* base:allocation of the main export: the first layer that answers, else
 * the image (meta.c). */
static int
base_allocation(const struct request *req, bool req_one, struct cbt_extent *ext,
                size_t max)
{
  for (uint8_t i = 0; i < N_LAYERS; i++) {
    const struct layer *l = stack[i];
    int n;

    if (!l->block_status || !layer_on(l))
      continue;
    n = l->block_status(req->hdr.offset, req->hdr.length, ext, req_one ? 1 : max);
    if (n != -ENOTSUP)
      return n;
  }
  return meta_extents(NULL, META_ID_BASE_ALLOCATION, req->hdr.offset,
                      req->hdr.length, req_one, ext, max);
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
    int n = p->meta_ids[i] == META_ID_BASE_ALLOCATION && !p->snap
            ? base_allocation(req, req_one, ext, MAX_BS_EXTENTS)
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
    snapshot_read(snap, conn_exec(req->c), h->offset, h->length, req->buf,
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

/* A READ a layer served (instant restore: from the backup). */
static void
layer_read_done(void *arg, int res)
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

static void change_down(struct request *req);

/* A layer that made a change wait resumes it: asked again, or the change
 * fails. */
static void
change_resumed(void *arg, int res)
{
  struct request *req = arg;

  if (res < 0) {
    req->error = NBD_EIO;
    change_up(req, req->layer, res);
    reply_error(req);
    return;
  }
  change_down(req);
}

/* A WRITE, WRITE_ZEROES or TRIM from req->layer down: each active
 * layer's before_change, then the image I/O. */
static void
change_down(struct request *req)
{
  for (; req->layer < N_LAYERS; req->layer++) {
    const struct layer *l = stack[req->layer];

    if (l->before_change && layer_on(l) &&
        l->before_change(&req->lr, change_resumed, req))
      return;
  }
  submit_change(req);
}

/* A READ of the main export: the first active layer that serves reads,
 * else the image. */
static bool
read_by_layer(struct request *req)
{
  for (uint8_t i = 0; i < N_LAYERS; i++) {
    const struct layer *l = stack[i];

    if (l->read && layer_on(l) && l->read(&req->lr, layer_read_done, req))
      return true;
  }
  return false;
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

  req->layer = 0;
  req->lr = (struct layer_req) {
    .ex = conn_exec(req->c), .type = h->type, .flags = h->flags,
    .offset = h->offset, .length = h->length,
  };
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
    req->lr.buf = req->buf;
    if (read_by_layer(req))
      return;
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
    change_down(req);
    return;
  }
  cbt_image_submit(srv.image, io);
}
