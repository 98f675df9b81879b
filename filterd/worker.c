/* Worker threads: one io_uring per thread carries everything a connection
 * does on the data path.
 *
 * Why this shape.  The machine we are built for has few cores, shared with
 * the client.  The cheapest path for a 4 KiB request is: one receive that
 * brings in many request headers at once, one image read that the kernel
 * completes inline from the page cache, and one sendmsg carrying the
 * replies of every request finished in the same loop turn.  With sockets
 * and files on the same ring, a whole loop turn costs one io_uring_enter
 * (io_uring_submit_and_wait), however many requests it moves.  So:
 *   - N workers (default: one per core), each with its own ring, buffer pool
 *     and request free list; no locks on the data path.
 *   - A connection is owned by one worker for its life.  Connections are
 *     spread round-robin, so multi-conn clients use every core.
 *   - Per connection: at most one RECV in flight into a 256 KiB buffer that
 *     is parsed for as many requests as it holds; a large WRITE payload is
 *     received straight into the request's buffer (no copy).
 *   - Replies are queued in completion order (NBD allows any order) and sent
 *     with one SENDMSG per connection per loop turn, at most one in flight,
 *     so bytes of different replies never interleave.  Short sends resume
 *     where they stopped.
 *   - Back-pressure: a connection stops reading when it has 512 requests or
 *     64 MiB of buffers in flight, so no client can make us allocate
 *     without bound; and all of them together stop at --max-memory
 *     (memcap.c): a READ or WRITE header is consumed only once its
 *     payload's bytes are taken from that budget, else the connection
 *     waits (reads nothing) until some worker gives memory back.  While
 *     any connection waits, a client that has not taken a byte of its
 *     replies for SEND_STALL seconds is closed: it would hold memory
 *     others need for as long as it likes.  Idle pooled buffers are freed
 *     once a second (workers_tick).  A WRITE longer than the maximum
 *     payload (32 MiB) closes its connection at once: its data is never
 *     read, so no header waits for memory or data it cannot have.
 *   - A WRITE's reply is linked to the write when nothing else is in
 *     flight on its connection (below: "a WRITE's reply linked"), so at
 *     queue depth 1 the reply leaves from the thread that wrote the data.
 * The ring is created with SINGLE_ISSUER|COOP_TASKRUN where the kernel
 * has them, else plain.  Not DEFER_TASKRUN: with it, a write completed
 * on an io-wq thread is handed back to this thread to be completed, and
 * the reply linked to it starts only once this thread has woken up to do
 * that, which is the very trip the link is there to save (measured: 4k
 * writes at queue depth 1 went from ~15k to ~24-28k IOPS with COOP).
 *
 * Shutdown: a stop message makes each connection cancel its pending
 * receive, finish the requests it already read, send their replies and
 * close.  The worker exits when its last connection is gone.  A client
 * that stops reading its replies must not hold the daemon hostage: after
 * STOP_GRACE seconds the remaining sockets are shut down, which fails
 * their pending sends (the image I/O itself always completes first).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cbt/util.h"
#include "worker.h"

#define RBUF_SIZE          (256 * 1024)
#define MAX_INFLIGHT       512
#define MAX_INFLIGHT_BYTES (64u * 1024 * 1024)
#define DIRECT_RECV_MIN    (16 * 1024)
#define SEND_BATCH_IOV     128
#define MAX_FREE_REQS      1024
#define RING_ENTRIES       512
#define STOP_GRACE         10                 /* seconds */
#define SEND_STALL         30                 /* seconds, under memory pressure */

struct conn {
  struct worker *w;
  struct conn_params p;
  struct cbt_nbd_caps caps;
  struct conn *prev, *next;          /* worker's list */

  /* Receive side. */
  uint8_t *rbuf;
  size_t rpos, rlen;                 /* parsed up to rpos, valid up to rlen */
  struct cbt_aio_op recv_op;
  bool recv_pending;
  bool recv_direct;                  /* pending recv targets wreq->buf */
  struct request *wreq;              /* WRITE waiting for its payload */
  uint64_t discard;                  /* payload bytes of a refused WRITE */
  struct request *discard_req;       /* its error reply, sent once skipped */

  /* Send side. */
  struct request *sendq_head, *sendq_tail;
  struct cbt_aio_op send_op;
  struct cbt_aio_op lsend_op;        /* a reply linked to its write */
  struct request *lreq;              /* that reply's request */
  bool send_pending;
  bool in_flush_list;
  struct conn *flush_next;
  struct msghdr msg;
  struct iovec siov[SEND_BATCH_IOV];

  unsigned inflight;                 /* requests allocated, not yet freed */
  size_t inflight_bytes;
  bool mem_wait;                     /* waits for memcap before parsing on */
  gint64 send_progress;              /* when a send last moved bytes */
  bool closing;                      /* read no more; close when drained */
  bool dead;                         /* socket broken: drop replies */
};

