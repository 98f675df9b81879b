/* The main thread's loop: accepts connections, handles signals and runs
 * periodic work, on a small io_uring of its own.
 *
 * Nothing here touches the data path.  Accepted sockets go to
 * handshake_start() unless --max-clients are connected already (then the
 * newest is closed and logged), control clients to control_start();
 * SIGTERM/SIGINT (read from a signalfd, the signals being blocked in
 * every thread) end the loop; a timer fires once a second for periodic
 * jobs (writing the dirty bitmap out).
 *
 * Out of descriptors (EMFILE, ENFILE) or memory, accept fails at once and
 * the connection stays queued on the listening socket, so accepting again
 * at once would spin.  That socket's accept waits instead, from
 * BACKOFF_MIN_MS doubling to BACKOFF_MAX_MS, while the loop goes on
 * serving signals, the timer and the other sockets; the first failure and
 * the recovery are logged, nothing in between.  The queued clients are
 * served once descriptors are free.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

#define BACKOFF_MIN_MS 10
#define BACKOFF_MAX_MS 1000

enum op_kind { OP_ACCEPT, OP_ACCEPT_CONTROL, OP_SIGNAL, OP_TIMER };

struct loop_op {
  enum op_kind kind;
  int fd;
  char *name;                        /* a listening socket, for logs */
  bool paused;                       /* accept waits backoff_ms first */
  unsigned backoff_ms;               /* the current wait, doubling */
  unsigned failed;                   /* accepts failed since the last success */
  struct sockaddr_storage addr;
  socklen_t addrlen;
  struct signalfd_siginfo si;
  struct __kernel_timespec ts;
};

static void
post(struct io_uring *ring, struct loop_op *op)
{
  struct io_uring_sqe *sqe = cbt_ring_get_sqe(ring);

  if (!sqe) {
    log_error("main loop: cannot queue an io_uring operation");
    abort();
  }
  switch (op->kind) {
  case OP_ACCEPT:
  case OP_ACCEPT_CONTROL:
    if (op->paused) {
      op->ts.tv_sec = op->backoff_ms / 1000;
      op->ts.tv_nsec = (long long)(op->backoff_ms % 1000) * 1000000;
      io_uring_prep_timeout(sqe, &op->ts, 0, 0);
      break;
    }
    op->addrlen = sizeof op->addr;
    io_uring_prep_accept(sqe, op->fd, (struct sockaddr *)&op->addr,
                         &op->addrlen, SOCK_CLOEXEC);
    break;
  case OP_SIGNAL:
    io_uring_prep_read(sqe, op->fd, &op->si, sizeof op->si, 0);
    break;
  case OP_TIMER:
    op->ts.tv_sec = 1;
    op->ts.tv_nsec = 0;
    io_uring_prep_timeout(sqe, &op->ts, 0, 0);
    break;
  }
  io_uring_sqe_set_data(sqe, op);
}

static void
describe_peer(const struct loop_op *op, char *buf, size_t len)
{
  char host[INET6_ADDRSTRLEN] = "?";

  if (op->addr.ss_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)&op->addr;
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    snprintf(buf, len, "%s:%u", host, ntohs(a->sin_port));
  } else if (op->addr.ss_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&op->addr;
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    snprintf(buf, len, "[%s]:%u", host, ntohs(a->sin6_port));
  } else {
    static atomic_uint n;
    snprintf(buf, len, "unix#%u", atomic_fetch_add(&n, 1) + 1);
  }
}

/* --max-clients is reached: close the newest connection.  The first
 * refusal is logged at once, later ones once a second with a count, so a
 * flood of connections cannot flood the log. */
static void
refuse(const char *peer)
{
  static gint64 last_log;
  static unsigned quiet;
  gint64 now = g_get_monotonic_time();

  if (now - last_log < G_USEC_PER_SEC) {
    quiet++;
    return;
  }
  log_error("%s: refused: %u clients connected, the most --max-clients allows",
            peer, srv.max_clients);
  if (quiet)
    log_error("(%u more connections refused in the last second)", quiet);
  last_log = now;
  quiet = 0;
}

/* An accept on @op's socket completed with @res.  Returns the accepted
 * socket, or -1 (then the next post() accepts again, or waits first). */
