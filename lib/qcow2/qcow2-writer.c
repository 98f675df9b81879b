/* A streaming qcow2 (version 3) writer for backup files.
 *
 * Layout of a finished file, in cluster units (cs = cluster size):
 *
 *   cluster 0            header, backing-format extension, end-of-extensions
 *                        marker, backing file name (written last of all)
 *   1 .. D               guest data clusters, in the order they were first
 *                        written (never freed: see "Zeroing" below)
 *   D+1 .. D+T           L2 tables, in L1 index order
 *   then                 the L1 table (ceil(l1_size * 8 / cs) clusters)
 *   then                 the refcount table, then the refcount blocks
 *
 * Since nothing is ever freed, every host cluster from 0 to the end of the
 * file is referenced exactly once, so every refcount is 1 and every L1/L2
 * entry carries the COPIED flag (qemu-img check verifies both).
 *
 * In memory each touched L2 range has a table of host-order entries that
 * are encoded (big-endian) only at finish.  data_end (next_host) is the
 * append point for new data clusters.
 *
 * Zeroing: a cluster that is zeroed (explicitly or by writing all-zero
 * data) becomes a v3 zero cluster.  If it already had a host cluster, the
 * entry keeps that offset with the zero flag set ("preallocated zero
 * cluster"): the host cluster stays referenced once, the refcounts stay
 * exact without a free list, and a later data write reuses it in place.
 * The cost is that such a cluster occupies space it does not need; backups
 * rarely zero what they wrote.  On an image without a backing file an
 * unallocated cluster already reads as zeros, so zeroing it changes
 * nothing and allocates no L2 table.
 *
 * Locking: w->lock protects the L2 tables, next_host, the byte counters'
 * updates and the sticky error.  write() decides under the lock which host
 * cluster each guest cluster goes to and then writes the data without it,
 * so threads copy data in parallel.  finish() runs alone.
 *
 * Streaming the file's bytes in order (set_stream, for checksums while
 * writing): host clusters for new data are handed out in increasing order,
 * so each write() that allocates owns one contiguous host range
 * [h0, h1).  After its data is written it waits, under w->stream_lock,
 * until everything before h0 was reported (w->streamed == h0), reports
 * its range and moves w->streamed to h1.  Every range handed out is
 * passed on, also by a write that failed (it reports nothing and marks
 * the stream broken), so no thread waits for ever.  Waiting threads hold
 * no other lock, and the thread whose turn it is never waits for a later
 * one, so there is no deadlock.
 *
 * Write-behind (set_write_behind): the same turn moves the data to disk as
 * it is appended.  Every WRITE_BEHIND_KICK bytes reported (or every
 * window, if smaller) are handed to writeback at once (sync_file_range
 * WRITE), so little is left to write when the copy ends; and each time
 * the reported data crosses a window boundary, the thread waits for the
 * writeback of the window before the one just completed.  So at most two
 * windows are dirty in the page cache, the disk writes while the copy
 * goes on instead of all at once in finish's fdatasync, and a writer that
 * is faster than the disk is slowed to it.  (Kicking writeback only once
 * per 64 MiB window left up to 64 MiB for finish: a 2 GiB full took
 * 1.01-1.14 s against 0.98-1.10 s with 8 MiB kicks, 4 and 16 MiB being
 * no better, alternating runs.)
 * A window whose writeback is done is dropped from the cache
 * (POSIX_FADV_DONTNEED): nothing reads it back through the cache, and a
 * nightly backup of a large disk must not push the host's working set
 * (its VMs' data) out of memory.  It is no durability promise (no
 * metadata, no cache flush): finish still fdatasyncs.
 *
 * Ordering: the header is written only after the data and all other
 * metadata are durable (fdatasync in finish), so a valid header never
 * points at metadata that a crash could lose.  Until then cluster 0 is a
 * hole and the file is not a qcow2 image at all.
 *
 * Sink mode (cbt_qcow2_writer_create_sink): there is no file.  The bytes
 * that would go into it go to the sink's data callback instead, in file
 * order through the same turn as the stream above (so the callback is
 * where the data is written, and it may fail: its error fails the write
 * that reported it and sticks), the metadata from finish likewise, and
 * cluster 0 last to the head callback.  Nothing can be rewritten once it
 * has been handed on, so a write that would land on a host cluster
 * allocated before (a guest cluster written twice) fails with -ENOTSUP
 * and changes nothing; the backup never does that (nbd-pull plans each
 * cluster once).  Zeroing a written cluster is fine: only its L2 entry
 * changes.
 *
 * All file I/O goes through cbt/uring-io.h.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <glib.h>

#include "cbt/fault-inject.h"
#include "cbt/qcow2-writer.h"
#include "cbt/qcow2.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"

#define QCOW2_VERSION          3u
#define QCOW2_REFCOUNT_ORDER   4u                     /* 16-bit refcounts */

/* Entry bits and offsets: CBT_QCOW2_* in cbt/qcow2.h. */
/* Host offsets must stay below 2^56 (bits 9..55). */
#define QCOW2_MAX_HOST_OFFSET  (UINT64_C(1) << 56)

/* qemu implementation limits (qcow2.txt): it refuses larger tables. */
#define QEMU_MAX_L1_BYTES      (UINT64_C(32) << 20)
#define QEMU_MAX_REFTABLE_BYTES (UINT64_C(8) << 20)
#define QEMU_MAX_VIRTUAL_SIZE  ((uint64_t)INT64_MAX & ~UINT64_C(511))

