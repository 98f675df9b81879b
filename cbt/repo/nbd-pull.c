/* Pulling a backup over NBD into a qcow2 writer.
 *
 * Plan, then copy.  The plan is built on the first connection from NBD
 * block status: for a full backup the whole disk minus what base:allocation
 * reports as reading zeros (a file without backing reads those as zeros
 * anyway); for an incremental the extents of the frozen checkpoint
 * bitmap (dirty_context), and within them base:allocation decides between
 * "read and store" and "store a zero cluster" (so a trim or write-zeroes in
 * the guest costs no data in the backup).  Everything is rounded to the
 * writer's cluster size, which is at most the bitmap granularity, so dirty
 * granules are whole clusters; a zero extent that covers a cluster only in
 * part is read as data (the writer still stores an all-zero cluster as a
 * zero cluster).
 *
 * Copy: one thread per connection, each with up to DEPTH reads of up to
 * MAX_REQ bytes in flight (nbd_aio_pread).  Items are taken from the plan
 * through one atomic index, so the connections share the work.  A read's
 * completion callback stores the data in the writer (thread-safe) and
 * retires the command.  The first error stops every thread; so does
 * *cancel (checked at least once a second: nbd_poll has a timeout so a
 * dead server cannot hold a cancelled backup forever).  The calling thread
 * reports progress and joins the workers.
 *
 * Point-in-time view (pull_opts.export_name/release): the backup reads the
 * daemon's NAME@checkpoint export and TRIMs there every range once it is
 * stored (and, for a full backup, at once every range the plan skips), so
 * the daemon stops protecting it and frees its scratch copy.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <libnbd.h>

#include "cbt/qcow2-writer.h"
#include "repo.h"

#define MAX_REQ      (2u << 20)   /* bytes per read */
#define DEPTH        8            /* reads in flight per connection */
#define BYTES_PER_CONN (UINT64_C(8) << 20)   /* planned bytes per extra connection */
#define BS_MAX       (UINT64_C(1) << 30)   /* bytes per block status query */
#define MAX_TRIM     (UINT64_C(1) << 30)   /* bytes per release (TRIM) */
#define BASE_ALLOC   "base:allocation"
#define HUGE_BUF     MAX_REQ      /* read buffers of a huge page, see buf_size */
#define SMALL_ALIGN  4096u        /* of smaller ones: O_DIRECT's alignment */
#define NBD_DIRTY    1u           /* the dirty flag of a dirty-bitmap context */

struct item {
  uint64_t off;
  uint64_t len;
  bool zero;                      /* store a zero cluster, read nothing */
};

struct pull;

struct slot {
  struct pull *p;
  struct worker *w;
  uint8_t *buf;
  uint64_t off;
  uint64_t len;
  bool busy;
};

struct worker {
  struct pull *p;
  struct nbd_handle *h;
  GThread *thread;
  struct slot slots[DEPTH];
  unsigned inflight;
  GArray *releases;               /* struct extent: stored, to TRIM */
  unsigned trims;                 /* TRIMs in flight */
};

struct pull {
  const struct pull_opts *o;
  GArray *items;                  /* struct item */
  atomic_uint next;               /* index into items of the next to take */
  atomic_bool failed;             /* stop: error is set */
  _Atomic uint64_t done;          /* bytes stored (for progress) */
  GMutex lock;                    /* error, running */
  GCond cond;
  unsigned running;
  GError *error;
  struct worker *w;
  unsigned nw;
  atomic_bool release;            /* TRIM stored ranges (until one fails) */
};

static void
set_error(struct pull *p, GError *e)
{
  g_mutex_lock(&p->lock);
  if (!p->error)
    p->error = e;
  else
    g_error_free(e);
  g_mutex_unlock(&p->lock);
  atomic_store(&p->failed, true);
}

static void
set_cancelled(const struct pull_opts *o, GError **error)
{
  int sig = *o->cancel;

  g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "interrupted by %s",
              sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "a signal");
}

