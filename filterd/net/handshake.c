/* The negotiation loop: every connection still negotiating, on one thread
 * and one io_uring, with no thread and no fixed slot per client.
 *
 * The protocol itself is negotiate.c's state machine; this file only
 * moves its bytes.  Each connection has at most one operation in flight:
 * a send of the replies the machine queued, or, when none is queued, a
 * receive of exactly the bytes the machine asks for next.  An idle
 * client therefore costs a pending receive and a few hundred bytes, and
 * thousands of them cannot keep a new client (QEMU reconnecting) from
 * being served at once.  How many clients may be connected at all is
 * --max-clients, checked where connections are accepted (main-loop.c).
 *
 * Deadlines: --handshake-timeout bounds the whole negotiation.  Since
 * every connection gets the same timeout from the moment it arrives,
 * the list of connections in arrival order is also in deadline order;
 * the loop sleeps until the first deadline (at most a second) and shuts
 * down the sockets whose time is up.  shutdown() completes their pending
 * operation, and a connection is freed only once nothing of it is in
 * flight.
 *
 * Connections arrive from the main thread through a locked list and an
 * eventfd.  A negotiation that reaches transmission hands its socket to a
 * worker from this thread; handshake_stop_all() stops the loop and joins
 * it, so nothing is handed over once the workers begin to stop.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

#define LOOP_ENTRIES    256
#define LOOP_CQ_ENTRIES 4096

struct hs {
  int fd;
  struct nego *n;
  gint64 deadline;                   /* the whole negotiation's end */
  bool busy;                         /* a send or receive is in flight */
  bool sending;                      /* ... and it is a send */
  bool dead;                         /* cut: free once nothing is in flight */
  GList link;                        /* in loop.alive, by deadline */
};

static struct {
  GMutex lock;                       /* protects pending */
  GQueue pending;                    /* struct hs, not yet seen by the loop */
  int efd;                           /* wakes the loop: new work or stop */
  uint64_t efd_val;
  pthread_t thread;
  bool started;
  atomic_bool stop;
  atomic_uint count;                 /* connections negotiating */
  GQueue alive;                      /* loop thread only */
  struct io_uring ring;
} loop = { .efd = -1 };

static void
free_hs(struct hs *h, bool close_fd)
{
  if (close_fd && h->fd >= 0)
    close(h->fd);
  nego_free(h->n);
  g_queue_unlink(&loop.alive, &h->link);
  g_free(h);
  atomic_fetch_sub(&loop.count, 1);
}

/* Stop a connection: its operation in flight (if any) completes soon,
 * and the connection is freed then. */
static void
cut(struct hs *h)
{
  h->dead = true;
  if (h->busy)
    shutdown(h->fd, SHUT_RDWR);
  else
    free_hs(h, true);
}

static void
hand_to_worker(struct hs *h)
{
  struct conn_params *p = nego_params(h->n);

  p->fd = h->fd;
  debug("%s: negotiated (%s, structured replies %s, %u meta contexts)",
        p->peer, p->snap ? "point-in-time view" : "main export",
        p->structured ? "on" : "off", p->n_meta);
  workers_add_conn(p);
  p->snap = NULL;                    /* the connection owns the reference now */
  h->fd = -1;
  free_hs(h, false);
}

/* Start the next operation of @h, or finish it. */
static void
kick(struct hs *h)
{
  struct io_uring_sqe *sqe;
  const void *out;
  size_t len;
  void *in;

  if (h->dead) {
    if (!h->busy)
      free_hs(h, true);
    return;
  }
  out = nego_output(h->n, &len);
  if (len == 0) {
    switch (nego_state(h->n)) {
    case NEGO_DONE:
      if (atomic_load(&loop.stop))
        free_hs(h, true);
      else
        hand_to_worker(h);
      return;
    case NEGO_CLOSE:
      free_hs(h, true);
      return;
    case NEGO_STARTTLS:
      /* The ACK is out; from here the client speaks TLS, and we go on
       * with the plaintext end of tls.c's pump. */
      h->fd = tls_start(h->fd, nego_params(h->n)->peer, h->deadline);
      if (h->fd < 0) {
        free_hs(h, false);
        return;
      }
      nego_tls_started(h->n);
      kick(h);
      return;
    case NEGO_RUNNING:
      break;
    }
  }
  sqe = cbt_ring_get_sqe(&loop.ring);
  if (!sqe) {
    log_error("%s: negotiation: cannot queue an io_uring operation", nego_params(h->n)->peer);
    free_hs(h, true);
    return;
  }
  if (len > 0) {
    io_uring_prep_send(sqe, h->fd, out, len, MSG_NOSIGNAL);
    h->sending = true;
  } else {
    in = nego_recv_buf(h->n, &len);
    io_uring_prep_recv(sqe, h->fd, in, len, 0);
    h->sending = false;
  }
  io_uring_sqe_set_data(sqe, h);
  h->busy = true;
}

static void
completed(struct hs *h, int res)
{
  const char *peer = nego_params(h->n)->peer;

  h->busy = false;
  if (h->dead) {
    kick(h);
    return;
  }
  if (res == -EINTR || res == -EAGAIN) {
    kick(h);
    return;
  }
  if (res < 0 || (res == 0 && !h->sending)) {
    if (res == 0)
      debug("%s: client closed the connection during negotiation", peer);
    else
      debug("%s: negotiation: %s", peer, g_strerror(-res));
    free_hs(h, true);
    return;
  }
  if (h->sending)
    nego_sent(h->n, (size_t)res);
  else
    nego_received(h->n, (size_t)res);
  kick(h);
}

