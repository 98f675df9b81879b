/* Random reads of a backup point through its chain, from any repository
 * (directory or S3), checked against the manifest's checksums: what cbt
 * mount serves (and through a private mount cbt serve and cbt restore
 * --instant).
 *
 * The chain is mapped once by chain-map.c (every file's L1 and L2 tables,
 * validated), and its runs of visible clusters are indexed by guest
 * offset.  A read of a guest range then needs no metadata: each cluster
 * is either in a run (file, host offset) or reads as zeros.
 *
 * A directory repository's files are read with pread (through the
 * thread's io_uring, cbt/uring-io.h) straight into the reader's buffer:
 * the kernel's page cache is their cache.  On S3, where every read is an
 * HTTP request, data comes through a cache of BLOCK-sized, BLOCK-aligned
 * pieces of the chain's files (CACHE_BLOCKS of them, least recently used
 * goes first).
 * A block missing from the cache is read by the thread that needs it
 * (FUSE runs many) with one ranged GET; readers of a block being read wait
 * for it rather than read it again.  Readahead: a miss on block k of a
 * file whose block k-1 is cached (a reader going forward) also starts
 * GETs of the missing blocks among k+1..k+READAHEAD on the fetch pool
 * (repo-read.c), so a sequential reader (cp, cmp, qemu-img convert, a
 * loop-mounted file system reading a large file) finds the next blocks
 * arriving while it copies this one; cbt backup writes a file's data in
 * guest order, so the next blocks of the file are the next guest data.
 *
 * Checksums.  Nothing is served that was not checked against the
 * manifest, as cbt restore checks it (a backup file with a byte changed
 * must not reach a guest or a restored disk).  The manifest has a
 * checksum per chunk of each file (64 MiB), so a chunk is checked whole,
 * the first time a read needs any byte of it: the reading thread reads
 * the chunk in order and hashes it (on S3 through the block cache, so
 * that the readahead above fetches its blocks ahead of the hash and they
 * stay cached for the read that asked).  The outcome is kept in two bits
 * per chunk, matched and damaged (a third says "being hashed": a reader
 * of a chunk being hashed waits for the outcome instead of hashing it
 * again), so a chunk is hashed once however often it is read, and a
 * damaged one fails every read that needs it (CLI_EXIT_DAMAGED, naming
 * the file and the chunk's range) without being hashed again; a chunk
 * that could not be read is not marked and is tried again.  Later reads
 * of a matched chunk read the file again (or the cache): the files do
 * not change under us, a directory repository being locked and an S3
 * object being pinned to the ETag seen at open.  The map's own sources
 * (each file's first cluster and its L1 and L2 tables, chain-map.c) are
 * checked when the reader is made, before anything is served: every read
 * depends on them.  Chunks are hashed by the threads that read them, so
 * readers of different chunks hash in parallel.  A reader going forward
 * would wait for each chunk's hash in turn (its data is read for the hash
 * first, its 64 MiB at the disk's speed), so in a directory repository a
 * read that needed chunk c of a file also has chunk c + 1 hashed ahead by
 * one thread of the reader's (one chunk at a time, and only ahead of what
 * readers asked for: a mount that serves a few files does not hash the
 * disk); cbt backup writes a file's data in roughly guest order, so that
 * is what a reader going forward needs next.  On S3 the block readahead
 * above does that job within a chunk, and hashing the next chunk ahead
 * would push the current one out of the cache.
 *
 * Locking: one mutex for the table, the LRU list and the chunk bits, one
 * condition for "a block finished loading or a chunk was checked".  A
 * block's bytes are written only while it is loading, by its one loader,
 * and read only once it is ready, by holders of a reference; an evicted
 * block is freed by its last holder.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>

#include "cbt/uring-io.h"
#include "repo.h"

#define BLOCK        (UINT64_C(4) << 20)
#define CACHE_BLOCKS 24                  /* 96 MiB */
#define READAHEAD    4
#define HASH_PIECE   (UINT64_C(1) << 20) /* a directory chunk is hashed in these */

enum block_state { LOADING, READY, FAILED };

struct block {
  uint64_t key;                   /* file << 40 | block index */
  unsigned file;
  uint64_t off, len;              /* in the file */
  uint8_t *buf;
  enum block_state state;
  int refs;                       /* the table's, and each holder's */
  bool in_table;
  GList link;                     /* in the LRU list while in the table */
  chain_reader *cr;               /* for a readahead's completion */
};

