/* Backend-independent image helpers: opening by format (with detection)
 * and running one request to completion on a private ring, for start-up,
 * shutdown and the reads a qcow2 image's metadata thread makes from its
 * backing file.
 *
 * The private ring is one per thread, made on first use and closed when
 * the thread ends (a pthread key's destructor): a qcow2 chain used to set
 * up and tear down a ring for every backing read, which cost more than
 * the read.  A call drains its ring before it returns, so the next call
 * starts with an empty one; a ring a failed call could not drain is
 * dropped.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <glib.h>

#include "cbt/image.h"
#include "cbt/qcow2.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"

void
cbt_image_io_link(struct cbt_image_io *io, struct io_uring_sqe *sqe)
{
  void (*link)(struct cbt_image_io *, struct io_uring_sqe *) = io->link;

  io->link = NULL;
  /* The sqe must be the write of every byte of a plain (not FUA) WRITE:
   * the link fires when it is done.  It must still be a write after the
   * fault injection, and the linked sqe must go into the same submission
   * (a link cut at a submission boundary would run at once). */
  if (!link || io->type != CBT_IO_WRITE || (io->flags & CBT_IO_FUA) ||
      io->done != 0 || sqe->opcode != IORING_OP_WRITE || sqe->len != io->len ||
      io_uring_sq_space_left(io->ring) < 1)
    return;
  sqe->flags |= IOSQE_IO_LINK;
  link(io, io_uring_get_sqe(io->ring));
}

struct sync_req {
  struct cbt_image_io io;
  bool done;
  int res;
};

static void
sync_complete(struct cbt_image_io *io, int res)
{
  struct sync_req *s = cbt_container_of(io, struct sync_req, io);

  s->done = true;
  s->res = res;
}

#define SYNC_RING_ENTRIES 8

static pthread_key_t ring_key;
static pthread_once_t ring_once = PTHREAD_ONCE_INIT;

static void
ring_free(void *p)
{
  io_uring_queue_exit(p);
  free(p);
}

static void
ring_key_init(void)
{
  if (pthread_key_create(&ring_key, ring_free) != 0)
    abort();                         /* out of keys at start-up: hopeless */
}

/* This thread's ring for cbt_image_run_sync, or NULL (*err set). */
static struct io_uring *
sync_ring(int *err)
{
  struct io_uring *ring;
  int r;

  pthread_once(&ring_once, ring_key_init);
  ring = pthread_getspecific(ring_key);
  if (ring)
    return ring;
  ring = malloc(sizeof *ring);
  if (!ring) {
    *err = -ENOMEM;
    return NULL;
  }
  r = io_uring_queue_init(SYNC_RING_ENTRIES, ring, 0);
  if (r < 0) {
    free(ring);
    *err = r;
    return NULL;
  }
  pthread_setspecific(ring_key, ring);
  return ring;
}

int
cbt_image_run_sync(struct cbt_image *img, enum cbt_io_type type,
                   unsigned flags, uint64_t offset, uint64_t len, void *buf)
{
  struct sync_req s;
  int r = 0;
  struct io_uring *ring = sync_ring(&r);

  if (!ring)
    return r;
  memset(&s, 0, sizeof s);
  s.io.ring = ring;
  s.io.type = type;
  s.io.flags = flags;
  s.io.offset = offset;
  s.io.len = len;
  s.io.buf = buf;
  s.io.complete = sync_complete;
  cbt_image_submit(img, &s.io);
  while (!s.done) {
    struct io_uring_cqe *cqe;

    r = io_uring_submit_and_wait(ring, 1);
    if (r < 0 && r != -EINTR) {
      /* The request is stuck in a ring we cannot drive: nothing sane to
       * do but report it.  The ring (and the request on it) stay valid
       * until exit; this thread gets a new one next time. */
      pthread_setspecific(ring_key, NULL);
      return r;
    }
    while (io_uring_peek_cqe(ring, &cqe) == 0) {
      struct cbt_aio_op *op = io_uring_cqe_get_data(cqe);
      int res = cqe->res;

      io_uring_cqe_seen(ring, cqe);
      if (op)
        op->done(op, res);
    }
  }
  return s.res;
}

int
cbt_image_detect_format(const char *path, const char **format, char **why)
{
  uint8_t magic[4];
  int fd = cbt_open_regular(path, O_RDONLY | O_CLOEXEC, NULL, why);
  int r;

  if (fd < 0)
    return fd;
  r = cbt_io_pread(fd, magic, sizeof magic, 0);
  close(fd);
  if (r == -ENODATA) {
    *format = "raw";                 /* tiny files are raw */
    return 0;
  }
  if (r < 0) {
    *why = g_strdup_printf("%s: cannot read: %s", path, g_strerror(-r));
    return r;
  }
  *format = memcmp(magic, "QFI\xfb", 4) == 0 ? "qcow2" : "raw";
  return 0;
}

int
cbt_image_open(const char *path, const char *format, bool read_only,
               bool direct, struct cbt_image **out, char **why)
{
  int r;

  if (g_str_has_prefix(path, "memory:") &&
      (!format || strcmp(format, "auto") == 0 || strcmp(format, "memory") == 0))
    return cbt_image_open_memory(path + strlen("memory:"), read_only, out, why);
  if (!format || strcmp(format, "auto") == 0) {
    r = cbt_image_detect_format(path, &format, why);
    if (r < 0)
      return r;
  }
  if (strcmp(format, "raw") == 0)
    return cbt_image_open_raw(path, read_only, direct, out, why);
  if (strcmp(format, "qcow2") == 0)
    return cbt_image_open_qcow2(path, read_only, direct, out, why);
  *why = g_strdup_printf("unknown image format '%s' (expected raw, qcow2 or auto)",
                         format);
  return -EINVAL;
}
