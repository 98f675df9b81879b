/* Image backends: asynchronous block I/O on a disk image over io_uring.
 *
 * A backend turns one request (read, write, flush, trim, zero, cache) into
 * one or more io_uring operations on the caller's ring and calls
 * io->complete exactly once when the request is finished.  Completion may
 * happen inside submit (for example when the request fails validation), so
 * a caller must not touch @io after handing it to submit unless it is told
 * so by the callback.
 *
 * The ring belongs to the calling thread.  Every sqe's user_data points at a
 * struct cbt_aio_op whose done() the ring's owner calls with cqe->res; that
 * is the only contract between an event loop and the backends, so a loop
 * can drive raw files, qcow2 files and bitmap writes alike.
 *
 * block_status() is synchronous: it asks the file system (SEEK_DATA /
 * SEEK_HOLE) or cached metadata, never reads data.
 */
#ifndef CBT_IMAGE_H
#define CBT_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <liburing.h>

struct cbt_aio_op {
  void (*done)(struct cbt_aio_op *op, int res);
};

/* An sqe from @ring, submitting what is queued first if the SQ is full.
 * Returns NULL only if the kernel refuses the submission. */
struct io_uring_sqe *cbt_ring_get_sqe(struct io_uring *ring);

enum cbt_io_type {
  CBT_IO_READ,
  CBT_IO_WRITE,
  CBT_IO_FLUSH,
  CBT_IO_TRIM,
  CBT_IO_ZERO,
  CBT_IO_CACHE,
};

#define CBT_IO_FUA        (1u << 0)   /* durable before completion */
#define CBT_IO_NO_HOLE    (1u << 1)   /* ZERO: keep the range allocated */
#define CBT_IO_FAST_ZERO  (1u << 2)   /* ZERO: fail -ENOTSUP unless cheap */

struct cbt_image;

struct cbt_image_io {
  /* Filled by the caller. */
  struct io_uring *ring;
  enum cbt_io_type type;
  unsigned flags;
  uint64_t offset;
  uint64_t len;
  void *buf;                     /* READ/WRITE data, len bytes */
  void (*complete)(struct cbt_image_io *io, int res);  /* 0 or -errno */
  /* Optional (NULL: none).  A backend that carries out the whole request
   * as one operation may chain a second one to it: it marks its sqe
   * IOSQE_IO_LINK and calls link() with the next sqe of the same ring for
   * the caller to prepare (so the caller knows).  The kernel starts the
   * linked operation only once the first has done all of its bytes, and
   * completes it with -ECANCELED otherwise.  Used at most once per
   * request.  The worker links the reply of a WRITE to the write itself,
   * so the reply leaves as soon as the data is written, without a trip
   * through the event loop (filterd/worker.c). */
  void (*link)(struct cbt_image_io *io, struct io_uring_sqe *sqe);

  /* Backend state. */
  struct cbt_aio_op op;
  struct cbt_image *img;
  uint64_t done;
  int stage;
};

struct cbt_extent {
  uint64_t length;
  uint32_t flags;                /* NBD_STATE_HOLE | NBD_STATE_ZERO */
};

/* For backends: @sqe, just prepared from @io's ring, is @io's own
 * operation.  If the caller asked for a link (io->link) and @sqe writes
 * all of a plain WRITE at once, chain the caller's operation to it; in
 * every case io->link is used up. */
void cbt_image_io_link(struct cbt_image_io *io, struct io_uring_sqe *sqe);

struct cbt_image_ops {
  const char *name;
  void (*submit)(struct cbt_image *img, struct cbt_image_io *io);
  /* Describe [offset, offset+len) in at most @max extents; the extents
   * cover a prefix of the range, never more than @len.  Returns the
   * number of extents (>= 1) or -errno. */
  int (*block_status)(struct cbt_image *img, uint64_t offset, uint64_t len,
                      struct cbt_extent *ext, size_t max);
  void (*close)(struct cbt_image *img);
};

struct cbt_image {
  const struct cbt_image_ops *ops;
  const char *format;            /* "raw", "qcow2" */
  uint64_t size;                 /* virtual size in bytes */
  uint64_t ino;                  /* inode of the image file (identity) */
  bool read_only;
  bool direct;                   /* --cache=none */
  unsigned direct_align;         /* buffer/offset alignment for O_DIRECT */
};

/* Open a raw image.  @direct opens a second O_DIRECT descriptor used for
 * aligned I/O (unaligned requests go through the page cache).
 * Returns 0 or -errno; on failure *why may be set to a reason (g_free). */
int cbt_image_open_raw(const char *path, bool read_only, bool direct,
                       struct cbt_image **out, char **why);

/* A sparse disk in memory of the size @spec says ("64M", "10G", "1T" or
 * bytes), empty at every start (lib/image/image-memory.c).  Its ino is
 * 0. */
int cbt_image_open_memory(const char *spec, bool read_only,
                          struct cbt_image **out, char **why);

/* Open @path as @format ("raw", "qcow2", or "auto"/NULL to detect by
 * magic); a @path "memory:SIZE" with format auto/NULL/"memory" is a
 * memory disk.  Returns 0 or -errno with *why set (g_free). */
int cbt_image_open(const char *path, const char *format, bool read_only,
                   bool direct, struct cbt_image **out, char **why);
int cbt_image_detect_format(const char *path, const char **format, char **why);

/* Run one request to completion on a private ring (not for event loops).
 * Returns 0 or -errno. */
int cbt_image_run_sync(struct cbt_image *img, enum cbt_io_type type,
                       unsigned flags, uint64_t offset, uint64_t len,
                       void *buf);

static inline void
cbt_image_submit(struct cbt_image *img, struct cbt_image_io *io)
{
  io->img = img;
  io->done = 0;
  io->stage = 0;
  img->ops->submit(img, io);
}

static inline void
cbt_image_close(struct cbt_image *img)
{
  if (img)
    img->ops->close(img);
}

#endif