struct wmsg {
  void (*fn)(void *);
  void *arg;
};

struct worker {
  struct exec ex;                    /* what the layers see (layer.h) */
  unsigned idx;
  pthread_t thread;
  struct io_uring ring;
  struct bufpool *pool;
  struct request *free_reqs;
  unsigned n_free_reqs;

  int efd;
  uint64_t efd_val;
  struct cbt_aio_op efd_op;
  GMutex lock;
  GQueue msgs;                       /* struct wmsg *, under lock */

  struct conn *conns;
  unsigned nconns;
  atomic_uint mem_waiters;           /* connections with mem_wait */
  atomic_bool mem_wake_posted;
  unsigned holds;                    /* exec_hold(): I/O of no connection */
  bool stopping;
  struct cbt_aio_op grace_op;
  struct __kernel_timespec grace_ts;
  struct conn *flush_list;

  /* Start-up result, under start_lock. */
  GMutex start_lock;
  GCond start_cond;
  int start_err;
  bool started;
};

static struct worker *workers;
static unsigned n_workers;
static atomic_uint next_worker;
static atomic_uint total_conns;

static void conn_post_recv(struct conn *c);
static void conn_parse(struct conn *c);
static void conn_maybe_finish(struct conn *c);
static void conn_start_close(struct conn *c);
static void worker_post(struct worker *w, void (*fn)(void *), void *arg);
static void workers_memory_freed(void);


struct bufpool *conn_pool(struct conn *c) { return c->w->pool; }
struct io_uring *conn_ring(struct conn *c) { return &c->w->ring; }
struct exec *conn_exec(struct conn *c) { return &c->w->ex; }

/* A worker as an execution context for the layers (layer.h): I/O that is
 * not a connection's (copies, punches) is counted in holds, and a
 * stopping worker waits until every hold is gone. */
static struct worker *
exec_worker(struct exec *ex)
{
  return cbt_container_of(ex, struct worker, ex);
}

static void
ex_post(struct exec *ex, void (*fn)(void *), void *arg)
{
  worker_post(exec_worker(ex), fn, arg);
}

static struct io_uring *ex_ring(struct exec *ex) { return &exec_worker(ex)->ring; }
static void ex_hold(struct exec *ex) { exec_worker(ex)->holds++; }
static void ex_unhold(struct exec *ex) { exec_worker(ex)->holds--; }

static const struct exec_ops worker_exec_ops = {
  .post = ex_post,
  .ring = ex_ring,
  .hold = ex_hold,
  .unhold = ex_unhold,
};
const struct conn_params *conn_params(struct conn *c) { return &c->p; }

unsigned
workers_conn_count(void)
{
  return atomic_load(&total_conns);
}

/* ---- requests ---- */

static struct request *
request_new(struct conn *c)
{
  struct worker *w = c->w;
  struct request *req = w->free_reqs;

  if (req) {
    w->free_reqs = req->next;
    w->n_free_reqs--;
  } else {
    req = g_new(struct request, 1);
  }
  memset(req, 0, offsetof(struct request, iov));
  req->c = c;
  req->niov = req->iov_pos = 0;
  req->next = NULL;
  c->inflight++;
  return req;
}

void
request_release_buf(struct request *req)
{
  if (req->buf) {
    bufpool_put(req->c->w->pool, req->buf, req->buf_len);
    req->c->inflight_bytes -= req->buf_len;
    req->buf = NULL;
    req->buf_len = 0;
  }
  if (memcap_give(req->charged))
    workers_memory_freed();
  req->charged = 0;
}

static void
request_free(struct request *req)
{
  struct conn *c = req->c;
  struct worker *w = c->w;

  request_release_buf(req);
  c->inflight--;
  if (w->n_free_reqs < MAX_FREE_REQS) {
    req->next = w->free_reqs;
    w->free_reqs = req;
    w->n_free_reqs++;
  } else {
    g_free(req);
  }
}

/* The buffer is paid for by what was taken when the header was read
 * (conn_reserve); a larger one (a block status reply) is charged. */
bool
request_alloc_buf(struct request *req, size_t len)
{
  req->buf = bufpool_get(req->c->w->pool, len);
  if (!req->buf)
    return false;
  req->buf_len = len;
  req->c->inflight_bytes += len;
  if (len > req->charged) {
    memcap_charge(len - req->charged);
    req->charged = len;
  }
  return true;
}

/* After requests were freed: a throttled connection may read again, a
 * closing one may be finished (which may free @c). */
static void
conn_after_free(struct conn *c)
{
  if (!c->closing && !c->recv_pending) {
    conn_parse(c);
    return;
  }
  conn_maybe_finish(c);
}

