/* qcow2 image backend (format: QEMU docs/interop/qcow2.txt; decoding and
 * validation of on-disk structures: qcow2.c).
 *
 * Two paths.
 *
 * Fast path, on the calling worker's ring: READ and WRITE look each
 * guest cluster up in the in-memory L2 cache under q->lock; a run of
 * contiguous allocated clusters (for WRITE: allocated, refcount one) is one
 * read/write sqe at the host offset; zero and unallocated clusters of an
 * image without backing file are zero-filled without I/O.  The request
 * walks its range with io->done, one sqe at a time.
 *
 * Slow path, on one metadata thread per image: everything that needs
 * metadata I/O or changes metadata (L2 cache misses, allocation and
 * copy-on-write, backing file and compressed reads, WRITE_ZEROES, TRIM,
 * FLUSH, FUA) is handed over with the rest of the request.  The metadata
 * thread runs the request to completion with the synchronous io_uring
 * helpers (cbt/uring-io.h) and then posts a completion into the worker's
 * ring (IORING_OP_MSG_RING from a ring of its own, one submission for all
 * the requests it finished together), which finishes the request on the
 * worker.  Kernels without MSG_RING get an eventfd per request instead,
 * whose read the worker queued on its ring.  Worker threads therefore never
 * wait for I/O, and all metadata changes are serialised on one thread, so
 * they need no ordering between concurrent allocators.  We chose this over
 * a per-request async metadata state machine: the fast path (the steady
 * state of a VM disk) is exactly as cheap, and the crash-ordering below is
 * easy to see in one sequential function.  The thread takes every request
 * queued at once and writes the data of the plain writes among them (in
 * place, or into clusters that read as zeros: the allocating writes of a
 * fresh image) with one submission on a ring of its own before it installs
 * their L2 entries ("batched writes" below).
 *
 * Locking: q->lock protects the L1 table, the L2 cache (the hash table
 * and the contents of the tables) and the metadata set.  Only the
 * metadata thread modifies them, always under the lock; workers read them
 * under the lock and copy what they need.  The metadata thread reads its
 * own state without the lock.  Refcount blocks, the refcount table, the
 * allocator and the pending-free list belong to the metadata thread alone.
 *
 * Write-back and crash safety.  Metadata changes are made in memory and
 * written by writeback(), at FLUSH, FUA, when too much is dirty and at
 * close.  Between two writebacks the on-disk metadata is therefore the
 * consistent state of the last writeback; data written to newly allocated
 * clusters lands in clusters the on-disk refcounts call free.  writeback()
 * moves the disk from one consistent state to the next in this order, with
 * an fdatasync after each step that wrote anything:
 *   1. dirty refcount blocks (increments only, see 6) and a relocated
 *      refcount table; the sync also makes guest data and COW data durable
 *   2. the header fields of a relocated refcount table, or the refcount
 *      table in place: a reference to a refcount block only after the
 *      block is durable
 *   3. dirty L2 tables: a reference to a cluster only after its refcount
 *      (1-2) and its COW data (1) are durable
 *   4. the L1 table: a reference to an L2 table only after it is durable
 *   5. decrements (clusters no longer referenced), then their refcount
 *      blocks: a refcount drops only after no durable table references
 *      the cluster.
 * A crash at any point leaves refcounts >= references: at worst leaked
 * clusters, never a cluster referenced with a refcount too low.
 * Freed clusters are only reused after step 5, and step 5 runs only when
 * no fast-path I/O is in flight, so a worker that looked up a cluster
 * before it was freed cannot write into it after it is reused.
 * An L2 entry is installed in memory only after the data (with its COW
 * head and tail) has been written, so the fast path never reads a cluster
 * before its contents are there.
 *
 * Metadata overlap.  A writable image keeps the set of host clusters that
 * hold metadata (header, L1 table, refcount table and blocks, L2 tables;
 * cbt/qcow2-metaset.h), built at open, where metadata structures that
 * overlap each other make us refuse the image, and updated as the
 * metadata thread allocates or frees them.  Snapshot tables need no place
 * in it (images with snapshots are read-only here), nor do persistent
 * bitmaps (their auto-clear bit is cleared before the first write, which
 * makes them stale for every reader).  A corrupt image can point L2
 * entries at metadata, or give a metadata cluster refcount zero, so:
 *   - the allocator skips clusters in the set, whatever their refcount;
 *   - before guest data goes to a host cluster (in place, or a fresh one),
 *     and before a reference to one is dropped, the cluster is tested
 *     against the set: the fast path hands such writes to the metadata
 *     thread, which refuses them with -EIO and marks the image corrupt
 *     (mark_corrupt): every later write, zero and trim fails with -EIO,
 *     reads go on, and a v3 image gets its corrupt bit set on disk.
 * The test is one bitmap lookup per cluster, under the lock the fast path
 * holds anyway.  An image already marked corrupt opens read-only only.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>
#include <zlib.h>

#include "cbt/fault-inject.h"
#include "cbt/image.h"
#include "cbt/nbd-proto.h"
#include "cbt/qcow2.h"
#include "cbt/qcow2-metaset.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"

#define L2_CACHE_BYTES    (32u * 1024 * 1024)
#define RB_CACHE_BYTES    (16u * 1024 * 1024)
#define DIRTY_LIMIT_BYTES (16u * 1024 * 1024)
#define MAX_BACKING_DEPTH 16
#define MAX_ALLOC_RUN     256u          /* clusters per allocating write */
#define MAX_SQE_BYTES     (1u << 30)
#define BATCH_JOBS        64u           /* jobs the metadata thread takes at once */
#define BATCH_OPS         128u          /* data writes in one batch */
#define BATCH_RING        256u

enum { ST_FUA_FLUSH = 1 };              /* io->stage: data done, flush */

/* A cached L2 table or refcount block, in disk byte order. */
struct q2_table {
  uint64_t key;                  /* L1 index / refcount table index */
  uint64_t disk_off;             /* where it lives in the file */
  uint8_t *buf;                  /* one cluster */
  bool dirty;
};

struct q2_cache {
  GHashTable *map;               /* &key -> struct q2_table */
  size_t max;                    /* tables kept before evicting clean ones */
};

struct q2 {
  struct cbt_image pub;
  char *path;
  int fd;
  struct cbt_qcow2_info h;
  unsigned cbits;
  uint64_t csize;
  uint64_t l2_entries;           /* entries per L2 table */
  uint64_t rb_entries;           /* refcounts per refcount block */
  struct cbt_image *backing;     /* NULL without backing file */
  uint8_t *zeros;                /* one zero cluster */

  /* Under lock (written by the metadata thread only). */
  GMutex lock;
  uint64_t *l1;                  /* host order, h.l1_size entries */
  bool l1_dirty;
  struct q2_cache l2;
  struct cbt_qcow2_metaset meta; /* metadata clusters (writable images) */
  int corrupt;                   /* atomic: writes refused, see mark_corrupt */
  char *corrupt_why;             /* set before corrupt, then constant */

  /* Metadata thread only. */
  struct q2_cache rb;
  uint64_t *reftable;            /* host order */
  uint64_t rt_entries;           /* allocated in memory */
  uint64_t rt_used;              /* highest used index + 1 */
  uint64_t rt_offset;            /* on disk */
  uint32_t rt_clusters;
  bool rt_dirty;
  uint64_t free_cursor;          /* first cluster index worth scanning */
  uint64_t fresh_from;           /* clusters from here on read as zeros (note_alloc) */
  GArray *frees;                 /* uint64_t host cluster indices */
  uint64_t comp_entry;           /* L2 entry of the cluster in comp_buf */
  uint8_t *comp_buf;
  uint8_t *cow_buf;
  int broken;                    /* -errno once a metadata write failed */

  struct q2_batch *batch;        /* NULL: no batch ring, all writes synchronous */
  bool msg_ring;                 /* jobs are signalled with IORING_OP_MSG_RING */

  GThread *thread;
  GAsyncQueue *queue;
  gint fast_inflight;            /* fast-path sqes in flight (atomic) */
};

struct q2_job {
  struct cbt_aio_op op;
  struct cbt_image_io *io;       /* NULL: stop the thread */
  int efd;
  uint64_t val;
  int res;
};

/* One data write of a batch (see batch_plan). */
struct q2_bop {
  struct cbt_aio_op op;
  struct q2 *q;
  struct q2_job *job;
  const uint8_t *buf;
  uint8_t *own;                  /* buf, when the op owns it */
  uint64_t host;                 /* where buf goes */
  uint64_t len, done;
  uint64_t cluster;              /* host offset of the clusters it allocated */
  uint64_t vcl, k;               /* then map k guest clusters from vcl there */
  struct cbt_qcow2_map old;      /* what vcl mapped before (k == 1) */
  int res;
};

struct q2_batch {
  struct io_uring ring;
  unsigned n;                    /* ops queued */
  unsigned inflight;             /* sqes not completed yet */
  struct q2_bop ops[BATCH_OPS];
};

static inline struct q2 *to_q2(struct cbt_image *img) { return (struct q2 *)img; }

static inline uint64_t
be64_at(const uint8_t *p, uint64_t i)
{
  uint64_t v;
  memcpy(&v, p + i * 8, 8);
  return be64toh(v);
}

static inline void
put_be64_at(uint8_t *p, uint64_t i, uint64_t v)
{
  v = htobe64(v);
  memcpy(p + i * 8, &v, 8);
}

/* ---- cache ---------------------------------------------------------- */

static void
table_free(gpointer p)
{
  struct q2_table *t = p;

  g_free(t->buf);
  g_free(t);
}

static void
cache_init(struct q2_cache *c, size_t bytes, uint64_t csize)
{
  c->map = g_hash_table_new_full(g_int64_hash, g_int64_equal, NULL, table_free);
  c->max = bytes / csize < 64 ? 64 : bytes / csize;
}

static inline struct q2_table *
cache_get(struct q2_cache *c, uint64_t key)
{
  return g_hash_table_lookup(c->map, &key);
}

/* Insert @t (owned by the cache from now), evicting clean tables when the
 * cache is over its size.  Dirty tables are never evicted. */
static void
cache_insert(struct q2_cache *c, struct q2_table *t)
{
  if (g_hash_table_size(c->map) >= c->max) {
    GHashTableIter it;
    gpointer k, v;
    size_t target = c->max / 2;

    g_hash_table_iter_init(&it, c->map);
    while (g_hash_table_size(c->map) > target && g_hash_table_iter_next(&it, &k, &v)) {
      if (!((struct q2_table *)v)->dirty)
        g_hash_table_iter_remove(&it);
    }
  }
  g_hash_table_insert(c->map, &t->key, t);
}

/* ---- synchronous I/O (metadata thread, open, close) ----------------- */

/* Read @n bytes at @off; bytes past the end of the file read as zeros
 * (an allocated cluster may end beyond EOF after a crash). */
static int
q2_pread(struct q2 *q, void *buf, size_t n, uint64_t off)
{
  struct stat st;
  int r = cbt_io_pread(q->fd, buf, n, off);

  if (r != -ENODATA)
    return r;
  if (fstat(q->fd, &st) < 0)
    return -errno;
  if ((uint64_t)st.st_size <= off) {
    memset(buf, 0, n);
    return 0;
  }
  if ((uint64_t)st.st_size - off < n) {
    size_t have = (size_t)((uint64_t)st.st_size - off);

    memset((uint8_t *)buf + have, 0, n - have);
    n = have;
  }
  r = cbt_io_pread(q->fd, buf, n, off);
  return r == -ENODATA ? -EIO : r;
}

