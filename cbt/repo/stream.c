/* Reading repository files as a stream: one io_uring, a deep queue of
 * large reads, the manifest's checksums checked as the bytes arrive.
 * cbt restore and cbt verify read backup files this way.
 *
 * The caller lists files and, for each, the byte ranges to read (all of
 * it when the checksums are to be checked: they cover every byte).  The
 * ranges are cut into pieces of at most PIECE bytes that never cross a
 * checksum chunk, and up to QD reads are in flight on the run's one ring.
 * When a piece has arrived, the caller's piece() callback sees it (on the
 * main thread, in whatever order reads complete) and may start writes
 * from its buffer: on the same ring (stream_write) or on its own threads
 * (stream_ref, then stream_done from any thread).  A buffer is reused
 * when its read, its checksum and every write from it are done.
 *
 * Checksums: chunk c of a file is hashed by lane c % nlanes, a thread
 * with its own queue.  Pieces are handed to the lanes in the order they
 * were issued (a piece that arrives early waits for the ones before it),
 * so each lane sees its chunks' bytes in order.  For the lanes to work
 * in parallel with a bounded number of buffers, a file read whole is
 * read striped: the chunks of a group of nlanes chunks are read side by
 * side, a piece of each in turn, so every lane has its share of the
 * buffers instead of the first lane holding them all.  A lane hashes
 * with the algorithm each file's manifest entry names (checksum.c's
 * chunk_hash: a lane keeps one per algorithm, since a chain may mix
 * them).  A chunk whose checksum differs from the manifest's stops the
 * run: CLI_EXIT_DAMAGED naming the file's byte range.
 *
 * Threads talk to the main thread through one queue of finished work and
 * an eventfd, on which a read is always armed on the ring, so the main
 * thread waits in exactly one place: io_uring_wait_cqe.
 *
 * Files on S3 (repo-read.c) are read the same way but for the read
 * itself: a piece is a ranged GET on a thread of the fetch pool instead
 * of a read on the ring, and its completion comes back through the queue
 * of finished work, after which it takes the same path as a piece read
 * from a file (lanes, piece callback, writes).  GETs want larger pieces
 * (S3_PIECE; a request costs a round trip and some server work) and as
 * many in flight as the pool has threads and more queued, so that a
 * connection never idles; a run with an S3 file uses S3_PIECE pieces and
 * as many buffers as make the same NBUF * PIECE bytes.
 *
 * Reads bypass the page cache: each file of a directory is opened a
 * second time O_DIRECT (through /proc/self/fd, so it is the same inode)
 * and the buffers are page aligned.  A buffered read of a repository that
 * is not in the cache costs a copy out of the page cache (a quarter of a
 * verified restore's CPU in perf, on two cores shared with the hashing)
 * and the cache's own upkeep; the reads are large and QD deep, so the
 * disk does not miss readahead.  A read that is not aligned (a range of
 * --no-verify that does not start on a page, the rest after a short
 * read), a file system that does not report direct I/O of that alignment
 * (statx STATX_DIOALIGN) or a read it refuses with EINVAL
 * goes through the caller's buffered descriptor instead.  The end of a
 * file need not be aligned: a direct read is rounded up to the page and
 * the bytes past the piece, if any, are ignored.
 *
 * Ordering at the end: stream_run returns only when no read, write or
 * lane work is outstanding, so the caller may free what the callbacks
 * used.  On an error nothing new is started; what is in flight is
 * awaited.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <liburing.h>

#include "cbt/image.h"
#include "repo.h"

#define PIECE     (UINT64_C(1) << 20)
#define NBUF      64                 /* buffers: 64 MiB */
#define QD        32                 /* reads in flight */
#define RING_SIZE 256
#define MAX_LANES 4
#define S3_PIECE  (UINT64_C(4) << 20)
#define DIO_ALIGN 4096u              /* offsets, lengths, buffers of direct reads */

enum op_kind { OP_READ, OP_WRITE, OP_EVENT };