/* A run of visible clusters, by guest offset. */
struct grun {
  uint64_t guest, clusters;       /* in clusters */
  uint64_t host;                  /* file offset of the first */
  unsigned file;
};

/* The checksum state of one file of the chain: bits per chunk. */
struct fcheck {
  uint64_t nchunks;
  uint64_t *ok;                   /* matched the manifest */
  uint64_t *bad;                  /* did not */
  uint64_t *busy;                 /* being hashed */
};

struct chain_reader {
  chain_map *map;
  GArray *runs;                   /* struct grun, by guest */
  GMutex lock;
  GCond loaded;                   /* a block loaded, or a chunk checked */
  GHashTable *blocks;             /* key -> struct block * */
  GQueue lru;                     /* most recent first */
  unsigned inflight_ra;           /* readaheads running */
  struct fcheck *check;           /* per file of the map */
  uint64_t checked, damaged;      /* chunks hashed, and mismatches */
  GThread *ahead;                 /* hashes a chunk ahead (directory) */
  GAsyncQueue *ahead_q;           /* (file << 40 | chunk) + 1; the reader: stop */
  bool ahead_busy;                /* one is queued or being hashed */
};

static bool check_range(chain_reader *cr, unsigned fi, uint64_t off, uint64_t len,
                        bool ahead, GError **error);
static gpointer ahead_main(gpointer opaque);

static int
cmp_grun(const void *a, const void *b)
{
  const struct grun *x = a, *y = b;

  return x->guest < y->guest ? -1 : x->guest > y->guest;
}

bool
chain_reader_new(repo *r, const repo_backup *b, chain_reader **out, GError **error)
{
  chain_reader *cr;
  chain_map *m = NULL;

  if (!chain_map_build(r, b, &m, error))
    return false;
  cr = g_new0(chain_reader, 1);
  cr->map = m;
  cr->check = g_new0(struct fcheck, m->nfiles);
  for (unsigned i = 0; i < m->nfiles; i++) {
    const struct chain_file *f = &m->files[i];
    struct fcheck *k = &cr->check[i];
    /* repo.c checked that chunk_size > 0 and that there is one sum per
     * chunk of file_size, which chain-map.c checked is the file's size. */
    uint64_t nchunks = f->size / f->backup->chunk_size + (f->size % f->backup->chunk_size != 0);
    uint64_t words = (nchunks + 63) / 64;

    k->nchunks = nchunks;
    k->ok = g_new0(uint64_t, words);
    k->bad = g_new0(uint64_t, words);
    k->busy = g_new0(uint64_t, words);
  }
  cr->runs = g_array_new(FALSE, FALSE, sizeof(struct grun));
  for (unsigned i = 0; i < m->nfiles; i++)
    for (guint k = 0; k < m->files[i].runs->len; k++) {
      const struct chain_run *run = &g_array_index(m->files[i].runs, struct chain_run, k);
      struct grun g = { run->guest, run->clusters, run->host, i };

      g_array_append_val(cr->runs, g);
    }
  g_array_sort(cr->runs, cmp_grun);
  g_mutex_init(&cr->lock);
  g_cond_init(&cr->loaded);
  cr->blocks = g_hash_table_new(g_int64_hash, g_int64_equal);
  g_queue_init(&cr->lru);
  cr->ahead_q = g_async_queue_new();
  cr->ahead = g_thread_new("hash-ahead", ahead_main, cr);
  /* The map's sources, before anything is served. */
  for (unsigned i = 0; i < m->nfiles; i++)
    for (guint k = 0; k < m->files[i].meta->len; k++) {
      const struct stream_range *mr = &g_array_index(m->files[i].meta, struct stream_range, k);

      if (!check_range(cr, i, mr->off, mr->len, false, error)) {
        chain_reader_free(cr);
        return false;
      }
    }
  *out = cr;
  return true;
}

static void
block_unref(struct block *bl)
{
  if (--bl->refs == 0) {
    g_free(bl->buf);
    g_free(bl);
  }
}

