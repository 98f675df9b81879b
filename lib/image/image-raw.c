/* Raw image backend: the image file is the disk, byte for byte.
 *
 * Every operation is one io_uring sqe on the caller's ring (reads, writes,
 * fdatasync, fallocate, fadvise); short transfers and -EAGAIN resubmit the
 * remainder from the completion.  Requests that need two steps keep their
 * position in io->stage:
 *   TRIM        punch hole  [-> fdatasync if FUA]
 *   ZERO        punch hole (or zero range with NO_HOLE), falling back to
 *               writing zeros when the file system cannot  [-> fdatasync]
 * FUA writes use RWF_DSYNC so the data is durable when the write completes.
 *
 * With --cache=none a second O_DIRECT descriptor serves requests whose
 * offset, length and buffer are aligned; everything else, and all
 * fallocate/fsync calls, use the buffered descriptor.  Linux keeps the page
 * cache coherent with direct I/O on the same inode, and fdatasync on either
 * descriptor covers the inode.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <glib.h>

#include "cbt/fault-inject.h"
#include "cbt/image.h"
#include "cbt/nbd-proto.h"
#include "cbt/util.h"

struct raw_image {
  struct cbt_image pub;
  int fd;
  int fd_direct;
  bool no_punch;                 /* file system refused PUNCH_HOLE */
  bool no_zero_range;            /* file system refused ZERO_RANGE */
};

enum raw_stage {
  ST_MAIN = 0,                   /* the request's own operation */
  ST_ZERO_RANGE,                 /* ZERO retried with FALLOC_FL_ZERO_RANGE */
  ST_WRITE_ZEROES,               /* ZERO by writing a zero buffer */
  ST_SYNC,                       /* FUA after trim/zero */
};

/* Writes of zeros come from this buffer (page aligned for O_DIRECT). */
#define ZERO_BUF_SIZE (1024 * 1024)
static const uint8_t zero_buf[ZERO_BUF_SIZE] __attribute__((aligned(4096)));

struct io_uring_sqe *
cbt_ring_get_sqe(struct io_uring *ring)
{
  struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

  if (!sqe) {
    if (io_uring_submit(ring) < 0)
      return NULL;
    sqe = io_uring_get_sqe(ring);
  }
  return sqe;
}

static void raw_done(struct cbt_aio_op *op, int res);

static inline struct raw_image *
to_raw(struct cbt_image *img)
{
  return (struct raw_image *)img;
}

static bool
is_aligned(const struct raw_image *r, uint64_t off, uint64_t len,
           const void *buf)
{
  uint64_t a = r->pub.direct_align;
  return r->fd_direct >= 0 && off % a == 0 && len % a == 0 &&
         (uintptr_t)buf % a == 0;
}

/* Queue the next sqe for @io according to its stage and progress.
 * Returns 0, or -errno if no sqe could be had. */
static int
raw_queue(struct raw_image *r, struct cbt_image_io *io)
{
  struct io_uring_sqe *sqe = cbt_ring_get_sqe(io->ring);
  uint64_t rest = io->len - io->done;
  /* One transfer is capped so that cqe->res (an int) holds its size. */
  unsigned n = rest > (1u << 30) ? (1u << 30) : (unsigned)rest;

  if (!sqe)
    return -EBUSY;

  switch (io->stage) {
  case ST_SYNC:
    io_uring_prep_fsync(sqe, r->fd, IORING_FSYNC_DATASYNC);
    break;
  case ST_ZERO_RANGE:
    io_uring_prep_fallocate(sqe, r->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                            (off_t)io->offset, (off_t)io->len);
    break;
  case ST_WRITE_ZEROES: {
    uint64_t off = io->offset + io->done;
    if (n > ZERO_BUF_SIZE)
      n = ZERO_BUF_SIZE;
    io_uring_prep_write(sqe, is_aligned(r, off, n, zero_buf) ? r->fd_direct : r->fd,
                        zero_buf, n, off);
    break;
  }
  default:
    switch (io->type) {
    case CBT_IO_READ: {
      uint64_t off = io->offset + io->done;
      void *p = (uint8_t *)io->buf + io->done;
      io_uring_prep_read(sqe, is_aligned(r, off, n, p) ? r->fd_direct : r->fd,
                         p, n, off);
      break;
    }
    case CBT_IO_WRITE: {
      uint64_t off = io->offset + io->done;
      const void *p = (const uint8_t *)io->buf + io->done;
      io_uring_prep_write(sqe, is_aligned(r, off, n, p) ? r->fd_direct : r->fd,
                          p, n, off);
      if (io->flags & CBT_IO_FUA)
        sqe->rw_flags = RWF_DSYNC;
      break;
    }
    case CBT_IO_FLUSH:
      io_uring_prep_fsync(sqe, r->fd, IORING_FSYNC_DATASYNC);
      break;
    case CBT_IO_TRIM:
    case CBT_IO_ZERO:
      if (io->type == CBT_IO_ZERO && (io->flags & CBT_IO_NO_HOLE)) {
        io->stage = ST_ZERO_RANGE;
        io_uring_prep_fallocate(sqe, r->fd,
                                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                (off_t)io->offset, (off_t)io->len);
      } else {
        io_uring_prep_fallocate(sqe, r->fd,
                                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                (off_t)io->offset, (off_t)io->len);
      }
      break;
    case CBT_IO_CACHE:
      io_uring_prep_fadvise(sqe, r->fd, io->offset, (off_t)io->len,
                            POSIX_FADV_WILLNEED);
      break;
    }
  }
  io->op.done = raw_done;
  io_uring_sqe_set_data(sqe, &io->op);
  cbt_fi_sqe(CBT_FI_IMAGE, sqe);       /* tests: may fail it */
  if (io->stage == ST_MAIN)
    cbt_image_io_link(io, sqe);         /* after it: it may make a NOP */
  return 0;
}

