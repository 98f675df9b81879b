/* Random reads of a backup point through its chain, from any repository
 * (directory or S3), with a cache of file blocks: what cbt mount serves
 * when the repository is on S3, where every read is an HTTP request.
 *
 * The chain is mapped once by chain-map.c (every file's L1 and L2 tables,
 * validated), and its runs of visible clusters are indexed by guest
 * offset.  A read of a guest range then needs no metadata: each cluster
 * is either in a run (file, host offset) or reads as zeros.
 *
 * Data comes through a cache of BLOCK-sized, BLOCK-aligned pieces of the
 * chain's files (CACHE_BLOCKS of them, least recently used goes first).
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
 * Locking: one mutex for the table and the LRU list, one condition for
 * "a block finished loading".  A block's bytes are written only while it
 * is loading, by its one loader, and read only once it is ready, by
 * holders of a reference; an evicted block is freed by its last holder.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "repo.h"

#define BLOCK        (UINT64_C(4) << 20)
#define CACHE_BLOCKS 24                  /* 96 MiB */
#define READAHEAD    4

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

struct chain_reader {
  chain_map *map;
  GArray *runs;                   /* struct grun, by guest */
  GMutex lock;
  GCond loaded;
  GHashTable *blocks;             /* key -> struct block * */
  GQueue lru;                     /* most recent first */
  unsigned inflight_ra;           /* readaheads running */
};

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
  chain_map_free(cr->map);
  g_free(cr);
}

const chain_map *
chain_reader_map(const chain_reader *cr)
{
  return cr->map;
}

/* FNV-1a of the top file's name and ETag (its size without one). */
uint64_t
chain_reader_ident(const chain_reader *cr)
{
  const struct chain_file *top = &cr->map->files[cr->map->nfiles - 1];
  g_autofree char *s = g_strdup_printf("%s\n%s\n%" PRIu64, top->rf->name,
                                       top->rf->etag ? top->rf->etag : "", top->rf->size);
  uint64_t h = UINT64_C(0xcbf29ce484222325);

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

/* Copy [@host, @host + @len) of file @fi into @buf through the cache. */
static bool
copy_file(chain_reader *cr, unsigned fi, uint64_t host, uint8_t *buf, uint64_t len,
          GError **error)
{
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
      if (!copy_file(cr, g->file, g->host + (off - gstart), out, n, error))
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