/* A metadata write: failure leaves the on-disk state unknown, so the image
 * refuses further changes. */
static int
meta_write(struct q2 *q, const void *buf, size_t n, uint64_t off)
{
  int r = cbt_io_pwrite(q->fd, buf, n, off);

  if (r < 0 && !q->broken)
    q->broken = r;
  return r;
}

static int
meta_sync(struct q2 *q)
{
  int r = cbt_io_fdatasync(q->fd);

  if (r < 0 && !q->broken)
    q->broken = r;
  return r;
}

/* ---- metadata overlap ----------------------------------------------- */

/* Which metadata structure holds host cluster @c (metadata thread, or
 * open): *@idx is the refcount table or L1 index for a refcount block or
 * an L2 table.  Linear in the table sizes: for messages only. */
enum meta_kind { MK_NONE, MK_HEADER, MK_L1, MK_REFTABLE, MK_REFBLOCK, MK_L2 };

static enum meta_kind
meta_kind_of(const struct q2 *q, uint64_t c, uint64_t *idx)
{
  uint64_t off = c << q->cbits;
  uint64_t l1_bytes = (uint64_t)q->h.l1_size * 8;

  *idx = 0;
  if (c == 0)
    return MK_HEADER;
  if (q->h.l1_size && off >= q->h.l1_table_offset &&
      off - q->h.l1_table_offset < l1_bytes)
    return MK_L1;
  if (off >= q->rt_offset && off - q->rt_offset < (uint64_t)q->rt_clusters * q->csize)
    return MK_REFTABLE;
  for (uint64_t b = 0; b < q->rt_used && b < q->rt_entries; b++) {
    if (q->reftable[b] == off) {
      *idx = b;
      return MK_REFBLOCK;
    }
  }
  for (uint32_t i = 0; i < q->h.l1_size; i++) {
    if ((q->l1[i] & CBT_QCOW2_OFFSET_MASK) == off) {
      *idx = i;
      return MK_L2;
    }
  }
  return MK_NONE;
}

static char *
meta_name(enum meta_kind k, uint64_t idx)
{
  switch (k) {
  case MK_HEADER:
    return g_strdup("the qcow2 header");
  case MK_L1:
    return g_strdup("the L1 table");
  case MK_REFTABLE:
    return g_strdup("the refcount table");
  case MK_REFBLOCK:
    return g_strdup_printf("refcount block %" PRIu64, idx);
  case MK_L2:
    return g_strdup_printf("the L2 table of L1 entry %" PRIu64, idx);
  default:
    return g_strdup("metadata");
  }
}

static char *
meta_describe(const struct q2 *q, uint64_t c)
{
  uint64_t idx;
  enum meta_kind k = meta_kind_of(q, c, &idx);

  return meta_name(k, idx);
}

/* Add host clusters (metadata thread) under the lock: workers test the
 * set in fast_classify. */
static void
meta_add(struct q2 *q, uint64_t off, uint64_t clusters)
{
  g_mutex_lock(&q->lock);
  cbt_qcow2_metaset_add(&q->meta, off >> q->cbits, clusters);
  g_mutex_unlock(&q->lock);
}

/* Guest cluster @vcl maps onto metadata at host cluster @c: refuse this
 * and every later change, as QEMU does.  The image stays readable; what
 * it already holds in memory (consistent, and possibly acknowledged
 * writes) is still written back at FLUSH and close.  On a v3 image the
 * corrupt bit goes into the header as well (an 8-byte field of its own,
 * written in place), so neither we nor QEMU open it read-write again
 * before `qemu-img check -r all` has repaired it.  Returns -EIO. */
static int
mark_corrupt(struct q2 *q, uint64_t vcl, uint64_t c)
{
  g_autofree char *what = NULL;
  char *why;

  if (g_atomic_int_get(&q->corrupt))
    return -EIO;
  what = meta_describe(q, c);
  why = g_strdup_printf("%s: corrupt image: guest offset %" PRIu64 " maps to host "
                        "offset 0x%" PRIx64 ", which holds %s; writes refused "
                        "(repair it with qemu-img check -r all)", q->path,
                        vcl << q->cbits, c << q->cbits, what);
  g_mutex_lock(&q->lock);
  q->corrupt_why = why;
  g_atomic_int_set(&q->corrupt, 1);
  g_mutex_unlock(&q->lock);
  if (q->h.version >= 3 && !q->broken) {
    uint64_t v = htobe64(q->h.incompatible_features | CBT_QCOW2_INCOMPAT_CORRUPT);

    /* A failure marks the image broken; the request fails either way. */
    if (meta_write(q, &v, 8, CBT_QCOW2_OFF_INCOMPAT) == 0)
      (void)meta_sync(q);
    q->h.incompatible_features |= CBT_QCOW2_INCOMPAT_CORRUPT;
  }
  return -EIO;
}

/* Before guest data goes to host bytes [@host, @host + @len) of guest
 * cluster @vcl, or a reference to them is dropped: 0 if none of them is
 * metadata, else the image is marked corrupt and -EIO returned. */
static int
check_overlap(struct q2 *q, uint64_t vcl, uint64_t host, uint64_t len)
{
  uint64_t first = host >> q->cbits, last = (host + len - 1) >> q->cbits;
  uint64_t c = cbt_qcow2_metaset_find(&q->meta, first, last - first + 1);

  return c == CBT_QCOW2_METASET_NONE ? 0 : mark_corrupt(q, vcl, c);
}

/* check_overlap for the host clusters an L2 entry @m points at. */
static int
check_mapping(struct q2 *q, uint64_t vcl, const struct cbt_qcow2_map *m)
{
  switch (m->type) {
  case CBT_QCOW2_NORMAL:
  case CBT_QCOW2_ZERO_ALLOC:
    return check_overlap(q, vcl, m->host_offset, q->csize);
  case CBT_QCOW2_COMPRESSED:
    return check_overlap(q, vcl, m->host_offset, m->comp_len);
  default:
    return 0;
  }
}

/* At open of a writable image: claim [@off, @off + @bytes) for metadata
 * structure @k (index @idx), which must not overlap any claimed before. */
static int
meta_claim(struct q2 *q, uint64_t off, uint64_t bytes, enum meta_kind k,
           uint64_t idx, char **why)
{
  uint64_t first = off >> q->cbits, n = (bytes + q->csize - 1) >> q->cbits;
  uint64_t hit = cbt_qcow2_metaset_find(&q->meta, first, n);

  if (hit != CBT_QCOW2_METASET_NONE) {
    g_autofree char *what = meta_name(k, idx);
    g_autofree char *other = meta_describe(q, hit);

    *why = g_strdup_printf("%s: corrupt image: %s (host offset 0x%" PRIx64 ") "
                           "overlaps %s; repair it with qemu-img check -r all, "
                           "or serve it with --read-only", q->path, what, off, other);
    return -EBADMSG;
  }
  cbt_qcow2_metaset_add(&q->meta, first, n);
  return 0;
}

/* The metadata set of a writable image, from the tables load_tables read:
 * claimed in the order meta_kind_of looks, so an overlap names the
 * structure claimed first. */
static int
meta_build(struct q2 *q, char **why)
{
  int r = meta_claim(q, 0, q->csize, MK_HEADER, 0, why);

  if (r == 0 && q->h.l1_size)
    r = meta_claim(q, q->h.l1_table_offset, (uint64_t)q->h.l1_size * 8, MK_L1, 0, why);
  if (r == 0)
    r = meta_claim(q, q->rt_offset, (uint64_t)q->rt_clusters * q->csize, MK_REFTABLE,
                   0, why);
  for (uint64_t b = 0; r == 0 && b < q->rt_used; b++) {
    if (q->reftable[b])
      r = meta_claim(q, q->reftable[b], q->csize, MK_REFBLOCK, b, why);
  }
  for (uint32_t i = 0; r == 0 && i < q->h.l1_size; i++) {
    uint64_t l2 = q->l1[i] & CBT_QCOW2_OFFSET_MASK;

    if (l2)
      r = meta_claim(q, l2, q->csize, MK_L2, i, why);
  }
  return r;
}

/* ---- L2 mapping ----------------------------------------------------- */

/* Map guest cluster @vcl from the cache; the caller holds q->lock.
 * Returns 1 with *m filled, 0 if its L2 table is not cached, -EBADMSG for
 * a corrupt entry. */
static int
map_locked(struct q2 *q, uint64_t vcl, struct cbt_qcow2_map *m)
{
  uint64_t l1i = vcl / q->l2_entries;
  struct q2_table *t;
  int r;

  if (l1i >= q->h.l1_size || (q->l1[l1i] & CBT_QCOW2_OFFSET_MASK) == 0) {
    memset(m, 0, sizeof *m);
    m->type = CBT_QCOW2_UNALLOCATED;
    return 1;
  }
  t = cache_get(&q->l2, l1i);
  if (!t)
    return 0;
  r = cbt_qcow2_l2_decode(be64_at(t->buf, vcl % q->l2_entries), q->cbits,
                          q->h.version, m);
  return r < 0 ? r : 1;
}

/* Read the L2 table of L1 entry @l1i from disk into a new table. */
static int
l2_read(struct q2 *q, uint64_t l1i, struct q2_table **out)
{
  g_autofree struct q2_table *t = g_new0(struct q2_table, 1);
  int r;

  t->key = l1i;
  g_mutex_lock(&q->lock);
  t->disk_off = q->l1[l1i] & CBT_QCOW2_OFFSET_MASK;
  g_mutex_unlock(&q->lock);
  t->buf = g_malloc(q->csize);
  r = q2_pread(q, t->buf, q->csize, t->disk_off);
  if (r < 0) {
    g_free(t->buf);
    return r;
  }
  *out = g_steal_pointer(&t);
  return 0;
}

/* Metadata thread: map @vcl, loading its L2 table if needed. */
static int
map_slow(struct q2 *q, uint64_t vcl, struct cbt_qcow2_map *m)
{
  struct q2_table *t = NULL;
  int r;

  g_mutex_lock(&q->lock);
  r = map_locked(q, vcl, m);
  g_mutex_unlock(&q->lock);
  if (r != 0)
    return r < 0 ? r : 0;
  r = l2_read(q, vcl / q->l2_entries, &t);
  if (r < 0)
    return r;
  g_mutex_lock(&q->lock);
  cache_insert(&q->l2, t);
  r = map_locked(q, vcl, m);
  g_mutex_unlock(&q->lock);
  return r < 0 ? r : 0;
}

/* ---- refcounts and allocation (metadata thread) --------------------- */

/* The refcount block for refcount table index @b, loaded if needed;
 * *out is NULL if the block is not allocated. */
static int
rb_get(struct q2 *q, uint64_t b, struct q2_table **out)
{
  struct q2_table *t;
  int r;

  *out = NULL;
  if (b >= q->rt_entries || q->reftable[b] == 0)
    return 0;
  t = cache_get(&q->rb, b);
  if (!t) {
    t = g_new0(struct q2_table, 1);
    t->key = b;
    t->disk_off = q->reftable[b];
    t->buf = g_malloc(q->csize);
    r = q2_pread(q, t->buf, q->csize, t->disk_off);
    if (r < 0) {
      table_free(t);
      return r;
    }
    cache_insert(&q->rb, t);
  }
  *out = t;
  return 0;
}