/* What a cqe's user_data points at. */
struct sop {
  enum op_kind kind;
  void *owner;                    /* the piece, the wop or the stream */
};

struct stream_piece {
  struct sop op;                  /* the read */
  struct stream *s;
  unsigned file;
  uint64_t off, len, got;
  uint64_t hseq;                  /* among the pieces to hash, in read order */
  uint8_t *buf;
  int refs;                       /* the read, the lane, each write */
  bool direct;                    /* the read in flight is O_DIRECT */
  bool hashed_in_order;           /* handed to its lane */
};

struct wop {
  struct sop op;
  struct stream_piece *p;
  int fd;
  const uint8_t *buf;
  uint64_t off, len, done;
  const char *name;
};

/* Finished work posted by other threads. */
struct done_item {
  struct stream_piece *p;         /* or NULL: */
  bool held;                      /* stream_hold's work is done */
  bool fetched;                   /* p's GET is done (error: it failed) */
  bool mismatch;                  /* error is a checksum mismatch */
  unsigned file;
  GError *error;
};

struct lane {
  struct stream *s;
  GThread *thread;
  GAsyncQueue *q;                 /* struct stream_piece *, itself: stop */
  chunk_hash *h[CHUNK_XXH128 + 1]; /* [enum chunk_alg], made when first used */
};

struct sfile {
  struct stream_file f;
  int dfd;                        /* the file O_DIRECT, or -1 */
  guint item;                     /* next read range */
  uint64_t pos;                   /* within it */
  /* Striped reading (a whole file with checksums, several lanes): the
   * chunks of a group, one per lane, are read side by side. */
  bool striped;
  uint64_t group;                 /* first chunk of the group */
  unsigned lane;                  /* whose piece is next */
  uint64_t lpos[MAX_LANES];       /* bytes of each lane's chunk started */
};

struct stream {
  const struct stream_opts *o;
  struct io_uring ring;
  bool ring_ok;
  int efd;
  uint64_t ebuf;
  struct sop eop;
  bool event_armed;
  GAsyncQueue *done;              /* struct done_item * */

  struct sfile *files;
  unsigned nfiles, cur;           /* file being read */
  uint8_t *bufs;                  /* nbuf buffers of piece bytes, one block */
  bool bufs_fixed;                /* registered with the ring as buffer 0 */
  GPtrArray *free_bufs;
  struct stream_piece **pending;  /* read, waiting for its turn to hash */
  unsigned npending;
  uint64_t next_hseq;             /* pieces to hash created */
  uint64_t hash_seq;              /* next one to hand to a lane */

  unsigned reads, writes, refs_out;  /* in flight */
  unsigned fetches;               /* of the reads: GETs on the fetch pool */
  uint64_t piece;                 /* PIECE, or S3_PIECE with an S3 file */
  unsigned nbuf;
  uint64_t bytes_read;
  struct lane lanes[MAX_LANES];
  unsigned nlanes;
  GError *error;
  gint64 last_progress;
};

static void
fail(stream *s, GError *e)
{
  if (!s->error)
    s->error = e;
  else
    g_error_free(e);
}

/* --- lanes --------------------------------------------------------------- */

static void
push_done(stream *s, struct done_item *d)
{
  uint64_t one = 1;

  g_async_queue_push(s->done, d);
  if (write(s->efd, &one, sizeof one) < 0)
    g_error("eventfd write: %s", g_strerror(errno));
}

static void
post(stream *s, struct stream_piece *p, bool held, GError *error)
{
  struct done_item *d = g_new0(struct done_item, 1);

  d->p = p;
  d->held = held;
  d->error = error;
  push_done(s, d);
}

