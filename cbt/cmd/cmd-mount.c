/* cbt mount / cbt umount: one backup point as a read-only file, through
 * FUSE, so that a file can be copied out of a backup without restoring
 * the whole disk (loop-mount the image, or point qemu-img or guestfish at
 * it).
 *
 *   MOUNTPOINT/            directory, 0555
 *   MOUNTPOINT/disk.raw    the disk as of the backup, 0400 (0440 with
 *                          --group: its members may read it too), its
 *                          size the manifest's image size, its mtime the
 *                          backup's
 *
 * FUSE (libfuse3) is the field's standard for this: qemu-storage-daemon
 * exports images through it, nbdfuse and virtnbdbackup's mapping do the
 * same.  We use its high-level API: the file system is two fixed names.
 *
 * Who may read.  The backup files are 0600: the mounted disk is no more
 * open than they are.  Without --allow-other only the mounting user can
 * enter the mount at all (FUSE's rule); with it the kernel checks the
 * modes above (default_permissions), so other users still cannot read
 * disk.raw unless --group names a group of theirs.
 *
 * Reads.  The chain is mapped once (chain-map.c: the manifest's chain,
 * every file's L1 and L2 tables, validated) and reads go through
 * chain-read.c, which serves whole 4 MiB blocks of the chain's files from
 * a cache (ranged GETs on S3, with readahead for readers going forward)
 * and checks every chunk against the manifest's checksum the first time
 * a read needs it, as cbt restore checks what it restores: a chunk that
 * does not match fails the reads that need it with EIO, and the log
 * names the file and the chunk's byte range (private mounts answer
 * EBADMSG instead, which tells cbt-filterd the backup is damaged: see
 * below).  libfuse's multi-threaded loop calls read() on up to
 * MAX_THREADS threads at once; libfuse accepts requests of up to 1 MiB
 * (the kernel's FUSE_MAX_PAGES), the kernel's read-ahead sends several
 * at once to our threads, kernel_cache keeps what was read in the page
 * cache across opens (the file never changes while mounted; a private
 * mount uses direct I/O instead: see mnt_open), and
 * lseek(SEEK_DATA / SEEK_HOLE) answers from the map, so sparse-aware
 * readers (qemu-img's raw driver, cp --sparse) skip what reads as zeros.
 *
 * On S3 (--repo s3://...) nothing is locked (readers take no lock
 * object); an object that disappears or changes while mounted fails the
 * reads of it with EIO, and the log names it.  disk.raw has a fixed
 * inode number that names the point's top file (chain_reader_ident: a
 * directory file's own inode number, else a hash of the object's name
 * and ETag), by which cbt restore --instant recognises the same backup
 * when it resumes.
 *
 * Private mounts.  cbt serve and cbt restore --instant hand cbt-filterd
 * MOUNTPOINT/disk.raw of a private mount (mount_private below) as a raw
 * image rather than the repository's qcow2 files, so that what the
 * daemon serves or restores is checked as above.  Its damage errno is
 * EBADMSG, which the daemon's instant restore takes as "the backup is
 * damaged" (filterd/restore.c: it stops with exit status 4; cbt serve's
 * daemon answers the NBD read with EIO as for any other error).
 *
 * Lifetime.  The repository is locked shared for as long as the file
 * system is mounted, so that pruning cannot remove a file of the chain.
 * cbt mount stays in the foreground until the file system is unmounted
 * (cbt umount, fusermount3 -u) or SIGTERM/SIGINT/SIGHUP arrives (libfuse's
 * handlers end the loop; we then unmount), and only then closes the chain
 * and drops the lock.  --daemon forks before anything is opened (the
 * chain's metadata threads do not survive a fork); the parent waits until
 * the child has mounted, or failed, and exits with its status.
 *
 * cbt umount finds the serving process through the xattr user.cbt.pid of
 * the mount's root, unmounts with fusermount3 -u (umount2 for root when
 * fusermount3 is missing) and waits on a pidfd until that process has
 * exited, so that the repository lock is free when cbt umount returns.
 */
#define FUSE_USE_VERSION 312

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <fuse.h>
#include <grp.h>

#include "cbt/uring-io.h"
#include "cbt/util.h"
#include "cli.h"