/* ---- sending ---- */

void
conn_reply(struct request *req)
{
  struct conn *c = req->c;

  if (c->dead) {
    request_free(req);
    conn_maybe_finish(c);
    return;
  }
  req->next = NULL;
  if (c->sendq_tail)
    c->sendq_tail->next = req;
  else
    c->sendq_head = req;
  c->sendq_tail = req;
  /* Sent at the end of this loop turn, batched with other replies. */
  if (!c->in_flush_list && !c->send_pending) {
    c->in_flush_list = true;
    c->flush_next = c->w->flush_list;
    c->w->flush_list = c;
  }
}

static void send_done(struct cbt_aio_op *op, int res);

/* The socket cannot take replies any more: drop the queued ones and
 * close the connection once its requests are done. */
static void
conn_send_broken(struct conn *c)
{
  c->dead = true;
  while (c->sendq_head) {
    struct request *r = c->sendq_head;
    c->sendq_head = r->next;
    request_free(r);
  }
  c->sendq_tail = NULL;
  conn_start_close(c);
}

static void
conn_send(struct conn *c)
{
  struct io_uring_sqe *sqe;
  unsigned n = 0;

  if (c->send_pending || !c->sendq_head || c->dead)
    return;
  for (struct request *r = c->sendq_head; r && n < SEND_BATCH_IOV; r = r->next) {
    for (unsigned i = r->iov_pos; i < r->niov && n < SEND_BATCH_IOV; i++)
      c->siov[n++] = r->iov[i];
  }
  sqe = cbt_ring_get_sqe(&c->w->ring);
  if (!sqe) {
    log_error("%s: io_uring submission failed; closing connection", c->p.peer);
    c->dead = true;
    conn_start_close(c);
    return;
  }
  memset(&c->msg, 0, sizeof c->msg);
  c->msg.msg_iov = c->siov;
  c->msg.msg_iovlen = n;
  io_uring_prep_sendmsg(sqe, c->p.fd, &c->msg, MSG_NOSIGNAL);
  if (c->send_progress == 0)
    c->send_progress = g_get_monotonic_time();
  c->send_op.done = send_done;
  io_uring_sqe_set_data(sqe, &c->send_op);
  c->send_pending = true;
}

static void
send_done(struct cbt_aio_op *op, int res)
{
  struct conn *c = cbt_container_of(op, struct conn, send_op);
  size_t bytes;

  c->send_pending = false;
  if (res == -EINTR || res == -EAGAIN) {
    conn_send(c);
    return;
  }
  if (res <= 0) {
    if (res < 0 && res != -EPIPE && res != -ECONNRESET)
      log_error("%s: send: %s", c->p.peer, g_strerror(-res));
    conn_send_broken(c);
    conn_maybe_finish(c);
    return;
  }

  /* Consume @res bytes from the head of the queue; whole replies are
   * freed, a partly sent one keeps its position. */
  c->send_progress = 0;              /* the next send starts the clock */
  bytes = (size_t)res;
  while (bytes > 0 && c->sendq_head) {
    struct request *r = c->sendq_head;
    while (bytes > 0 && r->iov_pos < r->niov) {
      struct iovec *v = &r->iov[r->iov_pos];
      if (bytes >= v->iov_len) {
        bytes -= v->iov_len;
        r->iov_pos++;
      } else {
        v->iov_base = (char *)v->iov_base + bytes;
        v->iov_len -= bytes;
        bytes = 0;
      }
    }
    if (r->iov_pos < r->niov)
      break;
    c->sendq_head = r->next;
    if (!c->sendq_head)
      c->sendq_tail = NULL;
    request_free(r);
  }
  /* Replies left in the queue go out now. */
  conn_send(c);
  conn_after_free(c);
}

/* ---- a WRITE's reply linked to the write ----
 *
 * A client at queue depth 1 waits for each reply before it sends the next
 * request, and on most file systems (ext4 among them) a buffered write
 * from io_uring runs on an io-wq thread.  Replied the normal way, the
 * write's completion must wake this thread, which then sends the reply:
 * one more thread switch on every request's path, the dearest step where
 * a wake-up costs an inter-processor interrupt (a VM).  Linked
 * (IOSQE_IO_LINK, image.h), the thread that wrote the data sends the
 * reply right after it, and this thread takes in both completions later,
 * off the client's path.
 *
 * Only when the connection has nothing else to send and no other request
 * (conn_can_link_reply): the linked send is then the connection's one
 * send in flight, so replies never interleave, and replies queued while
 * it is in flight wait for it as they would for any send.  The reply can
 * only be success: the kernel cancels the send (-ECANCELED) when the
 * write fails or is short, and the request is then replied the normal
 * way with the write's real outcome.
 *
 * A request with a linked reply ends when both completions are in, in
 * either order: link_state says which is still out.
 */