static inline uint16_t
rc_get(const struct q2_table *t, uint64_t i)
{
  uint16_t v;
  memcpy(&v, t->buf + i * 2, 2);
  return be16toh(v);
}

static inline void
rc_set(struct q2_table *t, uint64_t i, uint16_t v)
{
  v = htobe16(v);
  memcpy(t->buf + i * 2, &v, 2);
  t->dirty = true;
}

static void
reftable_grow(struct q2 *q, uint64_t min_entries)
{
  uint64_t n = q->rt_entries * 2;

  if (n < min_entries)
    n = min_entries;
  q->reftable = g_renew(uint64_t, q->reftable, n);
  memset(q->reftable + q->rt_entries, 0, (n - q->rt_entries) * 8);
  q->rt_entries = n;
}

/* Clusters [@c, @c + @n) were handed out.  q->fresh_from stays above
 * every cluster ever handed out since open and above the end of the file
 * at open, so a cluster at or past it has never held anything: it lies in
 * a hole or past the end of the file and reads as zeros, and a write into
 * part of it needs no zeros written around the data (batch_plan).  A
 * cluster given back (alloc_undo, apply_frees) stays below the mark: it
 * may hold old bytes. */
static void
note_alloc(struct q2 *q, uint64_t c, uint64_t n)
{
  if (c + n > q->fresh_from)
    q->fresh_from = c + n;
}

static struct q2_table *
new_refblock(struct q2 *q, uint64_t b, uint64_t c)
{
  struct q2_table *t = g_new0(struct q2_table, 1);

  note_alloc(q, c, 1);

  if (b >= q->rt_entries)
    reftable_grow(q, b + 1);
  t->key = b;
  t->disk_off = c << q->cbits;
  t->buf = g_malloc0(q->csize);
  t->dirty = true;
  cache_insert(&q->rb, t);
  meta_add(q, t->disk_off, 1);
  q->reftable[b] = t->disk_off;
  q->rt_dirty = true;
  if (b >= q->rt_used)
    q->rt_used = b + 1;
  return t;
}

/* A run of @k clusters too long to fit between refcount blocks placed by
 * alloc_run: put it after everything the refcount table covers, with the
 * new refcount blocks right behind it. */
static int
alloc_big(struct q2 *q, uint64_t k, uint64_t *host)
{
  uint64_t start = q->rt_used * q->rb_entries, m = 1, hit;

  while ((k + m + q->rb_entries - 1) / q->rb_entries > m)
    m++;
  /* Metadata out there has no refcount at all (a corrupt image): step
   * over it by whole refcount blocks, so none of these is covered yet. */
  while ((hit = cbt_qcow2_metaset_find(&q->meta, start, k + m)) != CBT_QCOW2_METASET_NONE)
    start = (hit / q->rb_entries + 1) * q->rb_entries;
  if (((start + k + m) << q->cbits) >= (UINT64_C(1) << 56))
    return -ENOSPC;
  for (uint64_t i = 0; i < m; i++)
    new_refblock(q, start / q->rb_entries + i, start + k + i);
  for (uint64_t c = start; c < start + k + m; c++)
    rc_set(cache_get(&q->rb, c / q->rb_entries), c % q->rb_entries, 1);
  note_alloc(q, start, k + m);
  *host = start << q->cbits;
  return 0;
}

/* Allocate @k contiguous free clusters (refcount 1); returns the host
 * offset in *@host.  A cluster whose refcount block does not exist yet
 * becomes that block (it describes itself), so allocation never recurses;
 * a fresh block's range thus has rb_entries - 1 free clusters in a row,
 * and longer runs go to alloc_big.  A metadata cluster is never free,
 * whatever its refcount says: a corrupt image may claim it is. */
static int
alloc_run(struct q2 *q, uint64_t k, uint64_t *host)
{
  uint64_t start = q->free_cursor, found = 0;
  int r;

  if (q->broken)
    return q->broken;
  if (k > q->rb_entries / 2)
    return alloc_big(q, k, host);
  while (found < k) {
    uint64_t c = start + found, b = c / q->rb_entries;
    struct q2_table *t;

    if ((c << q->cbits) >> q->cbits != c || (c << q->cbits) >= (UINT64_C(1) << 56))
      return -ENOSPC;
    if (cbt_qcow2_metaset_has(&q->meta, c)) {
      start = c + 1;
      found = 0;
      continue;
    }
    r = rb_get(q, b, &t);
    if (r < 0)
      return r;
    if (!t) {
      /* No block yet: every cluster it covers is free; c becomes it. */
      t = new_refblock(q, b, c);
      rc_set(t, c % q->rb_entries, 1);
      start = c + 1;
      found = 0;
      continue;
    }
    if (rc_get(t, c % q->rb_entries) != 0) {
      start = c + 1;
      found = 0;
      continue;
    }
    found++;
  }
  for (uint64_t c = start; c < start + k; c++) {
    struct q2_table *t;

    r = rb_get(q, c / q->rb_entries, &t);
    if (r < 0 || !t)
      return r < 0 ? r : -EIO;
    rc_set(t, c % q->rb_entries, 1);
  }
  note_alloc(q, start, k);
  q->free_cursor = start + k;
  *host = start << q->cbits;
  return 0;
}

/* Give back @k clusters at @host that alloc_run just handed out when their
 * data write failed: nothing references them (no L2 entry was set, no
 * worker can have looked them up, and no writeback ran in between on this
 * thread), so they are free at once.  Without this every failed write of
 * new data -- a guest retrying on ENOSPC -- would leak its clusters. */
static void
alloc_undo(struct q2 *q, uint64_t host, uint64_t k)
{
  uint64_t c0 = host >> q->cbits;

  for (uint64_t c = c0; c < c0 + k; c++) {
    struct q2_table *t;

    /* Loaded by alloc_run a moment ago, so no I/O here. */
    if (rb_get(q, c / q->rb_entries, &t) == 0 && t)
      rc_set(t, c % q->rb_entries, 0);
  }
  if (c0 < q->free_cursor)
    q->free_cursor = c0;
}

/* Remember that the clusters behind @m lose one reference once the L2
 * change that drops it is durable (writeback step 5). */
static void
defer_free(struct q2 *q, const struct cbt_qcow2_map *m)
{
  uint64_t first, last;

  switch (m->type) {
  case CBT_QCOW2_NORMAL:
  case CBT_QCOW2_ZERO_ALLOC:
    first = last = m->host_offset >> q->cbits;
    break;
  case CBT_QCOW2_COMPRESSED:
    first = m->host_offset >> q->cbits;
    last = (m->host_offset + m->comp_len - 1) >> q->cbits;
    break;
  default:
    return;
  }
  for (uint64_t c = first; c <= last; c++)
    g_array_append_val(q->frees, c);
}

/* Set the L2 entry of @vcl to @entry (host order), creating its L2 table
 * if the L1 entry is empty. */
static int
set_l2(struct q2 *q, uint64_t vcl, uint64_t entry)
{
  uint64_t l1i = vcl / q->l2_entries;
  struct cbt_qcow2_map m;
  struct q2_table *t;
  int r;

  if (l1i >= q->h.l1_size)
    return -EIO;
  if ((q->l1[l1i] & CBT_QCOW2_OFFSET_MASK) == 0) {
    uint64_t host;

    r = alloc_run(q, 1, &host);
    if (r < 0)
      return r;
    t = g_new0(struct q2_table, 1);
    t->key = l1i;
    t->disk_off = host;
    t->buf = g_malloc0(q->csize);
    t->dirty = true;
    g_mutex_lock(&q->lock);
    cache_insert(&q->l2, t);
    cbt_qcow2_metaset_add(&q->meta, host >> q->cbits, 1);
    q->l1[l1i] = host | CBT_QCOW2_COPIED;
    q->l1_dirty = true;
    g_mutex_unlock(&q->lock);
  } else {
    r = map_slow(q, vcl, &m);        /* loads the table */
    if (r < 0)
      return r;
  }
  g_mutex_lock(&q->lock);
  t = cache_get(&q->l2, l1i);
  if (t) {
    put_be64_at(t->buf, vcl % q->l2_entries, entry);
    t->dirty = true;
  }
  g_mutex_unlock(&q->lock);
  return t ? 0 : -EIO;
}

/* ---- write-back (metadata thread) ----------------------------------- */

/* Write every dirty table of @c; returns the number written or -errno. */
static int
write_dirty(struct q2 *q, struct q2_cache *c)
{
  GHashTableIter it;
  gpointer k, v;
  int n = 0, r;

  g_hash_table_iter_init(&it, c->map);
  while (g_hash_table_iter_next(&it, &k, &v)) {
    struct q2_table *t = v;

    if (!t->dirty)
      continue;
    r = meta_write(q, t->buf, q->csize, t->disk_off);
    if (r < 0)
      return r;
    /* Workers never change tables, and only this thread dirties them. */
    t->dirty = false;
    n++;
  }
  return n;
}

static int
write_reftable(struct q2 *q, uint64_t off, uint32_t clusters)
{
  size_t n = (size_t)clusters * q->csize / 8;
  g_autofree uint64_t *be = g_new0(uint64_t, n);

  for (size_t i = 0; i < n && i < q->rt_entries; i++)
    be[i] = htobe64(q->reftable[i]);
  return meta_write(q, be, n * 8, off);
}

/* Make room on disk for the in-memory refcount table: allocate a new,
 * larger table.  Allocating it may add refcount blocks, hence the loop. */
static int
reftable_relocate(struct q2 *q, uint64_t *new_off, uint32_t *new_clusters)
{
  for (;;) {
    uint64_t want = q->rt_used + q->rt_used / 2 + 8;
    uint64_t clusters = (want * 8 + q->csize - 1) / q->csize, host;
    int r;

    if (clusters * q->csize > CBT_QCOW2_MAX_REFTABLE_BYTES)
      return -ENOSPC;
    r = alloc_run(q, clusters, &host);
    if (r < 0)
      return r;
    if (q->rt_used <= clusters * q->csize / 8) {
      meta_add(q, host, clusters);
      *new_off = host;
      *new_clusters = (uint32_t)clusters;
      return 0;
    }
    /* Still too small: these clusters were never referenced, drop them. */
    for (uint64_t c = host >> q->cbits; c < (host >> q->cbits) + clusters; c++) {
      struct q2_table *t;

      r = rb_get(q, c / q->rb_entries, &t);
      if (r < 0 || !t)
        return r < 0 ? r : -EIO;
      rc_set(t, c % q->rb_entries, 0);
    }
  }
}

/* Apply the deferred refcount decrements (writeback step 5). */
static int
apply_frees(struct q2 *q)
{
  for (guint i = 0; i < q->frees->len; i++) {
    uint64_t c = g_array_index(q->frees, uint64_t, i);
    struct q2_table *t;
    uint16_t v;
    int r = rb_get(q, c / q->rb_entries, &t);

    if (r < 0)
      return r;
    if (!t || (v = rc_get(t, c % q->rb_entries)) == 0)
      continue;                 /* already free: the image was inconsistent */
    rc_set(t, c % q->rb_entries, (uint16_t)(v - 1));
    if (v == 1 && c < q->free_cursor)
      q->free_cursor = c;
  }
  g_array_set_size(q->frees, 0);
  return 0;
}