#define DISK_NAME      "disk.raw"
#define DISK_PATH      "/" DISK_NAME
#define MAX_THREADS    16
#define RING_ENTRIES   16
#define IO_BLKSIZE     (1u << 20)       /* st_blksize: readers' buffer size */
#define CACHE_SECONDS  86400.0          /* nothing changes while mounted */
#define UMOUNT_WAIT_MS 60000            /* for the server to exit */

#define XATTR_PID      "user.cbt.pid"
#define XATTR_REPO     "user.cbt.repo"
#define XATTR_BACKUP   "user.cbt.backup"

/* What the file system serves; read-only after mounting, so the FUSE
 * threads share it without a lock (the counters are atomic). */
struct mnt {
  chain_reader *cr;
  uint64_t ino;                   /* disk.raw's inode number */
  uint64_t size;                  /* the manifest's exact image size */
  uint64_t blocks;                /* st_blocks: an upper bound, see below */
  time_t mtime;
  uid_t uid;
  gid_t gid;
  mode_t mode;                    /* disk.raw's permissions */
  int damage_errno;               /* for a chunk that fails its checksum */
  bool private_mount;             /* for cbt-filterd: see mnt_open */
  char *repo_dir;                 /* absolute */
  char *file;
  char pid[24];
  atomic_uint_fast64_t reads, bytes, errors;
};

/* --- reading ------------------------------------------------------------ */

/* The lib's per-thread ring (cbt/uring-io.h: a directory repository's
 * files are read through it) is freed when a FUSE thread ends. */
static void
thread_io_free(gpointer p)
{
  (void)p;
  cbt_io_thread_cleanup();
}

static GPrivate thread_io = G_PRIVATE_INIT(thread_io_free);

/* Read [@off, @off + @len) of the disk into @buf; 0 or -errno (logged:
 * the first 100 failures). */
static int
disk_read(struct mnt *m, void *buf, uint64_t len, uint64_t off)
{
  g_autoptr(GError) err = NULL;

  if (!g_private_get(&thread_io))
    g_private_set(&thread_io, GINT_TO_POINTER(1));
  if (chain_reader_read(m->cr, buf, len, off, &err))
    return 0;
  if (atomic_fetch_add(&m->errors, 1) < 100)
    cli_error("%s: reading guest bytes %" PRIu64 "..%" PRIu64 ": %s", m->file, off,
              off + len - 1, err->message);
  return g_error_matches(err, CLI_ERROR, CLI_EXIT_DAMAGED) ? -m->damage_errno : -EIO;
}

/* --- the file system ---------------------------------------------------- */

static struct mnt *
mnt_get(void)
{
  return fuse_get_context()->private_data;
}

static void *
mnt_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
  /* The image is immutable while mounted: cache data across opens and
   * attributes for long. */
  cfg->kernel_cache = 1;
  cfg->entry_timeout = CACHE_SECONDS;
  cfg->attr_timeout = CACHE_SECONDS;
  cfg->negative_timeout = CACHE_SECONDS;
  cfg->use_ino = 1;
  /* Read-ahead requests are "background" requests: let the kernel keep
   * one in flight per thread. */
  conn->max_background = MAX_THREADS;
  conn->congestion_threshold = MAX_THREADS * 3 / 4;
  return mnt_get();
}

static int
mnt_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
  const struct mnt *m = mnt_get();

  (void)fi;
  memset(st, 0, sizeof *st);
  st->st_uid = m->uid;
  st->st_gid = m->gid;
  st->st_atime = st->st_mtime = st->st_ctime = m->mtime;
  if (strcmp(path, "/") == 0) {
    st->st_mode = S_IFDIR | 0555;
    st->st_nlink = 2;
    st->st_ino = 1;
    return 0;
  }
  if (strcmp(path, DISK_PATH) == 0) {
    st->st_mode = S_IFREG | m->mode;
    st->st_nlink = 1;
    st->st_ino = (ino_t)m->ino;
    st->st_size = (off_t)m->size;
    st->st_blocks = (blkcnt_t)m->blocks;
    st->st_blksize = IO_BLKSIZE;
    return 0;
  }
  return -ENOENT;
}

static int
mnt_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t off,
            struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
  (void)off;
  (void)fi;
  (void)flags;
  if (strcmp(path, "/") != 0)
    return -ENOTDIR;
  filler(buf, ".", NULL, 0, 0);
  filler(buf, "..", NULL, 0, 0);
  filler(buf, DISK_NAME, NULL, 0, 0);
  return 0;
}