enum link_state {
  LINK_NONE = 0,                     /* no linked reply (or decided) */
  LINK_BOTH,                         /* write and send both out */
  LINK_SEND,                         /* write done (link_res), send out */
  LINK_WRITE,                        /* reply sent, write completion out */
};

bool
conn_can_link_reply(const struct conn *c)
{
  return c->inflight == 1 && !c->send_pending && !c->sendq_head && !c->dead &&
         !c->in_flush_list;
}

static void linked_send_done(struct cbt_aio_op *op, int res);

void
conn_prep_linked_reply(struct request *req, struct io_uring_sqe *sqe)
{
  struct conn *c = req->c;

  c->lreq = req;
  req->link_state = LINK_BOTH;
  c->siov[0].iov_base = req->hdr_bytes;
  c->siov[0].iov_len = NBD_SIMPLE_REPLY_SIZE;
  memset(&c->msg, 0, sizeof c->msg);
  c->msg.msg_iov = c->siov;
  c->msg.msg_iovlen = 1;
  /* MSG_WAITALL: io_uring retries a short send until all 16 bytes went. */
  io_uring_prep_sendmsg(sqe, c->p.fd, &c->msg, MSG_NOSIGNAL | MSG_WAITALL);
  c->lsend_op.done = linked_send_done;
  io_uring_sqe_set_data(sqe, &c->lsend_op);
  c->send_pending = true;
  if (c->send_progress == 0)
    c->send_progress = g_get_monotonic_time();
}

bool
conn_linked_write_done(struct request *req, int res)
{
  struct conn *c = req->c;

  switch (req->link_state) {
  case LINK_BOTH:
    req->link_state = LINK_SEND;
    req->link_res = res;
    return true;
  case LINK_WRITE:
    req->link_state = LINK_NONE;
    request_free(req);
    conn_after_free(c);
    return true;
  default:
    return false;                    /* not linked, or the send cancelled */
  }
}

static void
linked_send_done(struct cbt_aio_op *op, int res)
{
  struct conn *c = cbt_container_of(op, struct conn, lsend_op);
  struct request *req = g_steal_pointer(&c->lreq);
  bool sent = res == NBD_SIMPLE_REPLY_SIZE;
  bool retry = res == -ECANCELED || res == -EINTR || res == -EAGAIN;

  c->send_pending = false;
  c->send_progress = 0;
  if (!sent && !retry) {
    /* The socket is broken, or a part of the reply is gone and the rest
     * can never be told apart from the next reply: drop the connection. */
    if (res < 0 && res != -EPIPE && res != -ECONNRESET)
      log_error("%s: send: %s", c->p.peer, g_strerror(-res));
    else if (res >= 0)
      log_error("%s: send: %d of %d bytes; closing connection", c->p.peer, res,
                NBD_SIMPLE_REPLY_SIZE);
    conn_send_broken(c);
  }
  if (req->link_state == LINK_SEND) {
    req->link_state = LINK_NONE;
    if (sent || c->dead)
      request_free(req);
    else
      dispatch_io_reply(req, req->link_res);   /* queues the real reply */
  } else {
    req->link_state = sent ? LINK_WRITE : LINK_NONE;
  }
  conn_send(c);
  conn_after_free(c);
}

/* ---- receiving ---- */

static bool
conn_throttled(const struct conn *c)
{
  return c->inflight >= MAX_INFLIGHT || c->inflight_bytes >= MAX_INFLIGHT_BYTES ||
         c->mem_wait;
}

static void recv_done(struct cbt_aio_op *op, int res);

static void
conn_post_recv(struct conn *c)
{
  struct io_uring_sqe *sqe;
  void *dst;
  size_t len;

  if (c->recv_pending || c->closing)
    return;
  if (c->wreq && c->wreq->hdr.length - c->wreq->have >= DIRECT_RECV_MIN &&
      c->rpos == c->rlen) {
    dst = (uint8_t *)c->wreq->buf + c->wreq->have;
    len = c->wreq->hdr.length - c->wreq->have;
    c->recv_direct = true;
  } else {
    if (c->rpos == c->rlen)
      c->rpos = c->rlen = 0;
    else if (c->rlen == RBUF_SIZE || c->rpos > RBUF_SIZE / 2) {
      memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
      c->rlen -= c->rpos;
      c->rpos = 0;
    }
    dst = c->rbuf + c->rlen;
    len = RBUF_SIZE - c->rlen;
    c->recv_direct = false;
  }
  sqe = cbt_ring_get_sqe(&c->w->ring);
  if (!sqe) {
    log_error("%s: io_uring submission failed; closing connection", c->p.peer);
    conn_start_close(c);
    return;
  }
  io_uring_prep_recv(sqe, c->p.fd, dst, len, 0);
  c->recv_op.done = recv_done;
  io_uring_sqe_set_data(sqe, &c->recv_op);
  c->recv_pending = true;
}