static const char *
where(const struct pull_opts *o)
{
  return o->uri ? o->uri : o->socket;
}

static struct nbd_handle *
connect_one(const struct pull_opts *o, GError **error)
{
  struct nbd_handle *h = nbd_create();
  int64_t size;

  if (!h) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "libnbd: %s", nbd_get_error());
    return NULL;
  }
  /* A named export (the point-in-time view) is chosen after connecting,
   * in option mode, so the URI form works alike. */
  if (nbd_add_meta_context(h, BASE_ALLOC) < 0 ||
      (o->dirty_context && nbd_add_meta_context(h, o->dirty_context) < 0) ||
      nbd_set_pread_initialize(h, false) < 0 ||
      (o->export_name && nbd_set_opt_mode(h, true) < 0) ||
      /* nbds:// URIs name their TLS files: tls-certificates=DIR,
       * tls-psk-file=FILE (the user gave the URI, so it may). */
      (o->uri && nbd_set_uri_allow_local_file(h, true) < 0) ||
      (o->uri ? nbd_connect_uri(h, o->uri) : nbd_connect_unix(h, o->socket)) < 0 ||
      (o->export_name && (nbd_set_export_name(h, o->export_name) < 0 ||
                          nbd_opt_go(h) < 0))) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s%s%s: %s", where(o),
                o->export_name ? " export " : "", o->export_name ? o->export_name : "",
                nbd_get_error());
    nbd_close(h);
    return NULL;
  }
  size = nbd_get_size(h);
  if (size < 0 || (uint64_t)size != o->size) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "NBD %s: export size %" PRId64 " differs from the daemon's %" PRIu64
                " (is this the export the control socket belongs to?)",
                where(o), size, o->size);
    nbd_close(h);
    return NULL;
  }
  if (nbd_can_meta_context(h, BASE_ALLOC) != 1 ||
      (o->dirty_context && nbd_can_meta_context(h, o->dirty_context) != 1)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "NBD %s: the server does not offer meta context %s", where(o),
                nbd_can_meta_context(h, BASE_ALLOC) != 1 ? BASE_ALLOC : o->dirty_context);
    nbd_close(h);
    return NULL;
  }
  return h;
}

/* --- planning ---------------------------------------------------------- */

struct extent { uint64_t off, len; uint32_t flags; };

struct map_ctx {
  const char *want;
  GArray *out;                    /* struct extent */
  uint64_t end;                   /* where the extents reached */
  uint64_t limit;
};

static int
extent_cb(void *opaque, const char *metacontext, uint64_t offset,
          uint32_t *entries, size_t nr, int *error)
{
  struct map_ctx *m = opaque;

  (void)error;
  if (strcmp(metacontext, m->want) != 0)
    return 0;
  for (size_t i = 0; i + 1 < nr && offset < m->limit; i += 2) {
    struct extent e = { offset, MIN((uint64_t)entries[i], m->limit - offset), entries[i + 1] };

    if (e.len == 0)
      break;
    g_array_append_val(m->out, e);
    offset += e.len;
  }
  m->end = offset;
  return 0;
}

/* All extents of @context over the whole export, in order. */
static bool
map_context(struct nbd_handle *h, const struct pull_opts *o, const char *context,
            GArray *out, GError **error)
{
  struct map_ctx m = { .want = context, .out = out, .limit = o->size };
  uint64_t off = 0;

  while (off < o->size) {
    if (*o->cancel) {
      set_cancelled(o, error);
      return false;
    }
    m.end = off;
    if (nbd_block_status(h, MIN(o->size - off, BS_MAX), off,
                         (nbd_extent_callback){ .callback = extent_cb, .user_data = &m },
                         0) < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: block status of %s at %"
                  PRIu64 ": %s", where(o), context, off, nbd_get_error());
      return false;
    }
    if (m.end <= off) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: block status of %s at %"
                  PRIu64 " described nothing", where(o), context, off);
      return false;
    }
    off = m.end;
  }
  return true;
}

