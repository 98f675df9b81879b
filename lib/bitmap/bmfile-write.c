/* Writing the bitmap file: the engine that makes changed bits and the
 * metadata durable, in the order that keeps the file crash safe (the
 * write rules of bitmap-format.md).  Every change to the file, here or in
 * bmfile-edit.c, ends in one pass of bmf_sync_locked.
 *
 * Crash safety rests on four things, each kept where it is implemented:
 *   - metadata goes to the copy not holding the newest durable generation,
 *     and each metadata write ends with fdatasync (bmf_write_meta);
 *   - data pages of a bitmap that the durable metadata references are only
 *     written while the durable metadata says "not clean" (bmf_sync_locked);
 *   - data is fdatasynced before the metadata carrying its checksums
 *     (bmf_sync_locked);
 *   - CLEAN is written only after a pass that found nothing left to write
 *     (bmf_sync_locked with make_clean).
 * A resize (resize_locked, bmfile-edit.c) gives every entry a fresh area
 * and goes through the same engine, so the switch to the new size is one
 * metadata write.
 *
 * Locking: all but the public functions run with f->lock held; those
 * take it.  All file I/O goes through cbt/uring-io.h.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include <glib.h>

#include "cbt/crc32c.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"
#include "bmfile-internal.h"

/* Renormalise the generation counter (renormalise) once it has reached
 * this.  Counting real updates never gets near it; a file written by
 * another implementation or crafted may start there, and a counter that
 * wrapped would lose to the stale copy: a reader would take the previous
 * generation (say CLEAN, without the bits since) as the newest. */
#define BMF_GEN_RENORMALISE (UINT64_C(1) << 63)

/* Move the durable metadata to low generations, unchanged: copy f->hdr.slot
 * holds it on disk (read at open or written by the last bmf_write_meta).  Its
 * header page and directory are read back and written verbatim, with only
 * slot, generation, dir_offset and the header checksum changed, first
 * into the other copy as generation 0 or 1 (that copy's parity), then
 * into its own copy as the next generation, each followed by fdatasync.
 * Until the first is durable readers take the durable copy (higher
 * generation); after it both copies say the same; a crash tearing the
 * second leaves the first.  So at every moment the durable metadata is
 * what a reader finds. */
static int
renormalise(struct cbt_bmfile *f, char **why)
{
  unsigned d = f->hdr.slot, o = !d;
  uint32_t cap = f->hdr.dir_capacity;
  size_t dir_len = (size_t)cap * BMF_ENTRY_SIZE;
  g_autofree uint8_t *dir = g_malloc(dir_len);
  g_autofree uint8_t *page = g_malloc(BMF_PAGE);
  struct bmf_header h;
  int r;

  r = cbt_io_pread(f->fd, page, BMF_PAGE, (uint64_t)d * BMF_PAGE);
  if (r == 0)
    r = cbt_io_pread(f->fd, dir, dir_len, f->hdr.dir_offset);
  if (r < 0)
    return cbt_fail(why, r == -ENODATA ? -EIO : r, "renormalising the generation "
                "counter: reading metadata copy %u: %s", d,
                g_strerror(r == -ENODATA ? EIO : -r));
  bmf_header_decode(page, &h);
  if (h.generation != f->hdr.generation || h.header_crc != f->hdr.header_crc ||
      cbt_crc32c(0, dir, dir_len) != f->hdr.dir_crc)
    return cbt_fail(why, -EIO, "renormalising the generation counter: metadata "
                "copy %u changed on disk (another writer?)", d);

  for (unsigned step = 0; step < 2; step++) {
    h.slot = step == 0 ? o : d;
    h.generation = step == 0 ? o : o + 1;
    h.dir_offset = dir_offset_for(cap, h.slot);
    h.header_crc = 0;
    bmf_header_encode(&h, page);
    h.header_crc = bmf_header_crc(page, h.header_size);
    bmf_header_encode(&h, page);
    r = cbt_io_pwrite(f->fd, dir, dir_len, h.dir_offset);
    if (r < 0)
      return cbt_fail(why, r, "renormalising the generation counter: writing "
                  "directory: %s", g_strerror(-r));
    r = cbt_io_pwrite(f->fd, page, BMF_PAGE, (uint64_t)h.slot * BMF_PAGE);
    if (r < 0)
      return cbt_fail(why, r, "renormalising the generation counter: writing "
                  "header: %s", g_strerror(-r));
    r = cbt_io_fdatasync(f->fd);
    if (r < 0)
      return cbt_fail(why, r, "renormalising the generation counter: "
                  "fdatasync: %s", g_strerror(-r));
  }
  f->hdr.generation = h.generation;
  f->hdr.header_crc = h.header_crc;
  return 0;
}