static void
recv_done(struct cbt_aio_op *op, int res)
{
  struct conn *c = cbt_container_of(op, struct conn, recv_op);

  c->recv_pending = false;
  if (res == -EINTR || res == -EAGAIN) {
    conn_post_recv(c);
    return;
  }
  if (res <= 0) {
    if (res < 0 && res != -ECANCELED && res != -ECONNRESET)
      log_error("%s: receive: %s", c->p.peer, g_strerror(-res));
    else if (res == 0 && (c->wreq || c->rpos != c->rlen))
      log_error("%s: client closed the connection in the middle of a request",
                c->p.peer);
    conn_start_close(c);
    conn_maybe_finish(c);
    return;
  }
  if (c->recv_direct)
    c->wreq->have += (uint32_t)res;
  else
    c->rlen += (size_t)res;
  conn_parse(c);
}

/* Reply with req->error, but only once a refused WRITE's payload has been
 * read and dropped: a client may still be sending it and would not expect
 * the reply before it has finished (libnbd does not). */
static void
conn_refuse(struct conn *c, struct request *req)
{
  c->discard = cbt_nbd_request_payload(&req->hdr);
  if (c->discard == 0) {
    reply_error(req);
    return;
  }
  c->discard_req = req;
}

/* A request header was read: validate it and start it. */
static void
conn_handle_header(struct conn *c, const struct cbt_nbd_request *hdr, size_t charged)
{
  struct request *req = request_new(c);

  req->hdr = *hdr;
  req->charged = charged;
  req->error = cbt_nbd_request_validate(hdr, &c->caps);
  if (req->error != NBD_SUCCESS) {
    debug("%s: %s offset %" PRIu64 " length %" PRIu32 " flags 0x%x: %s",
          c->p.peer, cbt_nbd_cmd_name(hdr->type), hdr->offset, hdr->length,
          hdr->flags, cbt_nbd_err_name(req->error));
    conn_refuse(c, req);
    return;
  }
  if (hdr->type == NBD_CMD_WRITE) {
    if (!request_alloc_buf(req, hdr->length)) {
      req->error = NBD_ENOMEM;
      conn_refuse(c, req);
      return;
    }
    c->wreq = req;                   /* dispatched once the payload is in */
    return;
  }
  dispatch_request(req);
}

/* The budget a request's header must take before it is read: the
 * payload of a READ or WRITE that may be valid (a longer READ is refused
 * without a buffer, a longer WRITE closes the connection). */
static size_t
payload_budget(const struct cbt_nbd_request *hdr)
{
  if ((hdr->type == NBD_CMD_READ || hdr->type == NBD_CMD_WRITE) &&
      hdr->length <= CBT_NBD_MAX_BLOCK)
    return hdr->length;
  return 0;
}

static void
conn_unwait(struct conn *c)
{
  if (!c->mem_wait)
    return;
  c->mem_wait = false;
  atomic_fetch_sub(&c->w->mem_waiters, 1);
  memcap_unwait();
}

/* Take @need bytes from the budget, or make @c wait for them.  Waiting is
 * announced before the second try, so memory given back in between
 * always finds a waiter to wake. */
static bool
conn_reserve(struct conn *c, size_t need)
{
  if (memcap_take(need)) {
    conn_unwait(c);
    return true;
  }
  if (!c->mem_wait) {
    c->mem_wait = true;
    atomic_fetch_add(&c->w->mem_waiters, 1);
    memcap_wait();
  }
  if (memcap_take(need)) {
    conn_unwait(c);
    return true;
  }
  return false;
}