void
chain_reader_free(chain_reader *cr)
{
  if (!cr)
    return;
  g_async_queue_push_front(cr->ahead_q, cr);
  g_thread_join(cr->ahead);
  g_async_queue_unref(cr->ahead_q);
  g_mutex_lock(&cr->lock);
  while (cr->inflight_ra > 0)
    g_cond_wait(&cr->loaded, &cr->lock);
  g_mutex_unlock(&cr->lock);
  for (GList *l = cr->lru.head; l;) {
    struct block *bl = l->data;

    l = l->next;
    block_unref(bl);
  }
  g_hash_table_unref(cr->blocks);
  g_mutex_clear(&cr->lock);
  g_cond_clear(&cr->loaded);
  g_array_unref(cr->runs);
  for (unsigned i = 0; i < cr->map->nfiles; i++) {
    g_free(cr->check[i].ok);
    g_free(cr->check[i].bad);
    g_free(cr->check[i].busy);
  }
  g_free(cr->check);
  chain_map_free(cr->map);
  g_free(cr);
}

const chain_map *
chain_reader_map(const chain_reader *cr)
{
  return cr->map;
}

/* A directory file's inode number: what cbt restore --instant recorded
 * as the source's identity when it handed the daemon the file itself, so
 * a restore begun that way resumes.  Otherwise FNV-1a of the top file's
 * name and ETag (its size without one).  Inode numbers 1 and 2 are the
 * mount's root's and "none": those get the hash too. */
uint64_t
chain_reader_ident(const chain_reader *cr)
{
  const struct chain_file *top = &cr->map->files[cr->map->nfiles - 1];
  g_autofree char *s = NULL;
  uint64_t h = UINT64_C(0xcbf29ce484222325);

  if (!rfile_is_s3(top->rf) && top->rf->ino > 2 && top->rf->ino <= INT64_MAX)
    return top->rf->ino;
  s = g_strdup_printf("%s\n%s\n%" PRIu64, top->rf->name,
                      top->rf->etag ? top->rf->etag : "", top->rf->size);
  for (const char *p = s; *p; p++)
    h = (h ^ (uint8_t)*p) * UINT64_C(0x100000001b3);
  h &= INT64_MAX;                 /* a positive ino_t */
  return h > 2 ? h : h + 3;       /* not the root's, nor 0 */
}

/* Drop least recently used blocks that nobody holds until there is room
 * (lock held).  Blocks being loaded or held stay: the cache may exceed
 * its size while they do. */
static void
evict(chain_reader *cr)
{
  GList *l = cr->lru.tail;

  while (cr->lru.length >= CACHE_BLOCKS && l) {
    struct block *bl = l->data;
    GList *prev = l->prev;

    if (bl->state != LOADING && bl->refs == 1) {
      g_queue_unlink(&cr->lru, &bl->link);
      g_hash_table_remove(cr->blocks, &bl->key);
      bl->in_table = false;
      block_unref(bl);
    }
    l = prev;
  }
}

/* A new block of file @fi at index @idx, loading, in the table (lock held). */
static struct block *
block_insert(chain_reader *cr, unsigned fi, uint64_t idx)
{
  const struct chain_file *f = &cr->map->files[fi];
  struct block *bl = g_new0(struct block, 1);

  evict(cr);
  bl->key = (uint64_t)fi << 40 | idx;
  bl->file = fi;
  bl->off = idx * BLOCK;
  bl->len = MIN(BLOCK, f->size - bl->off);
  bl->buf = g_malloc(bl->len);
  bl->state = LOADING;
  bl->refs = 1;                   /* the table's */
  bl->in_table = true;
  bl->link.data = bl;
  bl->cr = cr;
  g_hash_table_insert(cr->blocks, &bl->key, bl);
  g_queue_push_head_link(&cr->lru, &bl->link);
  return bl;
}

/* Loading of @bl ended (lock held): a failed block leaves the table, so
 * that the next reader tries again. */
static void
block_loaded(chain_reader *cr, struct block *bl, bool ok)
{
  bl->state = ok ? READY : FAILED;
  if (!ok && bl->in_table) {
    g_queue_unlink(&cr->lru, &bl->link);
    g_hash_table_remove(cr->blocks, &bl->key);
    bl->in_table = false;
    block_unref(bl);
  }
  g_cond_broadcast(&cr->loaded);
}

static void
readahead_done(void *opaque, GError *error)
{
  struct block *bl = opaque;
  chain_reader *cr = bl->cr;

  g_mutex_lock(&cr->lock);
  if (error)
    cli_debug("readahead: %s", error->message);
  block_loaded(cr, bl, error == NULL);
  block_unref(bl);                /* the readahead's */
  cr->inflight_ra--;
  g_cond_broadcast(&cr->loaded);
  g_mutex_unlock(&cr->lock);
  if (error)
    g_error_free(error);
}

