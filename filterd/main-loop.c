/* The main thread's loop: accepts connections, handles signals and runs
 * periodic work, on a small io_uring of its own.
 *
 * Nothing here touches the data path.  Accepted sockets go to
 * handshake_start() unless --max-clients are connected already (then the
 * newest is closed and logged), control clients to control_start(); SIGTERM/SIGINT (read from a signalfd, the signals
 * being blocked in every thread) end the loop; a timer fires once a second
 * for periodic jobs (writing the dirty bitmap out).
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

enum op_kind { OP_ACCEPT, OP_ACCEPT_CONTROL, OP_SIGNAL, OP_TIMER };

struct loop_op {
  enum op_kind kind;
  int fd;
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

static void
on_accept(struct loop_op *op, int res)
{
  char peer[64];

  if (res < 0) {
    if (res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM) {
      log_error("accept: %s; pausing", g_strerror(-res));
      g_usleep(100 * 1000);
    } else if (res != -EINTR && res != -EAGAIN && res != -ECONNABORTED) {
      log_error("accept: %s", g_strerror(-res));
    }
    return;
  }
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
    post(&ring, &ops[n_ops++]);
  }
  if (control_fd >= 0) {
    ops[n_ops].kind = OP_ACCEPT_CONTROL;
    ops[n_ops].fd = control_fd;
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
        on_accept(op, res);
        break;
      case OP_ACCEPT_CONTROL:
        if (res >= 0)
          control_start(res);
        else if (res != -EINTR && res != -EAGAIN && res != -ECONNABORTED)
          log_error("control: accept: %s", g_strerror(-res));
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
  return true;
}