/* Consume what the receive buffer holds; then read more if allowed. */
static void
conn_parse(struct conn *c)
{
  while (!c->closing) {
    size_t avail = c->rlen - c->rpos;

    if (c->wreq) {
      struct request *req = c->wreq;
      size_t need = req->hdr.length - req->have;
      size_t n = avail < need ? avail : need;

      memcpy((uint8_t *)req->buf + req->have, c->rbuf + c->rpos, n);
      req->have += (uint32_t)n;
      c->rpos += n;
      if (req->have < req->hdr.length)
        break;
      c->wreq = NULL;
      dispatch_request(req);
      continue;
    }
    if (c->discard) {
      size_t n = avail < c->discard ? avail : (size_t)c->discard;
      c->rpos += n;
      c->discard -= n;
      if (c->discard)
        break;
      reply_error(g_steal_pointer(&c->discard_req));
      continue;
    }
    if (avail < NBD_REQUEST_SIZE || conn_throttled(c))
      break;

    struct cbt_nbd_request hdr;
    size_t need;
    cbt_nbd_request_decode(c->rbuf + c->rpos, &hdr);
    if (hdr.magic != NBD_REQUEST_MAGIC) {
      log_error("%s: bad request magic 0x%08" PRIx32 "; closing connection",
                c->p.peer, hdr.magic);
      conn_start_close(c);
      break;
    }
    if (hdr.type == NBD_CMD_DISC) {
      debug("%s: client sent DISC", c->p.peer);
      c->rpos += NBD_REQUEST_SIZE;
      conn_start_close(c);
      break;
    }
    /* A WRITE over the maximum payload we advertise cannot be taken:
     * skipping its data would mean waiting for up to 4 GiB the client
     * may never send, with the connection stuck until then.  The
     * protocol lets a server drop a client that breaks the limit
     * (doc/proto.md, "Block size constraints"); qemu-nbd does. */
    if (cbt_nbd_request_payload(&hdr) > c->caps.max_block) {
      log_error("%s: WRITE of %" PRIu32 " bytes, more than the maximum payload "
                "of %" PRIu32 " bytes; closing connection", c->p.peer, hdr.length,
                c->caps.max_block);
      c->rpos += NBD_REQUEST_SIZE;
      conn_start_close(c);
      break;
    }
    need = payload_budget(&hdr);
    if (need > srv.max_memory) {
      /* Never reached while --max-memory is at least twice the maximum
       * payload (main.c); if it were, waiting would be for ever. */
      log_error("%s: %s of %" PRIu32 " bytes can never fit --max-memory; "
                "closing connection", c->p.peer, cbt_nbd_cmd_name(hdr.type),
                hdr.length);
      conn_start_close(c);
      break;
    }
    if (!conn_reserve(c, need))
      break;                         /* the header stays; woken later */
    c->rpos += NBD_REQUEST_SIZE;
    conn_handle_header(c, &hdr, need);
  }
  if (!c->closing && !conn_throttled(c))
    conn_post_recv(c);
  conn_maybe_finish(c);
}

/* ---- connection life ---- */

static void
conn_start_close(struct conn *c)
{
  if (c->closing)
    return;
  c->closing = true;
  if (c->recv_pending) {
    struct io_uring_sqe *sqe = cbt_ring_get_sqe(&c->w->ring);
    if (sqe) {
      io_uring_prep_cancel(sqe, &c->recv_op, 0);
      io_uring_sqe_set_data(sqe, NULL);
    } else {
      shutdown(c->p.fd, SHUT_RD);
    }
  }
}

static void
conn_maybe_finish(struct conn *c)
{
  struct worker *w = c->w;

  if (!c->closing || c->recv_pending || c->send_pending)
    return;
  if (c->wreq) {
    /* Its payload never fully arrived: it was never acknowledged. */
    request_free(g_steal_pointer(&c->wreq));
  }
  if (c->discard_req)
    request_free(g_steal_pointer(&c->discard_req));
  if (c->inflight > 0)
    return;
  if (c->sendq_head && !c->dead)
    return;
  if (c->in_flush_list)
    return;                          /* flush_sends() calls us again */

  debug("%s: connection closed", c->p.peer);
  conn_unwait(c);
  close(c->p.fd);
  if (c->prev)
    c->prev->next = c->next;
  else
    w->conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  w->nconns--;
  atomic_fetch_sub(&total_conns, 1);
  snapshot_unref(c->p.snap);
  free(c->rbuf);
  g_free(c);
}

static void
flush_sends(struct worker *w)
{
  while (w->flush_list) {
    struct conn *c = w->flush_list;
    w->flush_list = c->flush_next;
    c->in_flush_list = false;
    conn_send(c);
    conn_maybe_finish(c);
  }
}

struct handoff {
  struct worker *w;
  struct conn_params p;
};

static void
worker_add_conn_fn(void *arg)
{
  g_autofree struct handoff *h = arg;
  struct worker *w = h->w;
  struct conn *c;

  if (w->stopping) {
    close(h->p.fd);
    snapshot_unref(h->p.snap);
    atomic_fetch_sub(&total_conns, 1);
    return;
  }
  c = g_new0(struct conn, 1);
  c->w = w;
  c->p = h->p;
  c->rbuf = malloc(RBUF_SIZE);
  if (!c->rbuf) {
    log_error("%s: out of memory", c->p.peer);
    close(c->p.fd);
    snapshot_unref(c->p.snap);
    g_free(c);
    atomic_fetch_sub(&total_conns, 1);
    return;
  }
  c->caps.export_size = srv.image->size;
  c->caps.max_block = CBT_NBD_MAX_BLOCK;
  /* The @checkpoint export takes TRIM (release); dispatch refuses its
   * writes. */
  c->caps.read_only = srv.read_only && !c->p.snap;
  c->caps.structured_replies = c->p.structured;
  c->caps.fast_zero = !srv.read_only && !c->p.snap;
  c->caps.n_meta_contexts = c->p.n_meta;
  c->next = w->conns;
  if (w->conns)
    w->conns->prev = c;
  w->conns = c;
  w->nconns++;
  debug("%s: serving on worker %u", c->p.peer, w->idx);
  conn_post_recv(c);
}