static void
post_wakeup(void)
{
  struct io_uring_sqe *sqe = cbt_ring_get_sqe(&loop.ring);

  if (!sqe) {
    log_error("negotiation loop: cannot queue an io_uring operation");
    abort();
  }
  io_uring_prep_read(sqe, loop.efd, &loop.efd_val, sizeof loop.efd_val, 0);
  io_uring_sqe_set_data(sqe, &loop);
}

static void
adopt_pending(void)
{
  GQueue q = G_QUEUE_INIT;
  struct hs *h;

  g_mutex_lock(&loop.lock);
  q = loop.pending;
  g_queue_init(&loop.pending);
  g_mutex_unlock(&loop.lock);
  while ((h = g_queue_pop_head(&q))) {
    h->link.data = h;
    g_queue_push_tail_link(&loop.alive, &h->link);
    if (atomic_load(&loop.stop))
      cut(h);
    else
      kick(h);
  }
}

/* Cut the negotiations whose time is up; returns the microseconds until
 * the next deadline, at most a second. */
static gint64
expire(void)
{
  gint64 now = g_get_monotonic_time();

  for (GList *l = loop.alive.head; l; ) {
    struct hs *h = l->data;

    l = l->next;
    if (h->dead)
      continue;
    if (h->deadline > now)
      return MIN(h->deadline - now, G_USEC_PER_SEC);
    log_error("%s: negotiation timed out", nego_params(h->n)->peer);
    cut(h);
  }
  return G_USEC_PER_SEC;
}

static void *
loop_thread(void *arg)
{
  bool stopping = false;

  (void)arg;
  post_wakeup();
  for (;;) {
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts;
    gint64 wait = expire();
    int r;

    if (stopping && g_queue_is_empty(&loop.alive))
      break;
    ts.tv_sec = wait / G_USEC_PER_SEC;
    ts.tv_nsec = (wait % G_USEC_PER_SEC) * 1000;
    r = io_uring_submit_and_wait_timeout(&loop.ring, &cqe, 1, &ts, NULL);
    if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN) {
      log_error("negotiation loop: %s", g_strerror(-r));
      g_usleep(10 * 1000);
    }
    while (io_uring_peek_cqe(&loop.ring, &cqe) == 0) {
      void *data = io_uring_cqe_get_data(cqe);
      int res = cqe->res;

      io_uring_cqe_seen(&loop.ring, cqe);
      if (data == &loop) {
        adopt_pending();
        if (atomic_load(&loop.stop) && !stopping) {
          stopping = true;
          for (GList *l = loop.alive.head; l; ) {
            struct hs *h = l->data;
            l = l->next;
            if (!h->dead)
              cut(h);
          }
        }
        if (!stopping)
          post_wakeup();
      } else {
        completed(data, res);
      }
    }
  }
  return NULL;
}

static void
wake(void)
{
  uint64_t one = 1;

  if (write(loop.efd, &one, sizeof one) < 0 && errno != EAGAIN)
    log_error("negotiation loop: eventfd: %s", g_strerror(errno));
}

bool
handshake_init(GError **error)
{
  struct io_uring_params params = { .flags = IORING_SETUP_CQSIZE,
                                    .cq_entries = LOOP_CQ_ENTRIES };
  int r;

  loop.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (loop.efd < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                "eventfd: %s", g_strerror(errno));
    return false;
  }
  r = io_uring_queue_init_params(LOOP_ENTRIES, &loop.ring, &params);
  if (r < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                "cannot set up io_uring: %s", g_strerror(-r));
    goto fail;
  }
  r = pthread_create(&loop.thread, NULL, loop_thread, NULL);
  if (r != 0) {
    io_uring_queue_exit(&loop.ring);
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(r),
                "cannot start the negotiation thread: %s", g_strerror(r));
    goto fail;
  }
  loop.started = true;
  return true;

fail:
  close(loop.efd);
  loop.efd = -1;
  return false;
}

void
handshake_start(int fd, const char *peer)
{
  struct hs *h;

  if (!loop.started || atomic_load(&loop.stop)) {
    close(fd);
    return;
  }
  h = g_new0(struct hs, 1);
  h->fd = fd;
  h->n = nego_new(peer);
  h->deadline = g_get_monotonic_time() + (gint64)srv.handshake_timeout * G_USEC_PER_SEC;
  atomic_fetch_add(&loop.count, 1);
  g_mutex_lock(&loop.lock);
  g_queue_push_tail(&loop.pending, h);
  g_mutex_unlock(&loop.lock);
  wake();
}

unsigned
handshake_count(void)
{
  return atomic_load(&loop.count);
}

void
handshake_stop_all(void)
{
  if (!loop.started)
    return;
  atomic_store(&loop.stop, true);
  wake();
  pthread_join(loop.thread, NULL);
  io_uring_queue_exit(&loop.ring);
  close(loop.efd);
  loop.efd = -1;
  loop.started = false;
}
