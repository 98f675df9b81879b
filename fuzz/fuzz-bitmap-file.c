/* fuzz-bitmap-file: the persistent bitmap file reader and writer
 * (lib/bitmap/; format: bitmap-format.md) on arbitrary files.
 *
 * Input: one mode byte, then the file.
 *   mode bit 0  fix the checksums first: every header, directory and
 *               data CRC32C the file's own fields locate is recomputed,
 *               so mutations get past the checksums to the validation
 *               behind them (without it, the checksum checks are fuzzed)
 *   mode bit 1  writable session (below)
 * The file is written to the process's private directory (fuzz-util.h).
 *
 * Each input: a read-only open (all of the validation on load), then
 * every entry's accessors and bits, and the identity check; the same file
 * through cbt_bmfile_open_image with its own identity (must open) and
 * another image size (must be -ESTALE).  With bit 1, a writable open and
 * what the daemon and `cbt bitmap` do with one: mark_dirty, bits set,
 * sync, a checkpoint entry added, stamped and removed, entry 0 marked
 * INCONSISTENT and reset, close_clean; then an offline resize to twice
 * the image size.  After each of close_clean and resize succeeded the
 * file must open again (and be clean after close_clean): a file our
 * writer produced that our reader refuses aborts.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <glib.h>

#include "cbt/bitmap-file.h"
#include "cbt/crc32c.h"
#include "fuzz-util.h"

#define PAGE 4096u
#define ENTRY 128u

static char *path;

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
  (void)argc;
  (void)argv;
  fuzz_dir("bitmap-file");
  path = fuzz_path("fuzz.bitmap");
  return 0;
}

static uint32_t get_le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return GUINT32_FROM_LE(v); }
static uint64_t get_le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return GUINT64_FROM_LE(v); }
static void put_le32(uint8_t *p, uint32_t v) { v = GUINT32_TO_LE(v); memcpy(p, &v, 4); }

/* Does [off, off + len) lie inside a file of @n bytes? */
static bool
inside(uint64_t off, uint64_t len, size_t n)
{
  return off <= n && n - off >= len;
}

/* The two-level data checksum (bitmap-format.md, "data_crc32c"). */
static uint32_t
data_crc(const uint8_t *d, uint64_t len)
{
  uint32_t crc = 0;

  for (uint64_t pos = 0; pos < len; pos += PAGE) {
    uint8_t c[4];

    put_le32(c, cbt_crc32c(0, d + pos, MIN(PAGE, len - pos)));
    crc = cbt_crc32c(crc, c, 4);
  }
  return crc;
}

/* Recompute, in this order, the data, directory and header checksums of
 * both metadata copies, wherever the file's fields say they are. */
static void
fix_checksums(uint8_t *f, size_t n)
{
  for (unsigned s = 0; s < 2; s++) {
    uint8_t *h = f + (size_t)s * PAGE;
    uint32_t cap, nb, hsize;
    uint64_t dir;

    if (n < (size_t)(s + 1) * PAGE)
      break;
    cap = get_le32(h + 104);
    nb = get_le32(h + 60);
    dir = get_le64(h + 96);
    if (cap >= 1 && cap <= 4096 && inside(dir, (uint64_t)cap * ENTRY, n)) {
      for (uint32_t i = 0; i < MIN(nb, cap); i++) {
        uint8_t *e = f + dir + (size_t)i * ENTRY;
        uint64_t doff = get_le64(e + 72), dlen = get_le64(e + 80);

        if (inside(doff, dlen, n))
          put_le32(e + 88, data_crc(f + doff, dlen));
      }
      put_le32(h + 112, cbt_crc32c(0, f + dir, (size_t)cap * ENTRY));
    }
    hsize = get_le32(h + 12);
    if (hsize >= 20 && hsize <= PAGE) {
      put_le32(h + 16, 0);
      put_le32(h + 16, cbt_crc32c(0, h, hsize));
    }
  }
}

static void
reader(void)
{
  g_autoptr(cbt_bmfile) f = NULL;
  g_autofree char *why = NULL, *why2 = NULL;
  uint8_t uuid[16];

  if (cbt_bmfile_open(path, false, &f, &why) < 0)
    return;
  cbt_bmfile_uuid(f, uuid);
  (void)cbt_bmfile_recovery_note(f);
  (void)cbt_bmfile_found_crash_safe(f);
  for (unsigned i = 0; i < cbt_bmfile_entry_count(f); i++) {
    struct cbt_bitmap *bm = cbt_bmfile_entry_bitmap(f, i);
    const char *name = cbt_bmfile_entry_name(f, i);
    uint64_t off = 0;
    bool dirty;

    if (cbt_bmfile_find(f, name) != (int)i) {
      fprintf(stderr, "fuzz-bitmap-file: entry %u '%s' is found at %d\n", i, name,
              cbt_bmfile_find(f, name));
      abort();
    }
    (void)cbt_bmfile_entry_trusted(f, i, NULL);
    (void)cbt_bmfile_entry_checkpoint(f, i);
    (void)cbt_bmfile_entry_data_ok(f, i);
    (void)cbt_bitmap_dirty_bytes(bm);
    /* Walk the first runs, as cbt backup does to plan its copies. */
    for (int runs = 0; runs < 64 && off < bm->size; runs++) {
      uint64_t len = cbt_bitmap_extent(bm, off, bm->size - off, &dirty);

      if (len == 0) {
        fprintf(stderr, "fuzz-bitmap-file: an empty extent at %llu of %llu\n",
                (unsigned long long)off, (unsigned long long)bm->size);
        abort();
      }
      off += len;
    }
  }
  /* What `cbt bitmap info` shows. */
  (void)cbt_bmfile_path(f);
  (void)cbt_bmfile_version(f);
  (void)cbt_bmfile_generation(f);
  (void)cbt_bmfile_clean(f);
  (void)cbt_bmfile_header_crc(f);
  (void)cbt_bmfile_dir_crc(f);
  for (unsigned i = 0; i < cbt_bmfile_entry_count(f); i++) {
    (void)cbt_bmfile_entry_flags(f, i);
    (void)cbt_bmfile_entry_data_crc(f, i);
  }
  if (cbt_bmfile_check_image(f, cbt_bmfile_image_size(f), cbt_bmfile_image_inode(f),
                             &why2) < 0) {
    fprintf(stderr, "fuzz-bitmap-file: the file's own identity does not match: %s\n", why2);
    abort();
  }
}