static int
mnt_open(const char *path, struct fuse_file_info *fi)
{
  if (strcmp(path, DISK_PATH) != 0)
    return strcmp(path, "/") == 0 ? -EISDIR : -ENOENT;
  if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC))
    return -EROFS;
  /* cbt-filterd reads a private mount's disk.raw in requests of up to
   * 1 MiB, mostly once each (the instant restore's copier); through the
   * page cache they would reach us as 128 KiB readahead requests one
   * after another (8192 for 1 GiB against 1024 direct), and the
   * repository's files are in the page cache anyway. */
  if (mnt_get()->private_mount)
    fi->direct_io = 1;
  else
    fi->keep_cache = 1;
  return 0;
}

static int
mnt_read(const char *path, char *buf, size_t size, off_t off,
         struct fuse_file_info *fi)
{
  struct mnt *m = mnt_get();
  uint64_t len;
  int r;

  (void)path;
  (void)fi;
  if (off < 0)
    return -EINVAL;
  if ((uint64_t)off >= m->size || size == 0)
    return 0;
  len = MIN((uint64_t)size, m->size - (uint64_t)off);
  r = disk_read(m, buf, len, (uint64_t)off);
  atomic_fetch_add(&m->reads, 1);
  if (r < 0)
    return r;                     /* the reader gets it; the log names it */
  atomic_fetch_add(&m->bytes, len);
  return (int)len;
}

/* SEEK_DATA / SEEK_HOLE from the chain's block status: ranges that read
 * as zeros (unallocated everywhere, or zero clusters) are holes. */
static off_t
mnt_lseek(const char *path, off_t off, int whence, struct fuse_file_info *fi)
{
  struct mnt *m = mnt_get();
  uint64_t pos;

  (void)path;
  (void)fi;
  if (whence != SEEK_DATA && whence != SEEK_HOLE)
    return -EINVAL;
  if (off < 0 || (uint64_t)off >= m->size)
    return -ENXIO;
  pos = (uint64_t)off;
  while (pos < m->size) {
    uint64_t len;
    bool data = chain_reader_is_data(m->cr, pos, &len);

    if (data == (whence == SEEK_DATA))
      return (off_t)pos;
    if (len == 0)
      return -EIO;
    pos += len;
  }
  /* No data after @off; the end of the file is a hole. */
  return whence == SEEK_HOLE ? (off_t)m->size : -ENXIO;
}

static int
mnt_statfs(const char *path, struct statvfs *st)
{
  const struct mnt *m = mnt_get();

  (void)path;
  memset(st, 0, sizeof *st);
  st->f_bsize = 4096;
  st->f_frsize = 4096;
  st->f_blocks = (m->size + 4095) / 4096;
  st->f_files = 2;
  st->f_namemax = 255;
  return 0;
}

static const char *
xattr_value(const struct mnt *m, const char *name)
{
  if (strcmp(name, XATTR_PID) == 0)
    return m->pid;
  if (strcmp(name, XATTR_REPO) == 0)
    return m->repo_dir;
  if (strcmp(name, XATTR_BACKUP) == 0)
    return m->file;
  return NULL;
}

/* The root carries who serves what, for cbt umount and for people
 * (getfattr -d MOUNTPOINT). */
static int
mnt_getxattr(const char *path, const char *name, char *value, size_t size)
{
  const char *v = strcmp(path, "/") == 0 ? xattr_value(mnt_get(), name) : NULL;
  size_t len;

  if (!v)
    return -ENODATA;
  len = strlen(v);
  if (size == 0)
    return (int)len;
  if (size < len)
    return -ERANGE;
  memcpy(value, v, len);
  return (int)len;
}

static int
mnt_listxattr(const char *path, char *list, size_t size)
{
  static const char names[] = XATTR_PID "\0" XATTR_REPO "\0" XATTR_BACKUP;

  if (strcmp(path, "/") != 0)
    return 0;
  if (size == 0)
    return (int)sizeof names;
  if (size < sizeof names)
    return -ERANGE;
  memcpy(list, names, sizeof names);
  return (int)sizeof names;
}

static const struct fuse_operations mnt_ops = {
  .init = mnt_init,
  .getattr = mnt_getattr,
  .readdir = mnt_readdir,
  .open = mnt_open,
  .read = mnt_read,
  .lseek = mnt_lseek,
  .statfs = mnt_statfs,
  .getxattr = mnt_getxattr,
  .listxattr = mnt_listxattr,
};