static uint64_t
round_up(uint64_t v, uint64_t a, uint64_t cap)
{
  return MIN((v + a - 1) / a * a, cap);
}

/* Append [off, off+len) to the plan as items of at most MAX_REQ bytes
 * (zero items are not split: they cost no data), merging with the last
 * item when contiguous and of the same kind. */
static void
add_item(GArray *items, uint64_t off, uint64_t len, bool zero)
{
  while (len > 0) {
    struct item *last = items->len ? &g_array_index(items, struct item, items->len - 1) : NULL;
    uint64_t n;

    if (last && last->zero == zero && last->off + last->len == off &&
        (zero || last->len < MAX_REQ)) {
      n = zero ? len : MIN(len, MAX_REQ - last->len);
      last->len += n;
    } else {
      struct item it = { off, zero ? len : MIN(len, MAX_REQ), zero };
      n = it.len;
      g_array_append_val(items, it);
    }
    off += n;
    len -= n;
  }
}

/* Plan [d0, d1) (cluster aligned, or ending at the disk size) against the
 * allocation extents from index *ai on: whole clusters inside a zero
 * extent become zero items when @store_zero (else they are skipped), the
 * rest becomes data items. */
static void
plan_range(GArray *items, const GArray *alloc, guint *ai, uint64_t d0, uint64_t d1,
           uint64_t cs, uint64_t size, bool store_zero, uint64_t *planned)
{
  uint64_t pos = d0;

  while (*ai < alloc->len &&
         g_array_index(alloc, struct extent, *ai).off +
         g_array_index(alloc, struct extent, *ai).len <= d0)
    (*ai)++;
  for (guint i = *ai; i < alloc->len && pos < d1; i++) {
    const struct extent *e = &g_array_index(alloc, struct extent, i);
    uint64_t z0, z1;

    if (e->off >= d1)
      break;
    if (!(e->flags & LIBNBD_STATE_ZERO))
      continue;
    z0 = round_up(MAX(e->off, pos), cs, size);
    z1 = MIN(e->off + e->len, d1);
    if (z1 != size)
      z1 = z1 / cs * cs;
    if (z0 >= z1)
      continue;
    if (z0 > pos) {
      add_item(items, pos, z0 - pos, false);
      *planned += z0 - pos;
    }
    if (store_zero)
      add_item(items, z0, z1 - z0, true);
    pos = z1;
  }
  if (pos < d1) {
    add_item(items, pos, d1 - pos, false);
    *planned += d1 - pos;
  }
}

static bool
make_plan(struct pull *p, struct nbd_handle *h, struct pull_stats *st, GError **error)
{
  const struct pull_opts *o = p->o;
  g_autoptr(GArray) alloc = g_array_new(FALSE, FALSE, sizeof(struct extent));
  uint64_t cs = o->cluster_size;
  guint ai = 0;

  if (!map_context(h, o, BASE_ALLOC, alloc, error))
    return false;
  if (!o->dirty_context) {
    plan_range(p->items, alloc, &ai, 0, o->size, cs, o->size, false, &st->planned);
    return true;
  }
  {
    g_autoptr(GArray) dirty = g_array_new(FALSE, FALSE, sizeof(struct extent));

    if (!map_context(h, o, o->dirty_context, dirty, error))
      return false;
    for (guint i = 0; i < dirty->len; i++) {
      const struct extent *e = &g_array_index(dirty, struct extent, i);
      uint64_t d0, d1;

      if (!(e->flags & NBD_DIRTY))
        continue;
      st->dirty += e->len;
      d0 = e->off / cs * cs;
      d1 = round_up(e->off + e->len, cs, o->size);
      /* Extents are sorted; an unaligned neighbour may share a cluster. */
      if (p->items->len) {
        const struct item *last = &g_array_index(p->items, struct item, p->items->len - 1);
        d0 = MAX(d0, last->off + last->len);
      }
      if (d0 < d1)
        plan_range(p->items, alloc, &ai, d0, d1, cs, o->size, true, &st->planned);
    }
  }
  return true;
}