#define SECTOR                 512u
/* Metadata written at finish is gathered into writes of up to this size. */
#define STAGE_BYTES            (4u << 20)
/* Write-behind hands data to writeback in pieces of this size (see the top). */
#define WRITE_BEHIND_KICK      (UINT64_C(8) << 20)

/* The header is struct cbt_qcow2_header_disk (cbt/qcow2.h), written with
 * its version 3 fields and no compression_type. */
_Static_assert(sizeof(struct cbt_qcow2_header_disk) == CBT_QCOW2_V3_HEADER_LEN,
               "qcow2 v3 header is 104 bytes");

/* Header extension: type and data length, then data padded to 8. */
struct qcow2_ext_disk {
  uint32_t type;
  uint32_t len;
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_ext_disk) == 8, "extension header size");

/* Host-order form of the header fields we set. */
struct qcow2_header {
  uint64_t backing_file_offset;
  uint32_t backing_file_size;
  uint32_t cluster_bits;
  uint64_t size;
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
};

struct cbt_qcow2_writer {
  GMutex lock;
  int fd;
  char *path;
  uint64_t size;              /* as given by the caller */
  uint64_t disk_size;         /* size rounded up to a sector, in the header */
  uint32_t cluster_size;
  uint32_t cluster_bits;
  uint32_t l2_entries;        /* cluster_size / 8 */
  uint32_t l1_size;
  char *backing_file;         /* NULL if none */
  char *backing_format;

  /* Under lock: */
  uint64_t **l2;              /* l1_size slots; NULL until touched */
  uint64_t n_l2;              /* tables allocated */
  uint64_t next_host;         /* where the next new data cluster goes */
  int error;                  /* first failed data write, sticky */

  /* Written under lock with atomics, read with atomics from anywhere. */
  uint64_t data_bytes;
  uint64_t zero_bytes;

  /* The byte stream (set_stream); see the top of the file. */
  cbt_qcow2_writer_stream_fn stream_fn;
  void *stream_opaque;
  GMutex stream_lock;
  GCond stream_cond;
  uint64_t streamed;          /* under stream_lock: [cs, streamed) reported */
  struct cbt_qcow2_writer_sink sink;  /* sink mode: fd is -1, sink.data set */
  bool stream_broken;         /* atomics */
  uint64_t write_behind;      /* window bytes, 0: off */

  bool finished;
};

static inline uint64_t
div_round_up(uint64_t a, uint64_t b)
{
  return a / b + (a % b != 0);
}

static inline uint64_t
round_up8(uint64_t x)
{
  return (x + 7) & ~UINT64_C(7);
}

static void
header_encode(const struct qcow2_header *h, uint8_t *buf)
{
  struct cbt_qcow2_header_disk d = {
    .magic = htobe32(CBT_QCOW2_MAGIC),
    .version = htobe32(QCOW2_VERSION),
    .backing_file_offset = htobe64(h->backing_file_offset),
    .backing_file_size = htobe32(h->backing_file_size),
    .cluster_bits = htobe32(h->cluster_bits),
    .size = htobe64(h->size),
    .crypt_method = 0,
    .l1_size = htobe32(h->l1_size),
    .l1_table_offset = htobe64(h->l1_table_offset),
    .refcount_table_offset = htobe64(h->refcount_table_offset),
    .refcount_table_clusters = htobe32(h->refcount_table_clusters),
    .nb_snapshots = 0,
    .snapshots_offset = 0,
    .incompatible_features = 0,
    .compatible_features = 0,
    .autoclear_features = 0,
    .refcount_order = htobe32(QCOW2_REFCOUNT_ORDER),
    .header_length = htobe32(CBT_QCOW2_V3_HEADER_LEN),
  };

  memcpy(buf, &d, sizeof d);
}

/* Append extension @type with @len bytes of @data at @buf + *@pos,
 * zero-padded to 8; the caller made sure it fits. */
static void
ext_encode(uint8_t *buf, size_t *pos, uint32_t type, const void *data,
           uint32_t len)
{
  struct qcow2_ext_disk e = { .type = htobe32(type), .len = htobe32(len) };

  memcpy(buf + *pos, &e, sizeof e);
  *pos += sizeof e;
  if (len)
    memcpy(buf + *pos, data, len);
  *pos += round_up8(len);
}

/* Bytes of cluster 0 used by header, extensions and backing file name. */
static uint64_t
header_area_bytes(const char *backing_file, const char *backing_format)
{
  uint64_t n = CBT_QCOW2_V3_HEADER_LEN + sizeof(struct qcow2_ext_disk);

  if (backing_file)
    n += sizeof(struct qcow2_ext_disk) + round_up8(strlen(backing_format)) +
         strlen(backing_file);
  return n;
}

/* --- entries (all under w->lock) -------------------------------------- */

enum entry_kind { KIND_NONE, KIND_DATA, KIND_ZERO };

static enum entry_kind
entry_kind(uint64_t e)
{
  if (e & CBT_QCOW2_ZERO_BIT)
    return KIND_ZERO;
  return (e & CBT_QCOW2_OFFSET_MASK) ? KIND_DATA : KIND_NONE;
}