static int
accept_result(struct loop_op *op, int res)
{
  if (op->paused) {
    op->paused = false;              /* waited (-ETIME): try again */
    return -1;
  }
  if (res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM) {
    if (op->failed++ == 0)
      log_error("%s: cannot accept connections: %s; they wait in the socket's "
                "queue until some are closed (retrying every %d ms at most)",
                op->name, g_strerror(-res), BACKOFF_MAX_MS);
    op->backoff_ms = op->backoff_ms ? MIN(op->backoff_ms * 2, BACKOFF_MAX_MS)
                                    : BACKOFF_MIN_MS;
    op->paused = true;
    return -1;
  }
  if (res < 0) {
    if (res != -EINTR && res != -EAGAIN && res != -ECONNABORTED)
      log_error("%s: accept: %s", op->name, g_strerror(-res));
    return -1;
  }
  if (op->failed) {
    log_info("%s: accepting connections again (%u attempts failed)", op->name,
             op->failed);
    op->failed = 0;
  }
  op->backoff_ms = 0;
  return res;
}

static void
on_accept(struct loop_op *op, int res)
{
  char peer[64];

  describe_peer(op, peer, sizeof peer);
  if (handshake_count() + workers_conn_count() >= srv.max_clients) {
    refuse(peer);
    close(res);
    return;
  }
  if (op->addr.ss_family == AF_INET || op->addr.ss_family == AF_INET6) {
    int one = 1;
    setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  debug("%s: new connection", peer);
  handshake_start(res, peer);
}

bool
main_loop_run(const int *listen_fds, size_t n_listen, int control_fd,
               GError **error)
{
  struct io_uring ring;
  struct loop_op ops[MAX_LISTEN + 3];
  size_t n_ops = 0;
  sigset_t mask;
  int sfd, r;
  bool stop = false;

  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGHUP);
  sfd = signalfd(-1, &mask, SFD_CLOEXEC);
  if (sfd < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                "signalfd: %s", g_strerror(errno));
    return false;
  }
  r = io_uring_queue_init(16, &ring, 0);
  if (r < 0) {
    close(sfd);
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
                "cannot set up io_uring: %s", g_strerror(-r));
    return false;
  }

  memset(ops, 0, sizeof ops);
  for (size_t i = 0; i < n_listen && i < MAX_LISTEN; i++) {
    ops[n_ops].kind = OP_ACCEPT;
    ops[n_ops].fd = listen_fds[i];
    ops[n_ops].name = listen_describe(listen_fds[i]);
    post(&ring, &ops[n_ops++]);
  }
  if (control_fd >= 0) {
    g_autofree char *where = listen_describe(control_fd);

    ops[n_ops].kind = OP_ACCEPT_CONTROL;
    ops[n_ops].fd = control_fd;
    ops[n_ops].name = g_strconcat("control socket ", where, NULL);
    post(&ring, &ops[n_ops++]);
  }
  ops[n_ops].kind = OP_SIGNAL;
  ops[n_ops].fd = sfd;
  post(&ring, &ops[n_ops++]);
  ops[n_ops].kind = OP_TIMER;
  post(&ring, &ops[n_ops++]);

  while (!stop) {
    struct io_uring_cqe *cqe;

    r = io_uring_submit_and_wait(&ring, 1);
    if (r < 0 && r != -EINTR && r != -EAGAIN) {
      log_error("main loop: %s", g_strerror(-r));
      break;
    }
    while (!stop && io_uring_peek_cqe(&ring, &cqe) == 0) {
      struct loop_op *op = io_uring_cqe_get_data(cqe);
      int res = cqe->res;

      io_uring_cqe_seen(&ring, cqe);
      switch (op->kind) {
      case OP_ACCEPT:
        res = accept_result(op, res);
        if (res >= 0)
          on_accept(op, res);
        break;
      case OP_ACCEPT_CONTROL:
        res = accept_result(op, res);
        if (res >= 0)
          control_start(res);
        break;
      case OP_SIGNAL:
        if (res == (int)sizeof op->si && op->si.ssi_signo != SIGHUP) {
          log_info("received %s, shutting down", strsignal((int)op->si.ssi_signo));
          stop = true;
          continue;
        }
        break;
      case OP_TIMER:
        if (srv.tracking)
          tracking_tick(srv.tracking);
        workers_tick();
        notify_tick();
        break;
      }
      post(&ring, op);
    }
  }
  /* Closing the ring cancels the pending accepts and the timer. */
  io_uring_queue_exit(&ring);
  close(sfd);
  for (size_t i = 0; i < n_ops; i++)
    g_free(ops[i].name);
  return true;
}