/* Make all metadata and data durable in the order described at the top
 * of this file.  Returns 0 or -errno (and the image is then broken). */
static int
writeback(struct q2 *q)
{
  uint64_t rt_disk = (uint64_t)q->rt_clusters * q->csize / 8;
  uint64_t new_off = 0;
  uint32_t new_clusters = 0;
  GHashTableIter it;
  gpointer k, v;
  bool l2_dirty = false;
  int r;

  if (q->pub.read_only)
    return 0;
  if (q->broken)
    return q->broken;

  /* 1. Refcount blocks, a relocated refcount table, all data. */
  if (q->rt_used > rt_disk) {
    r = reftable_relocate(q, &new_off, &new_clusters);
    if (r < 0)
      return q->broken = r;
  }
  r = write_dirty(q, &q->rb);
  if (r < 0)
    return r;
  if (new_off) {
    r = write_reftable(q, new_off, new_clusters);
    if (r < 0)
      return r;
  }
  r = meta_sync(q);
  if (r < 0)
    return r;

  /* 2. What points at refcount blocks. */
  if (new_off) {
    uint8_t hdr[12];
    uint64_t o = htobe64(new_off);
    uint32_t c = htobe32(new_clusters);
    struct cbt_qcow2_map old = { .type = CBT_QCOW2_NORMAL };

    memcpy(hdr, &o, 8);
    memcpy(hdr + 8, &c, 4);
    r = meta_write(q, hdr, sizeof hdr, CBT_QCOW2_OFF_REFTABLE);
    if (r == 0)
      r = meta_sync(q);
    if (r < 0)
      return r;
    g_mutex_lock(&q->lock);
    cbt_qcow2_metaset_remove(&q->meta, q->rt_offset >> q->cbits, q->rt_clusters);
    g_mutex_unlock(&q->lock);
    for (uint32_t i = 0; i < q->rt_clusters; i++) {
      old.host_offset = q->rt_offset + (uint64_t)i * q->csize;
      defer_free(q, &old);
    }
    q->rt_offset = new_off;
    q->rt_clusters = new_clusters;
    q->rt_dirty = false;
  } else if (q->rt_dirty) {
    r = write_reftable(q, q->rt_offset, q->rt_clusters);
    if (r == 0)
      r = meta_sync(q);
    if (r < 0)
      return r;
    q->rt_dirty = false;
  }

  /* 3. L2 tables.  Workers only read them, so no lock is needed to write
   * them out; the dirty flags are ours. */
  g_hash_table_iter_init(&it, q->l2.map);
  while (g_hash_table_iter_next(&it, &k, &v))
    l2_dirty |= ((struct q2_table *)v)->dirty;
  if (l2_dirty) {
    r = write_dirty(q, &q->l2);
    if (r >= 0)
      r = meta_sync(q);
    if (r < 0)
      return r;
  }

  /* 4. The L1 table. */
  if (q->l1_dirty) {
    g_autofree uint64_t *be = g_new(uint64_t, q->h.l1_size);

    for (uint32_t i = 0; i < q->h.l1_size; i++)
      be[i] = htobe64(q->l1[i]);
    q->l1_dirty = false;
    r = meta_write(q, be, (size_t)q->h.l1_size * 8, q->h.l1_table_offset);
    if (r == 0)
      r = meta_sync(q);
    if (r < 0)
      return r;
  }

  /* 5. Decrements, once no fast-path I/O that might have looked up a
   * freed cluster is still in flight. */
  if (q->frees->len > 0 && g_atomic_int_get(&q->fast_inflight) == 0) {
    r = apply_frees(q);
    if (r < 0)
      return q->broken = r;
    r = write_dirty(q, &q->rb);
    if (r > 0)
      r = meta_sync(q);
    if (r < 0)
      return r;
  }
  return 0;
}

static bool
too_dirty(struct q2 *q)
{
  size_t n = 0;
  GHashTableIter it;
  gpointer k, v;

  g_hash_table_iter_init(&it, q->l2.map);
  while (g_hash_table_iter_next(&it, &k, &v))
    n += ((struct q2_table *)v)->dirty;
  g_hash_table_iter_init(&it, q->rb.map);
  while (g_hash_table_iter_next(&it, &k, &v))
    n += ((struct q2_table *)v)->dirty;
  return n * q->csize > DIRTY_LIMIT_BYTES || q->frees->len > 65536;
}

/* ---- slow-path reads (metadata thread) ------------------------------ */

static int
backing_read(struct q2 *q, uint8_t *buf, uint64_t n, uint64_t off)
{
  uint64_t have = 0;

  if (q->backing && off < q->backing->size) {
    have = q->backing->size - off < n ? q->backing->size - off : n;
    int r = cbt_image_run_sync(q->backing, CBT_IO_READ, 0, off, have, buf);
    if (r < 0)
      return r;
  }
  memset(buf + have, 0, n - have);
  return 0;
}

/* Decompress the cluster of @m into q->comp_buf (cached by entry). */
static int
read_compressed(struct q2 *q, const struct cbt_qcow2_map *m, uint64_t entry)
{
  g_autofree uint8_t *in = NULL;
  z_stream z;
  int r;

  if (q->comp_entry == entry && entry != 0)
    return 0;
  q->comp_entry = 0;
  in = g_malloc(m->comp_len);
  r = q2_pread(q, in, m->comp_len, m->host_offset);
  if (r < 0)
    return r;
  memset(&z, 0, sizeof z);
  if (inflateInit2(&z, -12) != Z_OK)
    return -ENOMEM;
  z.next_in = in;
  z.avail_in = (uInt)m->comp_len;
  z.next_out = q->comp_buf;
  z.avail_out = (uInt)q->csize;
  r = inflate(&z, Z_FINISH);
  inflateEnd(&z);
  /* Decompression ends when a whole cluster came out; trailing input is
   * the next compressed cluster's or padding. */
  if ((r != Z_STREAM_END && r != Z_OK && r != Z_BUF_ERROR) || z.avail_out != 0)
    return -EIO;
  q->comp_entry = entry;
  return 0;
}

static uint64_t
raw_entry(struct q2 *q, uint64_t vcl)
{
  uint64_t l1i = vcl / q->l2_entries, e = 0;
  struct q2_table *t;

  g_mutex_lock(&q->lock);
  t = cache_get(&q->l2, l1i);
  if (t && (q->l1[l1i] & CBT_QCOW2_OFFSET_MASK))
    e = be64_at(t->buf, vcl % q->l2_entries);
  g_mutex_unlock(&q->lock);
  return e;
}

/* Read [@in, @in + @n) of guest cluster @vcl, mapped by @m, into @buf. */
static int
read_piece(struct q2 *q, uint64_t vcl, const struct cbt_qcow2_map *m,
           uint64_t in, uint64_t n, uint8_t *buf)
{
  int r;

  switch (m->type) {
  case CBT_QCOW2_NORMAL:
    return q2_pread(q, buf, n, m->host_offset + in);
  case CBT_QCOW2_COMPRESSED:
    r = read_compressed(q, m, raw_entry(q, vcl));
    if (r < 0)
      return r;
    memcpy(buf, q->comp_buf + in, n);
    return 0;
  case CBT_QCOW2_UNALLOCATED:
    return backing_read(q, buf, n, (vcl << q->cbits) + in);
  default:
    memset(buf, 0, n);
    return 0;
  }
}

static bool
same_run(const struct cbt_qcow2_map *a, const struct cbt_qcow2_map *b,
         uint64_t dist)
{
  if (a->type != b->type)
    return false;
  if (a->type == CBT_QCOW2_NORMAL)
    return b->host_offset == a->host_offset + dist && a->copied == b->copied;
  return a->type != CBT_QCOW2_COMPRESSED;
}

static int
slow_read(struct q2 *q, struct cbt_image_io *io)
{
  while (io->done < io->len) {
    uint64_t off = io->offset + io->done, rest = io->len - io->done;
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < rest ? q->csize - in : rest;
    struct cbt_qcow2_map m, m2;
    int r = map_slow(q, vcl, &m);

    if (r < 0)
      return r;
    /* Extend over clusters of the same kind: one read for the run. */
    while (n < rest && m.type != CBT_QCOW2_COMPRESSED && n < MAX_SQE_BYTES) {
      uint64_t next = vcl + (in + n) / q->csize;

      r = map_slow(q, next, &m2);
      if (r < 0)
        return r;
      if (!same_run(&m, &m2, (next - vcl) << q->cbits))
        break;
      n += q->csize < rest - n ? q->csize : rest - n;
    }
    r = read_piece(q, vcl, &m, in, n, (uint8_t *)io->buf + io->done);
    if (r < 0)
      return r;
    io->done += n;
  }
  return 0;
}

/* ---- slow-path writes (metadata thread) ----------------------------- */

static bool
reads_as_zero(const struct q2 *q, const struct cbt_qcow2_map *m)
{
  return m->type == CBT_QCOW2_ZERO_PLAIN || m->type == CBT_QCOW2_ZERO_ALLOC ||
         (m->type == CBT_QCOW2_UNALLOCATED && !q->backing);
}

/* Whether [@in, @in + @n) of the cluster at guest @off covers all of the
 * cluster that lies inside the disk. */
static bool
whole_cluster(const struct q2 *q, uint64_t off, uint64_t in, uint64_t n)
{
  return in == 0 && (n == q->csize || off + n >= q->pub.size);
}

/* Grow a run of whole unallocated clusters that starts at guest cluster
 * @vcl (guest offset @off, @len bytes of data from there, the first *@n
 * bytes / *@k clusters already in the run): add the next clusters while
 * they are whole in the request and read as unallocated or plain zero,
 * up to MAX_ALLOC_RUN and half a refcount block.  0 or -errno. */
static int
grow_alloc_run(struct q2 *q, uint64_t off, uint64_t vcl, uint64_t len, uint64_t *n,
               uint64_t *k)
{
  while (*k < MAX_ALLOC_RUN && *k < q->rb_entries / 2 && *n < len) {
    struct cbt_qcow2_map m2;
    uint64_t step = q->csize < len - *n ? q->csize : len - *n;
    int r;

    if (!whole_cluster(q, off + *n, 0, step))
      break;
    r = map_slow(q, vcl + *k, &m2);
    if (r < 0)
      return r;
    if (m2.type != CBT_QCOW2_UNALLOCATED && m2.type != CBT_QCOW2_ZERO_PLAIN)
      break;
    *n += step;
    (*k)++;
  }
  return 0;
}

/* Write @len bytes of @data at guest @off (allocating, copy-on-write).
 * Every host cluster data goes to, or whose reference is dropped, is
 * checked against the metadata set first (check_overlap). */
