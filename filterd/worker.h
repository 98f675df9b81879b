/* cbt-filterd's request path: the worker threads (worker.c) and the
 * dispatcher (dispatch.c), the one callback pair among the daemon's files
 * (layer.h).  Only the files that run connections include this: the
 * features below the dispatcher see a request through layer.h alone.
 */
#ifndef CBT_FILTERD_WORKER_H
#define CBT_FILTERD_WORKER_H

#include "internal.h"
#include "layer.h"

/* ---- worker.c ---- */
struct conn;

#define REQ_MAX_CHUNKS 16        /* data/hole chunks in one READ reply */

struct request {
  struct conn *c;
  struct cbt_nbd_request hdr;
  uint32_t error;                /* NBD error for the reply */
  void *buf;                     /* READ/WRITE data or reply payload */
  size_t buf_len;                /* as passed to bufpool_get */
  size_t charged;                /* bytes taken from memcap.c for it */
  uint32_t have;                 /* WRITE payload bytes received */
  struct cbt_image_io io;
  uint8_t link_state;            /* enum link_state (worker.c) */
  uint8_t layer;                 /* dispatch.c: the stack's layer it is at */
  struct layer_req lr;           /* what the layers see of it (dispatch.c) */
  int link_res;                  /* the write's result, kept for the send */

  /* Reply, as iovecs over hdr_bytes and buf. */
  struct iovec iov[2 * REQ_MAX_CHUNKS + 1];
  unsigned niov;
  unsigned iov_pos;
  uint8_t hdr_bytes[REQ_MAX_CHUNKS * 32];
  struct request *next;          /* send queue / free list */
};

/* Called by dispatch.c. */
struct bufpool *conn_pool(struct conn *c);
struct io_uring *conn_ring(struct conn *c);
/* The connection's worker as the layers see it (layer.h). */
struct exec *conn_exec(struct conn *c);
const struct conn_params *conn_params(struct conn *c);
/* Queue a built reply for sending; the request is freed after it is sent. */
void conn_reply(struct request *req);
/* Give @req a pooled buffer of @len bytes (counted against the
 * connection's in-flight limit); false if out of memory. */
bool request_alloc_buf(struct request *req, size_t len);
void request_release_buf(struct request *req);
/* A WRITE's reply linked to the write (worker.c explains).  True when
 * @c has nothing else to send and no other request, so the reply may go
 * out from the kernel right after the data is written. */
bool conn_can_link_reply(const struct conn *c);
/* The image backend's link() for such a write: @req's reply header is
 * encoded; prepare its send in @sqe. */
void conn_prep_linked_reply(struct request *req, struct io_uring_sqe *sqe);
/* From an image request's completion (after its tracking and quiesce
 * steps): true if its reply was linked and the linked send has replied or
 * will decide the reply, so the caller must not touch @req again; false
 * (never linked, or the send was cancelled): reply the normal way. */
bool conn_linked_write_done(struct request *req, int res);


/* ---- dispatch.c ---- */
/* Start a validated request (payload, if any, already received).  The
 * request always ends in conn_reply(). */
void dispatch_request(struct request *req);
/* Build the reply for a request that failed validation or completed with
 * req->error set. */
void reply_error(struct request *req);
/* The reply of an image request that completed with @res, once its
 * changes' tracking is done (also for a linked reply whose send was
 * cancelled). */
void dispatch_io_reply(struct request *req, int res);

#endif