/* Write the current metadata as the next generation into the copy that
 * does not hold the durable one, with CLEAN = @clean, and fdatasync.
 *
 * Ordering: directory first, then header, then fdatasync.  Until the sync
 * completes, a crash may leave this copy torn (a reader then falls back
 * to the other copy, which is durable because the previous call ended
 * with fdatasync) or complete.  The generation only advances on success,
 * so a failed attempt is retried into the same copy, never the durable
 * one; it never wraps (renormalise). */
int
bmf_write_meta(struct cbt_bmfile *f, bool clean, char **why)
{
  uint32_t cap = f->hdr.dir_capacity;
  size_t dir_len = (size_t)cap * BMF_ENTRY_SIZE;
  g_autofree uint8_t *dir = g_malloc0(dir_len);
  g_autofree uint8_t *page = g_malloc0(BMF_PAGE);
  struct bmf_header h;
  int r;

  if (f->hdr.generation >= BMF_GEN_RENORMALISE) {
    r = renormalise(f, why);
    if (r < 0)
      return r;
  }
  h = f->hdr;

  for (unsigned i = 0; i < f->nentries; i++)
    bmf_entry_encode(f->entries[i], dir + (size_t)i * BMF_ENTRY_SIZE);

  h.generation = f->hdr.generation + 1;
  h.slot = (uint32_t)(h.generation % 2);
  h.nb_entries = f->nentries;
  h.state_flags = clean ? BMF_STATE_CLEAN : 0;
  /* crash_safe_tracking says how this writer keeps the bits (rules 6-8);
   * we implement no autoclear feature. */
  if (f->crash_safe)
    h.compat |= BMF_COMPAT_CRASH_SAFE;
  else
    h.compat &= ~BMF_COMPAT_CRASH_SAFE;
  h.autoclear = 0;
  h.dir_offset = dir_offset_for(cap, h.slot);
  h.dir_crc = cbt_crc32c(0, dir, dir_len);
  h.header_crc = 0;
  bmf_header_encode(&h, page);
  if (f->hdr_ext)
    memcpy(page + BMF_HEADER_SIZE, f->hdr_ext, h.header_size - BMF_HEADER_SIZE);
  h.header_crc = bmf_header_crc(page, h.header_size);
  bmf_header_encode(&h, page);

  r = cbt_io_pwrite(f->fd, dir, dir_len, h.dir_offset);
  if (r < 0)
    return cbt_fail(why, r, "writing directory: %s", g_strerror(-r));
  r = cbt_io_pwrite(f->fd, page, BMF_PAGE, (uint64_t)h.slot * BMF_PAGE);
  if (r < 0)
    return cbt_fail(why, r, "writing header: %s", g_strerror(-r));
  r = cbt_io_fdatasync(f->fd);
  if (r < 0)
    return cbt_fail(why, r, "fdatasync after metadata write: %s", g_strerror(-r));

  f->hdr = h;
  f->disk_clean = clean;
  f->owned_dirty = !clean;
  f->meta_dirty = false;
  for (unsigned i = 0; i < f->nentries; i++) {
    f->entries[i]->on_disk = true;
    f->entries[i]->data_crc = bmf_data_crc(f->entries[i]->page_crc,
                                           f->entries[i]->data_pages);
  }
  return 0;
}

/* Pages gathered into one write when several in a row changed. */
#define WRITE_RUN_PAGES       64u

/* Write the changed pages of every entry that may be written now: not
 * those the durable metadata references while it says CLEAN (write rule
 * 2; they stay marked).  Returns the number of pages written or -errno;
 * on error the claimed but unwritten pages are marked again. */
static int64_t
write_data(struct cbt_bmfile *f, char **why)
{
  g_autofree uint8_t *buf = g_malloc(WRITE_RUN_PAGES * BMF_PAGE);
  uint32_t crcs[WRITE_RUN_PAGES];
  int64_t written = 0;

  for (unsigned i = 0; i < f->nentries; i++) {
    struct bmf_entry *e = f->entries[i];
    uint64_t p = 0;

    if (e->on_disk && f->disk_clean)
      continue;
    while (p < e->data_pages) {
      uint64_t start = p;
      uint64_t len;
      unsigned n = 0;
      int r;

      if (!cbt_bitmap_claim_page(&e->bm, p)) {
        p++;
        continue;
      }
      /* The page is claimed: copy it; a set racing with the copy marks it
       * again and it goes out next time. */
      do {
        uint32_t nb = bmf_page_bytes(e, p);
        uint8_t *dst = buf + (size_t)n * BMF_PAGE;

        cbt_bitmap_copy_page_le(&e->bm, p, dst, nb);
        crcs[n] = cbt_crc32c(0, dst, nb);
        n++;
        p++;
      } while (n < WRITE_RUN_PAGES && p < e->data_pages &&
               cbt_bitmap_claim_page(&e->bm, p));

      len = (uint64_t)(n - 1) * BMF_PAGE + bmf_page_bytes(e, start + n - 1);
      r = cbt_io_pwrite(f->fd, buf, len, e->data_offset + start * BMF_PAGE);
      if (r < 0) {
        for (uint64_t q = start; q < start + n; q++)
          cbt_bitmap_mark_page(&e->bm, q);
        return cbt_fail(why, r, "bitmap '%s': writing data: %s", e->name,
                    g_strerror(-r));
      }
      memcpy(&e->page_crc[start], crcs, n * sizeof crcs[0]);
      written += n;
    }
  }
  return written;
}