void
workers_add_conn(const struct conn_params *p)
{
  unsigned i = atomic_fetch_add(&next_worker, 1) % n_workers;
  struct handoff *h = g_new(struct handoff, 1);

  h->w = &workers[i];
  h->p = *p;
  atomic_fetch_add(&total_conns, 1);
  worker_post(h->w, worker_add_conn_fn, h);
}

/* ---- cross-thread messages ---- */

/* Run @fn(@arg) on @w's thread (any thread may call). */
static void
worker_post(struct worker *w, void (*fn)(void *), void *arg)
{
  struct wmsg *m = g_new(struct wmsg, 1);
  uint64_t one = 1;

  m->fn = fn;
  m->arg = arg;
  g_mutex_lock(&w->lock);
  g_queue_push_tail(&w->msgs, m);
  g_mutex_unlock(&w->lock);
  /* An eventfd write only fails if the counter would overflow. */
  if (write(w->efd, &one, sizeof one) < 0 && errno != EAGAIN)
    log_error("worker %u: eventfd: %s", w->idx, g_strerror(errno));
}

static void efd_done(struct cbt_aio_op *op, int res);

static void
post_efd_read(struct worker *w)
{
  struct io_uring_sqe *sqe = cbt_ring_get_sqe(&w->ring);

  if (!sqe) {
    log_error("worker %u: cannot queue eventfd read", w->idx);
    abort();
  }
  io_uring_prep_read(sqe, w->efd, &w->efd_val, sizeof w->efd_val, 0);
  w->efd_op.done = efd_done;
  io_uring_sqe_set_data(sqe, &w->efd_op);
}

static void
efd_done(struct cbt_aio_op *op, int res)
{
  struct worker *w = cbt_container_of(op, struct worker, efd_op);

  (void)res;
  for (;;) {
    struct wmsg *m;
    g_mutex_lock(&w->lock);
    m = g_queue_pop_head(&w->msgs);
    g_mutex_unlock(&w->lock);
    if (!m)
      break;
    m->fn(m->arg);
    g_free(m);
  }
  post_efd_read(w);
}

static void
grace_done(struct cbt_aio_op *op, int res)
{
  struct worker *w = cbt_container_of(op, struct worker, grace_op);

  (void)res;
  for (struct conn *c = w->conns; c; c = c->next) {
    log_error("%s: client did not take its replies within %d s of shutdown; "
              "closing", c->p.peer, STOP_GRACE);
    shutdown(c->p.fd, SHUT_RDWR);
  }
}

static void
worker_stop_fn(void *arg)
{
  struct worker *w = arg;
  struct io_uring_sqe *sqe;

  w->stopping = true;
  sqe = cbt_ring_get_sqe(&w->ring);
  if (sqe) {
    w->grace_ts.tv_sec = STOP_GRACE;
    w->grace_ts.tv_nsec = 0;
    io_uring_prep_timeout(sqe, &w->grace_ts, 0, 0);
    w->grace_op.done = grace_done;
    io_uring_sqe_set_data(sqe, &w->grace_op);
  }
  for (struct conn *c = w->conns, *next; c; c = next) {
    next = c->next;
    conn_start_close(c);
    conn_maybe_finish(c);
  }
}

/* ---- memory ---- */

/* On @w: memory was given back; let its waiting connections try again. */
static void
mem_wake_fn(void *arg)
{
  struct worker *w = arg;

  atomic_store(&w->mem_wake_posted, false);
  for (struct conn *c = w->conns, *next; c; c = next) {
    next = c->next;
    if (c->mem_wait && !c->closing) {
      conn_unwait(c);
      conn_parse(c);                 /* may wait again, or free @c */
    }
  }
}

/* Buffers were given back while connections wait for memory: wake the
 * workers that have such connections. */
static void
workers_memory_freed(void)
{
  for (unsigned i = 0; i < n_workers; i++) {
    struct worker *w = &workers[i];
    if (atomic_load(&w->mem_waiters) > 0 &&
        !atomic_exchange(&w->mem_wake_posted, true))
      worker_post(w, mem_wake_fn, w);
  }
}