/* --- cbt mount ---------------------------------------------------------- */

struct mount_opts {
  const char *repo_dir, *at, *mountpoint;
  bool daemon, allow_other;
  bool has_group;                 /* --group: disk.raw 0440 with group @gid */
  gid_t gid;
  bool private_mount;             /* serve_private: for cbt-filterd */
  bool unlocked;                  /* serve_private: the caller holds the lock */
  int ready_fd;                   /* serve_private: "INO FILE\n" once mounted */
  int life_fd;                    /* serve_private: unmount when it reads EOF */
};

static bool
fuse_available(GError **error)
{
  if (access("/dev/fuse", R_OK | W_OK) < 0) {
    int err = errno;

    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "FUSE is not available: /dev/fuse: %s%s",
                g_strerror(err),
                err == ENOENT ? " (load the fuse kernel module; a container needs "
                                "/dev/fuse passed in)"
                : err == EACCES ? " (this user may not use FUSE; it is usually mode 0666)"
                : "");
    return false;
  }
  /* root mounts with mount(2); everyone else through the setuid helper. */
  if (geteuid() != 0) {
    g_autofree char *helper = g_find_program_in_path("fusermount3");

    if (!helper) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                  "FUSE is not available: fusermount3 not found (install fuse3)");
      return false;
    }
  }
  return true;
}

/* A value inside "-o a=b,c": commas and backslashes escaped (fuse_opt). */
static char *
opt_escape(const char *s)
{
  GString *g = g_string_new(NULL);

  for (; *s; s++) {
    if (*s == ',' || *s == '\\')
      g_string_append_c(g, '\\');
    g_string_append_c(g, *s);
  }
  return g_string_free(g, FALSE);
}

/* --daemon: fork now, before anything is opened.  The parent waits for
 * the child to say it is mounted (one byte on the pipe), or to exit, and
 * exits with the matching status; only the child returns, with the
 * pipe's write end in *@ready. */
static bool
daemon_fork(int *ready, GError **error)
{
  int p[2];
  pid_t pid;
  char c;
  ssize_t n;
  int status;

  if (pipe2(p, O_CLOEXEC) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "pipe: %s", g_strerror(errno));
    return false;
  }
  fflush(NULL);
  pid = fork();
  if (pid < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "fork: %s", g_strerror(errno));
    close(p[0]);
    close(p[1]);
    return false;
  }
  if (pid == 0) {
    close(p[0]);
    if (setsid() < 0)
      cli_debug("setsid: %s", g_strerror(errno));
    *ready = p[1];
    return true;
  }
  close(p[1]);
  do
    n = read(p[0], &c, 1);
  while (n < 0 && errno == EINTR);
  if (n == 1)
    _exit(CLI_EXIT_OK);
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
    ;
  _exit(WIFEXITED(status) && WEXITSTATUS(status) != 0 ? WEXITSTATUS(status)
                                                       : CLI_EXIT_FAILED);
}

/* The child is mounted: leave the terminal and let the parent exit.  The
 * standard descriptors go first, so that a caller reading our output
 * through a pipe sees its end when the parent exits. */
static void
daemon_ready(int ready)
{
  int fd = open("/dev/null", O_RDWR | O_CLOEXEC);

  if (chdir("/") < 0)
    cli_debug("chdir /: %s", g_strerror(errno));
  if (fd >= 0) {
    dup2(fd, STDIN_FILENO);
    dup2(fd, STDOUT_FILENO);
    dup2(fd, STDERR_FILENO);
    if (fd > STDERR_FILENO)
      close(fd);
  }
  if (write(ready, "1", 1) < 0)
    _exit(CLI_EXIT_FAILED);       /* the parent is gone: nobody to serve */
  close(ready);
}

static bool unmount_path(const char *mp, bool lazy, GError **error);

struct life {
  int fd;
  char *mp;
};

static gpointer
life_main(gpointer opaque)
{
  struct life *l = opaque;
  g_autoptr(GError) err = NULL;
  char c;

  /* Nothing is ever written: a read returns when every writer is gone. */
  while (read(l->fd, &c, 1) != 0 && errno == EINTR)
    ;
  cli_debug("%s: its user is done; unmounting", l->mp);
  if (!unmount_path(l->mp, true, &err))
    cli_error("%s", err->message);
  close(l->fd);
  g_free(l->mp);
  g_free(l);
  return NULL;
}