static gpointer
lane_main(gpointer opaque)
{
  struct lane *l = opaque;
  stream *s = l->s;
  struct stream_piece *p;

  while ((p = g_async_queue_pop(l->q)) != (void *)l) {
    const struct stream_file *f = &s->files[p->file].f;
    uint64_t chunk = f->chunk_size;
    uint64_t c = p->off / chunk;
    uint64_t cend = MIN((c + 1) * chunk, f->size);
    GError *err = NULL;
    chunk_hash **h = &l->h[f->checksum];

    /* A chunk's pieces come in order, each chunk whole: the hash is
     * fresh at its first byte (chunk_hash_hex resets it). */
    if (!*h)
      *h = chunk_hash_new(f->checksum);
    chunk_hash_update(*h, p->buf, p->len);
    if (p->off + p->len == cend) {
      g_autofree char *hex = chunk_hash_hex(*h);

      if (c >= f->sums->len ||
          g_ascii_strcasecmp(hex, g_ptr_array_index(f->sums, c)) != 0)
        err = g_error_new(CLI_ERROR, CLI_EXIT_DAMAGED,
                          "%s: checksum mismatch in bytes %" PRIu64 "..%" PRIu64
                          " (chunk %" PRIu64 "): the file was modified or is damaged",
                          f->rf->name, c * chunk, cend - 1, c);
    }
    {
      struct done_item *d = g_new0(struct done_item, 1);

      d->p = p;
      d->mismatch = err != NULL;
      d->file = p->file;
      d->error = err;
      push_done(s, d);
    }
  }
  return NULL;
}

/* Hand the pieces that arrived to their lanes, in read order across all
 * files (a lane hashes one chunk at a time: the next file's chunk on the
 * same lane must not come between). */
static void
feed_lanes(stream *s)
{
  for (;;) {
    struct stream_piece *p = NULL;

    for (unsigned i = 0; i < s->npending; i++)
      if (s->pending[i]->hseq == s->hash_seq) {
        p = s->pending[i];
        s->pending[i] = s->pending[--s->npending];
        break;
      }
    if (!p)
      return;
    s->hash_seq++;
    g_async_queue_push(s->lanes[(p->off / s->files[p->file].f.chunk_size) %
                                s->nlanes].q, p);
  }
}

/* After an error: pieces waiting for an earlier one that will never come. */
static void unref(struct stream_piece *p);
static void
drop_pending(stream *s)
{
  while (s->npending > 0) {
    s->refs_out--;
    unref(s->pending[--s->npending]);
  }
}

/* --- pieces and buffers ------------------------------------------------- */

void
stream_ref(struct stream_piece *p)
{
  p->refs++;
  p->s->refs_out++;
}

static void
unref(struct stream_piece *p)
{
  stream *s = p->s;

  g_assert(p->refs > 0);
  if (--p->refs == 0) {
    g_ptr_array_add(s->free_bufs, p->buf);
    g_free(p);
  }
}

void
stream_done(struct stream_piece *p, GError *error)
{
  post(p->s, p, false, error);
}

void
stream_hold(stream *s)
{
  s->refs_out++;
}

void
stream_release(stream *s, GError *error)
{
  post(s, NULL, true, error);
}

const uint8_t *
stream_piece_data(const struct stream_piece *p, unsigned *file, uint64_t *off,
                  uint64_t *len)
{
  *file = p->file;
  *off = p->off;
  *len = p->len;
  return p->buf;
}

/* --- the ring ------------------------------------------------------------ */

static struct io_uring_sqe *
get_sqe(stream *s)
{
  struct io_uring_sqe *sqe = cbt_ring_get_sqe(&s->ring);

  if (!sqe)
    g_error("io_uring: cannot submit");
  return sqe;
}

static void
fetch_done(void *opaque, GError *error)
{
  struct stream_piece *p = opaque;
  struct done_item *d = g_new0(struct done_item, 1);

  d->p = p;
  d->fetched = true;
  d->error = error;
  push_done(p->s, d);
}

