/* qcow2 image backend, metadata: the L2 and refcount-block caches,
 * synchronous metadata I/O, the metadata-overlap set, L2 lookups,
 * refcounts and the cluster allocator, and write-back.  The paths and the
 * locking are described in image-qcow2.c.
 *
 * Write-back and crash safety.  Metadata changes are made in memory and
 * written by q2_writeback(), at FLUSH, FUA, when too much is dirty and at
 * close.  Between two writebacks the on-disk metadata is therefore the
 * consistent state of the last writeback; data written to newly allocated
 * clusters lands in clusters the on-disk refcounts call free.  q2_writeback()
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
 *     (q2_mark_corrupt): every later write, zero and trim fails with -EIO,
 *     reads go on, and a v3 image gets its corrupt bit set on disk.
 * The test is one bitmap lookup per cluster, under the lock the fast path
 * holds anyway.  An image already marked corrupt opens read-only only.
 */
#include "image-qcow2.h"

/* ---- cache ---------------------------------------------------------- */

static void
table_free(gpointer p)
{
  struct q2_table *t = p;

  g_free(t->buf);
  g_free(t);
}

void
q2_cache_init(struct q2_cache *c, size_t bytes, uint64_t csize)
{
  c->map = g_hash_table_new_full(g_int64_hash, g_int64_equal, NULL, table_free);
  c->max = bytes / csize < 64 ? 64 : bytes / csize;
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
int
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
int
q2_mark_corrupt(struct q2 *q, uint64_t vcl, uint64_t c)
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
int
q2_check_overlap(struct q2 *q, uint64_t vcl, uint64_t host, uint64_t len)
{
  uint64_t first = host >> q->cbits, last = (host + len - 1) >> q->cbits;
  uint64_t c = cbt_qcow2_metaset_find(&q->meta, first, last - first + 1);

  return c == CBT_QCOW2_METASET_NONE ? 0 : q2_mark_corrupt(q, vcl, c);
}

/* q2_check_overlap for the host clusters an L2 entry @m points at. */
int
q2_check_mapping(struct q2 *q, uint64_t vcl, const struct cbt_qcow2_map *m)
{
  switch (m->type) {
  case CBT_QCOW2_NORMAL:
  case CBT_QCOW2_ZERO_ALLOC:
    return q2_check_overlap(q, vcl, m->host_offset, q->csize);
  case CBT_QCOW2_COMPRESSED:
    return q2_check_overlap(q, vcl, m->host_offset, m->comp_len);
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
int
q2_meta_build(struct q2 *q, char **why)
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
int
q2_map_locked(struct q2 *q, uint64_t vcl, struct cbt_qcow2_map *m)
{
  uint64_t l1i = vcl / q->l2_entries;
  struct q2_table *t;
  int r;

  if (l1i >= q->h.l1_size || (q->l1[l1i] & CBT_QCOW2_OFFSET_MASK) == 0) {
    memset(m, 0, sizeof *m);
    m->type = CBT_QCOW2_UNALLOCATED;
    return 1;
  }
  t = q2_cache_get(&q->l2, l1i);
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
int
q2_map_slow(struct q2 *q, uint64_t vcl, struct cbt_qcow2_map *m)
{
  struct q2_table *t = NULL;
  int r;

  g_mutex_lock(&q->lock);
  r = q2_map_locked(q, vcl, m);
  g_mutex_unlock(&q->lock);
  if (r != 0)
    return r < 0 ? r : 0;
  r = l2_read(q, vcl / q->l2_entries, &t);
  if (r < 0)
    return r;
  g_mutex_lock(&q->lock);
  cache_insert(&q->l2, t);
  r = q2_map_locked(q, vcl, m);
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
  t = q2_cache_get(&q->rb, b);
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
 * cluster given back (q2_alloc_undo, apply_frees) stays below the mark: it
 * may hold old bytes. */
void
q2_note_alloc(struct q2 *q, uint64_t c, uint64_t n)
{
  if (c + n > q->fresh_from)
    q->fresh_from = c + n;
}

static struct q2_table *
new_refblock(struct q2 *q, uint64_t b, uint64_t c)
{
  struct q2_table *t = g_new0(struct q2_table, 1);

  q2_note_alloc(q, c, 1);

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
 * q2_alloc_run: put it after everything the refcount table covers, with the
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
    rc_set(q2_cache_get(&q->rb, c / q->rb_entries), c % q->rb_entries, 1);
  q2_note_alloc(q, start, k + m);
  *host = start << q->cbits;
  return 0;
}

/* Allocate @k contiguous free clusters (refcount 1); returns the host
 * offset in *@host.  A cluster whose refcount block does not exist yet
 * becomes that block (it describes itself), so allocation never recurses;
 * a fresh block's range thus has rb_entries - 1 free clusters in a row,
 * and longer runs go to alloc_big.  A metadata cluster is never free,
 * whatever its refcount says: a corrupt image may claim it is. */
int
q2_alloc_run(struct q2 *q, uint64_t k, uint64_t *host)
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
  q2_note_alloc(q, start, k);
  q->free_cursor = start + k;
  *host = start << q->cbits;
  return 0;
}

/* Give back @k clusters at @host that q2_alloc_run just handed out when their
 * data write failed: nothing references them (no L2 entry was set, no
 * worker can have looked them up, and no writeback ran in between on this
 * thread), so they are free at once.  Without this every failed write of
 * new data -- a guest retrying on ENOSPC -- would leak its clusters. */
void
q2_alloc_undo(struct q2 *q, uint64_t host, uint64_t k)
{
  uint64_t c0 = host >> q->cbits;

  for (uint64_t c = c0; c < c0 + k; c++) {
    struct q2_table *t;

    /* Loaded by q2_alloc_run a moment ago, so no I/O here. */
    if (rb_get(q, c / q->rb_entries, &t) == 0 && t)
      rc_set(t, c % q->rb_entries, 0);
  }
  if (c0 < q->free_cursor)
    q->free_cursor = c0;
}

/* Remember that the clusters behind @m lose one reference once the L2
 * change that drops it is durable (q2_writeback step 5). */
void
q2_defer_free(struct q2 *q, const struct cbt_qcow2_map *m)
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
int
q2_set_l2(struct q2 *q, uint64_t vcl, uint64_t entry)
{
  uint64_t l1i = vcl / q->l2_entries;
  struct cbt_qcow2_map m;
  struct q2_table *t;
  int r;

  if (l1i >= q->h.l1_size)
    return -EIO;
  if ((q->l1[l1i] & CBT_QCOW2_OFFSET_MASK) == 0) {
    uint64_t host;

    r = q2_alloc_run(q, 1, &host);
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
    r = q2_map_slow(q, vcl, &m);        /* loads the table */
    if (r < 0)
      return r;
  }
  g_mutex_lock(&q->lock);
  t = q2_cache_get(&q->l2, l1i);
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
    r = q2_alloc_run(q, clusters, &host);
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

/* Apply the deferred refcount decrements (q2_writeback step 5). */
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
int
q2_writeback(struct q2 *q)
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
      q2_defer_free(q, &old);
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

bool
q2_too_dirty(struct q2 *q)
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