/* Block @idx of file @fi, ready, with a reference the caller drops with
 * block_release; NULL with @error if it cannot be read. */
static struct block *
block_get(chain_reader *cr, unsigned fi, uint64_t idx, GError **error)
{
  const struct chain_file *f = &cr->map->files[fi];
  uint64_t key = (uint64_t)fi << 40 | idx;
  struct block *bl;

  g_mutex_lock(&cr->lock);
  bl = g_hash_table_lookup(cr->blocks, &key);
  if (bl) {
    bl->refs++;
    g_queue_unlink(&cr->lru, &bl->link);
    g_queue_push_head_link(&cr->lru, &bl->link);
    while (bl->state == LOADING)
      g_cond_wait(&cr->loaded, &cr->lock);
    if (bl->state == FAILED) {
      block_unref(bl);
      g_mutex_unlock(&cr->lock);
      /* Its loader reported why; this reader tries once itself. */
      return block_get(cr, fi, idx, error);
    }
    g_mutex_unlock(&cr->lock);
    return bl;
  }
  bl = block_insert(cr, fi, idx);
  bl->refs++;                     /* ours */
  /* Readahead of the next blocks of the file, for a reader going forward. */
  key = (uint64_t)fi << 40 | (idx - 1);
  for (uint64_t k = idx + 1; (idx == 0 || g_hash_table_lookup(cr->blocks, &key)) &&
                             k <= idx + READAHEAD && k * BLOCK < f->size; k++) {
    uint64_t kk = (uint64_t)fi << 40 | k;
    struct block *ra;

    if (g_hash_table_lookup(cr->blocks, &kk))
      continue;
    ra = block_insert(cr, fi, k);
    ra->refs++;                   /* the readahead's */
    cr->inflight_ra++;
    rfile_fetch(f->rf, ra->buf, (size_t)ra->len, ra->off, readahead_done, ra);
  }
  g_mutex_unlock(&cr->lock);

  {
    GError *err = NULL;
    bool ok = rfile_pread(f->rf, bl->buf, (size_t)bl->len, bl->off, &err);

    g_mutex_lock(&cr->lock);
    block_loaded(cr, bl, ok);
    if (!ok) {
      block_unref(bl);
      g_mutex_unlock(&cr->lock);
      g_propagate_error(error, err);
      return NULL;
    }
    g_mutex_unlock(&cr->lock);
  }
  return bl;
}

static void
block_release(chain_reader *cr, struct block *bl)
{
  g_mutex_lock(&cr->lock);
  block_unref(bl);
  g_mutex_unlock(&cr->lock);
}

/* --- checksums ----------------------------------------------------------- */

static bool
bit_get(const uint64_t *w, uint64_t i)
{
  return (w[i / 64] >> (i % 64)) & 1;
}

static void
bit_put(uint64_t *w, uint64_t i, bool v)
{
  if (v)
    w[i / 64] |= UINT64_C(1) << (i % 64);
  else
    w[i / 64] &= ~(UINT64_C(1) << (i % 64));
}

static void
set_mismatch(GError **error, const struct chain_file *f, uint64_t c, uint64_t start,
             uint64_t end)
{
  /* The words of cbt restore's and cbt verify's message (stream.c). */
  g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: checksum mismatch in bytes %" PRIu64
              "..%" PRIu64 " (chunk %" PRIu64 "): the file was modified or is damaged",
              f->path, start, end - 1, c);
}

/* Feed [@start, @end) of file @fi to @h, in order. */
static bool
hash_bytes(chain_reader *cr, unsigned fi, uint64_t start, uint64_t end, chunk_hash *h,
           GError **error)
{
  const struct chain_file *f = &cr->map->files[fi];

  if (!rfile_is_s3(f->rf)) {
    g_autofree uint8_t *buf = g_malloc((size_t)MIN(HASH_PIECE, end - start));

    /* The whole chunk is needed: let the kernel read it ahead of us. */
    (void)posix_fadvise(f->rf->fd, (off_t)start, (off_t)(end - start), POSIX_FADV_WILLNEED);

    for (uint64_t off = start; off < end;) {
      size_t n = (size_t)MIN(HASH_PIECE, end - off);

      if (!rfile_pread(f->rf, buf, n, off, error))
        return false;
      chunk_hash_update(h, buf, n);
      off += n;
    }
    return true;
  }
  for (uint64_t off = start; off < end;) {
    struct block *bl = block_get(cr, fi, off / BLOCK, error);
    uint64_t in = off % BLOCK, n;

    if (!bl)
      return false;
    /* Blocks tile the file (block_insert), and off < f->size. */
    n = MIN(end - off, bl->len - in);
    chunk_hash_update(h, bl->buf + in, (size_t)n);
    block_release(cr, bl);
    off += n;
  }
  return true;
}