/* Read what is left of @p: on the ring, or as a GET for an S3 file. */
static void
submit_read(stream *s, struct stream_piece *p)
{
  const rfile *rf = s->files[p->file].f.rf;
  struct io_uring_sqe *sqe;

  if (rfile_is_s3(rf)) {
    s->fetches++;
    rfile_fetch(rf, p->buf, (size_t)p->len, p->off, fetch_done, p);
    return;
  }
  sqe = get_sqe(s);
  p->direct = s->files[p->file].dfd >= 0 && (p->off + p->got) % DIO_ALIGN == 0 &&
              p->got % DIO_ALIGN == 0;
  if (p->direct) {
    /* Rounded up: at most the buffer (s->piece is a multiple of it). */
    uint64_t n = (p->len - p->got + DIO_ALIGN - 1) / DIO_ALIGN * DIO_ALIGN;

    if (s->bufs_fixed)
      io_uring_prep_read_fixed(sqe, s->files[p->file].dfd, p->buf + p->got, (unsigned)n,
                               p->off + p->got, 0);
    else
      io_uring_prep_read(sqe, s->files[p->file].dfd, p->buf + p->got, (unsigned)n,
                         p->off + p->got);
  } else {
    io_uring_prep_read(sqe, rf->fd, p->buf + p->got, (unsigned)(p->len - p->got),
                       p->off + p->got);
  }
  io_uring_sqe_set_data(sqe, &p->op);
}

/* @rf opened again O_DIRECT, or -1 (S3, no /proc, a file system that
 * does not report direct I/O of DIO_ALIGN alignment). */
static int
open_direct(const rfile *rf)
{
  struct statx stx;
  char path[64];
  int fd;

  if (rfile_is_s3(rf) || rf->fd < 0)
    return -1;
  if (statx(rf->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0 ||
      !(stx.stx_mask & STATX_DIOALIGN) || stx.stx_dio_offset_align == 0 ||
      stx.stx_dio_offset_align > DIO_ALIGN || stx.stx_dio_mem_align > DIO_ALIGN)
    return -1;                    /* e.g. tmpfs: no direct I/O to speak of */
  snprintf(path, sizeof path, "/proc/self/fd/%d", rf->fd);
  fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0)
    cli_debug("%s: no O_DIRECT (%s): reading through the page cache", rf->name,
              g_strerror(errno));
  return fd;
}

static void
submit_wop(stream *s, struct wop *w)
{
  struct io_uring_sqe *sqe = get_sqe(s);
  const uint8_t *b = w->buf + w->done;
  unsigned n = (unsigned)(w->len - w->done);

  if (s->bufs_fixed && b >= s->bufs && b + n <= s->bufs + s->nbuf * s->piece)
    io_uring_prep_write_fixed(sqe, w->fd, b, n, w->off + w->done, 0);
  else
    io_uring_prep_write(sqe, w->fd, b, n, w->off + w->done);
  io_uring_sqe_set_data(sqe, &w->op);
}

void
stream_write(struct stream_piece *p, int fd, const char *name, const uint8_t *buf,
             uint64_t len, uint64_t off)
{
  stream *s = p->s;
  struct wop *w = g_new0(struct wop, 1);

  w->op.kind = OP_WRITE;
  w->op.owner = w;
  w->p = p;
  w->fd = fd;
  w->buf = buf;
  w->off = off;
  w->len = len;
  w->name = name;
  p->refs++;
  s->writes++;
  submit_wop(s, w);
}

static void
arm_event(stream *s)
{
  struct io_uring_sqe *sqe = get_sqe(s);

  io_uring_prep_read(sqe, s->efd, &s->ebuf, sizeof s->ebuf, 0);
  io_uring_sqe_set_data(sqe, &s->eop);
  s->event_armed = true;
}

/* The next piece of striped file @sf: *@off and *@len, or false at
 * its end. */
static bool
next_striped(stream *s, struct sfile *sf, uint64_t *off, uint64_t *len)
{
  const uint64_t chunk = sf->f.chunk_size, size = sf->f.size;

  while (sf->group * chunk < size) {
    for (unsigned t = 0; t < s->nlanes; t++) {
      unsigned l = sf->lane;
      uint64_t c0 = (sf->group + l) * chunk;
      uint64_t clen = c0 < size ? MIN(chunk, size - c0) : 0;

      sf->lane = (sf->lane + 1) % s->nlanes;
      if (sf->lpos[l] < clen) {
        *off = c0 + sf->lpos[l];
        *len = MIN(s->piece, clen - sf->lpos[l]);
        sf->lpos[l] += *len;
        return true;
      }
    }
    sf->group += s->nlanes;
    sf->lane = 0;
    memset(sf->lpos, 0, sizeof sf->lpos);
  }
  return false;
}

