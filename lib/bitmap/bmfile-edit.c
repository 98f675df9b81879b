/* Changing what a bitmap file holds: creating the file, adding, removing,
 * updating and resetting entries, and resizing every bitmap to a new
 * image size.  Each change is made in memory (under f->lock, but for
 * create, whose handle no one else has yet) and then written by one pass
 * of the engine (bmf_sync_locked, bmfile-write.c), which keeps the
 * crash-safe order.  What is decided here is where a new data area goes
 * (first fit after the metadata area) and how a change that could not be
 * written is undone, so the handle is as before.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <glib.h>

#include "cbt/uring-io.h"
#include "cbt/util.h"
#include "bmfile-internal.h"

/* --- data areas -------------------------------------------------------- */

/* Grow the file to at least @end bytes, allocating the space so later
 * bitmap writes cannot fail for lack of it. */
static int
extend_file(struct cbt_bmfile *f, uint64_t end, char **why)
{
  struct stat st;
  int r;

  if (fstat(f->fd, &st) < 0)
    return cbt_fail(why, -errno, "fstat: %s", g_strerror(errno));
  if ((uint64_t)st.st_size >= end)
    return 0;
  r = cbt_io_fallocate(f->fd, 0, (uint64_t)st.st_size, end - (uint64_t)st.st_size);
  if (r == -EOPNOTSUPP || r == -EINVAL) {
    r = ftruncate(f->fd, (off_t)end) < 0 ? -errno : 0;
  }
  if (r < 0)
    return cbt_fail(why, r, "extending file to %" PRIu64 " bytes: %s", end,
                g_strerror(-r));
  return 0;
}

/* A range of the file taken by a data area (length rounded up to pages). */
struct bmf_area {
  uint64_t offset;
  uint64_t length;
};