/* Guest bytes of cluster @ci below the caller's virtual size. */
static uint64_t
guest_bytes(const cbt_qcow2_writer *w, uint64_t ci)
{
  uint64_t off = ci << w->cluster_bits;

  return MIN((uint64_t)w->cluster_size, w->size - off);
}

static void
count_kind(cbt_qcow2_writer *w, enum entry_kind k, uint64_t bytes, bool add)
{
  uint64_t *ctr = k == KIND_DATA ? &w->data_bytes :
                  k == KIND_ZERO ? &w->zero_bytes : NULL;

  if (!ctr)
    return;
  if (add)
    __atomic_add_fetch(ctr, bytes, __ATOMIC_RELAXED);
  else
    __atomic_sub_fetch(ctr, bytes, __ATOMIC_RELAXED);
}

/* Store @e for guest cluster @ci (its L2 table exists) and keep the byte
 * counters in step. */
static void
set_entry(cbt_qcow2_writer *w, uint64_t ci, uint64_t e)
{
  uint64_t *slot = &w->l2[ci / w->l2_entries][ci % w->l2_entries];
  enum entry_kind old = entry_kind(*slot), new = entry_kind(e);

  if (old != new) {
    uint64_t bytes = guest_bytes(w, ci);

    count_kind(w, old, bytes, false);
    count_kind(w, new, bytes, true);
  }
  *slot = e;
}

/* The entry that makes a cluster now mapped by @e read as zeros; see
 * "Zeroing" at the top.  Returns @e itself when nothing needs to change. */
static uint64_t
zeroed_entry(const cbt_qcow2_writer *w, uint64_t e)
{
  uint64_t host = e & CBT_QCOW2_OFFSET_MASK;

  if (host)
    return host | CBT_QCOW2_COPIED | CBT_QCOW2_ZERO_BIT;
  if (!w->backing_file && entry_kind(e) == KIND_NONE)
    return e;
  return CBT_QCOW2_ZERO_BIT;
}

/* Make sure the L2 tables for guest clusters [@first, @last] exist.
 * 0 or -ENOMEM (tables allocated so far stay; they are harmless). */
static int
ensure_l2(cbt_qcow2_writer *w, uint64_t first, uint64_t last)
{
  for (uint64_t i = first / w->l2_entries; i <= last / w->l2_entries; i++) {
    if (!w->l2[i]) {
      w->l2[i] = g_try_new0(uint64_t, w->l2_entries);
      if (!w->l2[i])
        return -ENOMEM;
      w->n_l2++;
    }
  }
  return 0;
}

/* --- create ------------------------------------------------------------ */

static int
check_opts(const struct cbt_qcow2_writer_opts *o, uint32_t *cs_out,
           uint64_t *disk_size_out, uint32_t *l1_size_out, char **why)
{
  uint32_t cs = o->cluster_size ? o->cluster_size : CBT_QCOW2_WRITER_DEFAULT_CLUSTER_SIZE;
  uint64_t disk_size, l1_size;

  if (cs < CBT_QCOW2_WRITER_MIN_CLUSTER_SIZE || cs > CBT_QCOW2_WRITER_MAX_CLUSTER_SIZE ||
      (cs & (cs - 1)) != 0)
    return cbt_fail(why, -EINVAL, "cluster size %" PRIu32 " is not a power of two "
                "between %u and %u", cs, CBT_QCOW2_WRITER_MIN_CLUSTER_SIZE,
                CBT_QCOW2_WRITER_MAX_CLUSTER_SIZE);
  if (o->size == 0)
    return cbt_fail(why, -EINVAL, "virtual size is 0");
  /* qemu counts the virtual size in whole sectors (it truncates a header
   * size that is not a multiple of 512), so round up as qemu-img does. */
  if (o->size > QEMU_MAX_VIRTUAL_SIZE)
    return cbt_fail(why, -EFBIG, "virtual size %" PRIu64 " is too large", o->size);
  disk_size = (o->size + SECTOR - 1) & ~(uint64_t)(SECTOR - 1);
  l1_size = div_round_up(div_round_up(disk_size, cs), cs / 8);
  if (l1_size * 8 > QEMU_MAX_L1_BYTES)
    return cbt_fail(why, -EFBIG, "virtual size %" PRIu64 " needs an L1 table larger "
                "than qemu's limit of %" PRIu64 " bytes with %" PRIu32
                "-byte clusters: use larger clusters", o->size,
                QEMU_MAX_L1_BYTES, cs);

  if (!o->backing_file) {
    if (o->backing_format)
      return cbt_fail(why, -EINVAL, "backing format given without backing file");
  } else {
    size_t n = strlen(o->backing_file);

    if (n == 0)
      return cbt_fail(why, -EINVAL, "backing file name is empty");
    if (n > CBT_QCOW2_WRITER_BACKING_NAME_MAX)
      return cbt_fail(why, -EINVAL, "backing file name is %zu bytes, longer than "
                  "%u", n, CBT_QCOW2_WRITER_BACKING_NAME_MAX);
    if (!o->backing_format)
      return cbt_fail(why, -EINVAL, "backing file %s: no backing format given",
                  o->backing_file);
    if (strcmp(o->backing_format, "qcow2") != 0 &&
        strcmp(o->backing_format, "raw") != 0)
      return cbt_fail(why, -EINVAL, "backing format \"%s\" is not qcow2 or raw",
                  o->backing_format);
  }
  if (header_area_bytes(o->backing_file, o->backing_format) > cs)
    return cbt_fail(why, -EINVAL, "header and backing file name do not fit in "
                "one %" PRIu32 "-byte cluster", cs);

  *cs_out = cs;
  *disk_size_out = disk_size;
  *l1_size_out = (uint32_t)l1_size;
  return 0;
}