/* Unmount @mp (lazily: its user may still hold the file open) once
 * @fd, the read end of a pipe, reads EOF. */
static void
watch_life(int fd, const char *mp)
{
  struct life *l = g_new0(struct life, 1);

  l->fd = fd;
  l->mp = g_strdup(mp);
  g_thread_unref(g_thread_new("life", life_main, l));
}

static bool
mount_run(const struct mount_opts *o, GError **error)
{
  g_autoptr(repo) r = NULL;
  g_autofree char *mp = NULL, *fsname = NULL, *mopts = NULL;
  struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
  struct fuse_loop_config *lcfg = NULL;
  struct fuse *f = NULL;
  struct fuse_session *se = NULL;
  const repo_backup *b = NULL;
  struct mnt m = { 0 };
  struct stat st;
  int ready = -1, rc;
  bool ok = false;

  if (!fuse_available(error))
    return false;
  mp = realpath(o->mountpoint, NULL);
  if (!mp || stat(mp, &st) < 0 || !S_ISDIR(st.st_mode)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", o->mountpoint,
                mp ? "not a directory" : g_strerror(errno));
    return false;
  }
  if (o->daemon && !daemon_fork(&ready, error))
    return false;

  if (!repo_open(o->repo_dir, o->unlocked ? REPO_LOCK_NONE : REPO_LOCK_SHARED, false, &r,
                 error) ||
      !repo_find(r, o->at, &b, error) || !chain_reader_new(r, b, &m.cr, error))
    goto out;
  m.ino = chain_reader_ident(m.cr);
  if (repo_is_s3(r)) {
    m.repo_dir = g_strdup(r->dir);
  } else {
    m.repo_dir = realpath(r->dir, NULL);
    if (!m.repo_dir)
      m.repo_dir = g_canonicalize_filename(r->dir, NULL);
  }
  m.size = b->image_size;
  m.mtime = (time_t)b->time_unix;
  m.uid = geteuid();
  m.gid = o->has_group ? o->gid : getegid();
  m.mode = o->has_group ? 0440 : 0400;
  m.private_mount = o->private_mount;
  m.damage_errno = o->private_mount ? EBADMSG : EIO;
  m.file = g_strdup(b->file);
  g_snprintf(m.pid, sizeof m.pid, "%ld", (long)getpid());
  /* st_blocks: the data the chain's files store for the disk, an upper
   * bound of what reads as non-zero (du and cp's sparseness guess). */
  for (guint i = repo_chain_start(r, b); ; i++) {
    const repo_backup *c = g_ptr_array_index(r->backups, i);

    m.blocks += c->data_bytes / 512;
    if (c == b)
      break;
  }
  m.blocks = MIN(m.blocks, (m.size + 511) / 512);

  {
    g_autofree char *repo_abs = g_strdup_printf("%s/%s", m.repo_dir, b->file);

    fsname = opt_escape(repo_abs);
  }
  mopts = g_strdup_printf("ro,default_permissions,fsname=%s,subtype=cbt%s", fsname,
                          o->allow_other || o->has_group ? ",allow_other" : "");
  if (fuse_opt_add_arg(&args, "cbt") < 0 || fuse_opt_add_arg(&args, "-o") < 0 ||
      fuse_opt_add_arg(&args, mopts) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "out of memory");
    goto out;
  }
  f = fuse_new(&args, &mnt_ops, sizeof mnt_ops, &m);
  if (!f) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "cannot set up FUSE (see libfuse's message above)");
    goto out;
  }
  se = fuse_get_session(f);
  /* Before mounting: a signal from now on ends the loop, which unmounts. */
  if (fuse_set_signal_handlers(se) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "cannot install signal handlers");
    goto out_destroy;
  }
  if (fuse_mount(f, mp) < 0) {
    g_autofree char *helper = g_find_program_in_path("fusermount3");

    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: cannot mount (see libfuse's "
                "message above)%s", mp,
                helper ? "" : "; fusermount3 not found (install fuse3)");
    goto out_signals;
  }
  {
    g_autofree char *size = cli_format_size(m.size);

    cli_note("%s (%s, backup %u) mounted read-only at %s/%s; end with 'cbt umount %s'",
             b->file, size, b->seq, mp, DISK_NAME, mp);
  }
  if (ready >= 0) {
    daemon_ready(ready);
    ready = -1;
  }
  if (o->ready_fd >= 0) {
    g_autofree char *msg = g_strdup_printf("%" PRIu64 " %s\n", m.ino, b->file);

    if (write(o->ready_fd, msg, strlen(msg)) < 0)
      cli_debug("telling that %s is mounted: %s", mp, g_strerror(errno));
  }
  if (o->life_fd >= 0)
    watch_life(o->life_fd, mp);

  lcfg = fuse_loop_cfg_create();
  if (!lcfg) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "out of memory");
    goto out_unmount;
  }
  fuse_loop_cfg_set_max_threads(lcfg, MAX_THREADS);
  fuse_loop_cfg_set_idle_threads(lcfg, MAX_THREADS);
  fuse_loop_cfg_set_clone_fd(lcfg, 0);
  rc = fuse_loop_mt(f, lcfg);
  fuse_loop_cfg_destroy(lcfg);
  if (rc < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: FUSE loop failed: %s", mp,
                g_strerror(-rc));
    goto out_unmount;
  }
  if (rc > 0)
    cli_note("%s: unmounting (%s)", mp, g_strsignal(rc));
  {
    uint64_t checked, damaged;

    chain_reader_checked(m.cr, &checked, &damaged);
    cli_debug("%s: served %" PRIu64 " reads, %" PRIu64 " bytes, %" PRIu64 " errors; %"
              PRIu64 " chunks checked, %" PRIu64 " damaged", mp,
              (uint64_t)atomic_load(&m.reads), (uint64_t)atomic_load(&m.bytes),
              (uint64_t)atomic_load(&m.errors), checked, damaged);
  }
  ok = true;

