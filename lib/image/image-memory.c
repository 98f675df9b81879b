/* The memory:SIZE image backend: a sparse disk that lives in RAM and dies
 * with the process (the daemon's counterpart of nbdkit's memory plugin and
 * libvirt's test driver), for tests and fuzzing where a file adds nothing.
 *
 * The disk is a hash table of 64 KiB chunks, allocated on the first write
 * that touches them; a zero or trim that covers a whole chunk frees it, so
 * base:allocation reports holes exactly where nothing was written.  There
 * is no file and no io_uring: every request completes inside submit (the
 * image.h contract allows that).  One mutex serialises the workers; speed
 * is not the point.  A write that cannot get memory fails with ENOSPC, as
 * a full disk would.
 */
#include <errno.h>
#include <string.h>

#include <glib.h>

#include "cbt/bitmap.h"
#include "cbt/image.h"
#include "cbt/nbd-proto.h"
#include "cbt/util.h"

#define MEM_CHUNK (64u * 1024)

struct mem_image {
  struct cbt_image img;
  GMutex lock;
  GHashTable *chunks;                 /* &index -> struct chunk */
};

struct chunk {
  uint64_t index;
  uint8_t data[MEM_CHUNK];
};

static struct chunk *
lookup(struct mem_image *m, uint64_t index)
{
  return g_hash_table_lookup(m->chunks, &index);
}

/* Under the lock: the chunk at @index, allocated (zeroed) if needed, or
 * NULL when memory ran out. */
static struct chunk *
get_or_alloc(struct mem_image *m, uint64_t index)
{
  struct chunk *c = lookup(m, index);

  if (c)
    return c;
  c = g_try_malloc0(sizeof *c);
  if (!c)
    return NULL;
  c->index = index;
  g_hash_table_insert(m->chunks, &c->index, c);
  return c;
}

static int
do_io(struct mem_image *m, struct cbt_image_io *io)
{
  uint64_t pos = io->offset, end = io->offset + io->len;
  uint8_t *buf = io->buf;

  if (io->type == CBT_IO_FLUSH || io->type == CBT_IO_CACHE)
    return 0;
  if (end < pos || end > m->img.size)
    return -EINVAL;
  if (m->img.read_only && io->type != CBT_IO_READ)
    return -EROFS;
  while (pos < end) {
    uint64_t index = pos / MEM_CHUNK, in = pos % MEM_CHUNK;
    uint64_t n = MIN(end - pos, MEM_CHUNK - in);
    struct chunk *c;

    switch (io->type) {
    case CBT_IO_READ:
      c = lookup(m, index);
      if (c)
        memcpy(buf, c->data + in, n);
      else
        memset(buf, 0, n);
      buf += n;
      break;
    case CBT_IO_WRITE:
      c = get_or_alloc(m, index);
      if (!c)
        return -ENOSPC;
      memcpy(c->data + in, buf, n);
      buf += n;
      break;
    case CBT_IO_ZERO:
    case CBT_IO_TRIM:
      c = lookup(m, index);
      if (!c)
        break;                       /* reads as zeros already */
      if (n == MEM_CHUNK && !(io->flags & CBT_IO_NO_HOLE))
        g_hash_table_remove(m->chunks, &index);
      else
        memset(c->data + in, 0, n);
      break;
    default:
      return -EINVAL;
    }
    pos += n;
  }
  return 0;
}

static void
mem_submit(struct cbt_image *img, struct cbt_image_io *io)
{
  struct mem_image *m = cbt_container_of(img, struct mem_image, img);
  int r;

  g_mutex_lock(&m->lock);
  r = do_io(m, io);
  g_mutex_unlock(&m->lock);
  io->complete(io, r);
}

static int
mem_block_status(struct cbt_image *img, uint64_t offset, uint64_t len,
                 struct cbt_extent *ext, size_t max)
{
  struct mem_image *m = cbt_container_of(img, struct mem_image, img);
  uint64_t pos = offset, end;
  size_t n = 0;

  if (offset >= img->size || len == 0 || max == 0)
    return -EINVAL;
  end = MIN(img->size, offset + MIN(len, img->size - offset));
  g_mutex_lock(&m->lock);
  while (pos < end) {
    uint64_t step = MIN(end - pos, MEM_CHUNK - pos % MEM_CHUNK);
    uint32_t flags = lookup(m, pos / MEM_CHUNK) ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO;

    if (n > 0 && ext[n - 1].flags == flags) {
      ext[n - 1].length += step;
    } else {
      if (n == max)
        break;
      ext[n].length = step;
      ext[n].flags = flags;
      n++;
    }
    pos += step;
  }
  g_mutex_unlock(&m->lock);
  return (int)n;
}

static void
mem_close(struct cbt_image *img)
{
  struct mem_image *m = cbt_container_of(img, struct mem_image, img);

  g_hash_table_destroy(m->chunks);
  g_mutex_clear(&m->lock);
  g_free(m);
}

static const struct cbt_image_ops mem_ops = {
  .name = "memory",
  .submit = mem_submit,
  .block_status = mem_block_status,
  .close = mem_close,
};

int
cbt_image_open_memory(const char *spec, bool read_only, struct cbt_image **out,
                      char **why)
{
  struct mem_image *m;
  uint64_t v;

  if (cbt_parse_size(spec, &v) < 0 || v == 0 || v > CBT_BITMAP_MAX_SIZE)
    return cbt_fail(why, -EINVAL, "memory:%s: expected a size such as 64M or 10G "
                    "(at most 1 EiB)", spec);
  m = g_new0(struct mem_image, 1);
  g_mutex_init(&m->lock);
  m->chunks = g_hash_table_new_full(g_int64_hash, g_int64_equal, NULL, g_free);
  m->img.ops = &mem_ops;
  m->img.format = "memory";
  m->img.size = v;
  m->img.ino = 0;
  m->img.read_only = read_only;
  *out = &m->img;
  return 0;
}