/* Check chunk @c of file @fi against the manifest, unless that was done:
 * see the top of the file.  False with @error if it does not match or
 * cannot be read. */
static bool
check_chunk(chain_reader *cr, unsigned fi, uint64_t c, GError **error)
{
  const struct chain_file *f = &cr->map->files[fi];
  const repo_backup *e = f->backup;
  struct fcheck *k = &cr->check[fi];
  const uint64_t start = c * e->chunk_size;
  const uint64_t end = start + MIN(e->chunk_size, f->size - start);
  g_autoptr(chunk_hash) h = NULL;
  g_autofree char *hex = NULL;
  GError *err = NULL;
  bool match = false;

  g_mutex_lock(&cr->lock);
  while (bit_get(k->busy, c))
    g_cond_wait(&cr->loaded, &cr->lock);
  if (bit_get(k->ok, c) || bit_get(k->bad, c)) {
    match = bit_get(k->ok, c);
    g_mutex_unlock(&cr->lock);
    if (!match)
      set_mismatch(error, f, c, start, end);
    return match;
  }
  bit_put(k->busy, c, true);
  g_mutex_unlock(&cr->lock);

  h = chunk_hash_new(e->checksum);
  if (hash_bytes(cr, fi, start, end, h, &err)) {
    hex = chunk_hash_hex(h);
    match = c < e->sums->len && g_ascii_strcasecmp(hex, g_ptr_array_index(e->sums, c)) == 0;
  }

  g_mutex_lock(&cr->lock);
  bit_put(k->busy, c, false);
  if (!err) {
    bit_put(match ? k->ok : k->bad, c, true);
    cr->checked++;
    cr->damaged += !match;
  }
  g_cond_broadcast(&cr->loaded);
  g_mutex_unlock(&cr->lock);
  if (err) {
    g_propagate_error(error, err);
    return false;
  }
  if (!match)
    set_mismatch(error, f, c, start, end);
  return match;
}

/* The hash-ahead thread: see the top of the file. */
static gpointer
ahead_main(gpointer opaque)
{
  chain_reader *cr = opaque;
  gpointer item;

  while ((item = g_async_queue_pop(cr->ahead_q)) != cr) {
    g_autoptr(GError) err = NULL;
    gsize key = GPOINTER_TO_SIZE(item) - 1;

    /* A mismatch is remembered for the reader that gets there; a read
     * error is not, and the reader tries again. */
    if (!check_chunk(cr, (unsigned)(key >> 40), key & ((UINT64_C(1) << 40) - 1), &err))
      cli_debug("hashing ahead: %s", err->message);
    g_mutex_lock(&cr->lock);
    cr->ahead_busy = false;
    g_mutex_unlock(&cr->lock);
  }
  cbt_io_thread_cleanup();
  return NULL;
}

/* A reader needed chunk @c of file @fi: hash the next one ahead, unless
 * that is done, being done, or the one thread is busy. */
static void
hash_ahead(chain_reader *cr, unsigned fi, uint64_t c)
{
  const struct chain_file *f = &cr->map->files[fi];
  const struct fcheck *k = &cr->check[fi];
  const uint64_t n = c + 1;

  if (rfile_is_s3(f->rf) || n >= k->nchunks)
    return;
  g_mutex_lock(&cr->lock);
  if (!cr->ahead_busy && !bit_get(k->ok, n) && !bit_get(k->bad, n) && !bit_get(k->busy, n)) {
    cr->ahead_busy = true;
    g_async_queue_push(cr->ahead_q, GSIZE_TO_POINTER(((gsize)fi << 40 | n) + 1));
  }
  g_mutex_unlock(&cr->lock);
}

/* Check every chunk of file @fi that [@off, @off + @len) touches; with
 * @ahead (a reader's request) hash the next chunk ahead. */
