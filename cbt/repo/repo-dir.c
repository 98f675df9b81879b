/* The directory backend of a backup repository (repo.c describes the
 * format): DIR/manifest.json, one qcow2 file per backup, DIR/.lock.
 *
 * Ordering across a crash: a backup file is written as NAME.partial,
 * fsynced, renamed to NAME (repo-write.c), and only then listed in the
 * manifest, which is replaced atomically here (write_atomic: temp file,
 * fsync, rename, fsync of the directory).  What a crash leaves is removed
 * by repo_dir_clean_stale under the lock.
 *
 * Locking: backup and prune take an exclusive flock on DIR/.lock and
 * write their pid there (for the "locked by pid N" message); restore and
 * verify take a shared one so that pruning cannot delete files they read;
 * list takes none (the manifest is replaced atomically).  The locks never
 * wait.  A read-only repository is read without a lock.  DIR/.lock must
 * be a regular file: a symbolic link is never followed (it could make us
 * truncate a file outside the repository), and a FIFO or directory there
 * is refused like a damaged backup file.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cbt/fault-inject.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"
#include "repo.h"

void
repo_dir_close(repo *r)
{
  if (r->lock_fd < 0)
    return;
  /* Clear our pid before unlocking so that a conflict with a later
   * shared holder does not name us.  A failure is harmless: a reported
   * pid is checked for liveness first. */
  if (ftruncate(r->lock_fd, 0) < 0)
    cli_debug("%s: cannot clear the lock file: %s", r->dir, g_strerror(errno));
  close(r->lock_fd);
  r->lock_fd = -1;
}

char *
repo_path(const repo *r, const char *file)
{
  return g_build_filename(r->dir, file, NULL);
}

int
repo_open_file(const repo *r, const char *file, GError **error)
{
  g_autofree char *path = repo_path(r, file);
  struct stat st;
  int fd, flags;

  if (r->s3) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "%s: a file of an S3 repository cannot be opened as a local file", path);
    return -1;
  }
  /* The name has no '/' (plain_name), so only the last component could be
   * a link; O_NONBLOCK keeps a FIFO from blocking the open. */
  fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;

    g_set_error(error, CLI_ERROR, err == ELOOP ? CLI_EXIT_DAMAGED : CLI_EXIT_FAILED,
                "%s: %s", path, err == ELOOP
                ? "is a symbolic link (backup files never are; it may lead out of "
                  "the repository)" : g_strerror(err));
    return -1;
  }
  if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: not a regular file", path);
    close(fd);
    return -1;
  }
  flags = fcntl(fd, F_GETFL);
  if (flags >= 0)
    (void)fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

/* --- locking ----------------------------------------------------------- */

static bool
take_lock(repo *r, enum repo_lock lock, GError **error)
{
  g_autofree char *path = repo_path(r, REPO_LOCK_FILE);
  struct stat st;
  int fd;

  if (lock == REPO_LOCK_NONE)
    return true;
  /* Backup and prune write their pid into the lock file, so it must be
   * the repository's own regular file: O_NOFOLLOW refuses a symbolic link
   * (following it would truncate, or create, whatever it points to),
   * O_NONBLOCK keeps a FIFO from blocking the open, and nothing is
   * written before fstat has seen a regular file and the lock is ours. */
  fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0644);
  if (fd < 0 && (errno == ELOOP || errno == EISDIR || errno == ENXIO)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: %s", path,
                errno == ELOOP ? "is a symbolic link (the lock file never is; it may "
                                 "lead out of the repository)"
                : errno == EISDIR ? "a directory, not a regular file"
                : "a socket, not a regular file");
    return false;
  }
  if (fd < 0 && lock == REPO_LOCK_SHARED && (errno == EROFS || errno == EACCES)) {
    /* A read-only repository (backup media mounted ro): nobody can be
     * writing it, so reading needs no lock. */
    cli_debug("%s: %s: reading without a lock", path, g_strerror(errno));
    return true;
  }
  if (fd < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path, g_strerror(errno));
    return false;
  }
  if (fstat(fd, &st) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: stat: %s", path, g_strerror(errno));
    close(fd);
    return false;
  }
  if (!S_ISREG(st.st_mode)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: %s, not a regular file", path,
                S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISCHR(st.st_mode)
                ? "a character device" : S_ISBLK(st.st_mode) ? "a block device"
                : "a special file");
    close(fd);
    return false;
  }
  if (flock(fd, (lock == REPO_LOCK_EXCLUSIVE ? LOCK_EX : LOCK_SH) | LOCK_NB) < 0) {
    int err = errno;
    char buf[32] = "";
    ssize_t n;
    long holder = 0;

    if (err != EWOULDBLOCK) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: flock: %s", path,
                  g_strerror(err));
      close(fd);
      return false;
    }
    n = pread(fd, buf, sizeof buf - 1, 0);
    close(fd);
    if (n > 0) {
      buf[n] = '\0';
      holder = strtol(buf, NULL, 10);
    }
    if (holder > 0 && kill((pid_t)holder, 0) == 0)
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                  "repository %s is locked by pid %ld (another backup is running)",
                  r->dir, holder);
    else
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                  "repository %s is locked by another process "
                  "(a backup, restore, verify or prune is running)", r->dir);
    return false;
  }
  if (lock == REPO_LOCK_EXCLUSIVE) {
    g_autofree char *pid = g_strdup_printf("%ld\n", (long)getpid());

    if (ftruncate(fd, 0) < 0 || pwrite(fd, pid, strlen(pid), 0) < 0)
      cli_debug("%s: cannot record our pid: %s", path, g_strerror(errno));
  }
  r->lock_fd = fd;
  return true;
}