out_unmount:
  fuse_unmount(f);
out_signals:
  fuse_remove_signal_handlers(se);
out_destroy:
  fuse_destroy(f);
out:
  fuse_opt_free_args(&args);
  /* Every FUSE thread has ended: close the chain, then (repo_free) drop
   * the lock. */
  chain_reader_free(m.cr);
  g_free(m.repo_dir);
  g_free(m.file);
  if (ready >= 0)
    close(ready);                 /* the parent reports our exit status */
  return ok;
}

/* --group: a group name, or a number; false if there is no such group. */
static bool
parse_group(const char *s, gid_t *gid)
{
  const struct group *gr;

  if (*s && strspn(s, "0123456789") == strlen(s) && strlen(s) < 10) {
    *gid = (gid_t)strtoul(s, NULL, 10);
    return true;
  }
  gr = getgrnam(s);               /* before any thread starts */
  if (!gr)
    return false;
  *gid = gr->gr_gid;
  return true;
}

int
cmd_mount(int argc, char **argv)
{
  g_autofree char *dir = NULL, *at = NULL, *group = NULL;
  gboolean daemon = FALSE, allow_other = FALSE;
  GError *error = NULL;
  GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository: a directory or s3://BUCKET/PREFIX", "DIR" },
    CLI_S3_OPTION,
    { "at", 'a', 0, G_OPTION_ARG_STRING, &at, "the backup to mount: seq number, file name or 'latest' (default)", "BACKUP" },
    { "daemon", 'd', 0, G_OPTION_ARG_NONE, &daemon, "run in the background once mounted", NULL },
    { "allow-other", 0, 0, G_OPTION_ARG_NONE, &allow_other, "let other users into the mount (FUSE allow_other; needs user_allow_other in /etc/fuse.conf unless root); the file stays 0400, readable by its owner and root", NULL },
    { "group", 'g', 0, G_OPTION_ARG_STRING, &group, "let the members of GROUP (name or number) read the file too: mode 0440 with that group; implies --allow-other", "GROUP" },
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("mount", "MOUNTPOINT",
                       "Show the disk as of one backup as the read-only file "
                       "MOUNTPOINT/" DISK_NAME ".",
                       "The file reads through the backup's qcow2 chain as the manifest\n"
                       "lists it, like cbt restore; nothing is copied.  As cbt restore\n"
                       "does, every chunk is checked against the manifest's checksum\n"
                       "(when a read first needs it): a read of a damaged chunk fails\n"
                       "with EIO and the error names the file and byte range.  The file\n"
                       "is 0400 (0440 with --group).  Loop-mount it\n"
                       "(mount -o loop,ro MOUNTPOINT/" DISK_NAME " DIR) or give it to\n"
                       "qemu-img or guestfish.  The repository stays locked (shared)\n"
                       "while mounted, so no backup or pruning runs meanwhile (on S3\n"
                       "nothing is locked: an object that changes fails its reads).\n"
                       "Runs in the foreground until 'cbt umount MOUNTPOINT' (or\n"
                       "fusermount3 -u), SIGTERM or SIGINT, then unmounts.  Needs FUSE\n"
                       "(/dev/fuse; fusermount3 from fuse3 unless root).\n\n"
                       CLI_EXIT_CODES_HELP,
                       entries);
  struct mount_opts o;

  if (!cli_parse(octx, "mount", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc < 2)
    return cli_usage_error("mount", "MOUNTPOINT is required");
  if (argc > 2)
    return cli_usage_error("mount", "unexpected argument '%s'", argv[2]);
  if (!dir)
    return cli_usage_error("mount", "--repo is required");
  o = (struct mount_opts){ .repo_dir = dir, .at = at, .mountpoint = argv[1],
                           .daemon = daemon, .allow_other = allow_other,
                           .ready_fd = -1, .life_fd = -1 };
  if (group) {
    if (!parse_group(group, &o.gid))
      return cli_usage_error("mount", "--group %s: no such group", group);
    o.has_group = true;
  }
  return mount_run(&o, &error) ? CLI_EXIT_OK : cli_report(error);
}

/* --- cbt umount --------------------------------------------------------- */

static bool
unmount_path(const char *mp, bool lazy, GError **error)
{
  g_autofree char *helper = g_find_program_in_path("fusermount3");
  g_autofree char *err_out = NULL;
  g_autoptr(GError) spawn_err = NULL;
  int status = 0;

  if (!helper) {
    if (geteuid() == 0 && umount2(mp, lazy ? MNT_DETACH : 0) == 0)
      return true;
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: cannot unmount: %s", mp,
                geteuid() == 0 ? g_strerror(errno)
                               : "fusermount3 not found (install fuse3)");
    return false;
  }
  {
    const char *av[] = { helper, "-u", lazy ? "-z" : mp, mp, NULL };

    if (!lazy)
      av[3] = NULL;

    if (!g_spawn_sync(NULL, (char **)av, NULL, G_SPAWN_STDOUT_TO_DEV_NULL, NULL, NULL,
                      NULL, &err_out, &status, &spawn_err)) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: cannot run %s: %s", mp, helper,
                  spawn_err->message);
      return false;
    }
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    g_strchomp(err_out);
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: cannot unmount: %s", mp,
                *err_out ? err_out : "fusermount3 -u failed");
    return false;
  }
  return true;
}