/* A full backup reads only what the plan lists: release the rest of the
 * view at once (an incremental's view protects only what it reads).
 * Queued on the first worker, issued when it starts. */
static void want_release(struct worker *w, uint64_t off, uint64_t len);

static void
release_skipped(struct pull *p)
{
  uint64_t pos = 0;

  if (p->o->dirty_context)
    return;
  for (guint i = 0; i <= p->items->len; i++) {
    uint64_t next = i < p->items->len ? g_array_index(p->items, struct item, i).off
                                      : p->o->size;

    if (next > pos)
      want_release(&p->w[0], pos, next - pos);
    if (i < p->items->len)
      pos = next + g_array_index(p->items, struct item, i).len;
  }
}

/* --- copying ----------------------------------------------------------- */

/* The size of each read buffer: the largest data item of the plan,
 * rounded up to SMALL_ALIGN.  A full backup and a large dirty run have
 * items of MAX_REQ, which get a huge page each (see pull_run).  A small
 * incremental of scattered granules has 64 KiB items: its buffers are
 * that small, because the first touch of a huge page zeroes all 2 MiB of
 * it (a 1%-dirty incremental of a 2 GiB disk spent 40% of its CPU in
 * clear_page zeroing 8 huge pages for 64 KiB reads). */
static size_t
buf_size(const GArray *items)
{
  uint64_t n = SMALL_ALIGN;

  for (guint i = 0; i < items->len; i++) {
    const struct item *it = &g_array_index(items, struct item, i);

    if (!it->zero)
      n = MAX(n, it->len);
  }
  return (size_t)MIN((n + SMALL_ALIGN - 1) / SMALL_ALIGN * SMALL_ALIGN, (uint64_t)MAX_REQ);
}

/* Releasing: what is stored in the backup file no longer needs protecting
 * in the daemon's point-in-time view, so it is TRIMmed there (the view
 * frees its scratch copies).  Issued from the worker's loop, not from
 * inside a libnbd callback.  A failure only stops further releases. */
static void
want_release(struct worker *w, uint64_t off, uint64_t len)
{
  while (len > 0) {
    struct extent *last = w->releases->len == 0 ? NULL
      : &g_array_index(w->releases, struct extent, w->releases->len - 1);
    uint64_t n;

    if (last && last->off + last->len == off && last->len < MAX_TRIM) {
      n = MIN(len, MAX_TRIM - last->len);
      last->len += n;
    } else {
      struct extent e = { off, MIN(len, MAX_TRIM), 0 };

      n = e.len;
      g_array_append_val(w->releases, e);
    }
    off += n;
    len -= n;
  }
}

static int
trim_done(void *opaque, int *error)
{
  struct worker *w = opaque;

  w->trims--;
  if (*error && atomic_exchange(&w->p->release, false))
    cli_debug("NBD %s: releasing stored ranges failed (%s): the daemon keeps "
              "protecting them until the checkpoint ends", where(w->p->o),
              g_strerror(*error));
  return 1;
}

static void
issue_releases(struct worker *w)
{
  for (guint i = 0; i < w->releases->len && atomic_load(&w->p->release); i++) {
    const struct extent *e = &g_array_index(w->releases, struct extent, i);

    if (nbd_aio_trim(w->h, e->len, e->off,
                     (nbd_completion_callback){ .callback = trim_done, .user_data = w },
                     0) < 0) {
      if (atomic_exchange(&w->p->release, false))
        cli_debug("NBD %s: cannot release stored ranges: %s", where(w->p->o),
                  nbd_get_error());
      break;
    }
    w->trims++;
  }
  g_array_set_size(w->releases, 0);
}

