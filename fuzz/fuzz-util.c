/* Helpers shared by the fuzz targets: the private directory (see
 * fuzz-util.h).  The directory is removed by an atexit handler, so a
 * clean libFuzzer exit (-max_total_time, -runs) leaves nothing behind; a
 * crash leaves it for inspection (its name says which target made it). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

#include "fuzz-util.h"

static char *dir;

void
fuzz_clear_dir(void)
{
  g_autoptr(GDir) d = NULL;
  const char *e;

  if (!dir || !(d = g_dir_open(dir, 0, NULL)))
    return;
  while ((e = g_dir_read_name(d))) {
    g_autofree char *p = g_build_filename(dir, e, NULL);
    g_remove(p);
  }
}

static void
remove_dir(void)
{
  fuzz_clear_dir();
  if (dir)
    g_rmdir(dir);
}

const char *
fuzz_dir(const char *name)
{
  g_autofree char *tmpl = NULL;
  const char *base;

  if (dir)
    return dir;
  base = g_file_test("/dev/shm", G_FILE_TEST_IS_DIR) && access("/dev/shm", W_OK) == 0
             ? "/dev/shm" : g_get_tmp_dir();
  tmpl = g_strdup_printf("%s/cbt-fuzz-%s.XXXXXX", base, name);
  if (!g_mkdtemp(tmpl)) {
    fprintf(stderr, "fuzz: cannot create %s: %s\n", tmpl, g_strerror(errno));
    abort();
  }
  dir = g_steal_pointer(&tmpl);
  atexit(remove_dir);
  return dir;
}

char *
fuzz_path(const char *file)
{
  return g_build_filename(dir, file, NULL);
}

void
fuzz_write_file(const char *path, const void *data, size_t len)
{
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  size_t done = 0;

  if (fd < 0) {
    fprintf(stderr, "fuzz: %s: %s\n", path, g_strerror(errno));
    abort();
  }
  while (done < len) {
    ssize_t n = write(fd, (const char *)data + done, len - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      fprintf(stderr, "fuzz: %s: write: %s\n", path, g_strerror(errno));
      abort();
    }
    done += (size_t)n;
  }
  close(fd);
}