static int
write_range(struct q2 *q, uint64_t off, const uint8_t *data, uint64_t len)
{
  while (len > 0) {
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < len ? q->csize - in : len;
    struct cbt_qcow2_map m;
    uint64_t host;
    int r = map_slow(q, vcl, &m);

    if (r == 0)
      r = check_mapping(q, vcl, &m);
    if (r < 0)
      return r;
    if (m.type == CBT_QCOW2_NORMAL && m.copied) {
      r = cbt_io_pwrite(q->fd, data, n, m.host_offset + in);
      if (r < 0)
        return r;
    } else if (whole_cluster(q, off, in, n) &&
               (m.type == CBT_QCOW2_UNALLOCATED || m.type == CBT_QCOW2_ZERO_PLAIN)) {
      /* A run of whole unallocated clusters: one allocation, one write. */
      uint64_t k = 1;

      r = grow_alloc_run(q, off, vcl, len, &n, &k);
      if (r == 0)
        r = alloc_run(q, k, &host);
      if (r == 0)
        r = check_overlap(q, vcl, host, k << q->cbits);
      if (r < 0)
        return r;
      r = cbt_io_pwrite(q->fd, data, n, host);
      if (r < 0) {
        alloc_undo(q, host, k);
        return r;
      }
      for (uint64_t i = 0; i < k; i++) {
        r = set_l2(q, vcl + i, cbt_qcow2_l2_encode(host + (i << q->cbits), false));
        if (r < 0)
          return r;
      }
    } else {
      /* One cluster, copy-on-write of what the write does not cover. */
      const uint8_t *src = data;
      bool reuse = m.type == CBT_QCOW2_ZERO_ALLOC && m.copied;

      if (!whole_cluster(q, off, in, n)) {
        r = read_piece(q, vcl, &m, 0, q->csize, q->cow_buf);
        if (r < 0)
          return r;
        memcpy(q->cow_buf + in, data, n);
        src = q->cow_buf;
      }
      if (reuse) {
        host = m.host_offset;
      } else {
        r = alloc_run(q, 1, &host);
        if (r == 0)
          r = check_overlap(q, vcl, host, q->csize);
        if (r < 0)
          return r;
      }
      r = cbt_io_pwrite(q->fd, src, src == data ? n : q->csize, host);
      if (r < 0) {
        if (!reuse)
          alloc_undo(q, host, 1);
        return r;
      }
      r = set_l2(q, vcl, cbt_qcow2_l2_encode(host, false));
      if (r < 0)
        return r;
      if (!reuse)
        defer_free(q, &m);
    }
    off += n;
    data += n;
    len -= n;
  }
  return 0;
}

/* WRITE_ZEROES (@trim false) and TRIM.  On v3 whole clusters become zero
 * clusters (or unallocated without a backing file); partial clusters of
 * WRITE_ZEROES, and all of it on v2, are written as zeros unless they
 * already read as zeros.  TRIM leaves partial clusters and v2 alone. */
static int
slow_zero(struct q2 *q, struct cbt_image_io *io, bool trim)
{
  bool v3 = q->h.version >= 3;

  while (io->done < io->len) {
    uint64_t off = io->offset + io->done, rest = io->len - io->done;
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < rest ? q->csize - in : rest;
    struct cbt_qcow2_map m;
    int r = map_slow(q, vcl, &m);

    if (r < 0)
      return r;
    if (v3 && whole_cluster(q, off, in, n)) {
      bool keep = !trim && (io->flags & CBT_IO_NO_HOLE) && m.copied &&
                  (m.type == CBT_QCOW2_NORMAL || m.type == CBT_QCOW2_ZERO_ALLOC);
      uint64_t want = keep ? m.host_offset | CBT_QCOW2_COPIED | CBT_QCOW2_ZERO_BIT
                           : q->backing ? CBT_QCOW2_ZERO_BIT : 0;

      if (keep ? m.type != CBT_QCOW2_ZERO_ALLOC
               : !(m.type == CBT_QCOW2_UNALLOCATED && !q->backing) &&
                 !(m.type == CBT_QCOW2_ZERO_PLAIN && q->backing)) {
        /* Dropping a reference to metadata would free it. */
        r = keep ? 0 : check_mapping(q, vcl, &m);
        if (r == 0)
          r = set_l2(q, vcl, want);
        if (r < 0)
          return r;
        if (!keep)
          defer_free(q, &m);
      }
    } else if (!trim && !reads_as_zero(q, &m)) {
      r = write_range(q, off, q->zeros, n);
      if (r < 0)
        return r;
    }
    io->done += n;
  }
  return 0;
}

/* Run the rest of @io on the metadata thread.  Returns 0 or -errno. */
static int
slow_run(struct q2 *q, struct cbt_image_io *io)
{
  bool changes = io->type == CBT_IO_WRITE || io->type == CBT_IO_ZERO ||
                 io->type == CBT_IO_TRIM;
  int r = 0;

  if (changes && q->broken)
    return q->broken;
  if (changes && g_atomic_int_get(&q->corrupt))
    return -EIO;
  if (io->stage == ST_FUA_FLUSH)
    return writeback(q);
  switch (io->type) {
  case CBT_IO_READ:
    return slow_read(q, io);
  case CBT_IO_WRITE:
    r = write_range(q, io->offset + io->done, (const uint8_t *)io->buf + io->done,
                    io->len - io->done);
    io->done = io->len;
    break;
  case CBT_IO_ZERO:
  case CBT_IO_TRIM:
    r = slow_zero(q, io, io->type == CBT_IO_TRIM);
    break;
  case CBT_IO_FLUSH:
    return writeback(q);
  default:
    return 0;
  }
  if (r == 0 && (io->flags & CBT_IO_FUA))
    r = writeback(q);
  return r;
}

/* ---- batched writes (metadata thread) ------------------------------- */

/* Allocating writes arrive one per request, a queue depth of them at a
 * time.  Run one by one, each waited for its data write before the next
 * was looked at.  Instead the metadata thread takes every job queued
 * (slow_thread) and plans the writes among them that need no copy-on-write
 * read: in-place writes, and writes into clusters that read as zeros.
 * Planning allocates in memory and queues the data write; batch_run
 * submits all of them with one system call, waits for all, and only then
 * installs the L2 entries (an entry never points at data not yet written)
 * and completes the jobs.  The ordering of the file's top comment is
 * unchanged: data, refcounts, L2 tables and L1 still reach the disk in
 * writeback's order, and a FUA job in the batch costs one writeback for
 * the whole batch.
 *
 * Two jobs of one batch never touch the same guest cluster: a job that
 * would is planned only after the batch before it has run, so every
 * lookup sees the mapping the earlier writes left.  Any other job (reads,
 * zeroes, trims, flushes, copy-on-write from a backing file or a shared
 * cluster) runs the batch first and then runs synchronously, so the jobs
 * keep their order.
 *
 * Zeros around the data.  A 4 KiB write into a new 64 KiB cluster would
 * otherwise write 60 KiB of zeros.  A cluster at or past q->fresh_from
 * has never held anything (note_alloc): it reads as zeros already, so
 * only the data is written, at its place in the cluster.  The file may
 * then end inside the last cluster (qemu-img check allows less than one
 * cluster missing at the end, and reads past the end give zeros), and
 * holes stay holes.  A reused cluster gets data and zeros in one write of
 * the whole cluster, as before. */

/* How many batch ops the rest of WRITE @io needs, or 0 if it needs a
 * copy-on-write read (or a lookup failed): it then runs synchronously. */
static unsigned
batch_ops_for(struct q2 *q, const struct cbt_image_io *io)
{
  uint64_t off = io->offset + io->done, len = io->len - io->done;
  unsigned n = 0;

  while (len > 0) {
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t piece = q->csize - in < len ? q->csize - in : len;
    struct cbt_qcow2_map m;

    if (n == BATCH_OPS || map_slow(q, vcl, &m) < 0)
      return 0;
    if (!(m.type == CBT_QCOW2_NORMAL && m.copied) &&
        !((m.type == CBT_QCOW2_UNALLOCATED || m.type == CBT_QCOW2_ZERO_PLAIN) &&
          (whole_cluster(q, off, in, piece) || reads_as_zero(q, &m))))
      return 0;
    n++;
    off += piece;
    len -= piece;
  }
  return n;
}

/* Whether a queued op writes into guest clusters [@first, @last]. */
static bool
batch_touches(const struct q2_batch *b, uint64_t first, uint64_t last)
{
  for (unsigned i = 0; i < b->n; i++) {
    const struct q2_bop *op = &b->ops[i];
    uint64_t k = op->k ? op->k : 1;

    if (op->vcl <= last && first < op->vcl + k)
      return true;
  }
  return false;
}

/* Plan the rest of WRITE @job (batch_ops_for said it fits) into the
 * batch: allocate and queue, as write_range does synchronously.  Returns
 * 0 or -errno; on an error the job fails, and what it queued already
 * still runs. */
static int
batch_plan(struct q2 *q, struct q2_job *job)
{
  struct q2_batch *b = q->batch;
  struct cbt_image_io *io = job->io;
  uint64_t off = io->offset + io->done, len = io->len - io->done;
  const uint8_t *data = (const uint8_t *)io->buf + io->done;

  while (len > 0) {
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < len ? q->csize - in : len;
    struct q2_bop *op = &b->ops[b->n];
    struct cbt_qcow2_map m;
    uint64_t host, fresh = q->fresh_from;
    int r = map_slow(q, vcl, &m);

    if (r == 0)
      r = check_mapping(q, vcl, &m);
    if (r < 0)
      return r;
    memset(op, 0, sizeof *op);
    op->q = q;
    op->job = job;
    op->vcl = vcl;
    op->buf = data;
    op->old = m;
    if (m.type == CBT_QCOW2_NORMAL && m.copied) {
      op->host = m.host_offset + in;
    } else if (whole_cluster(q, off, in, n)) {
      /* A run of whole unallocated clusters: one allocation, one write. */
      uint64_t k = 1;

      r = grow_alloc_run(q, off, vcl, len, &n, &k);
      if (r == 0)
        r = alloc_run(q, k, &host);
      if (r == 0)
        r = check_overlap(q, vcl, host, k << q->cbits);
      if (r < 0)
        return r;
      op->host = op->cluster = host;
      op->k = k;
    } else {
      /* Part of a cluster that reads as zeros. */
      r = alloc_run(q, 1, &host);
      if (r == 0)
        r = check_overlap(q, vcl, host, q->csize);
      if (r < 0)
        return r;
      op->cluster = host;
      op->k = 1;
      if ((host >> q->cbits) >= fresh) {
        op->host = host + in;
      } else {
        op->own = g_malloc0(q->csize);
        memcpy(op->own + in, data, n);
        op->buf = op->own;
        op->host = host;
      }
    }
    op->len = op->own ? q->csize : n;
    b->n++;
    off += n;
    data += n;
    len -= n;
  }
  return 0;
}

static void batch_submit(struct q2 *q, struct q2_bop *op);

static void
bop_done(struct cbt_aio_op *aop, int res)
{
  struct q2_bop *op = cbt_container_of(aop, struct q2_bop, op);

  op->q->batch->inflight--;
  if (res == -EAGAIN || res == -EINTR) {
    batch_submit(op->q, op);
    return;
  }
  if (res <= 0) {
    op->res = res < 0 ? res : -EIO;
    return;
  }
  op->done += (uint64_t)res;
  if (op->done < op->len)
    batch_submit(op->q, op);        /* short write: the rest */
}