static int
read_done(void *opaque, int *error)
{
  struct slot *s = opaque;
  struct pull *p = s->p;

  if (*error) {
    set_error(p, g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: reading %" PRIu64
                             "+%" PRIu64 ": %s", where(p->o), s->off, s->len,
                             g_strerror(*error)));
  } else if (!atomic_load(&p->failed)) {
    int r = cbt_qcow2_writer_write(p->o->writer, s->off, s->buf, (size_t)s->len);

    if (r < 0) {
      set_error(p, g_error_new(CLI_ERROR, CLI_EXIT_FAILED,
                               "writing the backup file at guest offset %" PRIu64 ": %s",
                               s->off, g_strerror(-r)));
    } else {
      atomic_fetch_add(&p->done, s->len);
      if (atomic_load(&p->release))
        want_release(s->w, s->off, s->len);
    }
  }
  s->busy = false;
  return 1;                       /* retire the command */
}

static gpointer
worker_main(gpointer opaque)
{
  struct worker *w = opaque;
  struct pull *p = w->p;
  const struct pull_opts *o = p->o;

  for (;;) {
    unsigned inflight = 0;

    while (!atomic_load(&p->failed) && !*o->cancel) {
      struct slot *s = NULL;
      struct item it;
      unsigned i;

      for (unsigned k = 0; k < DEPTH; k++)
        if (!w->slots[k].busy) {
          s = &w->slots[k];
          break;
        }
      if (!s)
        break;
      i = atomic_fetch_add(&p->next, 1);
      if (i >= p->items->len)
        break;
      it = g_array_index(p->items, struct item, i);
      if (it.zero) {
        int r = cbt_qcow2_writer_zero(o->writer, it.off, it.len);

        if (r < 0)
          set_error(p, g_error_new(CLI_ERROR, CLI_EXIT_FAILED,
                                   "zeroing guest range %" PRIu64 "+%" PRIu64
                                   " in the backup file: %s", it.off, it.len,
                                   g_strerror(-r)));
        else if (atomic_load(&p->release))
          want_release(w, it.off, it.len);
        continue;
      }
      s->busy = true;
      s->off = it.off;
      s->len = it.len;
      if (nbd_aio_pread(w->h, s->buf, (size_t)it.len, it.off,
                        (nbd_completion_callback){ .callback = read_done, .user_data = s },
                        0) < 0) {
        s->busy = false;
        set_error(p, g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: reading %" PRIu64
                                 "+%" PRIu64 ": %s", where(o), it.off, it.len,
                                 nbd_get_error()));
      }
    }
    issue_releases(w);
    for (unsigned k = 0; k < DEPTH; k++)
      inflight += w->slots[k].busy;
    if ((inflight == 0 && w->trims == 0) || atomic_load(&p->failed) || *o->cancel)
      break;
    if (nbd_poll(w->h, 1000) < 0 && nbd_get_errno() != EINTR) {
      set_error(p, g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: %s", where(o),
                               nbd_get_error()));
      break;
    }
  }
  /* On failure reads may still be in flight: nbd_close (by the caller,
   * after join) abandons them, and their buffers outlive the handle. */
  g_mutex_lock(&p->lock);
  p->running--;
  g_cond_signal(&p->cond);
  g_mutex_unlock(&p->lock);
  return NULL;
}