static int
cmp_area(const void *a, const void *b)
{
  const struct bmf_area *x = a, *y = b;

  return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* First fit: the lowest page-aligned offset >= @start where @need bytes
 * overlap none of the @n @areas.  Sorts @areas by offset. */
static uint64_t
area_first_fit(struct bmf_area *areas, unsigned n, uint64_t start,
               uint64_t need)
{
  uint64_t cursor = start;

  qsort(areas, n, sizeof *areas, cmp_area);
  for (unsigned i = 0; i < n; i++) {
    uint64_t end = areas[i].offset + areas[i].length;

    if (areas[i].offset >= cursor && areas[i].offset - cursor >= need)
      break;
    if (end > cursor)
      cursor = end;
  }
  return cursor;
}

/* First fit after meta_end among the areas of f's entries. */
static uint64_t
find_free_area(const struct cbt_bmfile *f, uint64_t need)
{
  g_autofree struct bmf_area *areas = g_new(struct bmf_area, f->nentries + 1);

  for (unsigned i = 0; i < f->nentries; i++) {
    areas[i].offset = f->entries[i]->data_offset;
    areas[i].length = round_up_page(f->entries[i]->data_length);
  }
  return area_first_fit(areas, f->nentries, meta_end(f->hdr.dir_capacity),
                        need);
}

/* --- entries: add, remove, update -------------------------------------- */

/* Add entry, f->lock held.  Index or -errno.  The new area's pages are all
 * marked, so the sync writes the area in full (it may hold an old
 * bitmap's bits) before the metadata that references it (rule 4). */
static int
add_locked(struct cbt_bmfile *f, const char *name, uint32_t flags,
           uint32_t gran, char **why)
{
  struct bmf_entry *e;
  unsigned idx;
  int r;

  if (!f->writable)
    return cbt_fail(why, -EROFS, "opened read-only");
  if (!bmf_name_ok(name))
    return cbt_fail(why, -EINVAL, "bad bitmap name (1 to %d printable ASCII "
                "characters)", CBT_BMF_NAME_MAX);
  if (cbt_bmfile_find(f, name) >= 0)
    return cbt_fail(why, -EEXIST, "bitmap '%s' already exists", name);
  if (!bmf_flags_ok(flags))
    return cbt_fail(why, -EINVAL, "bad flags 0x%" PRIx32, flags);
  if (gran == 0)
    gran = CBT_BITMAP_DEFAULT_GRANULARITY;
  if (!gran_ok(gran))
    return cbt_fail(why, -EINVAL, "bad granularity %" PRIu32
                " (must be a power of two >= 512)", gran);
  if (f->nentries >= f->hdr.dir_capacity)
    return cbt_fail(why, -ENOSPC, "bitmap directory full (%" PRIu32 " entries)",
                f->hdr.dir_capacity);

  r = bmf_entry_new(name, flags, gran, f->hdr.image_size, &e);
  if (r < 0)
    return cbt_fail(why, r, "bitmap '%s': %s", name, g_strerror(-r));
  e->create_time = (uint64_t)time(NULL);
  e->data_offset = find_free_area(f, round_up_page(e->data_length));
  bmf_mark_all_pages(e);
  r = extend_file(f, e->data_offset + round_up_page(e->data_length), why);
  if (r < 0) {
    bmf_entry_free(e);
    return r;
  }
  idx = f->nentries;
  f->entries[f->nentries++] = e;
  f->meta_dirty = true;
  r = bmf_sync_locked(f, false, why);
  if (r < 0) {
    /* Forget it; if a "not clean" generation already listed it, the next
     * metadata write drops it again. */
    f->entries[--f->nentries] = NULL;
    bmf_entry_free(e);
    f->meta_dirty = true;
    return r;
  }
  return (int)idx;
}

int
cbt_bmfile_add(cbt_bmfile *f, const char *name, uint32_t flags,
               uint32_t granularity, char **why)
{
  int r;

  g_mutex_lock(&f->lock);
  r = add_locked(f, name, flags, granularity, why);
  g_mutex_unlock(&f->lock);
  return r;
}

int
cbt_bmfile_remove(cbt_bmfile *f, const char *name, char **why)
{
  int idx, r;

  g_mutex_lock(&f->lock);
  idx = cbt_bmfile_find(f, name);
  if (!f->writable)
    r = cbt_fail(why, -EROFS, "opened read-only");
  else if (idx < 0)
    r = cbt_fail(why, -ENOENT, "no bitmap '%s'", name);
  else {
    bmf_entry_free(f->entries[idx]);
    memmove(&f->entries[idx], &f->entries[idx + 1],
            (f->nentries - (unsigned)idx - 1) * sizeof f->entries[0]);
    f->entries[--f->nentries] = NULL;
    f->meta_dirty = true;
    r = bmf_sync_locked(f, false, why);
  }
  g_mutex_unlock(&f->lock);
  return r;
}

/* Change an entry's flags and/or checkpoint id (NULL: keep) and make the
 * metadata durable. */
static int
update_entry(cbt_bmfile *f, unsigned idx, const uint32_t *flags,
             const uint64_t *checkpoint, char **why)
{
  int r;

  g_mutex_lock(&f->lock);
  if (!f->writable)
    r = cbt_fail(why, -EROFS, "opened read-only");
  else if (idx >= f->nentries)
    r = cbt_fail(why, -EINVAL, "no bitmap at index %u", idx);
  else {
    if (flags)
      f->entries[idx]->flags = *flags;
    if (checkpoint)
      f->entries[idx]->checkpoint = *checkpoint;
    f->meta_dirty = true;
    r = bmf_sync_locked(f, false, why);
  }
  g_mutex_unlock(&f->lock);
  return r;
}

int
cbt_bmfile_set_flags(cbt_bmfile *f, unsigned idx, uint32_t flags, char **why)
{
  if (!bmf_flags_ok(flags))
    return cbt_fail(why, -EINVAL, "bad flags 0x%" PRIx32, flags);
  return update_entry(f, idx, &flags, NULL, why);
}

int
cbt_bmfile_set_checkpoint(cbt_bmfile *f, unsigned idx, uint64_t checkpoint,
                          char **why)
{
  return update_entry(f, idx, NULL, &checkpoint, why);
}

int
cbt_bmfile_reset_entry(cbt_bmfile *f, unsigned idx, char **why)
{
  int r;

  g_mutex_lock(&f->lock);
  if (!f->writable)
    r = cbt_fail(why, -EROFS, "opened read-only");
  else if (idx >= f->nentries)
    r = cbt_fail(why, -EINVAL, "no bitmap at index %u", idx);
  else {
    cbt_bitmap_clear_all(&f->entries[idx]->bm);
    f->entries[idx]->flags &= ~CBT_BMF_INCONSISTENT;
    f->meta_dirty = true;
    r = bmf_sync_locked(f, false, why);
  }
  g_mutex_unlock(&f->lock);
  return r;
}

/* --- resize ------------------------------------------------------------ */

/* The part of an entry that a resize replaces.  resize_locked builds the
 * new one beside each entry and swaps it in; on failure it swaps the old
 * one back, so the handle is as before. */
struct resize_geom {
  struct cbt_bitmap bm;
  uint32_t *page_crc;
  uint64_t data_pages;
  uint64_t data_offset;
  uint64_t data_length;
  bool on_disk;
};

static void
geom_swap(struct bmf_entry *e, struct resize_geom *g)
{
  struct resize_geom old = {
    e->bm, e->page_crc, e->data_pages, e->data_offset, e->data_length,
    e->on_disk,
  };

  /* The struct cbt_bitmap is copied into place, never moved: pointers to
   * &e->bm stay valid (cbt/bitmap-file.h). */
  e->bm = g->bm;
  e->page_crc = g->page_crc;
  e->data_pages = g->data_pages;
  e->data_offset = g->data_offset;
  e->data_length = g->data_length;
  e->on_disk = g->on_disk;
  *g = old;
}

/* The new geometry of entry @e for an image of @new_size bytes (from
 * @old_size): its bits resized, the added granules dirty, every page
 * marked for write-out, and a data area placed by first fit among the
 * @*nareas @areas, to which it is then added. */
static int
geom_new(const struct bmf_entry *e, uint64_t old_size, uint64_t new_size,
         uint64_t start, struct bmf_area *areas, unsigned *nareas,
         struct resize_geom *g, char **why)
{
  int r;

  r = cbt_bitmap_dup(&e->bm, &g->bm);
  if (r == 0) {
    r = cbt_bitmap_resize(&g->bm, new_size);
    if (r < 0)
      cbt_bitmap_destroy(&g->bm);
  }
  if (r < 0)
    return cbt_fail(why, r, "bitmap '%s': %s", e->name, g_strerror(-r));
  /* The added bytes were never backed up: dirty.  This includes the old
   * partial last granule, which now covers more of the image. */
  if (new_size > old_size)
    cbt_bitmap_set_range(&g->bm, old_size, new_size - old_size);
  g->data_length = data_length_for(new_size, e->granularity);
  g->data_pages = g->bm.npages;
  g->page_crc = g_try_new0(uint32_t, g->data_pages);
  if (!g->page_crc)
    return cbt_fail(why, -ENOMEM, "bitmap '%s': %s", e->name, g_strerror(ENOMEM));
  g->data_offset = area_first_fit(areas, *nareas, start,
                                  round_up_page(g->data_length));
  g->on_disk = false;
  areas[*nareas].offset = g->data_offset;
  areas[*nareas].length = round_up_page(g->data_length);
  (*nareas)++;
  return 0;
}

/* Resize, f->lock held.
 *
 * Every entry gets a new data area, even one whose length is unchanged:
 * its contents change anyway (added granules dirty, or bits dropped), and
 * rewriting an area that the durable metadata references would first need
 * a "not clean" generation (write rule 2).  The new areas overlap neither
 * each other nor any area of the durable metadata, so until the new
 * generation is durable the old one and its data are untouched: a crash
 * leaves the file as before the resize (CLEAN if it was), or torn new
 * metadata from which a reader falls back to that same generation.
 *
 * The new areas are entries with on_disk clear, so bmf_sync_locked writes them
 * in full, fdatasyncs (rule 4) and only then writes the metadata with the
 * new image_size, keeping CLEAN as it was on disk: with no thread marking
 * bits, every bit is then durable (rule 5).  The old areas become free. */
static int
resize_locked(struct cbt_bmfile *f, uint64_t new_size, char **why)
{
  uint64_t old_size = f->hdr.image_size;
  uint64_t start = meta_end(f->hdr.dir_capacity);
  uint64_t file_end = start;
  unsigned n = f->nentries, nareas = 0;
  g_autofree struct resize_geom *geom = NULL;
  g_autofree struct bmf_area *areas = NULL;
  int r = 0;

  if (!f->writable)
    return cbt_fail(why, -EROFS, "opened read-only");
  if (new_size == 0 || new_size > CBT_BITMAP_MAX_SIZE)
    return cbt_fail(why, -EINVAL, "bad image size %" PRIu64 " (1 to %" PRIu64
                " bytes)", new_size, CBT_BITMAP_MAX_SIZE);
  if (new_size == old_size)
    return 0;

  geom = g_new0(struct resize_geom, n + 1);
  areas = g_new(struct bmf_area, 2 * (size_t)n + 1);
  for (unsigned i = 0; i < n; i++) {
    areas[nareas].offset = f->entries[i]->data_offset;
    areas[nareas].length = round_up_page(f->entries[i]->data_length);
    nareas++;
  }
  for (unsigned i = 0; i < n; i++) {
    r = geom_new(f->entries[i], old_size, new_size, start, areas, &nareas,
                 &geom[i], why);
    if (r < 0)
      goto out;
    file_end = MAX(file_end, geom[i].data_offset +
                             round_up_page(geom[i].data_length));
  }
  r = extend_file(f, file_end, why);
  if (r < 0)
    goto out;

  for (unsigned i = 0; i < n; i++)
    geom_swap(f->entries[i], &geom[i]);
  f->hdr.image_size = new_size;
  f->meta_dirty = true;
  r = bmf_sync_locked(f, false, why);
  if (r < 0) {
    for (unsigned i = 0; i < n; i++)
      geom_swap(f->entries[i], &geom[i]);
    f->hdr.image_size = old_size;
  }

out:
  /* The new geometry on failure, the old one on success. */
  for (unsigned i = 0; i < n; i++) {
    cbt_bitmap_destroy(&geom[i].bm);
    g_free(geom[i].page_crc);
  }
  return r;
}

int
cbt_bmfile_resize(cbt_bmfile *f, uint64_t new_image_size, char **why)
{
  int r;

  g_mutex_lock(&f->lock);
  r = resize_locked(f, new_image_size, why);
  g_mutex_unlock(&f->lock);
  return r;
}

/* --- create ------------------------------------------------------------ */

static int
random_uuid(uint8_t uuid[16])
{
  size_t got = 0;

  while (got < 16) {
    ssize_t n = getrandom(uuid + got, 16 - got, 0);

    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return -errno;
    got += (size_t)n;
  }
  uuid[6] = (uint8_t)((uuid[6] & 0x0f) | 0x40);   /* version 4 */
  uuid[8] = (uint8_t)((uuid[8] & 0x3f) | 0x80);   /* RFC 4122 variant */
  return 0;
}

/* Make the new directory entry for @path durable. */
static int
sync_parent_dir(const char *path, char **why)
{
  int r = cbt_io_sync_parent_dir(path);

  return r < 0 ? cbt_fail(why, r, "%s: syncing its directory: %s", path, g_strerror(-r)) : 0;
}

static int
create_contents(cbt_bmfile *f, uint32_t gran, const char *first_name,
                char **why)
{
  int r;

  r = random_uuid(f->hdr.uuid);
  if (r < 0)
    return cbt_fail(why, r, "getrandom: %s", g_strerror(-r));
  r = extend_file(f, meta_end(f->hdr.dir_capacity), why);
  if (r < 0)
    return r;
  /* add_locked syncs the data and writes generation 1 (copy 1). */
  r = add_locked(f, first_name, CBT_BMF_ACTIVE, gran, why);
  if (r < 0)
    return r;
  r = bmf_sync_locked(f, true, why);
  if (r < 0)
    return r;
  /* Generation 2 fills copy 0, so both copies start intact. */
  r = bmf_write_meta(f, true, why);
  if (r < 0)
    return r;
  r = cbt_io_fsync(f->fd);
  if (r < 0)
    return cbt_fail(why, r, "fsync: %s", g_strerror(-r));
  return sync_parent_dir(f->path, why);
}

int
cbt_bmfile_create(const char *path, uint64_t image_size, uint64_t image_inode,
                  uint32_t granularity, const char *first_name,
                  cbt_bmfile **out, char **why)
{
  g_autoptr(cbt_bmfile) f = NULL;
  int fd, r;

  *out = NULL;
  if (image_size == 0 || image_size > CBT_BITMAP_MAX_SIZE)
    return cbt_fail(why, -EINVAL, "bad image size %" PRIu64, image_size);
  if (granularity == 0)
    granularity = CBT_BITMAP_DEFAULT_GRANULARITY;
  if (!gran_ok(granularity))
    return cbt_fail(why, -EINVAL, "bad granularity %" PRIu32
                " (must be a power of two >= 512)", granularity);
  if (!bmf_name_ok(first_name))
    return cbt_fail(why, -EINVAL, "bad bitmap name (1 to %d printable ASCII "
                "characters)", CBT_BMF_NAME_MAX);

  fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    return cbt_fail(why, -errno, "cannot create: %s", g_strerror(errno));
  f = bmf_handle_new(path, fd, true);
  f->hdr.version = BMF_VERSION;
  f->hdr.header_size = BMF_HEADER_SIZE;
  f->hdr.image_size = image_size;
  f->hdr.image_inode = image_inode;
  f->hdr.dir_capacity = CBT_BMF_DIR_CAPACITY;
  f->hdr.dir_entry_size = BMF_ENTRY_SIZE;
  f->hdr.generation = 0;
  /* Nothing durable yet: nothing to protect, nothing to taint. */
  f->disk_clean = false;
  f->owned_dirty = true;
  f->entries = g_new0(struct bmf_entry *, f->hdr.dir_capacity);

  r = create_contents(f, granularity, first_name, why);
  if (r < 0) {
    unlink(path);
    return r;
  }
  f->found_clean = true;
  *out = g_steal_pointer(&f);
  return 0;
}