/* Queue the rest of @op's write; a failure to get an sqe fails the op. */
static void
batch_submit(struct q2 *q, struct q2_bop *op)
{
  struct io_uring *ring = &q->batch->ring;
  struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
  uint64_t rest = op->len - op->done;

  if (!sqe) {
    int r = io_uring_submit(ring);

    sqe = r < 0 ? NULL : io_uring_get_sqe(ring);
    if (!sqe) {
      op->res = r < 0 ? r : -EBUSY;
      return;
    }
  }
  io_uring_prep_write(sqe, q->fd, op->buf + op->done,
                      rest > MAX_SQE_BYTES ? MAX_SQE_BYTES : (unsigned)rest,
                      op->host + op->done);
  op->op.done = bop_done;
  io_uring_sqe_set_data(sqe, &op->op);
  cbt_fi_sqe(CBT_FI_IMAGE, sqe);       /* tests: may fail it */
  q->batch->inflight++;
}

/* Write the batch's data, then install what it allocated (or give it back
 * if its write failed) and set each job's result.  The jobs are not
 * signalled here. */
static void
batch_run(struct q2 *q)
{
  struct q2_batch *b = q->batch;

  if (b->n == 0)
    return;
  for (unsigned i = 0; i < b->n; i++)
    batch_submit(q, &b->ops[i]);
  while (b->inflight > 0) {
    struct io_uring_cqe *cqe;
    struct cbt_aio_op *aop;
    int r = io_uring_submit_and_wait(&b->ring, 1);

    if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
      /* The ring is unusable and writes may still run: nothing can be
       * installed safely, and giving clusters back could let another
       * write land in them.  Fail the jobs; the clusters leak. */
      q->broken = r;
      for (unsigned i = 0; i < b->n; i++) {
        if (b->ops[i].res == 0)
          b->ops[i].res = r;
        b->ops[i].k = 0;
        b->ops[i].cluster = 0;
      }
      b->inflight = 0;
      break;
    }
    while (io_uring_peek_cqe(&b->ring, &cqe) == 0) {
      aop = io_uring_cqe_get_data(cqe);
      r = cqe->res;
      io_uring_cqe_seen(&b->ring, cqe);
      aop->done(aop, r);
    }
  }
  for (unsigned i = 0; i < b->n; i++) {
    struct q2_bop *op = &b->ops[i];
    int r = op->res;

    if (r < 0 && op->cluster) {
      alloc_undo(q, op->cluster, op->k);
    } else if (r == 0) {
      for (uint64_t j = 0; j < op->k && r == 0; j++)
        r = set_l2(q, op->vcl + j,
                   cbt_qcow2_l2_encode(op->cluster + (j << q->cbits), false));
      if (r == 0 && op->k == 1)
        defer_free(q, &op->old);
    }
    if (r < 0 && op->job->res == 0)
      op->job->res = r;
    g_free(op->own);
  }
  b->n = 0;
}

/* Run @job: plan it into the batch if it can be (0), else run the batch
 * and then the job synchronously (1: the job is done). */
static bool
batch_or_run(struct q2 *q, struct q2_job *job)
{
  struct cbt_image_io *io = job->io;
  struct q2_batch *b = q->batch;
  unsigned nops = 0;

  if (b && io->type == CBT_IO_WRITE && io->stage != ST_FUA_FLUSH && !q->broken &&
      !g_atomic_int_get(&q->corrupt)) {
    uint64_t first = (io->offset + io->done) >> q->cbits;
    uint64_t last = (io->offset + io->len - 1) >> q->cbits;

    if (batch_touches(b, first, last) || b->n == BATCH_OPS)
      batch_run(q);
    nops = batch_ops_for(q, io);
    if (nops > BATCH_OPS - b->n) {
      batch_run(q);
      nops = batch_ops_for(q, io);
    }
  }
  if (nops == 0) {
    if (b)
      batch_run(q);
    job->res = slow_run(q, io);
    return true;
  }
  job->res = batch_plan(q, job);
  io->done = io->len;
  return false;
}

/* Queue the message that completes @job in its worker's ring: the
 * worker's loop calls job->op.done, as for any of its own sqes.  Our
 * cqe for it carries the job too, to resend it. */
static void
msg_post(struct io_uring *ring, struct q2_job *job)
{
  struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

  /* jobs_signal keeps fewer messages queued than the ring has entries. */
  if (!sqe)
    abort();
  io_uring_prep_msg_ring(sqe, job->io->ring->ring_fd, 0,
                         (uint64_t)(uintptr_t)&job->op, 0);
  io_uring_sqe_set_data(sqe, job);
}

/* Post the queued messages and wait for all @queued of them.  A message
 * the target ring could not take (its CQ overflowing) is sent again; any
 * other failure would leave a request hanging for good. */
static void
msg_flush(struct io_uring *ring, unsigned queued)
{
  while (queued > 0) {
    struct io_uring_cqe *cqe;
    int r = io_uring_submit_and_wait(ring, 1);

    if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY)
      abort();
    while (io_uring_peek_cqe(ring, &cqe) == 0) {
      struct q2_job *job = io_uring_cqe_get_data(cqe);
      int res = cqe->res;

      io_uring_cqe_seen(ring, cqe);
      if (res == -EOVERFLOW || res == -EAGAIN || res == -EINTR) {
        g_usleep(1000);
        msg_post(ring, job);
      } else if (res < 0) {
        abort();
      } else {
        queued--;
      }
    }
  }
}

/* Tell the workers that @n jobs are done.  The worker may free a job as
 * soon as it learns that, so nothing of a job is touched after. */
static void
jobs_signal(struct q2 *q, struct q2_job **jobs, unsigned n)
{
  unsigned queued = 0;

  for (unsigned i = 0; i < n; i++) {
    struct q2_job *job = jobs[i];

    if (!job->io) {
      g_free(job);
    } else if (job->efd >= 0) {
      if (eventfd_write(job->efd, 1) < 0)
        abort();                 /* cannot happen for a valid eventfd */
    } else {
      /* Straight into the worker's ring: no eventfd to make, read and
       * close per request, and one system call for the whole batch. */
      if (queued == BATCH_RING / 2) {
        msg_flush(&q->batch->ring, queued);
        queued = 0;
      }
      msg_post(&q->batch->ring, job);
      queued++;
    }
  }
  msg_flush(q->batch ? &q->batch->ring : NULL, queued);
}

static gpointer
slow_thread(gpointer arg)
{
  struct q2 *q = arg;
  struct q2_job **jobs = g_new(struct q2_job *, BATCH_JOBS);
  bool stop = false;

  while (!stop) {
    unsigned n = 0;
    bool fua = false;

    jobs[n++] = g_async_queue_pop(q->queue);
    while (n < BATCH_JOBS && (jobs[n] = g_async_queue_try_pop(q->queue)))
      n++;
    for (unsigned i = 0; i < n; i++) {
      if (!jobs[i]->io) {
        stop = true;
        continue;
      }
      jobs[i]->res = 0;
      if (!batch_or_run(q, jobs[i]))
        fua |= (jobs[i]->io->flags & CBT_IO_FUA) != 0;
    }
    if (q->batch)
      batch_run(q);
    if (fua) {
      /* One writeback makes every FUA write of the batch durable. */
      int r = writeback(q);

      for (unsigned i = 0; r < 0 && i < n; i++) {
        if (jobs[i]->io && (jobs[i]->io->flags & CBT_IO_FUA) && jobs[i]->res == 0)
          jobs[i]->res = r;
      }
    }
    if (!q->pub.read_only && !q->broken && too_dirty(q))
      writeback(q);              /* an error marks the image broken */
    jobs_signal(q, jobs, n);
  }
  g_free(jobs);
  cbt_io_thread_cleanup();
  return NULL;
}

/* ---- worker side ---------------------------------------------------- */

static void fast_step(struct q2 *q, struct cbt_image_io *io);

static void
job_done(struct cbt_aio_op *op, int res)
{
  struct q2_job *job = cbt_container_of(op, struct q2_job, op);
  struct cbt_image_io *io = job->io;

  if (res == -EINTR || res == -EAGAIN) {
    struct io_uring_sqe *sqe = cbt_ring_get_sqe(io->ring);

    if (sqe) {
      io_uring_prep_read(sqe, job->efd, &job->val, sizeof job->val, 0);
      io_uring_sqe_set_data(sqe, &job->op);
      return;
    }
  }
  if (res < 0) {
    /* The read failed (cancelled?) but the thread may still be running
     * the request: wait for it, in this one pathological case blocking. */
    eventfd_t val;

    while (eventfd_read(job->efd, &val) < 0 && errno == EINTR)
      ;
  }
  res = job->res;
  close(job->efd);
  g_free(job);
  io->complete(io, res);
}

/* The metadata thread's message (jobs_signal): the job is done. */
static void
job_msg_done(struct cbt_aio_op *op, int res)
{
  struct q2_job *job = cbt_container_of(op, struct q2_job, op);
  struct cbt_image_io *io = job->io;

  (void)res;
  res = job->res;
  g_free(job);
  io->complete(io, res);
}

/* Hand the rest of @io to the metadata thread. */
static void
handoff(struct q2 *q, struct cbt_image_io *io)
{
  struct q2_job *job = g_new0(struct q2_job, 1);
  struct io_uring_sqe *sqe;

  job->io = io;
  if (q->msg_ring) {
    job->efd = -1;
    job->op.done = job_msg_done;
    g_async_queue_push(q->queue, job);
    return;
  }
  job->op.done = job_done;
  job->efd = eventfd(0, EFD_CLOEXEC);
  if (job->efd < 0) {
    int err = -errno;
    g_free(job);
    io->complete(io, err);
    return;
  }
  sqe = cbt_ring_get_sqe(io->ring);
  if (!sqe) {
    close(job->efd);
    g_free(job);
    io->complete(io, -EBUSY);
    return;
  }
  io_uring_prep_read(sqe, job->efd, &job->val, sizeof job->val, 0);
  io_uring_sqe_set_data(sqe, &job->op);
  g_async_queue_push(q->queue, job);
}

static void
fast_done(struct cbt_aio_op *op, int res)
{
  struct cbt_image_io *io = cbt_container_of(op, struct cbt_image_io, op);
  struct q2 *q = to_q2(io->img);

  (void)g_atomic_int_add(&q->fast_inflight, -1);
  if (res == -EAGAIN || res == -EINTR) {
    fast_step(q, io);
    return;
  }
  if (res < 0) {
    io->complete(io, res);
    return;
  }
  if (res == 0) {
    if (io->type != CBT_IO_READ) {
      io->complete(io, -EIO);
      return;
    }
    /* Allocated cluster past the end of the file: reads as zeros. */
    uint64_t off = io->offset + io->done;
    uint64_t n = q->csize - (off & (q->csize - 1));

    if (n > io->len - io->done)
      n = io->len - io->done;
    memset((uint8_t *)io->buf + io->done, 0, n);
    res = (int)n;
  }
  io->done += (unsigned)res;
  fast_step(q, io);
}

enum fast_kind { FK_SLOW, FK_ZERO, FK_HOST };