/* A writer for @o with no output yet (fd -1), named @name in messages:
 * the part both constructors share.  0 or -errno with *@why. */
static int
writer_new(const struct cbt_qcow2_writer_opts *o, const char *name,
           cbt_qcow2_writer **out, char **why)
{
  g_autoptr(cbt_qcow2_writer) w = NULL;
  uint32_t cs = 0, l1_size = 0;
  uint64_t disk_size = 0;
  int r;

  r = check_opts(o, &cs, &disk_size, &l1_size, why);
  if (r < 0)
    return r;

  w = g_new0(cbt_qcow2_writer, 1);
  g_mutex_init(&w->lock);
  g_mutex_init(&w->stream_lock);
  g_cond_init(&w->stream_cond);
  w->fd = -1;
  w->path = g_strdup(name);
  w->size = o->size;
  w->disk_size = disk_size;
  w->cluster_size = cs;
  w->cluster_bits = (uint32_t)__builtin_ctz(cs);
  w->l2_entries = cs / 8;
  w->l1_size = l1_size;
  w->backing_file = g_strdup(o->backing_file);
  w->backing_format = g_strdup(o->backing_format);
  w->next_host = cs;          /* cluster 0 is the header */
  w->streamed = cs;
  /* Up to 4 Mi pointers (32 MiB) for the largest L1 qemu accepts. */
  w->l2 = g_try_new0(uint64_t *, l1_size);
  if (!w->l2)
    return cbt_fail(why, -ENOMEM, "out of memory for %" PRIu32 " L1 entries",
                l1_size);
  *out = g_steal_pointer(&w);
  return 0;
}

int
cbt_qcow2_writer_create(const char *path, const struct cbt_qcow2_writer_opts *o,
                        cbt_qcow2_writer **out, char **why)
{
  g_autoptr(cbt_qcow2_writer) w = NULL;
  int r;

  if (!path || !o || !out)
    return cbt_fail(why, -EINVAL, "missing argument");
  r = writer_new(o, path, &w, why);
  if (r < 0)
    return r;

  w->fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (w->fd < 0)
    return cbt_fail(why, -errno, "cannot create: %s", g_strerror(errno));
  cbt_fi_tag_fd(w->fd, CBT_FI_REPO);   /* tests: may fail its I/O */

  *out = g_steal_pointer(&w);
  return 0;
}

int
cbt_qcow2_writer_create_sink(const struct cbt_qcow2_writer_opts *o,
                             const struct cbt_qcow2_writer_sink *sink,
                             cbt_qcow2_writer **out, char **why)
{
  g_autoptr(cbt_qcow2_writer) w = NULL;
  int r;

  if (!o || !sink || !sink->data || !sink->head || !out)
    return cbt_fail(why, -EINVAL, "missing argument");
  r = writer_new(o, "(sink)", &w, why);
  if (r < 0)
    return r;
  w->sink = *sink;
  *out = g_steal_pointer(&w);
  return 0;
}

void
cbt_qcow2_writer_free(cbt_qcow2_writer *w)
{
  if (!w)
    return;
  if (w->fd >= 0)
    close(w->fd);
  if (w->l2) {
    for (uint32_t i = 0; i < w->l1_size; i++)
      g_free(w->l2[i]);
    g_free(w->l2);
  }
  g_free(w->backing_file);
  g_free(w->backing_format);
  g_free(w->path);
  g_mutex_clear(&w->lock);
  g_mutex_clear(&w->stream_lock);
  g_cond_clear(&w->stream_cond);
  g_free(w);
}

/* --- write and zero ---------------------------------------------------- */

/* The alignment and range rule shared by write and zero. */
static int
check_range(const cbt_qcow2_writer *w, uint64_t offset, uint64_t len)
{
  uint64_t end;

  if (!w || w->finished)
    return -EINVAL;
  if (offset & (w->cluster_size - 1))
    return -EINVAL;
  if (__builtin_add_overflow(offset, len, &end) || end > w->size)
    return -EINVAL;
  if ((len & (w->cluster_size - 1)) != 0 && end != w->size)
    return -EINVAL;
  return 0;
}

/* Per guest cluster of one write request. */
struct wclust {
  uint64_t host;              /* 0: stored as zero, no data to write */
  bool zero;
  bool fresh;                 /* host cluster allocated by this request */
};

void
cbt_qcow2_writer_set_stream(cbt_qcow2_writer *w, cbt_qcow2_writer_stream_fn fn,
                            void *opaque)
{
  g_mutex_lock(&w->stream_lock);
  if (w->sink.data)
    __atomic_store_n(&w->stream_broken, true, __ATOMIC_RELAXED);  /* use the sink */
  w->stream_fn = fn;
  w->stream_opaque = opaque;
  if (w->next_host != w->cluster_size)
    __atomic_store_n(&w->stream_broken, true, __ATOMIC_RELAXED);  /* too late */
  g_mutex_unlock(&w->stream_lock);
}