/* --- the manifest ------------------------------------------------------ */

/* Read the manifest at @path into *@text (NUL-terminated), *@len bytes.
 * It must be a regular file (a FIFO would block the read) of at most
 * REPO_MANIFEST_MAX bytes (checked before reading).  -ENOENT quietly, any other
 * failure with @error set. */
static int
read_manifest(const char *path, char **text, gsize *len, GError **error)
{
  g_autofree char *why = NULL;
  g_autofree char *buf = NULL;
  struct stat st;
  size_t got = 0;
  int fd, r = 0;

  fd = cbt_open_regular(path, O_RDONLY | O_CLOEXEC, &st, &why);
  if (fd == -ENOENT)
    return fd;
  if (fd < 0) {
    g_set_error(error, CLI_ERROR, fd == -EINVAL ? CLI_EXIT_DAMAGED : CLI_EXIT_FAILED,
                "%s", why);
    return fd;
  }
  if ((uint64_t)st.st_size > REPO_MANIFEST_MAX) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: larger than %u MiB", path,
                REPO_MANIFEST_MAX >> 20);
    close(fd);
    return -EFBIG;
  }
  /* Up to one byte past the limit, in case it grows while we read. */
  buf = g_malloc((size_t)st.st_size + 2);
  while (got < (size_t)st.st_size + 1) {
    ssize_t n = read(fd, buf + got, (size_t)st.st_size + 1 - got);

    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      r = -errno;
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path, g_strerror(errno));
      break;
    }
    if (n == 0)
      break;
    got += (size_t)n;
  }
  close(fd);
  if (r < 0)
    return r;
  if (got > (size_t)st.st_size) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: changed while it was read", path);
    return -EAGAIN;
  }
  buf[got] = '\0';
  *len = got;
  *text = g_steal_pointer(&buf);
  return 0;
}

static bool
load_manifest(repo *r, bool create, GError **error)
{
  g_autofree char *path = repo_path(r, REPO_MANIFEST);
  g_autofree char *text = NULL;
  gsize len = 0;
  int rc;

  rc = read_manifest(path, &text, &len, error);
  if (rc == -ENOENT) {
    if (create)
      return true;
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "%s: not a backup repository (no " REPO_MANIFEST ")", r->dir);
    return false;
  }
  if (rc < 0)
    return false;
  return repo_parse_manifest(r, text, len, path, error);
}

bool
repo_dir_open(repo *r, const char *dir, enum repo_lock lock, bool create, GError **error)
{
  struct stat st;

  r->dir = g_strdup(dir);
  if (create && g_mkdir_with_parents(dir, 0755) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: cannot create: %s", dir,
                g_strerror(errno));
    return false;
  }
  if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", dir,
                errno && !S_ISDIR(st.st_mode) ? g_strerror(errno) : "not a directory");
    return false;
  }
  /* Lock first, so the manifest we read is the one we may replace. */
  if (!take_lock(r, lock, error) || !load_manifest(r, create, error))
    return false;
  return true;
}

/* --- stale files ------------------------------------------------------- */

