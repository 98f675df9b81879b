/* Socket activation: listening sockets inherited from a service manager
 * (systemd's sd_listen_fds protocol, read without libsystemd).
 *
 * The manager binds and listens itself, then starts us with the sockets
 * as descriptors 3, 4, ... and three variables: LISTEN_PID (our pid: the
 * variables are meant for this process, not left over from a parent),
 * LISTEN_FDS (how many descriptors) and LISTEN_FDNAMES (their names,
 * colon-separated: FileDescriptorName= in a .socket unit, --fdname of
 * systemd-socket-activate).  The names say what each socket is for:
 *
 *   nbd, nbd-tcp   an NBD listener (unix or TCP: the socket says which)
 *   control        the control socket (unix only: it has no
 *                  authentication of its own)
 *
 * Without LISTEN_FDNAMES every descriptor is an NBD listener.  Any other
 * name, a descriptor that is not a listening stream socket, or a second
 * control socket stops the start-up with a message naming it: a unit
 * that passes the wrong sockets must fail loudly, not serve the wrong
 * thing.
 *
 * The variables are unset (nothing we start must take them as its own)
 * and the descriptors marked close-on-exec.  The sockets stay the
 * manager's: the daemon never creates, chmods or unlinks their paths, and
 * connections that arrive while it is not running (before the first start
 * or during a restart) wait in the socket's backlog for the next one.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define SD_LISTEN_FDS_START 3
#define MAX_INHERITED 16

/* Is @fd a listening stream socket?  Its family goes to @family. */
static bool
check_listener(int fd, const char *name, int *family, GError **error)
{
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  struct stat st;
  int type = 0, acc = 0;
  socklen_t ol = sizeof type, al = sizeof acc;

  if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode) ||
      getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &ol) < 0 ||
      getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) < 0 ||
      getsockname(fd, (struct sockaddr *)&ss, &len) < 0) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "socket activation: descriptor %d (%s) is not a socket", fd, name);
    return false;
  }
  if (type != SOCK_STREAM || !acc) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "socket activation: descriptor %d (%s) is not a listening stream "
                "socket (ListenStream=, not Accept=yes)", fd, name);
    return false;
  }
  if (ss.ss_family != AF_UNIX && ss.ss_family != AF_INET && ss.ss_family != AF_INET6) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "socket activation: descriptor %d (%s) is neither a unix nor a TCP socket",
                fd, name);
    return false;
  }
  *family = ss.ss_family;
  return true;
}

/* LISTEN_FDS as a count, or -1 (set in @error) if malformed. */
static int
parse_count(const char *s, GError **error)
{
  char *end;
  long n;

  errno = 0;
  n = strtol(s, &end, 10);
  if (errno || end == s || *end || n < 0 || n > MAX_INHERITED) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "socket activation: LISTEN_FDS=%s: expected 0 to %d descriptors",
                s, MAX_INHERITED);
    return -1;
  }
  return (int)n;
}

bool
activation_take(struct activation *a, GError **error)
{
  g_autofree char *pid_s = g_strdup(g_getenv("LISTEN_PID"));
  g_autofree char *fds_s = g_strdup(g_getenv("LISTEN_FDS"));
  g_autofree char *names_s = g_strdup(g_getenv("LISTEN_FDNAMES"));
  g_auto(GStrv) names = NULL;
  int n;

  memset(a, 0, sizeof *a);
  a->control = -1;
  /* Whatever they say, no child of ours may take them for its own. */
  g_unsetenv("LISTEN_PID");
  g_unsetenv("LISTEN_FDS");
  g_unsetenv("LISTEN_FDNAMES");
  if (!pid_s || !fds_s)
    return true;
  if (strtol(pid_s, NULL, 10) != (long)getpid())
    return true;                 /* meant for another process */
  n = parse_count(fds_s, error);
  if (n < 0)
    return false;
  if (names_s && *names_s) {
    names = g_strsplit(names_s, ":", -1);
    if (g_strv_length(names) != (guint)n) {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                  "socket activation: LISTEN_FDNAMES=%s names %u descriptors, "
                  "LISTEN_FDS=%d", names_s, g_strv_length(names), n);
      return false;
    }
  }
  for (int i = 0; i < n; i++) {
    int fd = SD_LISTEN_FDS_START + i;
    const char *name = names ? names[i] : "nbd";
    int family;

    if (!check_listener(fd, name, &family, error))
      return false;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) {
      g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                  "socket activation: descriptor %d: %s", fd, g_strerror(errno));
      return false;
    }
    if (strcmp(name, "nbd") == 0 || strcmp(name, "nbd-tcp") == 0) {
      if (a->n_nbd == MAX_LISTEN) {
        g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "socket activation: more than %d NBD sockets", MAX_LISTEN);
        return false;
      }
      a->nbd[a->n_nbd++] = fd;
    } else if (strcmp(name, "control") == 0) {
      if (a->control >= 0 || family != AF_UNIX) {
        g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "socket activation: descriptor %d: %s", fd,
                    a->control >= 0 ? "a second control socket"
                                    : "the control socket must be a unix socket");
        return false;
      }
      a->control = fd;
    } else {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                  "socket activation: descriptor %d is named '%s'; expected nbd, "
                  "nbd-tcp or control (FileDescriptorName= in the .socket unit)",
                  fd, name);
      return false;
    }
  }
  return true;
}