void
cbt_qcow2_writer_set_write_behind(cbt_qcow2_writer *w, uint64_t window)
{
  w->write_behind = window;
}

/* The host range [@h0, @h1) was reported: writeback as described at the
 * top.  Errors are ignored: finish's fdatasync reports them. */
static void
write_behind(cbt_qcow2_writer *w, uint64_t h0, uint64_t h1)
{
  const uint64_t win = w->write_behind;
  const uint64_t kick = MIN(win, WRITE_BEHIND_KICK);

  for (uint64_t k = (h0 / kick + 1) * kick; k <= h1; k += kick)
    (void)sync_file_range(w->fd, (off64_t)(k - kick), (off64_t)kick, SYNC_FILE_RANGE_WRITE);
  for (uint64_t b = (h0 / win + 1) * win; b <= h1; b += win) {
    if (b >= 2 * win) {
      (void)sync_file_range(w->fd, (off64_t)(b - 2 * win), (off64_t)win,
                            SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                            SYNC_FILE_RANGE_WAIT_AFTER);
      /* Written back, so clean: drop it from the cache. */
      (void)posix_fadvise(w->fd, (off_t)(b - 2 * win), (off_t)win, POSIX_FADV_DONTNEED);
    }
  }
}

bool
cbt_qcow2_writer_stream_intact(const cbt_qcow2_writer *w)
{
  if (w->sink.data)
    return w->error == 0;
  return w->stream_fn && !__atomic_load_n(&w->stream_broken, __ATOMIC_RELAXED) &&
         w->error == 0;
}

/* Hand @len bytes at file offset @off on: to the sink (its result), or
 * to the stream watcher (0). */
static int
stream_out(cbt_qcow2_writer *w, uint64_t off, const void *buf, size_t len)
{
  if (w->sink.data)
    return w->sink.data(w->sink.opaque, off, buf, len);
  w->stream_fn(w->stream_opaque, off, buf, len);
  return 0;
}

/* Report host range [@h0, @h1), the new clusters of one write request @c
 * of @n clusters from @buf (the partial last one from @tail), when it is
 * its turn; see the top of the file.  With @failed nothing is reported and
 * the stream is marked broken, but the turn is passed on all the same.
 * Returns the sink's error, or 0. */
static int
stream_report(cbt_qcow2_writer *w, const struct wclust *c, uint64_t n,
              const uint8_t *buf, size_t len, const uint8_t *tail,
              uint64_t h0, uint64_t h1, bool failed)
{
  const uint64_t cs = w->cluster_size;
  int r = 0;

  g_mutex_lock(&w->stream_lock);
  while (w->streamed != h0)
    g_cond_wait(&w->stream_cond, &w->stream_lock);
  if (!w->stream_fn && !w->sink.data)
    goto pass;
  if (failed || (len % cs != 0 && !tail && c[n - 1].fresh))
    __atomic_store_n(&w->stream_broken, true, __ATOMIC_RELAXED);
  if (!__atomic_load_n(&w->stream_broken, __ATOMIC_RELAXED)) {
    for (uint64_t i = 0; i < n;) {
      uint64_t j = i + 1;

      if (!c[i].fresh) {
        i++;
        continue;
      }
      if (i * cs + cs > len) {            /* the partial last cluster */
        r = stream_out(w, c[i].host, tail, cs);
        break;
      }
      while (j < n && c[j].fresh && (j + 1) * cs <= len)
        j++;
      r = stream_out(w, c[i].host, buf + i * cs, (size_t)((j - i) * cs));
      if (r < 0)
        break;
      i = j;
    }
    if (r < 0)
      __atomic_store_n(&w->stream_broken, true, __ATOMIC_RELAXED);
  }
  /* A sink that missed earlier bytes must not take this write as done. */
  if (w->sink.data && r == 0 && !failed &&
      __atomic_load_n(&w->stream_broken, __ATOMIC_RELAXED))
    r = -EIO;
pass:
  w->streamed = h1;
  g_cond_broadcast(&w->stream_cond);
  g_mutex_unlock(&w->stream_lock);
  if (w->write_behind && !failed && w->fd >= 0)
    write_behind(w, h0, h1);
  return r;
}

