/* Synchronous whole-buffer file I/O over a per-thread io_uring.
 *
 * The ring is created on first use in each thread and kept for the life of
 * the thread.  Calls are strictly one at a time per thread, so the ring
 * never holds more than one operation and the cqe we reap is ours.
 *
 * A ring is a descriptor and a few pages of memory, so it must not outlive
 * its thread: the daemon starts a thread per control connection, and one
 * ring left behind by each ran it out of descriptors after a few dozen
 * checkpoints.  The ring is therefore registered as the value of a
 * pthread key whose destructor frees it when the thread ends, whoever
 * created the thread and however it ends (return or pthread_exit).  The
 * main thread's ring goes with the process.
 *
 * Test builds (fault injection) decide before each submission whether the
 * operation fails, or transfers short, instead (cbt_fi_io); the result
 * then goes through the same handling as one from the kernel.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <liburing.h>

#include "cbt/uring-io.h"
#include "cbt/fault-inject.h"

static __thread struct io_uring *tls_ring;
static pthread_key_t ring_key;
static pthread_once_t ring_key_once = PTHREAD_ONCE_INIT;
static int ring_key_err;

/* The key's destructor: runs in the ending thread, with its ring. */
static void
ring_free(void *arg)
{
  struct io_uring *ring = arg;

  io_uring_queue_exit(ring);
  free(ring);
  tls_ring = NULL;
}

static void
ring_key_create(void)
{
  ring_key_err = -pthread_key_create(&ring_key, ring_free);
}

static struct io_uring *
get_ring(int *err)
{
  struct io_uring *ring;
  int r;

  if (tls_ring)
    return tls_ring;
  pthread_once(&ring_key_once, ring_key_create);
  if (ring_key_err < 0) {
    *err = ring_key_err;
    return NULL;
  }
  ring = malloc(sizeof *ring);
  if (!ring) {
    *err = -ENOMEM;
    return NULL;
  }
  r = io_uring_queue_init(4, ring, 0);
  if (r < 0) {
    free(ring);
    *err = r;
    return NULL;
  }
  r = pthread_setspecific(ring_key, ring);
  if (r != 0) {
    /* Without the key the ring would outlive the thread: do without. */
    io_uring_queue_exit(ring);
    free(ring);
    *err = -r;
    return NULL;
  }
  tls_ring = ring;
  return ring;
}

void
cbt_io_thread_cleanup(void)
{
  struct io_uring *ring = tls_ring;

  if (ring) {
    pthread_setspecific(ring_key, NULL);
    ring_free(ring);
  }
}

/* Submit the one prepared sqe and return its result (>= 0 or -errno). */
static int
submit_wait(struct io_uring *ring)
{
  struct io_uring_cqe *cqe;
  int r;

  r = io_uring_submit(ring);
  if (r < 0)
    return r;
  do {
    r = io_uring_wait_cqe(ring, &cqe);
  } while (r == -EINTR);
  if (r < 0)
    return r;
  r = cqe->res;
  io_uring_cqe_seen(ring, cqe);
  return r;
}

enum rw { RW_READ, RW_WRITE };

static int
rw_full(enum rw dir, int fd, void *buf, size_t len, uint64_t offset)
{
  int err = 0;
  struct io_uring *ring = get_ring(&err);
  size_t done = 0;

  if (!ring)
    return err;
  while (done < len) {
    /* One read or write is capped at 1 GiB so the result fits an int. */
    size_t n = len - done > (1u << 30) ? (1u << 30) : len - done;
    int r = cbt_fi_io(fd, dir == RW_READ ? CBT_FI_READ : CBT_FI_WRITE, offset + done, &n);

    if (r == 0) {
      struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

      if (!sqe)
        return -EBUSY;
      if (dir == RW_READ)
        io_uring_prep_read(sqe, fd, (char *)buf + done, n, offset + done);
      else
        io_uring_prep_write(sqe, fd, (char *)buf + done, n, offset + done);
      r = submit_wait(ring);
    }
    if (r == -EINTR || r == -EAGAIN)
      continue;
    if (r < 0)
      return r;
    if (r == 0)
      return dir == RW_READ ? -ENODATA : -EIO;
    done += (size_t)r;
  }
  return 0;
}

int
cbt_io_pread(int fd, void *buf, size_t len, uint64_t offset)
{
  return rw_full(RW_READ, fd, buf, len, offset);
}

int
cbt_io_pwrite(int fd, const void *buf, size_t len, uint64_t offset)
{
  bool held = cbt_fi_write_begin(fd, offset, len);
  int r = rw_full(RW_WRITE, fd, (void *)buf, len, offset);

  if (held)
    cbt_fi_write_end();
  return r;
}

/* An operation that is not a transfer: submitted whole, retried on
 * -EINTR/-EAGAIN. */
struct one_op {
  enum { ONE_FSYNC, ONE_FALLOCATE } kind;
  int fd;
  unsigned fsync_flags;
  int mode;
  uint64_t offset, len;
};

static int
run_one(const struct one_op *o)
{
  int err = 0;
  struct io_uring *ring = get_ring(&err);
  struct io_uring_sqe *sqe;
  int r;

  if (!ring)
    return err;
  do {
    r = cbt_fi_io(o->fd, o->kind == ONE_FSYNC ? CBT_FI_SYNC : CBT_FI_WRITE, o->offset, NULL);
    if (r < 0)
      continue;
    sqe = io_uring_get_sqe(ring);
    if (!sqe)
      return -EBUSY;
    if (o->kind == ONE_FSYNC)
      io_uring_prep_fsync(sqe, o->fd, o->fsync_flags);
    else
      io_uring_prep_fallocate(sqe, o->fd, o->mode, (off_t)o->offset, (off_t)o->len);
    r = submit_wait(ring);
  } while (r == -EINTR || r == -EAGAIN);
  return r < 0 ? r : 0;
}

int
cbt_io_fdatasync(int fd)
{
  struct one_op o = { .kind = ONE_FSYNC, .fd = fd, .fsync_flags = IORING_FSYNC_DATASYNC };
  int r = run_one(&o);

  cbt_fi_synced(fd, r);
  return r;
}

int
cbt_io_fsync(int fd)
{
  struct one_op o = { .kind = ONE_FSYNC, .fd = fd };
  int r = run_one(&o);

  cbt_fi_synced(fd, r);
  return r;
}

int
cbt_io_fallocate(int fd, int mode, uint64_t offset, uint64_t len)
{
  struct one_op o = { .kind = ONE_FALLOCATE, .fd = fd, .mode = mode,
                      .offset = offset, .len = len };
  return run_one(&o);
}

int
cbt_io_sync_parent_dir(const char *path)
{
  char *slash = strrchr(path, '/');
  char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
  int fd, r;

  if (!dir)
    return -ENOMEM;
  fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  r = fd < 0 ? -errno : cbt_io_fsync(fd);
  if (fd >= 0)
    close(fd);
  free(dir);
  return r;
}
