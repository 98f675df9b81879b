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
 * whose read the worker queued on its ring.  Worker threads therefore
 * never wait for I/O, and all metadata changes are serialised on one
 * thread, so they need no ordering between concurrent allocators.  We
 * chose this over a per-request async metadata state machine: the fast
 * path (the steady state of a VM disk) is exactly as cheap, and the
 * crash-ordering (image-qcow2-meta.c) is easy to see in one sequential
 * function.  The thread takes every request queued at once and writes the
 * data of the plain writes among them (in place, or into clusters that
 * read as zeros: the allocating writes of a fresh image) with one
 * submission on a ring of its own before it installs their L2 entries
 * ("batched writes", image-qcow2-slow.c).
 *
 * Locking: q->lock protects the L1 table, the L2 cache (the hash table
 * and the contents of the tables) and the metadata set.  Only the
 * metadata thread modifies them, always under the lock; workers read them
 * under the lock and copy what they need.  The metadata thread reads its
 * own state without the lock.  Refcount blocks, the refcount table, the
 * allocator and the pending-free list belong to the metadata thread alone.
 *
 *
 * Files: this one (open, close, block status), image-qcow2-meta.c
 * (metadata, allocation, write-back and its crash ordering, overlap
 * checks), image-qcow2-slow.c (the metadata thread), image-qcow2-fast.c
 * (the worker side); image-qcow2.h holds what they share.
 */
#include "image-qcow2.h"

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
    r = q2_map_locked(q, vcl, &m);
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
  q2_writeback(q);
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
    r = q2_meta_build(q, why);
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

  q2_cache_init(&q->l2, L2_CACHE_BYTES, q->csize);
  q2_cache_init(&q->rb, RB_CACHE_BYTES, q->csize);
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
  q->thread = g_thread_try_new("qcow2-meta", q2_slow_thread, q, NULL);
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