int
cbt_qcow2_writer_write(cbt_qcow2_writer *w, uint64_t offset, const void *buf,
                       size_t len)
{
  g_autofree struct wclust *c = NULL;
  g_autofree uint8_t *tail = NULL;
  const uint8_t *p = buf;
  const uint64_t cs = w ? w->cluster_size : 0;
  uint64_t first, n, new_data = 0, h0, h1;
  bool streamed;
  int r;

  r = check_range(w, offset, len);
  if (r < 0)
    return r;
  if (len == 0)
    return 0;
  if (!buf)
    return -EINVAL;
  first = offset >> w->cluster_bits;
  n = div_round_up(len, cs);
  c = g_try_new0(struct wclust, n);
  if (!c)
    return -ENOMEM;

  /* Outside the lock: which clusters are all zero. */
  for (uint64_t i = 0; i < n; i++) {
    c[i].zero = cbt_is_zero(p + i * cs, MIN(cs, len - i * cs));
    new_data += !c[i].zero;
  }

  g_mutex_lock(&w->lock);
  if (w->sink.data) {
    /* Sink mode: what was handed on cannot be rewritten (see the top),
     * and after a sink error nothing more is taken. */
    if (w->error)
      r = w->error;
    for (uint64_t i = 0; i < n && r == 0; i++) {
      uint64_t ci = first + i;
      const uint64_t *l2 = w->l2[ci / w->l2_entries];

      if (!c[i].zero && l2 && (l2[ci % w->l2_entries] & CBT_QCOW2_OFFSET_MASK))
        r = -ENOTSUP;
    }
    if (r < 0) {
      g_mutex_unlock(&w->lock);
      return r;
    }
  }
  /* Allocate every L2 table needed before changing any entry, so running
   * out of memory leaves the mapping as it was.  Without a backing file a
   * zero cluster in an untouched range needs no table. */
  for (uint64_t i = 0; i < n && r == 0; i++)
    if (!c[i].zero || w->backing_file)
      r = ensure_l2(w, first + i, first + i);
  if (r == 0 && w->next_host + new_data * cs > QCOW2_MAX_HOST_OFFSET)
    r = -EFBIG;
  if (r < 0) {
    g_mutex_unlock(&w->lock);
    return r;
  }
  h0 = w->next_host;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t ci = first + i;
    uint64_t *l2 = w->l2[ci / w->l2_entries];
    uint64_t e;

    if (!l2)
      continue;               /* a zero cluster, see above */
    e = l2[ci % w->l2_entries];
    if (c[i].zero) {
      set_entry(w, ci, zeroed_entry(w, e));
      continue;
    }
    c[i].host = e & CBT_QCOW2_OFFSET_MASK;
    if (!c[i].host) {
      c[i].host = w->next_host;
      c[i].fresh = true;
      w->next_host += cs;
    } else if (w->stream_fn) {
      /* Rewritten in place: what was reported of it is stale. */
      __atomic_store_n(&w->stream_broken, true, __ATOMIC_RELAXED);
    }
    set_entry(w, ci, c[i].host | CBT_QCOW2_COPIED);
  }
  h1 = w->next_host;
  g_mutex_unlock(&w->lock);

  /* The partial last cluster is written padded with zeros to a whole
   * cluster, so the host cluster never holds stale bytes past the virtual
   * size. */
  if (len % cs != 0 && !c[n - 1].zero) {
    tail = g_try_malloc0(cs);
    if (tail)
      memcpy(tail, p + (n - 1) * cs, len % cs);
    else
      r = -ENOMEM;            /* the turn is still passed on below */
  }
  streamed = (w->stream_fn || w->write_behind || w->sink.data) && h1 > h0;

  /* Outside the lock: the data, one write per run of clusters that are
   * contiguous both in @buf and in the file. */
  for (uint64_t i = 0; i < n && r == 0;) {
    uint64_t j = i + 1, bytes;

    if (c[i].zero) {
      i++;
      continue;
    }
    while (j < n && !c[j].zero && c[j].host == c[j - 1].host + cs)
      j++;
    bytes = MIN(j * cs, len) - i * cs;
    if (bytes % cs) {
      /* The run ends with the partial last cluster. */
      uint64_t whole = bytes - bytes % cs;

      if (whole && w->fd >= 0)
        r = cbt_io_pwrite(w->fd, p + i * cs, whole, c[i].host);
      if (r == 0 && w->fd >= 0)
        r = cbt_io_pwrite(w->fd, tail, cs, c[j - 1].host);
    } else if (w->fd >= 0) {
      r = cbt_io_pwrite(w->fd, p + i * cs, bytes, c[i].host);
    }
    i = j;
  }
  if (streamed) {
    int sr = stream_report(w, c, n, p, len, tail, h0, h1, r < 0);

    if (r == 0)
      r = sr;
  }

  if (r < 0) {
    /* The metadata already maps these clusters; finish must not produce a
     * file that silently reads zeros or stale data there. */
    g_mutex_lock(&w->lock);
    if (w->error == 0)
      w->error = r;
    g_mutex_unlock(&w->lock);
  }
  return r;
}

int
cbt_qcow2_writer_zero(cbt_qcow2_writer *w, uint64_t offset, uint64_t len)
{
  uint64_t first, end_c;
  int r;

  r = check_range(w, offset, len);
  if (r < 0)
    return r;
  if (len == 0)
    return 0;
  first = offset >> w->cluster_bits;
  end_c = div_round_up(offset + len, w->cluster_size);

  /* One L2 range per lock hold, so a huge zero range does not stall
   * concurrent writers. */
  for (uint64_t ci = first; ci < end_c;) {
    uint64_t t = ci / w->l2_entries;
    uint64_t stop = MIN(end_c, (t + 1) * w->l2_entries);

    g_mutex_lock(&w->lock);
    if (!w->l2[t] && !w->backing_file) {
      /* Nothing mapped here and no backing data to hide. */
      g_mutex_unlock(&w->lock);
      ci = stop;
      continue;
    }
    r = ensure_l2(w, ci, ci);
    if (r < 0) {
      g_mutex_unlock(&w->lock);
      return r;
    }
    for (; ci < stop; ci++)
      set_entry(w, ci, zeroed_entry(w, w->l2[t][ci % w->l2_entries]));
    g_mutex_unlock(&w->lock);
  }
  return 0;
}

uint64_t
cbt_qcow2_writer_data_bytes(const cbt_qcow2_writer *w)
{
  return __atomic_load_n(&w->data_bytes, __ATOMIC_RELAXED);
}