bool
pull_run(const struct pull_opts *o, struct pull_stats *st, GError **error)
{
  struct pull p = { .o = o };
  size_t buf_len;
  bool ok = false;

  memset(st, 0, sizeof *st);
  g_mutex_init(&p.lock);
  g_cond_init(&p.cond);
  p.items = g_array_new(FALSE, FALSE, sizeof(struct item));
  p.nw = MAX(o->connections, 1u);
  p.w = g_new0(struct worker, p.nw);

  /* The first connection plans; the others are opened only when the plan
   * has work for them (a tiny incremental spends no handshakes on
   * connections that would sit idle), and all before any data is copied,
   * so a refused connection still fails before any work.  A second
   * connection pays from about 16 MiB on: it costs ~0.2 ms to open, and
   * its thread receives and stores while the first one does the same, on
   * another CPU (a 1%-dirty incremental of a 2 GiB disk, 20 MiB: the copy
   * took 24 ms on one connection, 18 ms on two). */
  for (unsigned i = 0; i < p.nw; i++) {
    p.w[i].p = &p;
    p.w[i].releases = g_array_new(FALSE, FALSE, sizeof(struct extent));
  }
  if (!(p.w[0].h = connect_one(o, error)))
    goto out;
  if (p.nw > 1 && nbd_can_multi_conn(p.w[0].h) != 1) {
    cli_note("NBD %s: the server does not advertise multi-conn: using one connection",
             where(o));
    p.nw = 1;
  }
  if (!make_plan(&p, p.w[0].h, st, error))
    goto out;
  cli_debug("plan: %u items, %" PRIu64 " bytes to read", p.items->len, st->planned);
  p.nw = (unsigned)MIN((uint64_t)p.nw, MAX(UINT64_C(1), st->planned / BYTES_PER_CONN));
  for (unsigned i = 1; i < p.nw; i++)
    if (!(p.w[i].h = connect_one(o, error)))
      goto out;

  if (o->release && nbd_can_trim(p.w[0].h) == 1) {
    atomic_store(&p.release, true);
    release_skipped(&p);
  }
  p.running = p.nw;
  buf_len = buf_size(p.items);
  for (unsigned i = 0; i < p.nw; i++) {
    for (unsigned k = 0; k < DEPTH; k++) {
      p.w[i].slots[k].w = &p.w[i];
      p.w[i].slots[k].p = &p;
      /* Aligned, so a writer with O_DIRECT writes it as it is; a full
       * MAX_REQ buffer as a huge page where the system allows, so pinning
       * it for each O_DIRECT write and the first touch cost one page, not
       * 512. */
      if (posix_memalign((void **)&p.w[i].slots[k].buf,
                         buf_len == HUGE_BUF ? HUGE_BUF : SMALL_ALIGN, buf_len) != 0)
        g_error("out of memory for read buffers");
      if (buf_len == HUGE_BUF)
        (void)madvise(p.w[i].slots[k].buf, buf_len, MADV_HUGEPAGE);
    }
    p.w[i].thread = g_thread_new("pull", worker_main, &p.w[i]);
  }
  g_mutex_lock(&p.lock);
  while (p.running > 0) {
    gint64 deadline = g_get_monotonic_time() + 200 * G_TIME_SPAN_MILLISECOND;

    g_cond_wait_until(&p.cond, &p.lock, deadline);
    if (o->progress) {
      g_mutex_unlock(&p.lock);
      o->progress(o->opaque, atomic_load(&p.done), st->planned);
      g_mutex_lock(&p.lock);
    }
  }
  g_mutex_unlock(&p.lock);
  for (unsigned i = 0; i < p.nw; i++)
    g_thread_join(p.w[i].thread);

  st->copied = atomic_load(&p.done);
  for (guint i = 0; i < p.items->len; i++) {
    const struct item *it = &g_array_index(p.items, struct item, i);
    if (it->zero)
      st->zeroed += it->len;
  }
  if (p.error) {
    g_propagate_error(error, p.error);
    p.error = NULL;
  } else if (*o->cancel) {
    set_cancelled(o, error);
  } else if (st->copied != st->planned) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "copied %" PRIu64 " bytes of %" PRIu64 " planned", st->copied, st->planned);
  } else {
    ok = true;
  }

out:
  for (unsigned i = 0; i < MAX(o->connections, 1u); i++) {
    if (p.w[i].h)
      nbd_close(p.w[i].h);
    if (p.w[i].releases)
      g_array_unref(p.w[i].releases);
    for (unsigned k = 0; k < DEPTH; k++)
      free(p.w[i].slots[k].buf);     /* posix_memalign */
  }
  g_free(p.w);
  g_array_unref(p.items);
  if (p.error)
    g_error_free(p.error);
  g_mutex_clear(&p.lock);
  g_cond_clear(&p.cond);
  return ok;
}