/* Start reads while buffers and queue depth allow. */
static void
start_reads(stream *s)
{
  while (!s->error && s->reads < QD && s->free_bufs->len > 0 && s->cur < s->nfiles) {
    struct sfile *sf = &s->files[s->cur];
    const struct stream_range *r;
    struct stream_piece *p;
    uint64_t end, len;

    if (sf->item >= sf->f.ranges->len) {
      s->cur++;
      continue;
    }
    if (sf->striped) {
      uint64_t off;

      if (!next_striped(s, sf, &off, &len)) {
        sf->item = sf->f.ranges->len;
        continue;
      }
      p = g_new0(struct stream_piece, 1);
      p->op.kind = OP_READ;
      p->op.owner = p;
      p->s = s;
      p->file = s->cur;
      p->off = off;
      p->len = len;
      p->hseq = s->next_hseq++;
      p->buf = g_ptr_array_steal_index_fast(s->free_bufs, s->free_bufs->len - 1);
      p->refs = 1;
      s->reads++;
      submit_read(s, p);
      continue;
    }
    r = &g_array_index(sf->f.ranges, struct stream_range, sf->item);
    end = r->off + r->len;
    len = MIN(s->piece, end - (r->off + sf->pos));
    if (sf->f.sums) {
      uint64_t o = r->off + sf->pos;
      uint64_t cend = (o / sf->f.chunk_size + 1) * sf->f.chunk_size;

      len = MIN(len, cend - o);
    }
    p = g_new0(struct stream_piece, 1);
    p->op.kind = OP_READ;
    p->op.owner = p;
    p->s = s;
    p->file = s->cur;
    p->off = r->off + sf->pos;
    p->len = len;
    if (sf->f.sums)
      p->hseq = s->next_hseq++;
    p->buf = g_ptr_array_steal_index_fast(s->free_bufs, s->free_bufs->len - 1);
    p->refs = 1;
    sf->pos += len;
    if (r->off + sf->pos >= end) {
      sf->item++;
      sf->pos = 0;
    }
    s->reads++;
    submit_read(s, p);
  }
}

static void piece_arrived(stream *s, struct stream_piece *p);

static void
read_done(stream *s, struct stream_piece *p, int res)
{
  const struct stream_file *f = &s->files[p->file].f;

  if (res == -EAGAIN || res == -EINTR) {
    submit_read(s, p);
    return;
  }
  if (res == -EINVAL && p->direct) {
    /* The file system takes no direct reads after all (or not of this
     * alignment): the buffered descriptor from now on. */
    struct sfile *sf = &s->files[p->file];

    cli_debug("%s: O_DIRECT read refused: reading through the page cache", f->rf->name);
    close(sf->dfd);
    sf->dfd = -1;
    submit_read(s, p);
    return;
  }
  if (res < 0 || (res == 0 && !s->error)) {
    s->reads--;
    if (res < 0)
      fail(s, g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "%s: reading at offset %" PRIu64
                          ": %s", f->rf->name, p->off + p->got, g_strerror(-res)));
    else
      fail(s, g_error_new(CLI_ERROR, CLI_EXIT_DAMAGED, "%s: ends at %" PRIu64
                          ", before the %" PRIu64 " bytes the manifest lists",
                          f->rf->name, p->off + p->got, f->size));
    unref(p);
    return;
  }
  /* A direct read may return bytes past the piece (rounded up). */
  p->got = MIN(p->got + (uint64_t)res, p->len);
  if (p->got < p->len && !s->error) {
    submit_read(s, p);            /* short read: the rest */
    return;
  }
  s->reads--;
  piece_arrived(s, p);
}

