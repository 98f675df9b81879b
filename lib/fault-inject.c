/* Fault injection: a simulated power cut for one file (tests only; built
 * with meson -Dfault_injection=true).
 *
 * A process killed with SIGKILL keeps the page cache, so a missing
 * fdatasync never shows in a kill -9 test.  Here every write to the file
 * named by CBT_FI_POWERCUT_FILE first saves the bytes it overwrites; a
 * completed fdatasync (or fsync) of the file forgets them, since what it
 * covered is durable.  When the write numbered CBT_FI_POWERCUT_AT (1 =
 * the first write to the file) is about to happen, the "power fails":
 * every write since the last completed fdatasync is undone, newest first,
 * and the process kills itself with SIGKILL.  That is the worst a power
 * cut may leave of the file -- no write that was not followed by a
 * completed fdatasync reached the disk -- while all other files keep what
 * the process wrote (the most a power cut can leave of data whose bits
 * were lost).  A line on stderr says where the cut happened.
 *
 * Writes to the target file are serialised here (a mutex held from
 * cbt_fi_write_begin to cbt_fi_write_end) so a cut never races a write.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>

#include "fault-inject.h"

struct undo {
  uint64_t offset;
  size_t len;
  uint8_t *old;
};

static GMutex lock;
static bool inited, enabled;
static dev_t target_dev;
static ino_t target_ino;
static uint64_t cut_at, writes;
static GArray *journal;             /* struct undo, oldest first */

static void
init(void)
{
  const char *path = getenv("CBT_FI_POWERCUT_FILE");
  const char *at = getenv("CBT_FI_POWERCUT_AT");
  struct stat st;

  inited = true;
  if (!path || !at || stat(path, &st) < 0)
    return;
  target_dev = st.st_dev;
  target_ino = st.st_ino;
  cut_at = g_ascii_strtoull(at, NULL, 10);
  enabled = cut_at > 0;
  journal = g_array_new(FALSE, FALSE, sizeof(struct undo));
}

/* Is @fd the target file?  Under lock. */
static bool
is_target(int fd)
{
  struct stat st;

  if (!inited)
    init();
  return enabled && fstat(fd, &st) == 0 && st.st_dev == target_dev &&
         st.st_ino == target_ino;
}

static void
forget(void)
{
  for (guint i = 0; i < journal->len; i++)
    g_free(g_array_index(journal, struct undo, i).old);
  g_array_set_size(journal, 0);
}

static void
power_cut(int fd)
{
  guint n = journal->len;

  for (guint i = n; i-- > 0;) {
    struct undo *u = &g_array_index(journal, struct undo, i);
    if (pwrite(fd, u->old, u->len, (off_t)u->offset) != (ssize_t)u->len)
      fprintf(stderr, "cbt fault injection: undoing a write failed: %s\n",
              g_strerror(errno));
  }
  fprintf(stderr, "cbt fault injection: power cut before write %" G_GUINT64_FORMAT
          " of the bitmap file; %u unsynced writes undone\n", writes, n);
  fflush(stderr);
  kill(getpid(), SIGKILL);
  _exit(137);
}

bool
cbt_fi_write_begin(int fd, uint64_t offset, size_t len)
{
  struct undo u;
  ssize_t r;

  g_mutex_lock(&lock);
  if (!is_target(fd)) {
    g_mutex_unlock(&lock);
    return false;
  }
  if (++writes == cut_at)
    power_cut(fd);
  u.offset = offset;
  u.len = len;
  u.old = g_malloc0(len);            /* past the end of the file: zeros */
  r = pread(fd, u.old, len, (off_t)offset);
  (void)r;
  g_array_append_val(journal, u);
  return true;                       /* unlocked in cbt_fi_write_end */
}

void
cbt_fi_write_end(void)
{
  g_mutex_unlock(&lock);
}

void
cbt_fi_synced(int fd, int r)
{
  g_mutex_lock(&lock);
  if (r == 0 && is_target(fd))
    forget();
  g_mutex_unlock(&lock);
}
