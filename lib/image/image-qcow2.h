/* Internals of the qcow2 image backend, shared by its four files:
 *
 *   image-qcow2.c        overview (paths, threads, locking), open, close,
 *                        block status
 *   image-qcow2-meta.c   metadata: table caches, refcounts, allocation,
 *                        the overlap checks, write-back and its crash
 *                        ordering
 *   image-qcow2-slow.c   the metadata thread: slow-path reads and writes,
 *                        batched allocating writes
 *   image-qcow2-fast.c   the worker side: the fast path and the hand-off
 *
 * Nothing here is part of the library's interface (that is cbt/image.h
 * and cbt/qcow2.h).  Which thread may call what, and under which lock,
 * is said at each definition.
 */
#ifndef CBT_IMAGE_QCOW2_H
#define CBT_IMAGE_QCOW2_H

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
  int corrupt;                   /* atomic: writes refused, see q2_mark_corrupt */
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
  uint64_t fresh_from;           /* clusters from here on read as zeros (q2_note_alloc) */
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

static inline struct q2_table *
q2_cache_get(struct q2_cache *c, uint64_t key)
{
  return g_hash_table_lookup(c->map, &key);
}

/* image-qcow2-meta.c */
void q2_cache_init(struct q2_cache *c, size_t bytes, uint64_t csize);
int q2_pread(struct q2 *q, void *buf, size_t n, uint64_t off);
int q2_mark_corrupt(struct q2 *q, uint64_t vcl, uint64_t c);
int q2_check_overlap(struct q2 *q, uint64_t vcl, uint64_t host, uint64_t len);
int q2_check_mapping(struct q2 *q, uint64_t vcl, const struct cbt_qcow2_map *m);
int q2_meta_build(struct q2 *q, char **why);
int q2_map_locked(struct q2 *q, uint64_t vcl, struct cbt_qcow2_map *m);
int q2_map_slow(struct q2 *q, uint64_t vcl, struct cbt_qcow2_map *m);
void q2_note_alloc(struct q2 *q, uint64_t c, uint64_t n);
int q2_alloc_run(struct q2 *q, uint64_t k, uint64_t *host);
void q2_alloc_undo(struct q2 *q, uint64_t host, uint64_t k);
void q2_defer_free(struct q2 *q, const struct cbt_qcow2_map *m);
int q2_set_l2(struct q2 *q, uint64_t vcl, uint64_t entry);
int q2_writeback(struct q2 *q);
bool q2_too_dirty(struct q2 *q);

/* image-qcow2-slow.c */
bool q2_reads_as_zero(const struct q2 *q, const struct cbt_qcow2_map *m);
int q2_write_range(struct q2 *q, uint64_t off, const uint8_t *data, uint64_t len);
int q2_slow_run(struct q2 *q, struct cbt_image_io *io);
void q2_jobs_signal(struct q2 *q, struct q2_job **jobs, unsigned n);
gpointer q2_slow_thread(gpointer arg);

/* image-qcow2-fast.c */
void q2_submit(struct cbt_image *img, struct cbt_image_io *io);

#endif /* CBT_IMAGE_QCOW2_H */