/* @p's bytes are all there: hash them, hand them to the caller. */
static void
piece_arrived(stream *s, struct stream_piece *p)
{
  const struct stream_file *f = &s->files[p->file].f;

  s->bytes_read += p->len;
  if (s->error) {
    unref(p);
    return;
  }
  if (f->sums) {
    p->refs++;                    /* the lane's */
    s->refs_out++;
    s->pending[s->npending++] = p;
    feed_lanes(s);
  }
  if (s->o->piece) {
    GError *err = NULL;

    if (!s->o->piece(s->o->opaque, p, &err))
      fail(s, err);
  }
  unref(p);
}

static void
write_done(stream *s, struct wop *w, int res)
{
  if (res == -EAGAIN || res == -EINTR) {
    submit_wop(s, w);
    return;
  }
  if (res > 0) {
    w->done += (uint64_t)res;
    if (w->done < w->len) {
      submit_wop(s, w);
      return;
    }
  } else {
    fail(s, g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "%s: writing at offset %" PRIu64
                        ": %s", w->name, w->off + w->done,
                        g_strerror(res < 0 ? -res : EIO)));
  }
  s->writes--;
  unref(w->p);
  g_free(w);
}

static void
drain_done(stream *s)
{
  struct done_item *d;

  while ((d = g_async_queue_try_pop(s->done))) {
    if (d->fetched) {
      s->fetches--;
      s->reads--;
      if (d->error) {
        fail(s, d->error);
        unref(d->p);
      } else {
        d->p->got = d->p->len;
        piece_arrived(s, d->p);
      }
      g_free(d);
      continue;
    }
    if (d->mismatch && s->o->mismatch)
      s->o->mismatch(s->o->opaque, d->file, g_steal_pointer(&d->error));
    else if (d->error)
      fail(s, d->error);
    if (d->p) {
      s->refs_out--;
      unref(d->p);
    } else if (d->held) {
      s->refs_out--;
    }
    g_free(d);
  }
}