static bool
any_page_dirty(const struct bmf_entry *e)
{
  for (uint64_t i = 0; i < (e->bm.npages + 63) / 64; i++)
    if (__atomic_load_n(&e->bm.pages_dirty[i], __ATOMIC_RELAXED))
      return true;
  return false;
}

static bool
any_dirty(const struct cbt_bmfile *f, bool only_on_disk)
{
  for (unsigned i = 0; i < f->nentries; i++)
    if ((!only_on_disk || f->entries[i]->on_disk) &&
        any_page_dirty(f->entries[i]))
      return true;
  return false;
}

/* f->lock held: write every changed data page and make it durable, first
 * making "not clean" durable if the file is CLEAN on disk.  Returns the
 * number of pages written or -errno. */
static int64_t
write_data_durably(struct cbt_bmfile *f, char **why)
{
  int64_t n;
  int r;

  /* Rule 2: bits of a bitmap the durable metadata references change on
   * disk only under a durable "not clean". */
  if (f->disk_clean && any_dirty(f, true)) {
    r = bmf_write_meta(f, false, why);
    if (r < 0)
      return r;
  }
  n = write_data(f, why);
  if (n <= 0)
    return n;
  /* Rule 4 (and 6): data is durable before the metadata that describes
   * it, and before the writes its bits cover. */
  r = cbt_io_fdatasync(f->fd);
  if (r < 0) {
    /* The page cache may have dropped the pages: write all again. */
    for (unsigned i = 0; i < f->nentries; i++)
      bmf_mark_all_pages(f->entries[i]);
    return cbt_fail(why, r, "fdatasync after data write: %s", g_strerror(-r));
  }
  return n;
}

/* The sync engine, f->lock held.  See the write rules in
 * bitmap-format.md; each step below says which one it keeps. */
int
bmf_sync_locked(struct cbt_bmfile *f, bool make_clean, char **why)
{
  if (!f->writable)
    return cbt_fail(why, -EROFS, "opened read-only");

  for (int pass = 0; pass < 8; pass++) {
    int64_t n = write_data_durably(f, why);

    if (n < 0)
      return (int)n;
    if (!make_clean) {
      if (n > 0 || f->meta_dirty)
        return bmf_write_meta(f, f->disk_clean, why);
      return 0;
    }
    /* Rule 5: CLEAN only after a pass that left nothing unwritten. */
    if (any_dirty(f, false))
      continue;
    if (n > 0 || f->meta_dirty || !f->disk_clean)
      return bmf_write_meta(f, true, why);
    return 0;
  }
  return cbt_fail(why, -EBUSY, "bits kept changing while marking the file clean");
}

int
cbt_bmfile_sync(cbt_bmfile *f, char **why)
{
  int r;

  g_mutex_lock(&f->lock);
  r = bmf_sync_locked(f, false, why);
  g_mutex_unlock(&f->lock);
  return r;
}

int
cbt_bmfile_sync_data(cbt_bmfile *f, char **why)
{
  int64_t n;

  g_mutex_lock(&f->lock);
  n = f->writable ? write_data_durably(f, why)
                  : cbt_fail(why, -EROFS, "opened read-only");
  g_mutex_unlock(&f->lock);
  return n < 0 ? (int)n : 0;
}

void
cbt_bmfile_set_crash_safe(cbt_bmfile *f, bool on)
{
  g_mutex_lock(&f->lock);
  if (f->crash_safe != on)
    f->meta_dirty = true;
  f->crash_safe = on;
  g_mutex_unlock(&f->lock);
}

int
cbt_bmfile_mark_dirty(cbt_bmfile *f, char **why)
{
  int r = 0;

  g_mutex_lock(&f->lock);
  if (!f->writable)
    r = cbt_fail(why, -EROFS, "opened read-only");
  else if (f->disk_clean || !f->owned_dirty)
    r = bmf_write_meta(f, false, why);   /* carries INCONSISTENT (rule 1) */
  g_mutex_unlock(&f->lock);
  return r;
}

int
cbt_bmfile_close_clean(cbt_bmfile *f, char **why)
{
  int r;

  g_mutex_lock(&f->lock);
  r = bmf_sync_locked(f, true, why);
  g_mutex_unlock(&f->lock);
  cbt_bmfile_free(f);
  return r;
}