static bool
umount_run(const char *arg, GError **error)
{
  /* Not realpath: with its server gone the mountpoint cannot be stat'ed. */
  g_autofree char *mp = g_canonicalize_filename(arg, NULL);
  char val[32];
  ssize_t n = getxattr(mp, XATTR_PID, val, sizeof val - 1);
  long pid = 0;
  int pidfd = -1;
  bool ok;

  if (n < 0 && errno == ENOTCONN) {
    cli_note("%s: its cbt mount is gone (%s); unmounting", mp, g_strerror(errno));
  } else if (n < 0) {
    int err = errno;

    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", mp,
                err == ENODATA || err == ENOTSUP
                ? "not mounted by cbt mount" : g_strerror(err));
    return false;
  } else {
    char *end = NULL;

    val[n] = '\0';
    pid = strtol(val, &end, 10);
    if (pid <= 0 || *end) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                  "%s: not mounted by cbt mount (%s is '%s')", mp, XATTR_PID, val);
      return false;
    }
    /* Before unmounting, so that the pid cannot be reused meanwhile. */
    pidfd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
    if (pidfd < 0)
      cli_debug("pidfd_open %ld: %s: not waiting for it", pid, g_strerror(errno));
  }
  ok = unmount_path(mp, false, error);
  if (ok && pidfd >= 0) {
    /* The server's loop ends with the mount; it then closes the chain and
     * unlocks the repository.  Wait for that, so that a backup or prune
     * right after us finds the repository free. */
    struct pollfd pfd = { .fd = pidfd, .events = POLLIN };
    int r;

    do
      r = poll(&pfd, 1, UMOUNT_WAIT_MS);
    while (r < 0 && errno == EINTR);
    if (r == 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                  "%s: unmounted, but its cbt mount (pid %ld) is still running after "
                  "%d s", mp, pid, UMOUNT_WAIT_MS / 1000);
      ok = false;
    }
  }
  if (pidfd >= 0)
    close(pidfd);
  return ok;
}