static bool
check_range(chain_reader *cr, unsigned fi, uint64_t off, uint64_t len, bool ahead,
            GError **error)
{
  const struct chain_file *f = &cr->map->files[fi];
  const uint64_t cs = f->backup->chunk_size;

  if (len == 0)
    return true;
  if (off > f->size || f->size - off < len) {
    /* chain-map.c keeps every run and table inside the file. */
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: bytes %" PRIu64 "..%" PRIu64
                " past its end", f->path, off, off + len - 1);
    return false;
  }
  for (uint64_t c = off / cs; c <= (off + len - 1) / cs; c++)
    if (!check_chunk(cr, fi, c, error))
      return false;
  if (ahead)
    hash_ahead(cr, fi, (off + len - 1) / cs);
  return true;
}

void
chain_reader_checked(chain_reader *cr, uint64_t *checked, uint64_t *damaged)
{
  g_mutex_lock(&cr->lock);
  *checked = cr->checked;
  *damaged = cr->damaged;
  g_mutex_unlock(&cr->lock);
}

/* --- reads --------------------------------------------------------------- */

/* Index of the first run that ends after guest cluster @c. */
static guint
grun_find(const chain_reader *cr, uint64_t c)
{
  guint lo = 0, hi = cr->runs->len;

  while (lo < hi) {
    guint mid = lo + (hi - lo) / 2;
    const struct grun *g = &g_array_index(cr->runs, struct grun, mid);

    if (g->guest + g->clusters <= c)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/* Copy [@host, @host + @len) of file @fi into @buf: a directory's file
 * directly, an S3 object through the cache. */
static bool
copy_file(chain_reader *cr, unsigned fi, uint64_t host, uint8_t *buf, uint64_t len,
          GError **error)
{
  if (!rfile_is_s3(cr->map->files[fi].rf))
    return rfile_pread(cr->map->files[fi].rf, buf, (size_t)len, host, error);
  while (len > 0) {
    uint64_t idx = host / BLOCK, in = host % BLOCK;
    struct block *bl = block_get(cr, fi, idx, error);
    uint64_t n;

    if (!bl)
      return false;
    if (in >= bl->len) {
      /* Runs lie inside the file (chain-map.c checked): never here. */
      block_release(cr, bl);
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: offset %" PRIu64
                  " past its end", cr->map->files[fi].path, host);
      return false;
    }
    n = MIN(len, bl->len - in);
    memcpy(buf, bl->buf + in, n);
    block_release(cr, bl);
    buf += n;
    host += n;
    len -= n;
  }
  return true;
}

bool
chain_reader_read(chain_reader *cr, void *buf, uint64_t len, uint64_t off,
                  GError **error)
{
  const uint64_t cs = cr->map->cluster_size;
  uint8_t *out = buf;
  uint64_t end = off + len;
  guint k = grun_find(cr, off / cs);

  while (off < end) {
    const struct grun *g = k < cr->runs->len ? &g_array_index(cr->runs, struct grun, k)
                                              : NULL;
    uint64_t gstart = g ? g->guest * cs : UINT64_MAX;
    uint64_t gend = g ? (g->guest + g->clusters) * cs : UINT64_MAX;
    uint64_t n;

    if (off < gstart) {
      /* Before the next run: reads as zeros. */
      n = MIN(end, gstart) - off;
      memset(out, 0, n);
    } else {
      n = MIN(end, gend) - off;
      if (!check_range(cr, g->file, g->host + (off - gstart), n, true, error) ||
          !copy_file(cr, g->file, g->host + (off - gstart), out, n, error))
        return false;
      k++;
    }
    out += n;
    off += n;
  }
  return true;
}

bool
chain_reader_is_data(const chain_reader *cr, uint64_t off, uint64_t *len)
{
  const uint64_t cs = cr->map->cluster_size;
  guint k = grun_find(cr, off / cs);
  const struct grun *g = k < cr->runs->len ? &g_array_index(cr->runs, struct grun, k)
                                            : NULL;
  uint64_t size = cr->map->image_size;

  if (!g || g->guest * cs > off) {
    *len = (g ? MIN(g->guest * cs, size) : size) - off;
    return false;
  }
  /* Runs that follow each other make one extent. */
  {
    uint64_t e = (g->guest + g->clusters) * cs;

    for (guint i = k + 1; i < cr->runs->len; i++) {
      const struct grun *h = &g_array_index(cr->runs, struct grun, i);

      if (h->guest * cs != e)
        break;
      e = (h->guest + h->clusters) * cs;
    }
    *len = MIN(e, size) - off;
  }
  return true;
}