bool
repo_dir_clean_stale(repo *r, GError **error)
{
  g_autoptr(GError) err = NULL;
  g_autoptr(GDir) d = NULL;
  const char *name;

  g_assert(r->lock_fd >= 0);
  d = g_dir_open(r->dir, 0, &err);
  if (!d) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s", err->message);
    return false;
  }
  while ((name = g_dir_read_name(d))) {
    g_autofree char *path = NULL;
    const char *why = NULL;
    unsigned seq = 0;

    if (g_str_has_suffix(name, ".qcow2" REPO_PARTIAL_SUFFIX)) {
      why = "left by a backup that did not finish";
    } else if (g_str_has_prefix(name, REPO_MANIFEST ".") && strlen(name) ==
               strlen(REPO_MANIFEST) + 7) {
      why = "manifest temp file left by an interrupted update";
    } else if (g_str_has_suffix(name, ".qcow2") && sscanf(name, "%6u-", &seq) == 1 &&
               !repo_listed(r, name)) {
      why = repo_stale_reason(r, seq);
    }
    if (!why)
      continue;
    path = repo_path(r, name);
    if (unlink(path) < 0 && errno != ENOENT) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: cannot remove: %s", path,
                  g_strerror(errno));
      return false;
    }
    cli_note("%s: removed (%s)", path, why);
  }
  return true;
}

/* --- writing ----------------------------------------------------------- */

static bool
fsync_dir(const char *dir, GError **error)
{
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int r;

  if (fd < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", dir, g_strerror(errno));
    return false;
  }
  cbt_fi_tag_fd(fd, CBT_FI_MANIFEST);  /* tests: this sync is the manifest's */
  r = cbt_io_fsync(fd);
  cbt_fi_untag_fd(fd);
  close(fd);
  if (r < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: fsync: %s", dir, g_strerror(-r));
    return false;
  }
  return true;
}

/* Write @text to @dir/@name atomically: a temp file in the same directory
 * is written and fsynced, renamed over @name, and the directory fsynced, so
 * after a crash @name is either the old or the new content, never a mix.
 * Fails (and @name is unchanged) unless the rename happened; a failure to
 * fsync the directory after it is only a warning. */
static bool
write_atomic(const char *dir, const char *name, const char *text, GError **error)
{
  g_autofree char *path = g_build_filename(dir, name, NULL);
  g_autofree char *tmp = g_strdup_printf("%s.XXXXXX", path);
  size_t len = strlen(text);
  int fd = mkostemp(tmp, O_CLOEXEC);
  int r;

  if (fd < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: cannot create a temp file: %s",
                path, g_strerror(errno));
    return false;
  }
  if (fchmod(fd, 0644) < 0)
    cli_debug("%s: fchmod: %s", tmp, g_strerror(errno));
  cbt_fi_tag_fd(fd, CBT_FI_MANIFEST);  /* tests: may fail its I/O */
  r = cbt_io_pwrite(fd, text, len, 0);
  if (r == 0)
    r = cbt_io_fsync(fd);
  close(fd);
  if (r < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: writing: %s", tmp, g_strerror(-r));
    unlink(tmp);
    return false;
  }
  if (rename(tmp, path) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: rename to %s: %s", tmp, path,
                g_strerror(errno));
    unlink(tmp);
    return false;
  }
  /* Readers see the new content from here on, so this is no failure to
   * undo (a caller that did would remove what the new content lists):
   * only a crash may still bring the old content back, which every
   * reader of @name has to survive anyway. */
  {
    g_autoptr(GError) err = NULL;

    if (!fsync_dir(dir, &err))
      cli_error("warning: %s: %s is replaced but may not survive a crash", err->message,
                path);
  }
  return true;
}

bool
repo_dir_put_manifest(repo *r, const char *text, GError **error)
{
  g_assert(r->lock_fd >= 0);
  return write_atomic(r->dir, REPO_MANIFEST, text, error);
}

bool
repo_dir_delete_file(repo *r, const char *file, GError **error)
{
  g_autofree char *path = repo_path(r, file);

  if (unlink(path) < 0 && errno != ENOENT) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: cannot remove: %s", path,
                g_strerror(errno));
    return false;
  }
  return true;
}

/* No lock object to lose: flock holds while the descriptor is open. */
static bool
dir_lock_check(repo *r, GError **error)
{
  (void)r;
  (void)error;
  return true;
}

const struct repo_backend repo_dir_backend = {
  .name = "directory",
  .open = repo_dir_open,
  .close = repo_dir_close,
  .put_manifest = repo_dir_put_manifest,
  .clean_stale = repo_dir_clean_stale,
  .lock_check = dir_lock_check,
  .delete_file = repo_dir_delete_file,
};