bool
stream_run(const struct stream_opts *o, const struct stream_file *files, unsigned nfiles,
           GError **error)
{
  stream *s = g_new0(stream, 1);
  bool any_sums = false, ok = false;
  int r;

  s->o = o;
  s->efd = -1;
  s->eop.kind = OP_EVENT;
  s->done = g_async_queue_new();
  s->nfiles = nfiles;
  s->files = g_new0(struct sfile, MAX(nfiles, 1u));
  s->piece = PIECE;
  for (unsigned i = 0; i < nfiles; i++) {
    s->files[i].f = files[i];
    s->files[i].dfd = open_direct(files[i].rf);
    any_sums |= files[i].sums != NULL;
    if (rfile_is_s3(files[i].rf))
      s->piece = S3_PIECE;
  }
  s->nbuf = (unsigned)(NBUF * PIECE / s->piece);
  s->bufs = g_aligned_alloc(s->nbuf, s->piece, DIO_ALIGN);
  s->free_bufs = g_ptr_array_new();
  for (unsigned i = 0; i < s->nbuf; i++)
    g_ptr_array_add(s->free_bufs, s->bufs + i * s->piece);
  s->pending = g_new0(struct stream_piece *, s->nbuf);

  r = io_uring_queue_init(RING_SIZE, &s->ring, 0);
  if (r < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "io_uring: %s", g_strerror(-r));
    goto out;
  }
  s->ring_ok = true;
  {
    /* Pinned once here instead of at every direct read and write (the
     * page pinning was 6% of a verified restore's samples).  Counted
     * against RLIMIT_MEMLOCK for a user without CAP_IPC_LOCK: without
     * it, plain reads and writes. */
    struct iovec iov = { .iov_base = s->bufs, .iov_len = s->nbuf * s->piece };

    r = io_uring_register_buffers(&s->ring, &iov, 1);
    s->bufs_fixed = r == 0;
    if (r < 0)
      cli_debug("io_uring: cannot register the buffers (%s): plain reads and writes",
                g_strerror(-r));
  }
  s->efd = eventfd(0, EFD_CLOEXEC);
  if (s->efd < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "eventfd: %s", g_strerror(errno));
    goto out;
  }
  if (any_sums) {
    s->nlanes = CLAMP((unsigned)g_get_num_processors(), 1u, (unsigned)MAX_LANES);
    for (unsigned i = 0; i < s->nlanes; i++) {
      s->lanes[i].s = s;
      s->lanes[i].q = g_async_queue_new();
      s->lanes[i].thread = g_thread_new("checksum", lane_main, &s->lanes[i]);
    }
  }
  for (unsigned i = 0; i < nfiles; i++) {
    const struct stream_file *f = &s->files[i].f;

    s->files[i].striped = f->sums && s->nlanes > 1 && f->ranges->len == 1 &&
      g_array_index(f->ranges, struct stream_range, 0).off == 0 &&
      g_array_index(f->ranges, struct stream_range, 0).len == f->size;
  }
  if (o->start && !o->start(o->opaque, s, error))
    goto out;

  arm_event(s);
  for (;;) {
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts = { .tv_nsec = 200 * 1000 * 1000 };
    unsigned head, n = 0;

    start_reads(s);
    if (s->error)
      drop_pending(s);
    if (s->reads == 0 && s->writes == 0 && s->refs_out == 0 &&
        (s->error || s->cur >= s->nfiles))
      break;
    r = io_uring_submit_and_wait_timeout(&s->ring, &cqe, 1, &ts, NULL);
    if (r < 0 && r != -ETIME && r != -EINTR) {
      fail(s, g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "io_uring: %s", g_strerror(-r)));
      /* Nothing more can complete: do not wait for it. */
      break;
    }
    io_uring_for_each_cqe(&s->ring, head, cqe) {
      struct sop *op = io_uring_cqe_get_data(cqe);
      int res = cqe->res;

      n++;
      switch (op->kind) {
      case OP_READ:
        read_done(s, op->owner, res);
        break;
      case OP_WRITE:
        write_done(s, op->owner, res);
        break;
      case OP_EVENT:
        s->event_armed = false;
        break;
      }
    }
    io_uring_cq_advance(&s->ring, n);
    drain_done(s);
    if (!s->event_armed)
      arm_event(s);
    if (o->progress) {
      gint64 now = g_get_monotonic_time();

      if (now - s->last_progress >= 200 * 1000) {
        s->last_progress = now;
        o->progress(o->opaque, s->bytes_read);
      }
    }
  }
  if (o->progress)
    o->progress(o->opaque, s->bytes_read);
  if (s->error) {
    g_propagate_error(error, s->error);
    s->error = NULL;
  } else {
    ok = true;
  }

out:
  /* After a broken ring: GETs still write into our buffers. */
  while (s->fetches > 0) {
    struct done_item *d = g_async_queue_pop(s->done);

    if (d->fetched) {
      s->fetches--;
      if (d->error)
        g_error_free(d->error);
      unref(d->p);
      g_free(d);
    } else {
      g_async_queue_push_front(s->done, d);
      drain_done(s);
    }
  }
  for (unsigned i = 0; i < s->nlanes; i++) {
    g_async_queue_push(s->lanes[i].q, &s->lanes[i]);   /* stop */
    g_thread_join(s->lanes[i].thread);
    g_async_queue_unref(s->lanes[i].q);
    for (size_t k = 0; k < G_N_ELEMENTS(s->lanes[i].h); k++)
      chunk_hash_free(s->lanes[i].h[k]);
  }
  drain_done(s);
  if (s->ring_ok)
    io_uring_queue_exit(&s->ring);   /* cancels the armed eventfd read */
  if (s->efd >= 0)
    close(s->efd);
  for (unsigned i = 0; i < s->nfiles; i++)
    if (s->files[i].dfd >= 0)
      close(s->files[i].dfd);
  g_async_queue_unref(s->done);
  g_ptr_array_unref(s->free_bufs);
  g_aligned_free(s->bufs);
  g_free(s->pending);
  g_free(s->files);
  if (s->error)
    g_error_free(s->error);
  g_free(s);
  return ok;
}