static void
worker_tick_fn(void *arg)
{
  struct worker *w = arg;
  gint64 now = g_get_monotonic_time();

  bufpool_trim(w->pool);
  if (!memcap_pressure())
    return;
  for (struct conn *c = w->conns; c; c = c->next) {
    if (c->send_pending && c->send_progress &&
        now - c->send_progress >= (gint64)SEND_STALL * G_USEC_PER_SEC &&
        !c->dead) {
      log_error("%s: has not taken a byte of its replies for %d s while other "
                "clients wait for memory (--max-memory); closing", c->p.peer,
                SEND_STALL);
      shutdown(c->p.fd, SHUT_RDWR);
      c->send_progress = 0;
    }
  }
}

void
workers_tick(void)
{
  for (unsigned i = 0; i < n_workers; i++)
    worker_post(&workers[i], worker_tick_fn, &workers[i]);
}

/* ---- the loop ---- */

static int
ring_init(struct io_uring *ring)
{
  struct io_uring_params p;
  int r;

  memset(&p, 0, sizeof p);
  p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN |
            IORING_SETUP_CQSIZE;
  p.cq_entries = RING_ENTRIES * 8;
  r = io_uring_queue_init_params(RING_ENTRIES, ring, &p);
  if (r == -EINVAL) {
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = RING_ENTRIES * 8;
    r = io_uring_queue_init_params(RING_ENTRIES, ring, &p);
  }
  return r;
}

static void *
worker_main(void *arg)
{
  struct worker *w = arg;
  int r = ring_init(&w->ring);

  g_mutex_lock(&w->start_lock);
  w->start_err = r;
  w->started = true;
  g_cond_signal(&w->start_cond);
  g_mutex_unlock(&w->start_lock);
  if (r < 0)
    return NULL;
  io_uring_register_ring_fd(&w->ring);   /* optional speed-up */
  post_efd_read(w);

  for (;;) {
    struct io_uring_cqe *cqe;

    flush_sends(w);
    if (w->stopping && w->nconns == 0 && w->holds == 0)
      break;
    r = io_uring_submit_and_wait(&w->ring, 1);
    if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY && r != -ETIME) {
      log_error("worker %u: io_uring_submit_and_wait: %s", w->idx, g_strerror(-r));
      abort();
    }
    while (io_uring_peek_cqe(&w->ring, &cqe) == 0) {
      struct cbt_aio_op *op = io_uring_cqe_get_data(cqe);
      int res = cqe->res;

      io_uring_cqe_seen(&w->ring, cqe);
      if (op)
        op->done(op, res);
    }
  }
  io_uring_queue_exit(&w->ring);
  return NULL;
}

bool
workers_start(unsigned n, GError **error)
{
  workers = g_new0(struct worker, n);
  n_workers = n;
  for (unsigned i = 0; i < n; i++) {
    struct worker *w = &workers[i];
    int r;

    w->idx = i;
    w->ex.ops = &worker_exec_ops;
    w->pool = bufpool_new();
    g_mutex_init(&w->lock);
    g_queue_init(&w->msgs);
    g_mutex_init(&w->start_lock);
    g_cond_init(&w->start_cond);
    w->efd = eventfd(0, EFD_CLOEXEC);
    if (w->efd < 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                  "eventfd: %s", g_strerror(errno));
      return false;
    }
    r = pthread_create(&w->thread, NULL, worker_main, w);
    if (r != 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(r),
                  "cannot start worker thread: %s", g_strerror(r));
      return false;
    }
    g_mutex_lock(&w->start_lock);
    while (!w->started)
      g_cond_wait(&w->start_cond, &w->start_lock);
    r = w->start_err;
    g_mutex_unlock(&w->start_lock);
    if (r < 0) {
      pthread_join(w->thread, NULL);
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                  "cannot set up io_uring: %s", g_strerror(-r));
      return false;
    }
  }
  return true;
}

void
workers_stop(void)
{
  for (unsigned i = 0; i < n_workers; i++)
    worker_post(&workers[i], worker_stop_fn, &workers[i]);
  for (unsigned i = 0; i < n_workers; i++) {
    struct worker *w = &workers[i];
    pthread_join(w->thread, NULL);
    close(w->efd);
    while (w->free_reqs) {
      struct request *r = w->free_reqs;
      w->free_reqs = r->next;
      g_free(r);
    }
    bufpool_free(w->pool);
    /* Messages posted after the worker stopped (late connections). */
    for (struct wmsg *m; (m = g_queue_pop_head(&w->msgs)); g_free(m)) {
      if (m->fn == worker_add_conn_fn) {
        struct handoff *h = m->arg;
        close(h->p.fd);
        snapshot_unref(h->p.snap);
        g_free(h);
      }
    }
    g_mutex_clear(&w->lock);
  }
  g_free(workers);
  workers = NULL;
  n_workers = 0;
}