/* Under q->lock: classify the cluster at guest @off for @io. */
static enum fast_kind
fast_classify(struct q2 *q, const struct cbt_image_io *io, uint64_t vcl,
              struct cbt_qcow2_map *m)
{
  if (map_locked(q, vcl, m) != 1)
    return FK_SLOW;
  /* A write onto metadata, or to an image found corrupt, goes to the
   * metadata thread, which refuses it (write_range, slow_run). */
  if (io->type == CBT_IO_WRITE)
    return m->type == CBT_QCOW2_NORMAL && m->copied && !g_atomic_int_get(&q->corrupt) &&
           !cbt_qcow2_metaset_has(&q->meta, m->host_offset >> q->cbits)
               ? FK_HOST : FK_SLOW;
  if (m->type == CBT_QCOW2_NORMAL)
    return FK_HOST;
  return reads_as_zero(q, m) ? FK_ZERO : FK_SLOW;
}

/* Advance @io on the fast path: zero-fill, queue one sqe, finish, or hand
 * the rest to the metadata thread. */
static void
fast_step(struct q2 *q, struct cbt_image_io *io)
{
  while (io->done < io->len) {
    uint64_t off = io->offset + io->done, rest = io->len - io->done;
    uint64_t vcl = off >> q->cbits, in = off & (q->csize - 1);
    uint64_t n = q->csize - in < rest ? q->csize - in : rest;
    struct cbt_qcow2_map m, m2;
    struct io_uring_sqe *sqe;
    enum fast_kind k;

    g_mutex_lock(&q->lock);
    k = fast_classify(q, io, vcl, &m);
    while (k != FK_SLOW && n < rest && n < MAX_SQE_BYTES - q->csize) {
      uint64_t next = vcl + (in + n) / q->csize;

      if (fast_classify(q, io, next, &m2) != k ||
          (k == FK_HOST && m2.host_offset != m.host_offset + ((next - vcl) << q->cbits)))
        break;
      n += q->csize < rest - n ? q->csize : rest - n;
    }
    if (k == FK_HOST)
      g_atomic_int_inc(&q->fast_inflight);
    g_mutex_unlock(&q->lock);

    if (k == FK_SLOW) {
      handoff(q, io);
      return;
    }
    if (k == FK_ZERO) {
      memset((uint8_t *)io->buf + io->done, 0, n);
      io->done += n;
      continue;
    }
    sqe = cbt_ring_get_sqe(io->ring);
    if (!sqe) {
      (void)g_atomic_int_add(&q->fast_inflight, -1);
      io->complete(io, -EBUSY);
      return;
    }
    if (io->type == CBT_IO_READ)
      io_uring_prep_read(sqe, q->fd, (uint8_t *)io->buf + io->done, (unsigned)n,
                         m.host_offset + in);
    else
      io_uring_prep_write(sqe, q->fd, (const uint8_t *)io->buf + io->done,
                          (unsigned)n, m.host_offset + in);
    io->op.done = fast_done;
    io_uring_sqe_set_data(sqe, &io->op);
    cbt_fi_sqe(CBT_FI_IMAGE, sqe);     /* tests: may fail it */
    cbt_image_io_link(io, sqe);        /* an overwrite in place, in one piece */
    return;
  }
  if (io->type == CBT_IO_WRITE && (io->flags & CBT_IO_FUA)) {
    /* The data is written; its metadata may not be durable yet. */
    io->stage = ST_FUA_FLUSH;
    handoff(q, io);
    return;
  }
  io->complete(io, 0);
}

static void
q2_submit(struct cbt_image *img, struct cbt_image_io *io)
{
  struct q2 *q = to_q2(img);

  if (io->type != CBT_IO_FLUSH &&
      (io->offset > img->size || io->len > img->size - io->offset)) {
    io->complete(io, -EINVAL);
    return;
  }
  if (io->len == 0 && io->type != CBT_IO_FLUSH) {
    io->complete(io, 0);
    return;
  }
  if (img->read_only && io->type != CBT_IO_READ && io->type != CBT_IO_CACHE &&
      io->type != CBT_IO_FLUSH) {
    io->complete(io, -EROFS);
    return;
  }
  if ((io->type == CBT_IO_WRITE || io->type == CBT_IO_ZERO || io->type == CBT_IO_TRIM) &&
      g_atomic_int_get(&q->corrupt)) {
    io->complete(io, -EIO);
    return;
  }
  switch (io->type) {
  case CBT_IO_READ:
  case CBT_IO_WRITE:
    fast_step(q, io);
    return;
  case CBT_IO_CACHE:
    io->complete(io, 0);
    return;
  case CBT_IO_ZERO:
    if ((io->flags & CBT_IO_FAST_ZERO) &&
        (q->h.version < 3 || io->offset % q->csize != 0 ||
         ((io->offset + io->len) % q->csize != 0 && io->offset + io->len != img->size))) {
      io->complete(io, -ENOTSUP);
      return;
    }
    handoff(q, io);
    return;
  case CBT_IO_FLUSH:
    if (img->read_only) {
      io->complete(io, 0);
      return;
    }
    handoff(q, io);
    return;
  case CBT_IO_TRIM:
  default:
    handoff(q, io);
    return;
  }
}

/* ---- block status (synchronous, any thread) ------------------------- */

static uint32_t
flags_of(const struct q2 *q, const struct cbt_qcow2_map *m)
{
  (void)q;
  switch (m->type) {
  case CBT_QCOW2_NORMAL:
  case CBT_QCOW2_COMPRESSED:
    return 0;
  default:
    return NBD_STATE_HOLE | NBD_STATE_ZERO;
  }
}

static int
add_extent(struct cbt_extent *ext, size_t max, size_t *n, uint64_t len,
           uint32_t flags)
{
  if (*n > 0 && ext[*n - 1].flags == flags && ext[*n - 1].length + len <= UINT32_MAX) {
    ext[*n - 1].length += len;
    return 0;
  }
  if (*n == max)
    return 1;
  ext[*n].length = len;
  ext[*n].flags = flags;
  (*n)++;
  return 0;
}

/* Map the unallocated range [@off, @off + @len) through the backing file. */
static int
backing_extents(struct q2 *q, uint64_t off, uint64_t len, struct cbt_extent *ext,
                size_t max, size_t *n)
{
  while (len > 0) {
    struct cbt_extent sub[64];
    int k;

    if (!q->backing || off >= q->backing->size)
      return add_extent(ext, max, n, len, NBD_STATE_HOLE | NBD_STATE_ZERO);
    uint64_t span = q->backing->size - off < len ? q->backing->size - off : len;
    k = q->backing->ops->block_status(q->backing, off, span, sub, 64);
    if (k <= 0)
      return k < 0 ? k : -EIO;
    for (int i = 0; i < k; i++) {
      uint64_t l = sub[i].length < len ? sub[i].length : len;

      if (l == 0)
        return -EIO;
      if (add_extent(ext, max, n, l, sub[i].flags))
        return 1;
      off += l;
      len -= l;
    }
  }
  return 0;
}

/* Reports from the L2 cache; an L2 table that is not cached is read from
 * disk into a private buffer (the interface is synchronous).  A table
 * missing from the cache is clean, so the disk copy is current. */
static int
q2_block_status(struct cbt_image *img, uint64_t offset, uint64_t len,
                struct cbt_extent *ext, size_t max)
{
  struct q2 *q = to_q2(img);
  g_autofree uint8_t *tbuf = NULL;
  uint64_t tbuf_l1i = UINT64_MAX;
  size_t n = 0;

  if (offset > img->size || len > img->size - offset)
    return -EINVAL;
  if (len > UINT32_MAX)
    len = UINT32_MAX;
  while (len > 0 && n <= max) {
    uint64_t vcl = offset >> q->cbits, in = offset & (q->csize - 1);
    uint64_t l1i = vcl / q->l2_entries;
    uint64_t step = q->csize - in < len ? q->csize - in : len;
    struct cbt_qcow2_map m;
    uint64_t l2off = 0;
    int r;

    g_mutex_lock(&q->lock);
    r = map_locked(q, vcl, &m);
    if (r == 0)
      l2off = q->l1[l1i] & CBT_QCOW2_OFFSET_MASK;
    g_mutex_unlock(&q->lock);
    if (r == 0) {
      if (tbuf_l1i != l1i) {
        if (!tbuf)
          tbuf = g_malloc(q->csize);
        r = q2_pread(q, tbuf, q->csize, l2off);
        if (r < 0)
          return n > 0 ? (int)n : r;
        tbuf_l1i = l1i;
      }
      r = cbt_qcow2_l2_decode(be64_at(tbuf, vcl % q->l2_entries), q->cbits,
                              q->h.version, &m);
    }
    if (r < 0)
      return n > 0 ? (int)n : -EIO;
    if (m.type == CBT_QCOW2_UNALLOCATED && q->backing) {
      r = backing_extents(q, offset, step, ext, max, &n);
      if (r < 0)
        return n > 0 ? (int)n : r;
      if (r > 0)
        break;
    } else if (add_extent(ext, max, &n, step, flags_of(q, &m))) {
      break;
    }
    offset += step;
    len -= step;
  }
  return (int)n;
}

/* ---- open / close --------------------------------------------------- */

static void
q2_free(struct q2 *q)
{
  if (q->thread) {
    struct q2_job *stop = g_new0(struct q2_job, 1);

    g_async_queue_push(q->queue, stop);
    g_thread_join(q->thread);
  }
  if (q->queue)
    g_async_queue_unref(q->queue);
  if (q->batch) {
    io_uring_queue_exit(&q->batch->ring);
    g_free(q->batch);
  }
  if (q->l2.map)
    g_hash_table_destroy(q->l2.map);
  if (q->rb.map)
    g_hash_table_destroy(q->rb.map);
  if (q->frees)
    g_array_free(q->frees, TRUE);
  cbt_image_close(q->backing);
  if (q->fd >= 0)
    close(q->fd);
  g_mutex_clear(&q->lock);
  cbt_qcow2_metaset_clear(&q->meta);
  g_free(q->corrupt_why);
  g_free(q->l1);
  g_free(q->reftable);
  g_free(q->zeros);
  g_free(q->comp_buf);
  g_free(q->cow_buf);
  g_free(q->path);
  g_free(q);
}

static void
q2_close(struct cbt_image *img)
{
  struct q2 *q = to_q2(img);

  if (q->thread) {
    struct q2_job *stop = g_new0(struct q2_job, 1);

    g_async_queue_push(q->queue, stop);
    g_thread_join(q->thread);
    q->thread = NULL;
  }
  /* Normally a no-op: the daemon flushes before closing. */
  writeback(q);
  q2_free(q);
}

static const struct cbt_image_ops q2_ops = {
  .name = "qcow2",
  .submit = q2_submit,
  .block_status = q2_block_status,
  .close = q2_close,
};

const char *
cbt_image_qcow2_corrupt(struct cbt_image *img)
{
  struct q2 *q = to_q2(img);

  if (!img || img->ops != &q2_ops || !g_atomic_int_get(&q->corrupt))
    return NULL;
  return q->corrupt_why;
}

static __thread int backing_depth;

