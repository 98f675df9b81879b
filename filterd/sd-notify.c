/* Readiness and status for a service manager (systemd's sd_notify
 * protocol, spoken without libsystemd).
 *
 * Under Type=notify, systemd sets NOTIFY_SOCKET to an AF_UNIX datagram
 * socket, a path or an abstract name written with a leading '@', and
 * counts the service as started only when "READY=1" arrives on it.  Each
 * message is one datagram of newline-separated VAR=value lines.  We send:
 *
 *   READY=1, STATUS=serving ...   when the daemon serves: image and bitmap
 *                                 open, every socket listening, workers
 *                                 running (the moment the pid file is
 *                                 written); clients that connected earlier
 *                                 waited in the backlog and are served now
 *   STATUS=serving IMAGE, N clients[, checkpoint in progress]
 *                                 whenever that line changes (looked at once
 *                                 a second from the main loop)
 *   STOPPING=1, STATUS=stopping   when SIGTERM/SIGINT begins the orderly stop
 *   STATUS=failed: REASON         when start-up fails
 *
 * Sends never block (the main loop calls us) and a failed one is logged
 * once, then ignored: the daemon serves whether anyone listens or not.
 * NOTIFY_SOCKET is read once and unset, so nothing we start inherits it.
 * Without NOTIFY_SOCKET every call is a no-op.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

static int notify_fd = -1;
static struct sockaddr_un notify_addr;
static socklen_t notify_addrlen;
static char last_status[512];

void
notify_init(void)
{
  const char *e = g_getenv("NOTIFY_SOCKET");
  size_t n;

  if (!e)
    return;
  n = strlen(e);
  if ((e[0] != '/' && e[0] != '@') || n < 2 || n >= sizeof notify_addr.sun_path) {
    log_error("NOTIFY_SOCKET=%s: not a unix socket path or @abstract name; "
              "the service manager will not hear from us", e);
    g_unsetenv("NOTIFY_SOCKET");
    return;
  }
  notify_addr.sun_family = AF_UNIX;
  memcpy(notify_addr.sun_path, e, n);
  /* An abstract name is the bytes after a NUL, exactly n of them; a path
   * is NUL-terminated. */
  if (e[0] == '@')
    notify_addr.sun_path[0] = '\0';
  notify_addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n +
                               (e[0] == '@' ? 0 : 1));
  g_unsetenv("NOTIFY_SOCKET");
  notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (notify_fd < 0)
    log_error("NOTIFY_SOCKET: socket: %s; the service manager will not hear from us",
              g_strerror(errno));
}

void
notify_send(const char *fmt, ...)
{
  static bool warned;
  char msg[1024];
  va_list ap;
  int len;

  if (notify_fd < 0)
    return;
  va_start(ap, fmt);
  len = vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (len < 0)
    return;
  if ((size_t)len >= sizeof msg)
    len = sizeof msg - 1;        /* a long STATUS is cut, never dropped */
  if (sendto(notify_fd, msg, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL,
             (const struct sockaddr *)&notify_addr, notify_addrlen) < 0 && !warned) {
    warned = true;
    log_error("NOTIFY_SOCKET: cannot notify the service manager: %s", g_strerror(errno));
  }
}

/* The STATUS line for now: what an admin sees in `systemctl status`. */
static void
current_status(char *buf, size_t len)
{
  unsigned clients = handshake_count() + workers_conn_count();
  struct meta_context frozen;
  bool cp = srv.tracking && tracking_meta_list(srv.tracking, &frozen, 1, true) > 0;

  snprintf(buf, len, "serving %s, %u client%s%s", srv.image_path, clients,
           clients == 1 ? "" : "s", cp ? ", checkpoint in progress" : "");
}

void
notify_ready(void)
{
  if (notify_fd < 0)
    return;
  current_status(last_status, sizeof last_status);
  notify_send("READY=1\nSTATUS=%s", last_status);
}

void
notify_tick(void)
{
  char status[sizeof last_status];

  if (notify_fd < 0)
    return;
  current_status(status, sizeof status);
  if (strcmp(status, last_status) == 0)
    return;
  memcpy(last_status, status, sizeof status);
  notify_send("STATUS=%s", status);
}