int
cmd_umount(int argc, char **argv)
{
  GError *error = NULL;
  GOptionEntry entries[] = { { NULL } };
  g_autoptr(GOptionContext) octx =
    cli_option_context("umount", "MOUNTPOINT", "End a cbt mount.",
                       "Unmounts MOUNTPOINT (with fusermount3 -u) and waits until the\n"
                       "cbt mount serving it has exited and so released the\n"
                       "repository.  A mountpoint whose cbt mount died is unmounted\n"
                       "too; anything not mounted by cbt mount is refused.\n\n"
                       CLI_EXIT_CODES_HELP,
                       entries);

  if (!cli_parse(octx, "umount", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc < 2)
    return cli_usage_error("umount", "MOUNTPOINT is required");
  if (argc > 2)
    return cli_usage_error("umount", "unexpected argument '%s'", argv[2]);
  return umount_run(argv[1], &error) ? CLI_EXIT_OK : cli_report(error);
}

/* --- private mounts, for cbt restore --instant and cbt serve ------------------ */

/* The child's side of mount_private. */
static int
serve_private(const char *repo_url, const char *at, bool unlocked, const char *mountpoint,
              int ready_fd, int life_fd)
{
  struct mount_opts o = { .repo_dir = repo_url, .at = at, .mountpoint = mountpoint,
                          .private_mount = true, .unlocked = unlocked,
                          .ready_fd = ready_fd, .life_fd = life_fd };
  GError *error = NULL;

  return mount_run(&o, &error) ? CLI_EXIT_OK : cli_report(error);
}

bool
mount_private(const char *repo_url, const char *at, int caller_lock, char **mp,
              uint64_t *ino, char **file, int *life, GError **error)
{
  g_autoptr(GError) err = NULL;
  g_autofree char *dir = g_dir_make_tmp("cbt-point-XXXXXX", &err);
  g_autoptr(GString) line = g_string_new(NULL);
  int ready[2], lp[2], status = 0;
  pid_t pid;
  char c;

  if (!dir) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "a mountpoint for %s: %s", repo_url,
                err->message);
    return false;
  }
  if (pipe2(ready, O_CLOEXEC) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "pipe: %s", g_strerror(errno));
    rmdir(dir);
    return false;
  }
  if (pipe2(lp, O_CLOEXEC) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "pipe: %s", g_strerror(errno));
    close(ready[0]);
    close(ready[1]);
    rmdir(dir);
    return false;
  }
  fflush(NULL);
  pid = fork();
  if (pid < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "fork: %s", g_strerror(errno));
    close(ready[0]);
    close(ready[1]);
    close(lp[0]);
    close(lp[1]);
    rmdir(dir);
    return false;
  }
  if (pid == 0) {
    int rc;

    close(ready[0]);
    close(lp[1]);
    /* The caller's lock covers us; our copy of it must not outlive the
     * caller's (the lock goes when the last copy closes). */
    if (caller_lock >= 0)
      close(caller_lock);
    cli_quiet = TRUE;             /* errors still go to stderr */
    rc = serve_private(repo_url, at, caller_lock >= 0, dir, ready[1], lp[0]);
    if (rmdir(dir) < 0)
      cli_debug("%s: %s", dir, g_strerror(errno));
    _exit(rc);
  }
  close(ready[1]);
  close(lp[0]);
  while (read(ready[0], &c, 1) == 1 && c != '\n')
    g_string_append_c(line, c);
  close(ready[0]);
  if (line->len == 0) {
    /* The child failed (it said why) or died. */
    close(lp[1]);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
      ;
    rmdir(dir);
    g_set_error(error, CLI_ERROR, WIFEXITED(status) && WEXITSTATUS(status) == CLI_EXIT_DAMAGED
                ? CLI_EXIT_DAMAGED : CLI_EXIT_FAILED,
                "%s: cannot serve the backup to cbt-filterd (see above)", repo_url);
    return false;
  }
  {
    char *end = NULL;

    *ino = g_ascii_strtoull(line->str, &end, 10);
    *file = g_strdup(end && *end == ' ' ? end + 1 : "");
  }
  *mp = g_steal_pointer(&dir);
  *life = lp[1];
  return true;
}