uint64_t
cbt_qcow2_writer_zero_bytes(const cbt_qcow2_writer *w)
{
  return __atomic_load_n(&w->zero_bytes, __ATOMIC_RELAXED);
}

uint32_t
cbt_qcow2_writer_cluster_size(const cbt_qcow2_writer *w)
{
  return w->cluster_size;
}

/* --- finish ------------------------------------------------------------ */

/* Sequential writer for the metadata area: whole clusters are filled in a
 * staging buffer and written in large pieces. */
struct seqw {
  int fd;                     /* w->fd, or -1 in sink mode */
  cbt_qcow2_writer *w;        /* its stream_fn sees what is written */
  uint32_t cs;
  uint8_t *buf;
  size_t cap, used;
  uint64_t off;               /* file offset of buf[0] */
};

static int
seqw_flush(struct seqw *s)
{
  int r = 0;

  if (s->used) {
    if (s->fd >= 0)
      r = cbt_io_pwrite(s->w->fd, s->buf, s->used, s->off);
    if (r == 0 && (s->w->stream_fn || s->w->sink.data))
      r = stream_out(s->w, s->off, s->buf, s->used);
    s->off += s->used;
    s->used = 0;
  }
  return r;
}

/* A zeroed cluster-sized slot to fill; it is written at the next offset.
 * NULL with *@err set if flushing the full buffer failed. */
static uint8_t *
seqw_next(struct seqw *s, int *err)
{
  uint8_t *slot;

  if (s->used == s->cap) {
    *err = seqw_flush(s);
    if (*err < 0)
      return NULL;
  }
  slot = s->buf + s->used;
  memset(slot, 0, s->cs);
  s->used += s->cs;
  return slot;
}

static inline void
put_be64(uint8_t *p, uint64_t v)
{
  v = htobe64(v);
  memcpy(p, &v, sizeof v);
}

static inline void
put_be16(uint8_t *p, uint16_t v)
{
  v = htobe16(v);
  memcpy(p, &v, sizeof v);
}

/* Refcount structure sizes for an image whose other clusters number
 * @n_other: each refcount block counts cs/2 clusters including the
 * refcount table and the blocks themselves, so grow both until they cover
 * everything (the sequence only increases and settles in a step or two). */
static void
refcount_layout(uint64_t n_other, uint32_t cs, uint64_t *n_rt, uint64_t *n_rb)
{
  const uint64_t per_block = (uint64_t)cs * 8 / (1u << QCOW2_REFCOUNT_ORDER);
  uint64_t rt = 0, rb = 0;

  for (;;) {
    uint64_t nrb = div_round_up(n_other + rt + rb, per_block);
    uint64_t nrt = div_round_up(nrb * 8, cs);

    if (nrb == rb && nrt == rt)
      break;
    rb = nrb;
    rt = nrt;
  }
  *n_rt = rt;
  *n_rb = rb;
}

/* Write L2 tables, L1, refcount table and blocks from @s->off on and fill
 * in the table offsets of @h.  Every cluster from 0 to the end gets
 * refcount 1 (see the top of the file). */
static int
write_metadata(cbt_qcow2_writer *w, struct seqw *s, struct qcow2_header *h,
               char **why)
{
  const uint32_t cs = w->cluster_size;
  const uint64_t l2_start = s->off;
  const uint64_t l1_clusters = div_round_up((uint64_t)w->l1_size * 8, cs);
  const uint64_t per_block = (uint64_t)cs * 8 / (1u << QCOW2_REFCOUNT_ORDER);
  uint64_t l1_off, rt_off, rb_off, n_rt, n_rb, total, l2_off;
  uint64_t next_l2;
  int r = 0;

  l1_off = l2_start + w->n_l2 * cs;
  rt_off = l1_off + l1_clusters * cs;
  refcount_layout(rt_off / cs, cs, &n_rt, &n_rb);
  rb_off = rt_off + n_rt * cs;
  total = rb_off / cs + n_rb;
  if (n_rt * cs > QEMU_MAX_REFTABLE_BYTES)
    return cbt_fail(why, -EFBIG, "refcount table of %" PRIu64 " bytes exceeds "
                "qemu's limit", n_rt * cs);
  if (total > QCOW2_MAX_HOST_OFFSET / cs)
    return cbt_fail(why, -EFBIG, "image file would exceed 2^56 bytes");

  /* L2 tables, in L1 order. */
  for (uint32_t i = 0; i < w->l1_size; i++) {
    uint8_t *slot;

    if (!w->l2[i])
      continue;
    if (!(slot = seqw_next(s, &r)))
      goto io_error;
    for (uint32_t k = 0; k < w->l2_entries; k++)
      put_be64(slot + 8 * k, w->l2[i][k]);
  }

  /* L1 table: entry i points at the i-th allocated L2 table. */
  next_l2 = l2_start;
  for (uint64_t c = 0; c < l1_clusters; c++) {
    uint8_t *slot = seqw_next(s, &r);

    if (!slot)
      goto io_error;
    for (uint64_t k = 0; k < cs / 8; k++) {
      uint64_t i = c * (cs / 8) + k;

      if (i >= w->l1_size)
        break;
      if (!w->l2[i])
        continue;
      l2_off = next_l2;
      next_l2 += cs;
      put_be64(slot + 8 * k, l2_off | CBT_QCOW2_COPIED);
    }
  }

  /* Refcount table, then the blocks it points at. */
  for (uint64_t c = 0; c < n_rt; c++) {
    uint8_t *slot = seqw_next(s, &r);

    if (!slot)
      goto io_error;
    for (uint64_t k = 0; k < cs / 8; k++) {
      uint64_t b = c * (cs / 8) + k;

      if (b >= n_rb)
        break;
      put_be64(slot + 8 * k, rb_off + b * cs);
    }
  }
  for (uint64_t b = 0; b < n_rb; b++) {
    uint8_t *slot = seqw_next(s, &r);
    uint64_t in_use;

    if (!slot)
      goto io_error;
    in_use = MIN(per_block, total - b * per_block);
    for (uint64_t k = 0; k < in_use; k++)
      put_be16(slot + 2 * k, 1);
  }
  r = seqw_flush(s);
  if (r < 0)
    goto io_error;
  g_assert(s->off == total * cs);

  h->l1_size = w->l1_size;
  h->l1_table_offset = l1_off;
  h->refcount_table_offset = rt_off;
  h->refcount_table_clusters = (uint32_t)n_rt;
  return 0;

io_error:
  return cbt_fail(why, r, "writing metadata: %s", g_strerror(-r));
}