static int
open_backing(struct q2 *q, char **why)
{
  g_autofree char *dir = g_path_get_dirname(q->path);
  g_autofree char *bpath = g_path_is_absolute(q->h.backing_file)
                               ? g_strdup(q->h.backing_file)
                               : g_build_filename(dir, q->h.backing_file, NULL);
  const char *fmt = q->h.backing_format[0] ? q->h.backing_format : "auto";
  g_autofree char *bwhy = NULL;
  int r;

  if (strcmp(fmt, "raw") != 0 && strcmp(fmt, "qcow2") != 0 && strcmp(fmt, "auto") != 0) {
    *why = g_strdup_printf("%s: backing file %s has format '%s' (only raw and "
                           "qcow2 are supported)", q->path, bpath, fmt);
    return -ENOTSUP;
  }
  if (backing_depth >= MAX_BACKING_DEPTH) {
    *why = g_strdup_printf("%s: backing chain longer than %d files (a loop?)",
                           q->path, MAX_BACKING_DEPTH);
    return -ELOOP;
  }
  backing_depth++;
  r = cbt_image_open(bpath, fmt, true, false, &q->backing, &bwhy);
  backing_depth--;
  if (r < 0) {
    *why = g_strdup_printf("%s: backing file: %s", q->path,
                           bwhy ? bwhy : g_strerror(-r));
    return r;
  }
  return 0;
}

/* Read and check the L1 and refcount tables. */
static int
load_tables(struct q2 *q, uint64_t file_size, char **why)
{
  size_t rt_bytes = (size_t)q->h.refcount_table_clusters * q->csize;
  int r;

  q->l1 = g_new0(uint64_t, q->h.l1_size ? q->h.l1_size : 1);
  if (q->h.l1_size) {
    r = cbt_io_pread(q->fd, q->l1, (size_t)q->h.l1_size * 8, q->h.l1_table_offset);
    if (r < 0) {
      *why = g_strdup_printf("%s: cannot read the L1 table: %s", q->path, g_strerror(-r));
      return r;
    }
  }
  for (uint32_t i = 0; i < q->h.l1_size; i++) {
    uint64_t l2;
    bool copied;

    q->l1[i] = be64toh(q->l1[i]);
    if (cbt_qcow2_l1_decode(q->l1[i], q->cbits, &l2, &copied) < 0 ||
        l2 > file_size || file_size - l2 < q->csize) {
      *why = g_strdup_printf("%s: corrupt image: L1 entry %" PRIu32 " is invalid "
                             "(0x%016" PRIx64 ")", q->path, i, q->l1[i]);
      return -EBADMSG;
    }
    if (l2 && !copied && !q->pub.read_only) {
      *why = g_strdup_printf("%s: L2 table %" PRIu32 " is shared (refcount > 1); "
                             "writing such images is not supported (use --read-only)",
                             q->path, i);
      return -ENOTSUP;
    }
  }

  q->rt_offset = q->h.refcount_table_offset;
  q->rt_clusters = q->h.refcount_table_clusters;
  q->rt_entries = rt_bytes / 8;
  q->reftable = g_new0(uint64_t, q->rt_entries);
  r = cbt_io_pread(q->fd, q->reftable, rt_bytes, q->rt_offset);
  if (r < 0) {
    *why = g_strdup_printf("%s: cannot read the refcount table: %s", q->path,
                           g_strerror(-r));
    return r;
  }
  for (uint64_t i = 0; i < q->rt_entries; i++) {
    uint64_t b;

    q->reftable[i] = be64toh(q->reftable[i]);
    if (q->reftable[i])
      q->rt_used = i + 1;
    if (cbt_qcow2_reftable_decode(q->reftable[i], q->cbits, &b) < 0 ||
        b > file_size || file_size - b < q->csize) {
      *why = g_strdup_printf("%s: corrupt image: refcount table entry %" PRIu64
                             " is invalid (0x%016" PRIx64 ")", q->path, i,
                             q->reftable[i]);
      return -EBADMSG;
    }
  }
  return 0;
}

/* The header of @q names the backing file @link expects (none for NULL),
 * in qcow2 format (or unnamed)?  0 or -EBADMSG. */
static int
check_link(struct q2 *q, const struct cbt_qcow2_link *link, char **why)
{
  if (!link->backing_name != !link->backing) {
    *why = g_strdup_printf("%s: a backing image without a backing name, or the "
                           "other way round", q->path);
    return -EINVAL;
  }
  if (!link->backing_name) {
    if (!q->h.backing_file[0])
      return 0;
    *why = g_strdup_printf("%s: names backing file '%s', but its chain has "
                           "none", q->path, q->h.backing_file);
    return -EBADMSG;
  }
  if (strcmp(q->h.backing_file, link->backing_name) != 0) {
    *why = g_strdup_printf("%s: names backing file '%s', but its chain has '%s'",
                           q->path, q->h.backing_file[0] ? q->h.backing_file
                           : "(none)", link->backing_name);
    return -EBADMSG;
  }
  if (q->h.backing_format[0] && strcmp(q->h.backing_format, "qcow2") != 0) {
    *why = g_strdup_printf("%s: names backing format '%s' for '%s', but its "
                           "chain is qcow2", q->path, q->h.backing_format,
                           q->h.backing_file);
    return -EBADMSG;
  }
  return 0;
}

static int
open_q2(const char *path, bool read_only, bool direct,
        const struct cbt_qcow2_link *link, struct cbt_image **out, char **why);

int
cbt_image_open_qcow2(const char *path, bool read_only, bool direct,
                     struct cbt_image **out, char **why)
{
  return open_q2(path, read_only, direct, NULL, out, why);
}

int
cbt_image_open_qcow2_link(const char *path, const struct cbt_qcow2_link *link,
                          struct cbt_image **out, char **why)
{
  return open_q2(path, true, false, link, out, why);
}

static int
open_q2(const char *path, bool read_only, bool direct,
        const struct cbt_qcow2_link *link, struct cbt_image **out, char **why)
{
  struct q2 *q;
  g_autofree uint8_t *hdr = NULL;
  g_autofree char *hwhy = NULL;
  struct stat st;
  size_t hlen;
  int r;

  if (direct) {
    *why = g_strdup_printf("%s: --cache=none is not supported for qcow2 images",
                           path);
    return -ENOTSUP;
  }
  q = g_new0(struct q2, 1);
  g_mutex_init(&q->lock);
  q->path = g_strdup(path);
  /* The caller's descriptor and backing image are ours from here on. */
  if (link)
    q->backing = link->backing;
  q->fd = link ? link->fd : cbt_open_regular(path, (read_only ? O_RDONLY : O_RDWR) |
                                             O_CLOEXEC, NULL, why);
  if (q->fd < 0) {
    r = q->fd;
    goto fail;
  }
  if (fstat(q->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
    r = -EINVAL;
    *why = g_strdup_printf("%s: not a regular file", path);
    goto fail;
  }
  hlen = (uint64_t)st.st_size < (UINT64_C(1) << CBT_QCOW2_MAX_CLUSTER_BITS)
             ? (size_t)st.st_size : (size_t)1 << CBT_QCOW2_MAX_CLUSTER_BITS;
  hdr = g_malloc(hlen ? hlen : 1);
  r = cbt_io_pread(q->fd, hdr, hlen, 0);
  if (r < 0) {
    *why = g_strdup_printf("%s: cannot read the header: %s", path, g_strerror(-r));
    goto fail;
  }
  r = cbt_qcow2_header_decode_flags(hdr, hlen, (uint64_t)st.st_size,
                                    CBT_QCOW2_DECODE_ALLOW_CORRUPT, &q->h, &hwhy);
  if (r < 0) {
    *why = g_strdup_printf("%s: %s", path, hwhy);
    goto fail;
  }
  /* Like QEMU: an image marked corrupt can still be read (to rescue its
   * data), never written before it is repaired. */
  if ((q->h.incompatible_features & CBT_QCOW2_INCOMPAT_CORRUPT) && !read_only) {
    r = -ENOTSUP;
    *why = g_strdup_printf("%s: image is marked corrupt (incompatible feature "
                           "'corrupt' bit set): repair it with qemu-img check -r "
                           "all, or serve it with --read-only", path);
    goto fail;
  }
  if (q->h.nb_snapshots > 0 && !read_only) {
    r = -ENOTSUP;
    *why = g_strdup_printf("%s: image has %" PRIu32 " internal snapshot(s); "
                           "writing to such images is not supported (use --read-only)",
                           path, q->h.nb_snapshots);
    goto fail;
  }
  q->cbits = q->h.cluster_bits;
  q->csize = q->h.cluster_size;
  q->l2_entries = q->csize / 8;
  q->rb_entries = q->csize / 2;
  q->pub.ops = &q2_ops;
  q->pub.format = "qcow2";
  q->pub.size = q->h.size;
  q->pub.ino = (uint64_t)st.st_ino;
  q->pub.read_only = read_only;
  q->pub.direct = false;
  q->pub.direct_align = 512;

  q->fresh_from = ((uint64_t)st.st_size + q->csize - 1) >> q->cbits;
  r = load_tables(q, (uint64_t)st.st_size, why);
  if (r < 0)
    goto fail;
  if (!read_only) {
    r = meta_build(q, why);
    if (r < 0)
      goto fail;
  }
  if (link) {
    r = check_link(q, link, why);
    if (r < 0)
      goto fail;
  } else if (q->h.backing_file[0]) {
    r = open_backing(q, why);
    if (r < 0)
      goto fail;
  }
  /* Auto-clear features we do not maintain (persistent bitmaps) must be
   * cleared before the first write, so QEMU knows they are stale. */
  if (!read_only && q->h.version >= 3 && q->h.autoclear_features) {
    uint64_t zero = 0;

    r = cbt_io_pwrite(q->fd, &zero, 8, CBT_QCOW2_OFF_AUTOCLEAR);
    if (r == 0)
      r = cbt_io_fdatasync(q->fd);
    if (r < 0) {
      *why = g_strdup_printf("%s: cannot clear auto-clear features: %s", path,
                             g_strerror(-r));
      goto fail;
    }
    q->h.autoclear_features = 0;
  }

  cache_init(&q->l2, L2_CACHE_BYTES, q->csize);
  cache_init(&q->rb, RB_CACHE_BYTES, q->csize);
  q->frees = g_array_new(FALSE, FALSE, sizeof(uint64_t));
  q->zeros = g_malloc0(q->csize);
  q->comp_buf = g_malloc(q->csize);
  q->cow_buf = g_malloc(q->csize);
  q->queue = g_async_queue_new();
  q->batch = g_new0(struct q2_batch, 1);
  if (io_uring_queue_init(BATCH_RING, &q->batch->ring, 0) < 0) {
    /* All writes synchronous, jobs signalled through eventfds. */
    g_clear_pointer(&q->batch, g_free);
  } else {
    struct io_uring_probe *probe = io_uring_get_probe_ring(&q->batch->ring);

    q->msg_ring = probe && io_uring_opcode_supported(probe, IORING_OP_MSG_RING);
    if (probe)
      io_uring_free_probe(probe);
#ifdef CBT_FAULT_INJECTION
    /* Tests: the eventfd path of kernels without MSG_RING. */
    if (g_getenv("CBT_QCOW2_NO_MSG_RING"))
      q->msg_ring = false;
#endif
  }
  q->thread = g_thread_try_new("qcow2-meta", slow_thread, q, NULL);
  if (!q->thread) {
    r = -EAGAIN;
    *why = g_strdup_printf("%s: cannot start the metadata thread", path);
    goto fail;
  }
  /* Tests: the metadata thread's synchronous I/O is image I/O too. */
  cbt_fi_tag_fd(q->fd, CBT_FI_IMAGE);
  *out = &q->pub;
  return 0;

fail:
  q2_free(q);
  return r;
}
