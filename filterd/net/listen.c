/* Listening sockets: a unix socket at a path, or TCP on HOST:PORT.
 *
 * A unix socket path that already exists is only replaced when nothing
 * answers on it (a stale socket left by a crash); a live socket means
 * another daemon serves it and we refuse to start.  A daemon killed with
 * SIGKILL leaves its listening socket accepting for a few milliseconds
 * more (the kernel tears its io_uring down asynchronously, and pending
 * accepts hold the socket), so "live" must stay true for LIVE_GRACE
 * before we believe it: a supervisor restarting at once must succeed.
 *
 * A unix socket gets its mode (--socket-mode, default 0600: the daemon's
 * user only) and group (--socket-group) between bind() and listen(), so
 * no client can connect while the permissions are still the umask's.
 * Sockets inherited from a service manager (sd-activation.c) are made
 * there and never touched here.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

#define BACKLOG 128
#define LIVE_GRACE_MS 2000
#define LIVE_POLL_MS  20

static bool
socket_is_live(const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  bool live;

  if (fd < 0)
    return false;
  g_strlcpy(sun.sun_path, path, sizeof sun.sun_path);
  live = connect(fd, (struct sockaddr *)&sun, sizeof sun) == 0;
  close(fd);
  return live;
}

int
listen_unix(const char *path, mode_t mode, gid_t gid, GError **error)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct stat st;
  int fd;

  if (strlen(path) >= sizeof sun.sun_path) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_NAMETOOLONG,
                "%s: socket path too long (max %zu bytes)", path,
                sizeof sun.sun_path - 1);
    return -1;
  }
  if (lstat(path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                  "%s: exists and is not a socket", path);
      return -1;
    }
    bool live = socket_is_live(path);
    for (int waited = 0; live && waited < LIVE_GRACE_MS; waited += LIVE_POLL_MS) {
      g_usleep(LIVE_POLL_MS * 1000);
      live = socket_is_live(path);
    }
    if (live) {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                  "%s: socket is in use by another server", path);
      return -1;
    }
    unlink(path);                /* stale, from a crashed daemon */
  }
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                "socket: %s", g_strerror(errno));
    return -1;
  }
  memcpy(sun.sun_path, path, strlen(path) + 1);
  if (bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
    int e = errno;
    close(fd);
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(e),
                "%s: cannot listen: %s", path, g_strerror(e));
    return -1;
  }
  /* Bound but not listening: a connect() is refused until the mode and
   * group are right.  lchown: never follow a link put in the socket's
   * place. */
  if (gid != (gid_t)-1 && lchown(path, (uid_t)-1, gid) < 0) {
    int e = errno;
    close(fd);
    unlink(path);
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(e),
                "%s: cannot give the socket to group %u (--socket-group): %s",
                path, (unsigned)gid, g_strerror(e));
    return -1;
  }
  if (chmod(path, mode) < 0 || listen(fd, BACKLOG) < 0) {
    int e = errno;
    close(fd);
    unlink(path);
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(e),
                "%s: cannot listen: %s", path, g_strerror(e));
    return -1;
  }
  return fd;
}

int
listen_tcp(const char *hostport, GError **error)
{
  g_autofree char *host = NULL;
  const char *colon = strrchr(hostport, ':');
  const char *port;
  struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_PASSIVE };
  struct addrinfo *res = NULL;
  int fd = -1, r, e = 0;

  if (!colon || colon[1] == '\0') {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--listen %s: expected HOST:PORT", hostport);
    return -1;
  }
  port = colon + 1;
  host = g_strndup(hostport, (gsize)(colon - hostport));
  /* [::1]:10809 */
  if (host[0] == '[' && host[strlen(host) - 1] == ']') {
    memmove(host, host + 1, strlen(host));
    host[strlen(host) - 1] = '\0';
  }
  r = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
  if (r != 0) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--listen %s: %s", hostport, gai_strerror(r));
    return -1;
  }
  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    int one = 1;
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      e = errno;
      continue;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, BACKLOG) == 0)
      break;
    e = errno;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0)
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(e),
                "--listen %s: cannot listen: %s", hostport, g_strerror(e));
  return fd;
}

char *
listen_describe(int fd)
{
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  char host[INET6_ADDRSTRLEN] = "?";

  memset(&ss, 0, sizeof ss);
  if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
    return g_strdup_printf("descriptor %d", fd);
  if (ss.ss_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)&ss;
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    return g_strdup_printf("%s:%u", host, ntohs(a->sin_port));
  }
  if (ss.ss_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    return g_strdup_printf("[%s]:%u", host, ntohs(a->sin6_port));
  }
  if (ss.ss_family == AF_UNIX) {
    const struct sockaddr_un *a = (const struct sockaddr_un *)&ss;
    size_t n = len > offsetof(struct sockaddr_un, sun_path) ?
               len - offsetof(struct sockaddr_un, sun_path) : 0;
    if (n == 0)
      return g_strdup("unix:(unnamed)");
    if (a->sun_path[0] == '\0')       /* abstract: @name */
      return g_strdup_printf("unix:@%.*s", (int)(n - 1), a->sun_path + 1);
    return g_strdup_printf("unix:%.*s", (int)strnlen(a->sun_path, n), a->sun_path);
  }
  return g_strdup_printf("descriptor %d", fd);
}

bool
listen_is_tcp(int fd)
{
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;

  return getsockname(fd, (struct sockaddr *)&ss, &len) == 0 &&
         (ss.ss_family == AF_INET || ss.ss_family == AF_INET6);
}