/* Move @io to the next stage or complete it. */
static void
raw_finish(struct raw_image *r, struct cbt_image_io *io, int res)
{
  if (res == 0 && io->stage != ST_SYNC &&
      (io->type == CBT_IO_TRIM || io->type == CBT_IO_ZERO) &&
      (io->flags & CBT_IO_FUA)) {
    io->stage = ST_SYNC;
    res = raw_queue(r, io);
    if (res == 0)
      return;
  }
  io->complete(io, res);
}

/* The zero path could not use fallocate: try the next way down. */
static void
raw_zero_fallback(struct raw_image *r, struct cbt_image_io *io)
{
  int res;

  if (io->stage == ST_MAIN && !r->no_zero_range) {
    io->stage = ST_ZERO_RANGE;
  } else {
    if (io->flags & CBT_IO_FAST_ZERO) {
      io->complete(io, -ENOTSUP);
      return;
    }
    io->stage = ST_WRITE_ZEROES;
    io->done = 0;
  }
  res = raw_queue(r, io);
  if (res < 0)
    io->complete(io, res);
}

static void
raw_done(struct cbt_aio_op *op, int res)
{
  struct cbt_image_io *io = cbt_container_of(op, struct cbt_image_io, op);
  struct raw_image *r = to_raw(io->img);

  if (res == -EAGAIN || res == -EINTR) {
    res = raw_queue(r, io);
    if (res < 0)
      io->complete(io, res);
    return;
  }

  switch (io->stage) {
  case ST_SYNC:
    io->complete(io, res < 0 ? res : 0);
    return;
  case ST_ZERO_RANGE:
    if (res == -EOPNOTSUPP || res == -EINVAL) {
      r->no_zero_range = true;
      raw_zero_fallback(r, io);
      return;
    }
    raw_finish(r, io, res < 0 ? res : 0);
    return;
  case ST_WRITE_ZEROES:
    if (res < 0) {
      io->complete(io, res);
      return;
    }
    if (res == 0) {
      io->complete(io, -EIO);
      return;
    }
    io->done += (unsigned)res;
    if (io->done < io->len) {
      res = raw_queue(r, io);
      if (res < 0)
        io->complete(io, res);
      return;
    }
    raw_finish(r, io, 0);
    return;
  default:
    break;
  }

  switch (io->type) {
  case CBT_IO_READ:
  case CBT_IO_WRITE:
    if (res < 0) {
      io->complete(io, res);
      return;
    }
    if (res == 0) {
      /* End of file inside the export: the image shrank under us. */
      io->complete(io, -EIO);
      return;
    }
    io->done += (unsigned)res;
    if (io->done < io->len) {
      res = raw_queue(r, io);
      if (res < 0)
        io->complete(io, res);
      return;
    }
    io->complete(io, 0);
    return;
  case CBT_IO_TRIM:
    /* Trim is advisory: a file system without hole punching ignores it. */
    if (res == -EOPNOTSUPP || res == -EINVAL) {
      r->no_punch = true;
      res = 0;
    }
    raw_finish(r, io, res < 0 ? res : 0);
    return;
  case CBT_IO_ZERO:
    if (res == -EOPNOTSUPP || res == -EINVAL) {
      r->no_punch = true;
      raw_zero_fallback(r, io);
      return;
    }
    raw_finish(r, io, res < 0 ? res : 0);
    return;
  case CBT_IO_CACHE:
    /* Advice only: never an error the client must see. */
    io->complete(io, 0);
    return;
  case CBT_IO_FLUSH:
  default:
    io->complete(io, res < 0 ? res : 0);
    return;
  }
}