/* cbt_bmfile_open_image, as the daemon opens it: with the file's own
 * identity (when the plain open told it) and with another size. */
static void
reader_for_image(void)
{
  g_autoptr(cbt_bmfile) f = NULL, g = NULL, h = NULL;
  g_autofree char *why = NULL, *why2 = NULL, *why3 = NULL;
  uint64_t size, ino;

  if (cbt_bmfile_open(path, false, &f, &why) < 0) {
    /* Must be refused before (or as) the identity is compared. */
    if (cbt_bmfile_open_image(path, false, 1 << 20, 0, &g, &why2) == 0) {
      fprintf(stderr, "fuzz-bitmap-file: open_image accepts what open refused: %s\n", why);
      abort();
    }
    return;
  }
  size = cbt_bmfile_image_size(f);
  ino = cbt_bmfile_image_inode(f);
  if (cbt_bmfile_open_image(path, false, size, ino, &g, &why2) < 0) {
    fprintf(stderr, "fuzz-bitmap-file: open_image refuses the file's own identity: %s\n",
            why2);
    abort();
  }
  if (cbt_bmfile_open_image(path, false, size + 1, ino, &h, &why3) != -ESTALE) {
    fprintf(stderr, "fuzz-bitmap-file: open_image accepts another image size\n");
    abort();
  }
}

/* The file must open again after a write that succeeded. */
static void
reopen(const char *after, bool must_be_clean)
{
  g_autoptr(cbt_bmfile) f = NULL;
  g_autofree char *why = NULL;

  if (cbt_bmfile_open(path, false, &f, &why) < 0) {
    fprintf(stderr, "fuzz-bitmap-file: after %s the file does not open: %s\n", after, why);
    abort();
  }
  if (must_be_clean && !cbt_bmfile_found_clean(f)) {
    fprintf(stderr, "fuzz-bitmap-file: after %s the file is not clean\n", after);
    abort();
  }
}

static void
writer(void)
{
  cbt_bmfile *f = NULL;
  g_autoptr(cbt_bmfile) g = NULL;
  g_autofree char *why = NULL;
  struct cbt_bitmap *bm;
  uint64_t size;
  int idx;

  if (cbt_bmfile_open(path, true, &f, &why) < 0)
    return;
  cbt_bmfile_set_crash_safe(f, true);
  if (cbt_bmfile_mark_dirty(f, NULL) < 0 || cbt_bmfile_entry_count(f) == 0) {
    cbt_bmfile_free(f);
    return;
  }
  bm = cbt_bmfile_entry_bitmap(f, 0);
  cbt_bitmap_set_range(bm, 0, 1);
  cbt_bitmap_set_range(bm, bm->size / 2, bm->granularity * 3);
  cbt_bmfile_sync_data(f, NULL);
  cbt_bmfile_sync(f, NULL);
  idx = cbt_bmfile_add(f, "fuzz-checkpoint", CBT_BMF_FROZEN, 0, NULL);
  if (idx >= 0) {
    cbt_bitmap_merge(cbt_bmfile_entry_bitmap(f, (unsigned)idx), bm);
    cbt_bmfile_set_checkpoint(f, (unsigned)idx, 0x0123456789abcdef, NULL);
    cbt_bmfile_remove(f, "fuzz-checkpoint", NULL);
  }
  cbt_bmfile_set_flags(f, 0, cbt_bmfile_entry_flags(f, 0) | CBT_BMF_INCONSISTENT, NULL);
  cbt_bmfile_reset_entry(f, 0, NULL);
  cbt_bitmap_set_range(bm, 0, bm->size);
  if (cbt_bmfile_close_clean(f, NULL) < 0)
    return;
  reopen("close_clean", true);

  if (cbt_bmfile_open(path, true, &g, NULL) < 0)
    return;
  size = cbt_bmfile_image_size(g);
  if (size <= CBT_BITMAP_MAX_SIZE / 2 && cbt_bmfile_resize(g, size * 2, NULL) == 0)
    reopen("resize", false);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  g_autofree uint8_t *file = NULL;
  unsigned mode;

  if (size < 1)
    return 0;
  mode = data[0];
  file = g_malloc(size);
  memcpy(file, data + 1, size - 1);
  if (mode & 1)
    fix_checksums(file, size - 1);
  fuzz_write_file(path, file, size - 1);
  reader();
  reader_for_image();
  if (mode & 2)
    writer();
  return 0;
}