/* Cluster 0: header, extensions, backing file name. */
static int
write_header(cbt_qcow2_writer *w, struct qcow2_header *h, char **why)
{
  g_autofree uint8_t *buf = g_try_malloc0(w->cluster_size);
  size_t pos = CBT_QCOW2_V3_HEADER_LEN;
  int r;

  if (!buf)
    return cbt_fail(why, -ENOMEM, "out of memory");
  if (w->backing_file)
    ext_encode(buf, &pos, CBT_QCOW2_EXT_BACKING_FMT, w->backing_format,
               (uint32_t)strlen(w->backing_format));
  ext_encode(buf, &pos, CBT_QCOW2_EXT_END, NULL, 0);
  if (w->backing_file) {
    size_t n = strlen(w->backing_file);

    h->backing_file_offset = pos;
    h->backing_file_size = (uint32_t)n;
    memcpy(buf + pos, w->backing_file, n);
    pos += n;
  }
  g_assert(pos <= w->cluster_size);   /* checked at create */
  h->cluster_bits = w->cluster_bits;
  h->size = w->disk_size;
  header_encode(h, buf);

  if (w->sink.data) {
    r = w->sink.head(w->sink.opaque, buf, w->cluster_size);
    return r < 0 ? cbt_fail(why, r, "writing header: %s", g_strerror(-r)) : 0;
  }
  r = cbt_io_pwrite(w->fd, buf, w->cluster_size, 0);
  if (r < 0)
    return cbt_fail(why, r, "writing header: %s", g_strerror(-r));
  if (w->stream_fn)
    w->stream_fn(w->stream_opaque, 0, buf, w->cluster_size);
  return 0;
}

/* Make the new directory entry durable too. */
static int
sync_parent_dir(const char *path, char **why)
{
  int r = cbt_io_sync_parent_dir(path);

  return r < 0 ? cbt_fail(why, r, "%s: syncing its directory: %s", path, g_strerror(-r)) : 0;
}

int
cbt_qcow2_writer_finish(cbt_qcow2_writer *w, char **why)
{
  struct qcow2_header h = { 0 };
  struct seqw s = { 0 };
  g_autofree uint8_t *stage = NULL;
  int r, fd;

  if (!w)
    return cbt_fail(why, -EINVAL, "missing argument");
  if (w->finished)
    return cbt_fail(why, -EINVAL, "finish called twice");
  w->finished = true;
  if (w->error)
    return cbt_fail(why, -EIO, "an earlier data write failed: %s",
                g_strerror(-w->error));

  /* Every data write has returned, so every range was reported. */
  if ((w->stream_fn || w->write_behind || w->sink.data) && w->streamed != w->next_host)
    __atomic_store_n(&w->stream_broken, true, __ATOMIC_RELAXED);
  if (w->sink.data && __atomic_load_n(&w->stream_broken, __ATOMIC_RELAXED))
    return cbt_fail(why, -EIO, "the data did not reach the sink in order");
  s.fd = w->fd;
  s.w = w;
  s.cs = w->cluster_size;
  s.cap = MAX(STAGE_BYTES, w->cluster_size);
  s.off = w->next_host;
  stage = g_try_malloc(s.cap);
  if (!stage)
    return cbt_fail(why, -ENOMEM, "out of memory");
  s.buf = stage;

  r = write_metadata(w, &s, &h, why);
  if (r < 0)
    return r;
  if (w->sink.data)
    return write_header(w, &h, why);  /* the sink orders it after the rest */
  /* Everything the header points at is durable before the header. */
  r = cbt_io_fdatasync(w->fd);
  if (r < 0)
    return cbt_fail(why, r, "fdatasync: %s", g_strerror(-r));
  r = write_header(w, &h, why);
  if (r < 0)
    return r;
  r = cbt_io_fdatasync(w->fd);
  if (r < 0)
    return cbt_fail(why, r, "fdatasync: %s", g_strerror(-r));

  fd = w->fd;
  w->fd = -1;
  if (close(fd) < 0)
    return cbt_fail(why, -errno, "close: %s", g_strerror(errno));
  return sync_parent_dir(w->path, why);
}