static void
raw_submit(struct cbt_image *img, struct cbt_image_io *io)
{
  struct raw_image *r = to_raw(img);
  int res;

  if (io->len == 0 && io->type != CBT_IO_FLUSH) {
    io->complete(io, 0);
    return;
  }
  if (io->type == CBT_IO_TRIM && r->no_punch) {
    raw_finish(r, io, 0);
    return;
  }
  if (io->type == CBT_IO_ZERO && r->no_punch && !(io->flags & CBT_IO_NO_HOLE)) {
    raw_zero_fallback(r, io);
    return;
  }
  res = raw_queue(r, io);
  if (res < 0)
    io->complete(io, res);
}

static int
raw_block_status(struct cbt_image *img, uint64_t offset, uint64_t len,
                 struct cbt_extent *ext, size_t max)
{
  struct raw_image *r = to_raw(img);
  uint64_t end = offset + len;
  size_t n = 0;

  while (offset < end && n < max) {
    off_t data = lseek(r->fd, (off_t)offset, SEEK_DATA);
    uint64_t next;
    uint32_t flags;

    if (data < 0 && errno != ENXIO) {
      /* No SEEK_DATA support: report everything as data. */
      if (n == 0) {
        ext[0].length = end - offset;
        ext[0].flags = 0;
        return 1;
      }
      break;
    }
    if (data < 0 || (uint64_t)data > offset) {
      /* A hole up to the next data (or to the end). */
      next = data < 0 ? end : (uint64_t)data;
      flags = NBD_STATE_HOLE | NBD_STATE_ZERO;
    } else {
      off_t hole = lseek(r->fd, (off_t)offset, SEEK_HOLE);
      next = hole < 0 ? end : (uint64_t)hole;
      flags = 0;
    }
    if (next > end)
      next = end;
    if (next <= offset)           /* the file changed under us */
      next = end;
    if (n > 0 && ext[n - 1].flags == flags) {
      ext[n - 1].length += next - offset;
    } else {
      ext[n].length = next - offset;
      ext[n].flags = flags;
      n++;
    }
    offset = next;
  }
  return (int)n;
}

static void
raw_close(struct cbt_image *img)
{
  struct raw_image *r = to_raw(img);

  if (r->fd_direct >= 0)
    close(r->fd_direct);
  if (r->fd >= 0)
    close(r->fd);
  g_free(r);
}

static const struct cbt_image_ops raw_ops = {
  .name = "raw",
  .submit = raw_submit,
  .block_status = raw_block_status,
  .close = raw_close,
};

int
cbt_image_open_raw(const char *path, bool read_only, bool direct,
                   struct cbt_image **out, char **why)
{
  g_autofree struct raw_image *r = g_new0(struct raw_image, 1);
  int flags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  struct stat st;
  int err;

  r->fd = r->fd_direct = -1;
  r->fd = cbt_open_regular(path, flags, &st, why);
  if (r->fd < 0)
    return r->fd;
  if (direct) {
    r->fd_direct = open(path, flags | O_DIRECT);
    if (r->fd_direct < 0) {
      err = -errno;
      *why = g_strdup_printf("%s: cannot open with O_DIRECT (--cache=none): %s",
                             path, g_strerror(errno));
      close(r->fd);
      return err;
    }
  }
  r->pub.ops = &raw_ops;
  r->pub.format = "raw";
  r->pub.size = (uint64_t)st.st_size;
  r->pub.ino = (uint64_t)st.st_ino;
  r->pub.read_only = read_only;
  r->pub.direct = direct;
  r->pub.direct_align = 4096;
  *out = &g_steal_pointer(&r)->pub;
  return 0;
}
