/* Helpers shared by lib/ (declared in cbt/util.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>

#include "cbt/util.h"

int
cbt_fail(char **why, int err, const char *fmt, ...)
{
  if (why && !*why) {
    va_list ap;

    va_start(ap, fmt);
    *why = g_strdup_vprintf(fmt, ap);
    va_end(ap);
  }
  return err;
}

static const char *
file_type(mode_t m)
{
  return S_ISFIFO(m) ? "a FIFO" : S_ISSOCK(m) ? "a socket" : S_ISDIR(m)
         ? "a directory" : S_ISCHR(m) ? "a character device" : S_ISBLK(m)
         ? "a block device" : "not a regular file";
}

int
cbt_open_regular(const char *path, int flags, struct stat *st, char **why)
{
  struct stat buf;
  int fd, fl;

  /* O_NONBLOCK: opening a FIFO for reading waits for a writer. */
  fd = open(path, flags | O_NONBLOCK);
  if (fd < 0)
    return cbt_fail(why, -errno, "%s: %s", path, g_strerror(errno));
  if (!st)
    st = &buf;
  if (fstat(fd, st) < 0) {
    int err = errno;

    close(fd);
    return cbt_fail(why, -err, "%s: stat: %s", path, g_strerror(err));
  }
  if (!S_ISREG(st->st_mode)) {
    close(fd);
    return cbt_fail(why, -EINVAL, "%s: %s, not a regular file", path,
                    file_type(st->st_mode));
  }
  /* Not for a regular file: io_uring would return -EAGAIN where it waits. */
  fl = fcntl(fd, F_GETFL);
  if (fl < 0 || (!(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)) {
    int err = errno;

    close(fd);
    return cbt_fail(why, -err, "%s: fcntl: %s", path, g_strerror(err));
  }
  return fd;
}

bool
cbt_is_zero(const void *buf, size_t len)
{
  static const uint8_t zero[16];
  const uint8_t *p = buf;

  if (len <= 16)
    return memcmp(p, zero, len) == 0;
  return memcmp(p, zero, 16) == 0 && memcmp(p, p + 16, len - 16) == 0;
}

int
cbt_parse_size(const char *s, uint64_t *out)
{
  const char *p = s;
  uint64_t v = 0;
  unsigned shift = 0;

  if (!g_ascii_isdigit(*p))
    return -EINVAL;
  for (; g_ascii_isdigit(*p); p++) {
    uint64_t d = (uint64_t)(*p - '0');

    if (v > UINT64_MAX / 10 || (v == UINT64_MAX / 10 && d > UINT64_MAX % 10))
      return -ERANGE;
    v = v * 10 + d;
  }
  switch (g_ascii_toupper(*p)) {
  case 'K': shift = 10; break;
  case 'M': shift = 20; break;
  case 'G': shift = 30; break;
  case 'T': shift = 40; break;
  default: break;
  }
  if (shift) {
    p++;
    if (*p == 'i')
      p++;
  }
  if (*p == 'B')
    p++;
  if (*p != '\0')
    return -EINVAL;
  if (shift && v > (UINT64_MAX >> shift))
    return -ERANGE;
  *out = v << shift;
  return 0;
}
