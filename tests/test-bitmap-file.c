/* Unit tests for the bitmap file (lib/bitmap/, lib/crc32c.c):
 * create/open round trips, several entries, sync, clean shutdown, crash
 * (free without close_clean) and the INCONSISTENT rule, resize (grow,
 * shrink, crash in the middle), and rejection of
 * corrupt files: every header byte, every header and directory field,
 * checksums, truncation at many points, unknown features.  Offsets used to
 * corrupt files come from bitmap-format.md, so these tests also hold the
 * code to the spec. */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <endian.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <signal.h>
#include <unistd.h>

#include <cmocka.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "cbt/bitmap-file.h"
#include "cbt/crc32c.h"

#define MiB (UINT64_C(1) << 20)
#define IMG_SIZE (100 * MiB + 4096 * 3)   /* not a granule multiple */
#define IMG_INODE UINT64_C(123456)

/* Layout with the default directory capacity (bitmap-format.md). */
#define PAGE 4096u
#define DIR0 8192u
#define DIR1 (8192u + 8192u)
#define META_END 24576u

struct fixture {
  char *dir;
  char *path;
};

static int
setup(void **state)
{
  struct fixture *fx = g_new0(struct fixture, 1);
  g_autofree char *tmpl = g_build_filename(g_get_tmp_dir(), "cbt-bmfile-XXXXXX", NULL);

  fx->dir = g_strdup(g_mkdtemp(tmpl));
  assert_non_null(fx->dir);
  fx->path = g_build_filename(fx->dir, "disk.bitmap", NULL);
  *state = fx;
  return 0;
}

static int
teardown(void **state)
{
  struct fixture *fx = *state;
  GDir *d = g_dir_open(fx->dir, 0, NULL);
  const char *name;

  while (d && (name = g_dir_read_name(d))) {
    g_autofree char *p = g_build_filename(fx->dir, name, NULL);

    g_unlink(p);
  }
  if (d)
    g_dir_close(d);
  g_rmdir(fx->dir);
  g_free(fx->dir);
  g_free(fx->path);
  g_free(fx);
  return 0;
}

/* --- byte helpers -------------------------------------------------------- */

static uint32_t
get32(const uint8_t *p)
{
  uint32_t v;

  memcpy(&v, p, 4);
  return le32toh(v);
}

static uint64_t
get64(const uint8_t *p)
{
  uint64_t v;

  memcpy(&v, p, 8);
  return le64toh(v);
}

static void
put32(uint8_t *p, uint32_t v)
{
  v = htole32(v);
  memcpy(p, &v, 4);
}

static void
put64(uint8_t *p, uint64_t v)
{
  v = htole64(v);
  memcpy(p, &v, 8);
}

static uint8_t *
slurp(const char *path, size_t *len)
{
  gchar *buf = NULL;
  gsize n = 0;

  assert_true(g_file_get_contents(path, &buf, &n, NULL));
  *len = n;
  return (uint8_t *)buf;
}

static void
spit(const char *path, const uint8_t *buf, size_t len)
{
  FILE *fp = fopen(path, "wb");

  assert_non_null(fp);
  assert_int_equal(fwrite(buf, 1, len, fp), len);
  assert_int_equal(fclose(fp), 0);
}

static void
fix_header_crc(uint8_t *buf, unsigned slot)
{
  uint8_t *h = buf + slot * PAGE;
  uint32_t hs = get32(h + 12);

  if (hs < 128 || hs > PAGE)
    hs = 128;
  put32(h + 16, 0);
  put32(h + 16, cbt_crc32c(0, h, hs));
}

static void
fix_dir_crc(uint8_t *buf, unsigned slot)
{
  uint8_t *h = buf + slot * PAGE;

  put32(h + 112, cbt_crc32c(0, buf + get64(h + 96), get32(h + 104) * 128));
  fix_header_crc(buf, slot);
}

static unsigned
newest_slot(const uint8_t *buf)
{
  return get64(buf + PAGE + 24) > get64(buf + 24);
}

/* The two-level data checksum, independently of the library. */
static uint32_t
data_crc_of(const uint8_t *data, uint64_t len)
{
  uint32_t crc = 0;

  for (uint64_t off = 0; off < len; off += PAGE) {
    uint8_t le[4];

    put32(le, cbt_crc32c(0, data + off, MIN(PAGE, len - off)));
    crc = cbt_crc32c(crc, le, 4);
  }
  return crc;
}

static void
expect_open_fails(const char *path, int err, const char *what)
{
  g_autofree char *why = NULL;
  cbt_bmfile *f = NULL;
  int r = cbt_bmfile_open(path, false, &f, &why);

  if (r != err)
    print_error("%s: open returned %d (%s), want %d\n", what, r,
                why ? why : "-", err);
  assert_int_equal(r, err);
  assert_null(f);
  assert_non_null(why);
  assert_true(strlen(why) > 0);
  if (g_getenv("CBT_TEST_VERBOSE"))
    print_message("%-28s -> %d: %s\n", what, r, why);
}

static cbt_bmfile *
open_ok(const char *path, bool writable)
{
  g_autofree char *why = NULL;
  cbt_bmfile *f = NULL;
  int r = cbt_bmfile_open(path, writable, &f, &why);

  if (r != 0)
    print_error("open %s: %d %s\n", path, r, why ? why : "-");
  assert_int_equal(r, 0);
  assert_null(why);
  return f;
}

/* --- basics -------------------------------------------------------------- */

static void
test_crc32c(void **state)
{
  uint8_t big[1000];

  (void)state;
  assert_int_equal(cbt_crc32c(0, "123456789", 9), 0xE3069283u);
  assert_int_equal(cbt_crc32c(0, "", 0), 0);
  for (size_t i = 0; i < sizeof big; i++)
    big[i] = (uint8_t)(i * 31 + 7);
  /* Piecewise equals whole, at every split (exercises the 8-byte path). */
  for (size_t split = 0; split <= 20; split++)
    assert_int_equal(cbt_crc32c(cbt_crc32c(0, big, split), big + split,
                                sizeof big - split),
                     cbt_crc32c(0, big, sizeof big));
}

static void
test_create_open(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  cbt_bmfile *f = NULL;
  uint8_t uuid[16], uuid2[16], zero[16] = { 0 };
  struct cbt_bitmap *bm;
  struct stat st;

  assert_int_equal(cbt_bmfile_create(fx->path, IMG_SIZE, IMG_INODE, 0,
                                     "active", &f, &why), 0);
  assert_null(why);
  assert_true(cbt_bmfile_clean(f));
  assert_true(cbt_bmfile_found_clean(f));
  assert_int_equal(cbt_bmfile_entry_count(f), 1);
  assert_string_equal(cbt_bmfile_entry_name(f, 0), "active");
  assert_int_equal(cbt_bmfile_entry_flags(f, 0), CBT_BMF_ACTIVE);
  assert_int_equal(cbt_bmfile_image_size(f), IMG_SIZE);
  assert_int_equal(cbt_bmfile_image_inode(f), IMG_INODE);
  cbt_bmfile_uuid(f, uuid);
  assert_memory_not_equal(uuid, zero, 16);
  assert_int_equal(uuid[6] >> 4, 4);
  bm = cbt_bmfile_entry_bitmap(f, 0);
  assert_int_equal(bm->granularity, 65536);
  assert_int_equal(bm->size, IMG_SIZE);
  assert_null(cbt_bmfile_entry_bitmap(f, 1));
  assert_null(cbt_bmfile_entry_name(f, 1));
  cbt_bmfile_free(f);

  /* Data areas are page-aligned and the file holds what the spec says. */
  assert_int_equal(stat(fx->path, &st), 0);
  assert_int_equal(st.st_mode & 0777, 0600);
  {
    size_t len;
    g_autofree uint8_t *buf = slurp(fx->path, &len);

    assert_memory_equal(buf, "CBT-BMAP", 8);
    assert_memory_equal(buf + PAGE, "CBT-BMAP", 8);
    assert_int_equal(get32(buf + 8), 1);
    assert_int_equal(get32(buf + 56), 1);                 /* CLEAN */
    assert_int_equal(get64(buf + 64), IMG_SIZE);
    assert_int_equal(get64(buf + 72), IMG_INODE);
    assert_int_equal(get64(buf + 96), DIR0);
    assert_int_equal(get64(buf + PAGE + 96), DIR1);
    assert_string_equal((const char *)buf + DIR0, "active");
    assert_int_equal(get64(buf + DIR0 + 72), META_END);
    assert_int_equal(get64(buf + DIR0 + 80), 1608 / 64 * 8 + 8);
    assert_int_equal(len, META_END + PAGE);
  }

  /* Reopen: same identity. */
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_null(cbt_bmfile_recovery_note(f));
  cbt_bmfile_uuid(f, uuid2);
  assert_memory_equal(uuid, uuid2, 16);
  assert_int_equal(cbt_bmfile_find(f, "active"), 0);
  assert_int_equal(cbt_bmfile_find(f, "nope"), -ENOENT);
  assert_true(cbt_bmfile_entry_data_ok(f, 0));

  assert_int_equal(cbt_bmfile_check_image(f, IMG_SIZE, IMG_INODE, &why), 0);
  assert_null(why);
  assert_int_equal(cbt_bmfile_check_image(f, IMG_SIZE + 1, IMG_INODE, &why),
                   -ESTALE);
  assert_non_null(strstr(why, "size"));
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_check_image(f, IMG_SIZE, 99, &why), -ESTALE);
  assert_non_null(strstr(why, "inode"));
  g_clear_pointer(&why, g_free);

  /* Read-only handles refuse to write. */
  assert_int_equal(cbt_bmfile_sync(f, &why), -EROFS);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), -EROFS);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_add(f, "x", 0, 0, &why), -EROFS);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), -EROFS);
  g_clear_pointer(&why, g_free);

  /* O_EXCL: an existing file is never overwritten. */
  assert_int_equal(cbt_bmfile_create(fx->path, MiB, 1, 0, "a", &f, &why),
                   -EEXIST);
  assert_null(f);
  assert_non_null(why);
  g_clear_pointer(&why, g_free);
  f = open_ok(fx->path, false);
  assert_int_equal(cbt_bmfile_image_size(f), IMG_SIZE);
  cbt_bmfile_free(f);

  expect_open_fails("/nonexistent/x.bitmap", -ENOENT, "missing");
}

static void
test_create_errors(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  cbt_bmfile *f = NULL;

  assert_int_equal(cbt_bmfile_create(fx->path, MiB, 1, 1000, "a", &f, &why),
                   -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_create(fx->path, MiB, 1, 256, "a", &f, &why),
                   -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_create(fx->path, 0, 1, 0, "a", &f, &why),
                   -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_create(fx->path, MiB, 1, 0, "", &f, &why),
                   -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_create(fx->path, MiB, 1, 0, "tab\there", &f,
                                     &why), -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_false(g_file_test(fx->path, G_FILE_TEST_EXISTS));

  /* 64 TiB at 512 bytes would need 16 GiB; at 64 KiB, 128 MiB (sparse). */
  assert_int_equal(cbt_bmfile_create(fx->path, UINT64_C(64) << 40, 1, 0,
                                     "big", &f, &why), 0);
  cbt_bitmap_set_range(cbt_bmfile_entry_bitmap(f, 0), (UINT64_C(64) << 40) - 1, 1);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  f = open_ok(fx->path, false);
  assert_true(cbt_bitmap_test(cbt_bmfile_entry_bitmap(f, 0),
                              (UINT64_C(64) << 40) - 1));
  assert_int_equal(cbt_bitmap_dirty_bytes(cbt_bmfile_entry_bitmap(f, 0)), 65536);
  cbt_bmfile_free(f);
}

static void
set_pattern(struct cbt_bitmap *bm, unsigned seed)
{
  for (uint64_t off = (uint64_t)seed * 4096; off < bm->size;
       off += bm->granularity * (7 + seed))
    cbt_bitmap_set_range(bm, off, 1);
}

static void
assert_same_bits(const struct cbt_bitmap *a, const struct cbt_bitmap *b)
{
  assert_int_equal(a->size, b->size);
  assert_int_equal(a->granularity, b->granularity);
  assert_memory_equal(a->words, b->words, cbt_bitmap_nwords(a) * 8);
}

static void
test_entries(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  struct cbt_bitmap want[3];
  cbt_bmfile *f = NULL;
  int idx;

  assert_int_equal(cbt_bmfile_create(fx->path, IMG_SIZE, IMG_INODE, 65536,
                                     "active", &f, &why), 0);
  idx = cbt_bmfile_add(f, "ckpt-1", CBT_BMF_FROZEN, 4096, &why);
  assert_int_equal(idx, 1);
  idx = cbt_bmfile_add(f, "spare", 0, 512, &why);
  assert_int_equal(idx, 2);
  assert_int_equal(cbt_bmfile_add(f, "ckpt-1", 0, 0, &why), -EEXIST);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_add(f, "bad", CBT_BMF_ACTIVE | CBT_BMF_FROZEN, 0,
                                  &why), -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_add(f, "bad", 1u << 7, 0, &why), -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_add(f, "bad", 0, 3000, &why), -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_add(f, "0123456789012345678901234567890123456789"
                                  "012345678901234567890123", 0, 0, &why), -EINVAL);
  g_clear_pointer(&why, g_free);

  for (unsigned i = 0; i < 3; i++) {
    struct cbt_bitmap *bm = cbt_bmfile_entry_bitmap(f, i);

    set_pattern(bm, i);
    assert_int_equal(cbt_bitmap_init(&want[i], bm->size, bm->granularity), 0);
    assert_int_equal(cbt_bitmap_merge(&want[i], bm), 0);
  }
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  assert_null(why);

  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_entry_count(f), 3);
  assert_string_equal(cbt_bmfile_entry_name(f, 1), "ckpt-1");
  assert_int_equal(cbt_bmfile_entry_flags(f, 1), CBT_BMF_FROZEN);
  assert_int_equal(cbt_bmfile_entry_flags(f, 2), 0);
  for (unsigned i = 0; i < 3; i++)
    assert_same_bits(cbt_bmfile_entry_bitmap(f, i), &want[i]);

  /* Remove the middle one, then reuse its area (first fit) for a new one. */
  assert_int_equal(cbt_bmfile_remove(f, "ckpt-1", &why), 0);
  assert_int_equal(cbt_bmfile_remove(f, "ckpt-1", &why), -ENOENT);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_entry_count(f), 2);
  assert_string_equal(cbt_bmfile_entry_name(f, 1), "spare");
  idx = cbt_bmfile_add(f, "ckpt-2", CBT_BMF_FROZEN, 65536, &why);
  assert_int_equal(idx, 2);
  assert_int_equal(cbt_bitmap_dirty_bytes(cbt_bmfile_entry_bitmap(f, 2)), 0);
  assert_int_equal(cbt_bmfile_set_flags(f, 2, CBT_BMF_FROZEN | CBT_BMF_INCONSISTENT,
                                        &why), 0);
  assert_int_equal(cbt_bmfile_set_flags(f, 2, 1u << 9, &why), -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_set_flags(f, 7, 0, &why), -EINVAL);
  g_clear_pointer(&why, g_free);
  cbt_bmfile_free(f);   /* everything above is already durable */

  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));   /* only metadata changed */
  assert_int_equal(cbt_bmfile_entry_count(f), 3);
  assert_string_equal(cbt_bmfile_entry_name(f, 2), "ckpt-2");
  assert_int_equal(cbt_bmfile_entry_flags(f, 2), CBT_BMF_FROZEN | CBT_BMF_INCONSISTENT);
  assert_int_equal(cbt_bitmap_dirty_bytes(cbt_bmfile_entry_bitmap(f, 2)), 0);
  assert_same_bits(cbt_bmfile_entry_bitmap(f, 0), &want[0]);
  assert_same_bits(cbt_bmfile_entry_bitmap(f, 1), &want[2]);
  cbt_bmfile_free(f);

  /* Fill the directory. */
  f = open_ok(fx->path, true);
  for (unsigned i = 3; i < CBT_BMF_DIR_CAPACITY; i++) {
    g_autofree char *name = g_strdup_printf("b%u", i);

    assert_int_equal(cbt_bmfile_add(f, name, 0, 1u << 20, &why), (int)i);
  }
  assert_int_equal(cbt_bmfile_add(f, "one-too-many", 0, 0, &why), -ENOSPC);
  g_clear_pointer(&why, g_free);
  cbt_bmfile_free(f);
  f = open_ok(fx->path, false);
  assert_int_equal(cbt_bmfile_entry_count(f), CBT_BMF_DIR_CAPACITY);
  cbt_bmfile_free(f);

  for (unsigned i = 0; i < 3; i++)
    cbt_bitmap_destroy(&want[i]);
}

static void
test_sync_crash_inconsistent(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  cbt_bmfile *f = NULL;
  struct cbt_bitmap *bm;
  uint64_t gen;

  assert_int_equal(cbt_bmfile_create(fx->path, IMG_SIZE, IMG_INODE, 65536,
                                     "active", &f, &why), 0);
  assert_int_equal(cbt_bmfile_add(f, "ckpt", CBT_BMF_FROZEN, 0, &why), 1);
  cbt_bmfile_free(f);

  /* Daemon start: mark dirty, on a clean file no INCONSISTENT. */
  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  assert_false(cbt_bmfile_clean(f));
  assert_int_equal(cbt_bmfile_entry_flags(f, 0), CBT_BMF_ACTIVE);
  gen = cbt_bmfile_generation(f);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);     /* no-op */
  assert_int_equal(cbt_bmfile_sync(f, &why), 0);           /* nothing to do */
  assert_int_equal(cbt_bmfile_generation(f), gen);

  bm = cbt_bmfile_entry_bitmap(f, 0);
  cbt_bitmap_set_range(bm, 0, 1);
  cbt_bitmap_set_range(bm, IMG_SIZE - 1, 1);
  assert_int_equal(cbt_bmfile_sync(f, &why), 0);
  assert_int_equal(cbt_bmfile_generation(f), gen + 1);
  cbt_bitmap_set_range(bm, 50 * MiB, 1);
  assert_int_equal(cbt_bmfile_sync(f, &why), 0);
  cbt_bitmap_set_range(bm, 60 * MiB, 1);                   /* never synced */
  cbt_bmfile_free(f);                                      /* crash */

  /* Reader sees "not clean"; the synced bits are there with good CRCs. */
  f = open_ok(fx->path, false);
  assert_false(cbt_bmfile_found_clean(f));
  assert_false(cbt_bmfile_clean(f));
  assert_true(cbt_bmfile_entry_data_ok(f, 0));
  assert_int_equal(cbt_bmfile_entry_flags(f, 0), CBT_BMF_ACTIVE);
  bm = cbt_bmfile_entry_bitmap(f, 0);
  assert_true(cbt_bitmap_test(bm, 0));
  assert_true(cbt_bitmap_test(bm, IMG_SIZE - 1));
  assert_true(cbt_bitmap_test(bm, 50 * MiB));
  assert_false(cbt_bitmap_test(bm, 60 * MiB));
  cbt_bmfile_free(f);

  /* Daemon restarts after the crash: every entry becomes INCONSISTENT. */
  f = open_ok(fx->path, true);
  assert_true(cbt_bmfile_entry_flags(f, 0) & CBT_BMF_INCONSISTENT);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  cbt_bmfile_free(f);                                      /* crash again */
  f = open_ok(fx->path, false);
  assert_int_equal(cbt_bmfile_entry_flags(f, 0), CBT_BMF_ACTIVE | CBT_BMF_INCONSISTENT);
  assert_int_equal(cbt_bmfile_entry_flags(f, 1), CBT_BMF_FROZEN | CBT_BMF_INCONSISTENT);
  cbt_bmfile_free(f);

  /* A clean shutdown does not make it trusted again ... */
  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_true(cbt_bmfile_entry_flags(f, 0) & CBT_BMF_INCONSISTENT);
  cbt_bmfile_free(f);

  /* ... only a reset does. */
  f = open_ok(fx->path, true);
  assert_true(cbt_bmfile_found_clean(f));
  assert_int_equal(cbt_bmfile_reset_entry(f, 0, &why), 0);
  assert_int_equal(cbt_bmfile_reset_entry(f, 9, &why), -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_entry_flags(f, 0), CBT_BMF_ACTIVE);
  assert_false(cbt_bmfile_clean(f));       /* bits changed on disk */
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_int_equal(cbt_bmfile_entry_flags(f, 0), CBT_BMF_ACTIVE);
  assert_int_equal(cbt_bmfile_entry_flags(f, 1), CBT_BMF_FROZEN | CBT_BMF_INCONSISTENT);
  assert_int_equal(cbt_bitmap_dirty_bytes(cbt_bmfile_entry_bitmap(f, 0)), 0);
  cbt_bmfile_free(f);

  /* A writer that syncs a crashed file without mark_dirty and shuts down
   * cleanly still leaves it INCONSISTENT (rule 1). */
  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  cbt_bmfile_free(f);
  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_true(cbt_bmfile_entry_flags(f, 0) & CBT_BMF_INCONSISTENT);
  cbt_bmfile_free(f);
}


/* Crash-safe mode (rules 6-8): the mode is in the "not clean" generation,
 * sync_data makes bits durable without a metadata update (the data CRC
 * goes stale), and a file found not clean in that mode is trusted by
 * readers and writers (no INCONSISTENT); a lazy writer clears the mode
 * again, after which a crash makes it untrusted as before. */
static void
test_crash_safe(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  const char *reason = NULL;
  cbt_bmfile *f = NULL;
  struct cbt_bitmap *bm;
  uint64_t gen;

  assert_int_equal(cbt_bmfile_create(fx->path, IMG_SIZE, IMG_INODE, 65536,
                                     "active", &f, &why), 0);
  cbt_bmfile_set_crash_safe(f, true);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  gen = cbt_bmfile_generation(f);
  bm = cbt_bmfile_entry_bitmap(f, 0);
  cbt_bitmap_set_range(bm, 5 * MiB, 1);
  assert_int_equal(cbt_bmfile_sync_data(f, &why), 0);
  assert_int_equal(cbt_bmfile_generation(f), gen);      /* data only */
  assert_int_equal(cbt_bmfile_sync_data(f, &why), 0);   /* nothing to do */
  cbt_bitmap_set_range(bm, 7 * MiB, 1);                 /* never synced */
  cbt_bmfile_free(f);                                   /* crash */

  f = open_ok(fx->path, false);
  assert_false(cbt_bmfile_found_clean(f));
  assert_true(cbt_bmfile_found_crash_safe(f));
  assert_false(cbt_bmfile_entry_data_ok(f, 0));          /* stale CRC */
  assert_true(cbt_bmfile_entry_trusted(f, 0, &reason));
  assert_non_null(strstr(reason, "crash-safe"));
  bm = cbt_bmfile_entry_bitmap(f, 0);
  assert_true(cbt_bitmap_test(bm, 5 * MiB));
  assert_false(cbt_bitmap_test(bm, 7 * MiB));
  cbt_bmfile_free(f);

  /* A writer trusts it too and does not taint it. */
  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_entry_flags(f, 0), CBT_BMF_ACTIVE);
  assert_true(cbt_bmfile_entry_trusted(f, 0, NULL));
  /* ... but one in lazy mode clears the mode with its first update, and
   * after its crash the file is untrusted. */
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  cbt_bmfile_free(f);
  f = open_ok(fx->path, false);
  assert_false(cbt_bmfile_found_crash_safe(f));
  assert_false(cbt_bmfile_entry_trusted(f, 0, &reason));
  cbt_bmfile_free(f);
  f = open_ok(fx->path, true);
  assert_true(cbt_bmfile_entry_flags(f, 0) & CBT_BMF_INCONSISTENT);
  assert_false(cbt_bmfile_entry_trusted(f, 0, NULL));
  cbt_bmfile_free(f);
}

/* Marking from another thread while the file is synced repeatedly; the
 * final clean file must verify (data CRCs match what was written). */
struct marker_arg {
  struct cbt_bitmap *bm;
  int stop;
  unsigned long rounds;
};

static void *
marker(void *opaque)
{
  struct marker_arg *a = opaque;
  uint64_t x = 1;

  while (!__atomic_load_n(&a->stop, __ATOMIC_ACQUIRE)) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    cbt_bitmap_set_range(a->bm, (x >> 11) % a->bm->size, 70000);
    __atomic_fetch_add(&a->rounds, 1, __ATOMIC_RELAXED);
  }
  return NULL;
}

static void
test_sync_concurrent(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  struct cbt_bitmap copy;
  struct marker_arg a = { NULL, 0, 0 };
  cbt_bmfile *f = NULL;
  pthread_t t;

  assert_int_equal(cbt_bmfile_create(fx->path, 4096 * MiB, 1, 4096,
                                     "active", &f, &why), 0);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  a.bm = cbt_bmfile_entry_bitmap(f, 0);
  assert_int_equal(pthread_create(&t, NULL, marker, &a), 0);
  for (int i = 0; i < 30 || __atomic_load_n(&a.rounds, __ATOMIC_RELAXED) < 20000; i++) {
    assert_int_equal(cbt_bmfile_sync(f, &why), 0);
    g_usleep(1000);
  }
  __atomic_store_n(&a.stop, 1, __ATOMIC_RELEASE);
  pthread_join(t, NULL);
  assert_int_equal(cbt_bitmap_init(&copy, a.bm->size, a.bm->granularity), 0);
  assert_int_equal(cbt_bitmap_merge(&copy, a.bm), 0);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  assert_null(why);

  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_true(cbt_bitmap_dirty_bytes(&copy) > 0);
  assert_same_bits(cbt_bmfile_entry_bitmap(f, 0), &copy);
  cbt_bmfile_free(f);
  cbt_bitmap_destroy(&copy);
}

/* --- corruption ---------------------------------------------------------- */

/* A clean file with two entries and some bits; returns its bytes. */
static uint8_t *
make_base(const char *path, size_t *len)
{
  g_autofree char *why = NULL;
  cbt_bmfile *f = NULL;

  assert_int_equal(cbt_bmfile_create(path, IMG_SIZE, IMG_INODE, 65536,
                                     "active", &f, &why), 0);
  assert_int_equal(cbt_bmfile_add(f, "ckpt", CBT_BMF_FROZEN, 65536, &why), 1);
  set_pattern(cbt_bmfile_entry_bitmap(f, 0), 1);
  set_pattern(cbt_bmfile_entry_bitmap(f, 1), 2);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  return slurp(path, len);
}

static void
test_corrupt_header_bytes(void **state)
{
  struct fixture *fx = *state;
  size_t len;
  g_autofree uint8_t *base = make_base(fx->path, &len);
  g_autofree uint8_t *buf = g_malloc(len);

  /* Every byte of the header, flipped in both copies. */
  for (unsigned i = 0; i < 128; i++) {
    g_autofree char *what = g_strdup_printf("header byte %u", i);

    memcpy(buf, base, len);
    buf[i] ^= 0x40;
    buf[PAGE + i] ^= 0x40;
    spit(fx->path, buf, len);
    expect_open_fails(fx->path, i < 8 ? -EINVAL : -EBADMSG, what);
  }
  /* Padding after the header (not checksummed, must be zero). */
  for (unsigned i = 128; i < PAGE; i += 397) {
    g_autofree char *what = g_strdup_printf("header padding byte %u", i);

    memcpy(buf, base, len);
    buf[i] = 1;
    buf[PAGE + i] = 1;
    spit(fx->path, buf, len);
    expect_open_fails(fx->path, -EBADMSG, what);
  }
  /* Not a bitmap file at all. */
  memset(buf, 'x', len);
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EINVAL, "text file");
}

/* One field change in both header copies, checksum recomputed. */
struct hcase {
  const char *what;
  unsigned off, width;
  uint64_t value;
  int err;
};

static void
test_corrupt_header_fields(void **state)
{
  struct fixture *fx = *state;
  size_t len;
  g_autofree uint8_t *base = make_base(fx->path, &len);
  g_autofree uint8_t *buf = g_malloc(len);
  static const struct hcase cases[] = {
    { "version 2",             8, 4, 2, -ENOTSUP },
    { "version 0",             8, 4, 0, -ENOTSUP },
    { "incompatible bit 0",   32, 8, 1, -ENOTSUP },
    { "incompatible bit 63",  32, 8, UINT64_C(1) << 63, -ENOTSUP },
    { "state reserved bit",   56, 4, 3, -EBADMSG },
    { "nb_entries 65",        60, 4, 65, -EBADMSG },
    { "nb_entries 1",         60, 4, 1, -EBADMSG },
    { "nb_entries 3",         60, 4, 3, -EBADMSG },
    { "image_size 0",         64, 8, 0, -EBADMSG },
    { "image_size huge",      64, 8, UINT64_C(1) << 61, -EBADMSG },
    { "image_size other",     64, 8, 2 * IMG_SIZE, -EBADMSG },
    { "uuid zero lo",         80, 8, 0, 0 },          /* half zero is fine */
    { "dir_offset",           96, 8, 12288, -EBADMSG },
    { "dir_capacity 0",      104, 4, 0, -EBADMSG },
    { "dir_capacity 5000",   104, 4, 5000, -EBADMSG },
    { "dir_capacity 65",     104, 4, 65, -EBADMSG },
    { "dir_entry_size 64",   108, 4, 64, -EBADMSG },
    { "dir_crc",             112, 4, 0x12345678, -EBADMSG },
    { "reserved 116",        116, 4, 1, -EBADMSG },
    { "reserved 120",        120, 8, 1, -EBADMSG },
    { "header_size 120",      12, 4, 120, -EBADMSG },
    { "header_size 130",      12, 4, 130, -EBADMSG },
    { "header_size 8192",     12, 4, 8192, -EBADMSG },
    { "header_size 136",      12, 4, 136, 0 },        /* extension, zero */
    { "compatible unknown",   40, 8, UINT64_C(1) << 40, 0 },
    { "compatible crash-safe", 40, 8, 1, 0 },
    { "autoclear unknown",    48, 8, 0xff, 0 },
  };

  for (size_t c = 0; c < G_N_ELEMENTS(cases); c++) {
    memcpy(buf, base, len);
    for (unsigned s = 0; s < 2; s++) {
      uint8_t *h = buf + s * PAGE;

      if (cases[c].width == 4)
        put32(h + cases[c].off, (uint32_t)cases[c].value);
      else
        put64(h + cases[c].off, cases[c].value);
      fix_header_crc(buf, s);
    }
    spit(fx->path, buf, len);
    if (cases[c].err) {
      expect_open_fails(fx->path, cases[c].err, cases[c].what);
    } else {
      cbt_bmfile *f = open_ok(fx->path, false);

      assert_true(cbt_bmfile_found_clean(f));
      cbt_bmfile_free(f);
    }
  }

  /* uuid all zeros. */
  memcpy(buf, base, len);
  for (unsigned s = 0; s < 2; s++) {
    memset(buf + s * PAGE + 80, 0, 16);
    fix_header_crc(buf, s);
  }
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EBADMSG, "uuid zero");

  /* slot field / generation parity wrong in both copies. */
  memcpy(buf, base, len);
  for (unsigned s = 0; s < 2; s++) {
    put32(buf + s * PAGE + 20, !s);
    fix_header_crc(buf, s);
  }
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EBADMSG, "slot swapped");
  memcpy(buf, base, len);
  for (unsigned s = 0; s < 2; s++) {
    put64(buf + s * PAGE + 24, get64(buf + s * PAGE + 24) + 1);
    fix_header_crc(buf, s);
  }
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EBADMSG, "generation parity");

  /* Unknown incompatible feature in the newest copy only: no fallback. */
  memcpy(buf, base, len);
  put64(buf + newest_slot(buf) * PAGE + 32, 4);
  fix_header_crc(buf, newest_slot(buf));
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -ENOTSUP, "incompat in newest copy");
}

static void
test_header_extension_preserved(void **state)
{
  struct fixture *fx = *state;
  size_t len;
  g_autofree uint8_t *base = make_base(fx->path, &len);
  g_autofree uint8_t *after = NULL;
  g_autofree char *why = NULL;
  cbt_bmfile *f;
  unsigned n;

  for (unsigned s = 0; s < 2; s++) {
    put32(base + s * PAGE + 12, 144);
    memcpy(base + s * PAGE + 128, "extension-bytes!", 16);
    fix_header_crc(base, s);
  }
  spit(fx->path, base, len);
  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  after = slurp(fx->path, &len);
  n = newest_slot(after);
  assert_int_equal(get32(after + n * PAGE + 12), 144);
  assert_memory_equal(after + n * PAGE + 128, "extension-bytes!", 16);
  f = open_ok(fx->path, false);
  cbt_bmfile_free(f);
}

/* The per-entry checkpoint id survives a clean close and a crash. */
static void
test_checkpoint_id(void **state)
{
  struct fixture *fx = *state;
  size_t len;
  g_autofree char *why = NULL;
  cbt_bmfile *f;
  int idx;

  g_free(make_base(fx->path, &len));
  f = open_ok(fx->path, true);
  idx = cbt_bmfile_add(f, "frozen", CBT_BMF_FROZEN, 0, &why);

  assert_true(idx > 0);
  assert_int_equal(cbt_bmfile_entry_checkpoint(f, 0), 0);
  assert_int_equal(cbt_bmfile_set_checkpoint(f, 0, UINT64_C(0x1122334455667788), &why), 0);
  assert_int_equal(cbt_bmfile_set_checkpoint(f, (unsigned)idx, 42, &why), 0);
  assert_int_equal(cbt_bmfile_set_checkpoint(f, 99, 1, &why), -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);

  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_entry_checkpoint(f, 0) == UINT64_C(0x1122334455667788));
  assert_int_equal(cbt_bmfile_entry_checkpoint(f, (unsigned)cbt_bmfile_find(f, "frozen")), 42);
  assert_int_equal(cbt_bmfile_set_checkpoint(f, 0, 7, &why), -EROFS);
  cbt_bmfile_free(f);

  /* Written by metadata updates alone: a crash after it keeps the id. */
  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_set_checkpoint(f, 0, 9, NULL), 0);
  cbt_bmfile_free(f);
  f = open_ok(fx->path, false);
  assert_int_equal(cbt_bmfile_entry_checkpoint(f, 0), 9);
  cbt_bmfile_free(f);
}

struct ecase {
  const char *what;
  unsigned entry, off, width;
  uint64_t value;
};

static void
test_corrupt_directory(void **state)
{
  struct fixture *fx = *state;
  size_t len;
  g_autofree uint8_t *base = make_base(fx->path, &len);
  g_autofree uint8_t *buf = g_malloc(len);
  uint64_t off0 = get64(base + DIR0 + 72);
  static const struct ecase cases[] = {
    { "name empty",            0, 0, 1, 0 },
    { "name non-printable",    0, 1, 1, 0x07 },
    { "name byte 0x7f",        0, 1, 1, 0x7f },
    { "bytes after name",      0, 40, 1, 'x' },
    { "flags unknown bit",     0, 64, 4, 1u << 3 },
    { "flags ACTIVE|FROZEN",   0, 64, 4, 3 },
    { "granularity 1000",      0, 68, 4, 1000 },
    { "granularity 256",       0, 68, 4, 256 },
    { "granularity 0",         0, 68, 4, 0 },
    { "granularity 131072",    0, 68, 4, 131072 },   /* length mismatch */
    { "data_offset unaligned", 0, 72, 8, META_END + 512 },
    { "data_offset in meta",   0, 72, 8, DIR1 },
    { "data_offset past EOF",  1, 72, 8, UINT64_C(1) << 40 },
    { "data_offset overflow",  1, 72, 8, UINT64_MAX & ~UINT64_C(4095) },
    { "data_length",           0, 80, 8, 4096 },
    { "reserved 92",           0, 92, 4, 1 },
    { "reserved 112",          1, 112, 8, 1 },
    { "reserved 120",          1, 120, 8, 1 },
    { "unused slot",           2, 0, 1, 'z' },
    { "unused slot tail",     63, 127, 1, 1 },
  };

  for (size_t c = 0; c < G_N_ELEMENTS(cases); c++) {
    memcpy(buf, base, len);
    for (unsigned s = 0; s < 2; s++) {
      uint8_t *e = buf + (s ? DIR1 : DIR0) + cases[c].entry * 128 + cases[c].off;

      if (cases[c].width == 1)
        *e = (uint8_t)cases[c].value;
      else if (cases[c].width == 4)
        put32(e, (uint32_t)cases[c].value);
      else
        put64(e, cases[c].value);
      fix_dir_crc(buf, s);
    }
    spit(fx->path, buf, len);
    expect_open_fails(fx->path, -EBADMSG, cases[c].what);
  }

  /* Name without terminator; duplicate names; overlapping areas. */
  memcpy(buf, base, len);
  for (unsigned s = 0; s < 2; s++) {
    memset(buf + (s ? DIR1 : DIR0), 'n', 64);
    fix_dir_crc(buf, s);
  }
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EBADMSG, "name unterminated");

  memcpy(buf, base, len);
  for (unsigned s = 0; s < 2; s++) {
    memcpy(buf + (s ? DIR1 : DIR0) + 128, "active\0", 7);
    fix_dir_crc(buf, s);
  }
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EBADMSG, "duplicate names");

  memcpy(buf, base, len);
  for (unsigned s = 0; s < 2; s++) {
    put64(buf + (s ? DIR1 : DIR0) + 128 + 72, off0);
    fix_dir_crc(buf, s);
  }
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EBADMSG, "overlapping areas");

  /* Directory checksum mismatch in both copies. */
  memcpy(buf, base, len);
  buf[DIR0 + 200] ^= 1;
  buf[DIR1 + 200] ^= 1;
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EBADMSG, "directory checksum");
}

static void
test_corrupt_data(void **state)
{
  struct fixture *fx = *state;
  size_t len;
  g_autofree uint8_t *base = make_base(fx->path, &len);
  g_autofree uint8_t *buf = g_malloc(len);
  uint64_t off0 = get64(base + DIR0 + 72), len0 = get64(base + DIR0 + 80);
  g_autofree char *why = NULL;
  cbt_bmfile *f;

  /* Clean file: a data checksum mismatch is fatal. */
  memcpy(buf, base, len);
  buf[off0 + 3] ^= 0x10;
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EBADMSG, "data checksum");

  /* Padding bits set, checksum recomputed: still rejected when clean. */
  memcpy(buf, base, len);
  buf[off0 + len0 - 1] |= 0x80;
  for (unsigned s = 0; s < 2; s++) {
    put32(buf + (s ? DIR1 : DIR0) + 88, data_crc_of(buf + off0, len0));
    fix_dir_crc(buf, s);
  }
  spit(fx->path, buf, len);
  expect_open_fails(fx->path, -EBADMSG, "padding bits");

  /* Not clean: the same damage is expected after a crash, and tolerated. */
  memcpy(buf, base, len);
  buf[off0 + 3] ^= 0x10;
  buf[off0 + len0 - 1] |= 0x80;
  for (unsigned s = 0; s < 2; s++) {
    put32(buf + s * PAGE + 56, 0);
    fix_header_crc(buf, s);
  }
  spit(fx->path, buf, len);
  f = open_ok(fx->path, true);
  assert_false(cbt_bmfile_found_clean(f));
  assert_false(cbt_bmfile_entry_data_ok(f, 0));
  assert_true(cbt_bmfile_entry_data_ok(f, 1));
  assert_true(cbt_bmfile_entry_flags(f, 0) & CBT_BMF_INCONSISTENT);
  /* The writer repairs the checksums with its first write. */
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_true(cbt_bmfile_entry_data_ok(f, 0));
  cbt_bmfile_free(f);
}

static void
test_truncated(void **state)
{
  struct fixture *fx = *state;
  size_t len;
  g_autofree uint8_t *base = make_base(fx->path, &len);
  /* Entry 1's data ends last; past it there is only area padding. */
  size_t end1 = get64(base + DIR0 + 128 + 72) + get64(base + DIR0 + 128 + 80);
  const size_t cuts[] = { 0, 1, 7, 8, 100, 127, 128, 4095, 4096, 5000, 8191,
                          8192, 10000, DIR1, DIR1 + 100, META_END - 1,
                          META_END, META_END + 1, META_END + 207,
                          META_END + 4096, end1 - 200, end1 - 1 };
  cbt_bmfile *f;

  assert_true(len >= end1);
  for (size_t i = 0; i < G_N_ELEMENTS(cuts); i++) {
    g_autofree char *what = g_strdup_printf("truncated at %zu", cuts[i]);

    spit(fx->path, base, cuts[i]);
    expect_open_fails(fx->path, -EBADMSG, what);
  }
  /* Cutting only the padding after the last area is harmless. */
  spit(fx->path, base, end1);
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  cbt_bmfile_free(f);
}

/* One damaged copy: the other is used and the file is treated as not
 * clean (a torn write cannot be told from corruption). */
static void
test_one_copy_damaged(void **state)
{
  struct fixture *fx = *state;
  size_t len;
  g_autofree uint8_t *base = make_base(fx->path, &len);
  g_autofree uint8_t *buf = g_malloc(len);
  unsigned n = newest_slot(base);
  cbt_bmfile *f;

  for (int kind = 0; kind < 4; kind++) {
    memcpy(buf, base, len);
    switch (kind) {
    case 0: buf[n * PAGE + 60] ^= 1; break;            /* newest header */
    case 1: buf[!n * PAGE + 60] ^= 1; break;           /* older header */
    case 2: buf[(n ? DIR1 : DIR0) + 5] ^= 1; break;    /* newest directory */
    case 3: memset(buf + n * PAGE, 0, PAGE); break;    /* header never written */
    }
    spit(fx->path, buf, len);
    f = open_ok(fx->path, false);
    assert_false(cbt_bmfile_found_clean(f));
    assert_non_null(cbt_bmfile_recovery_note(f));
    assert_int_equal(cbt_bmfile_entry_count(f), 2);
    assert_true(cbt_bitmap_dirty_bytes(cbt_bmfile_entry_bitmap(f, 0)) > 0);
    cbt_bmfile_free(f);
  }

  /* A writer repairs it: the damaged copy is rewritten, entries are
   * INCONSISTENT, and both copies are intact again afterwards. */
  memcpy(buf, base, len);
  buf[n * PAGE + 60] ^= 1;
  spit(fx->path, buf, len);
  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_mark_dirty(f, NULL), 0);
  assert_int_equal(cbt_bmfile_close_clean(f, NULL), 0);
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_null(cbt_bmfile_recovery_note(f));
  assert_true(cbt_bmfile_entry_flags(f, 0) & CBT_BMF_INCONSISTENT);
  cbt_bmfile_free(f);
}

/* --- resize -------------------------------------------------------------- */

/* A private copy of @bm's bits. */
static void
copy_bits(struct cbt_bitmap *dst, const struct cbt_bitmap *bm)
{
  assert_int_equal(cbt_bitmap_init(dst, bm->size, bm->granularity), 0);
  assert_int_equal(cbt_bitmap_merge(dst, bm), 0);
}

/* @bm is @old resized to bm->size the way cbt_bmfile_resize promises:
 * every granule wholly inside the old size as in @old, every granule that
 * covers bytes past the old size dirty. */
static void
assert_resized(const struct cbt_bitmap *bm, const struct cbt_bitmap *old)
{
  uint64_t g = bm->granularity;

  assert_int_equal(g, old->granularity);
  for (uint64_t off = 0; off < bm->size; off += g) {
    bool want = off + g <= old->size ? cbt_bitmap_test(old, off)
              : bm->size > old->size || cbt_bitmap_test(old, off);

    if (cbt_bitmap_test(bm, off) != want)
      fail_msg("size %" PRIu64 " -> %" PRIu64 ", granularity %" PRIu64
               ": granule at %" PRIu64 " is %d, want %d", old->size,
               bm->size, g, off, !want, want);
  }
  /* Padding bits past the end stay zero (the format requires it). */
  if (bm->nbits % 64)
    assert_int_equal(bm->words[cbt_bitmap_nwords(bm) - 1] >> (bm->nbits % 64), 0);
}

/* Three entries (active, frozen with a checkpoint id, a 512-byte one that
 * spans several data pages) with bits, closed clean. */
static void
make_three(const char *path, uint64_t size)
{
  g_autofree char *why = NULL;
  cbt_bmfile *f = NULL;

  assert_int_equal(cbt_bmfile_create(path, size, IMG_INODE, 65536, "active",
                                     &f, &why), 0);
  assert_int_equal(cbt_bmfile_add(f, "ckpt", CBT_BMF_FROZEN, 4096, &why), 1);
  assert_int_equal(cbt_bmfile_add(f, "fine", 0, 512, &why), 2);
  assert_int_equal(cbt_bmfile_set_checkpoint(f, 1, UINT64_C(0xfeed), &why), 0);
  for (unsigned i = 0; i < 3; i++) {
    struct cbt_bitmap *bm = cbt_bmfile_entry_bitmap(f, i);

    set_pattern(bm, i + 1);
    cbt_bitmap_set_range(bm, size - 1, 1);      /* the partial last granule */
  }
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
}

/* Resize the file at @path (writable handle) to @new_size and check the
 * result in memory, then after reopening. */
static void
resize_and_check(const char *path, uint64_t new_size)
{
  g_autofree char *why = NULL;
  struct cbt_bitmap old[3], now[3];
  cbt_bmfile *f = open_ok(path, true);
  uint64_t gen = cbt_bmfile_generation(f);
  bool was_clean = cbt_bmfile_found_clean(f);

  assert_int_equal(cbt_bmfile_entry_count(f), 3);
  for (unsigned i = 0; i < 3; i++)
    copy_bits(&old[i], cbt_bmfile_entry_bitmap(f, i));
  assert_int_equal(cbt_bmfile_resize(f, new_size, &why), 0);
  assert_null(why);
  assert_int_equal(cbt_bmfile_image_size(f), new_size);
  assert_int_equal(cbt_bmfile_generation(f), gen + 1);   /* one switch */
  assert_int_equal(cbt_bmfile_clean(f), was_clean);
  for (unsigned i = 0; i < 3; i++) {
    struct cbt_bitmap *bm = cbt_bmfile_entry_bitmap(f, i);

    assert_int_equal(bm->size, new_size);
    assert_resized(bm, &old[i]);
    copy_bits(&now[i], bm);
  }
  cbt_bmfile_free(f);        /* no close: the resize alone is durable */

  f = open_ok(path, false);
  assert_int_equal(cbt_bmfile_found_clean(f), was_clean);
  assert_int_equal(cbt_bmfile_image_size(f), new_size);
  assert_int_equal(cbt_bmfile_check_image(f, new_size, IMG_INODE, NULL), 0);
  assert_string_equal(cbt_bmfile_entry_name(f, 1), "ckpt");
  assert_true(cbt_bmfile_entry_flags(f, 0) & CBT_BMF_ACTIVE);
  assert_true(cbt_bmfile_entry_flags(f, 1) & CBT_BMF_FROZEN);
  assert_int_equal(cbt_bmfile_entry_checkpoint(f, 1), 0xfeed);
  for (unsigned i = 0; i < 3; i++) {
    assert_true(cbt_bmfile_entry_data_ok(f, i));
    assert_same_bits(cbt_bmfile_entry_bitmap(f, i), &now[i]);
    cbt_bitmap_destroy(&old[i]);
    cbt_bitmap_destroy(&now[i]);
  }
  cbt_bmfile_free(f);
}

static void
test_resize(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  uint64_t grown = IMG_SIZE + 50 * MiB + 1000;
  uint64_t shrunk = 10 * MiB + 512;
  struct stat st;
  off_t size_grown;
  cbt_bmfile *f;
  uint64_t gen;

  make_three(fx->path, IMG_SIZE);

  /* Grow: from a partial last granule to another one, past page
   * boundaries of every entry's data. */
  resize_and_check(fx->path, grown);
  assert_int_equal(stat(fx->path, &st), 0);
  size_grown = st.st_size;

  /* Shrink: the new areas fit where the first areas were. */
  resize_and_check(fx->path, shrunk);
  assert_int_equal(stat(fx->path, &st), 0);
  assert_int_equal(st.st_size, size_grown);

  /* Grow back across a granule boundary by one byte, and to exact
   * multiples. */
  resize_and_check(fx->path, 12 * MiB + 1);
  resize_and_check(fx->path, 12 * MiB);
  resize_and_check(fx->path, 64 * MiB);

  /* Same size: nothing written.  Bad sizes: refused, nothing changed. */
  f = open_ok(fx->path, true);
  gen = cbt_bmfile_generation(f);
  assert_int_equal(cbt_bmfile_resize(f, 64 * MiB, &why), 0);
  assert_int_equal(cbt_bmfile_generation(f), gen);
  assert_int_equal(cbt_bmfile_resize(f, 0, &why), -EINVAL);
  assert_non_null(why);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_resize(f, CBT_BITMAP_MAX_SIZE + 1, &why), -EINVAL);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_generation(f), gen);
  assert_int_equal(cbt_bmfile_image_size(f), 64 * MiB);
  cbt_bmfile_free(f);

  /* Read-only handles refuse. */
  f = open_ok(fx->path, false);
  assert_int_equal(cbt_bmfile_resize(f, MiB, &why), -EROFS);
  assert_non_null(why);
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_image_size(f), 64 * MiB);
  cbt_bmfile_free(f);
  f = open_ok(fx->path, false);
  assert_int_equal(cbt_bmfile_image_size(f), 64 * MiB);
  assert_true(cbt_bmfile_found_clean(f));
  cbt_bmfile_free(f);

  /* A file that is not clean (crash) stays not clean across a resize, and
   * its entries become INCONSISTENT on disk (write rule 1). */
  f = open_ok(fx->path, true);
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  cbt_bmfile_free(f);
  resize_and_check(fx->path, 80 * MiB);
  f = open_ok(fx->path, false);
  assert_false(cbt_bmfile_found_clean(f));
  for (unsigned i = 0; i < 3; i++)
    assert_true(cbt_bmfile_entry_flags(f, i) & CBT_BMF_INCONSISTENT);
  cbt_bmfile_free(f);
}

/* A crash during a resize: the file holds the old state or the new one.
 * The moments that matter are "new data written, metadata not" (the old
 * metadata must still find its data untouched) and "new metadata torn"
 * (the reader falls back to the old generation). */
static void
test_resize_crash(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  g_autofree uint8_t *before = NULL, *after = NULL, *buf = NULL;
  size_t len_before, len_after;
  uint64_t grown = 3 * IMG_SIZE;
  struct cbt_bitmap want[3];
  cbt_bmfile *f;
  unsigned n;

  make_three(fx->path, IMG_SIZE);
  f = open_ok(fx->path, false);
  for (unsigned i = 0; i < 3; i++)
    copy_bits(&want[i], cbt_bmfile_entry_bitmap(f, i));
  cbt_bmfile_free(f);
  before = slurp(fx->path, &len_before);
  resize_and_check(fx->path, grown);
  after = slurp(fx->path, &len_after);
  assert_true(len_after > len_before);
  buf = g_malloc(len_after);

  /* The old areas were not written: the file with the old metadata
   * (both copies) and everything the resize wrote is the old, CLEAN file. */
  memcpy(buf, after, len_after);
  memcpy(buf, before, META_END);
  spit(fx->path, buf, len_after);
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_null(cbt_bmfile_recovery_note(f));
  assert_int_equal(cbt_bmfile_image_size(f), IMG_SIZE);
  for (unsigned i = 0; i < 3; i++) {
    assert_true(cbt_bmfile_entry_data_ok(f, i));
    assert_same_bits(cbt_bmfile_entry_bitmap(f, i), &want[i]);
  }
  cbt_bmfile_free(f);

  /* New header torn, or new directory torn: the previous generation, the
   * old size, with its bits intact (and not clean, as the spec says). */
  n = newest_slot(after);
  for (int kind = 0; kind < 2; kind++) {
    memcpy(buf, after, len_after);
    if (kind == 0)
      buf[n * PAGE + 64] ^= 0x40;                    /* image_size */
    else
      buf[(n ? DIR1 : DIR0) + 80] ^= 1;              /* data_length */
    spit(fx->path, buf, len_after);
    f = open_ok(fx->path, false);
    assert_false(cbt_bmfile_found_clean(f));
    assert_non_null(cbt_bmfile_recovery_note(f));
    assert_int_equal(cbt_bmfile_image_size(f), IMG_SIZE);
    for (unsigned i = 0; i < 3; i++) {
      assert_true(cbt_bmfile_entry_data_ok(f, i));
      assert_same_bits(cbt_bmfile_entry_bitmap(f, i), &want[i]);
    }
    cbt_bmfile_free(f);
  }

  /* From there a writer can resize again (the entries are INCONSISTENT
   * now: the file was found not clean). */
  resize_and_check(fx->path, grown);
  f = open_ok(fx->path, true);
  assert_true(cbt_bmfile_entry_flags(f, 0) & CBT_BMF_INCONSISTENT);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_int_equal(cbt_bmfile_image_size(f), grown);
  cbt_bmfile_free(f);

  for (unsigned i = 0; i < 3; i++)
    cbt_bitmap_destroy(&want[i]);
}

/* --- what a file claims -------------------------------------------------- */

/* Make both metadata copies of @buf (one entry, at 65536) claim an image
 * of @size bytes, with the matching data_length and all-zero data. */
static void
claim_size(uint8_t *buf, uint64_t size, uint32_t gran)
{
  for (unsigned slot = 0; slot < 2; slot++) {
    uint8_t *h = buf + slot * PAGE;
    uint8_t *e = buf + get64(h + 96);
    uint64_t length = ((size + gran - 1) / gran + 63) / 64 * 8;

    put64(h + 64, size);
    put32(e + 68, gran);
    put64(e + 80, length);
    fix_dir_crc(buf, slot);
  }
}

/* The image identity is checked before any bit is loaded, and a file
 * claiming more bits than the machine has memory is refused before
 * anything is allocated: both fail at once, whatever the file claims. */
static void
test_claims_bounded(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  g_autofree uint8_t *buf = NULL;
  const uint64_t huge = UINT64_C(1) << 55;       /* 8 TiB of bits at 512 */
  cbt_bmfile *f = NULL;
  size_t len;
  int r;

  assert_int_equal(cbt_bmfile_create(fx->path, IMG_SIZE, IMG_INODE, 65536,
                                     "active", &f, &why), 0);
  cbt_bmfile_free(f);
  f = NULL;

  assert_int_equal(cbt_bmfile_open_image(fx->path, false, IMG_SIZE, IMG_INODE,
                                         &f, &why), 0);
  cbt_bmfile_free(f);
  f = NULL;
  assert_int_equal(cbt_bmfile_open_image(fx->path, true, IMG_SIZE + 512, IMG_INODE,
                                         &f, &why), -ESTALE);
  assert_null(f);
  assert_non_null(strstr(why, "image size changed"));
  g_clear_pointer(&why, g_free);
  assert_int_equal(cbt_bmfile_open_image(fx->path, false, IMG_SIZE, IMG_INODE + 1,
                                         &f, &why), -ESTALE);
  assert_non_null(strstr(why, "image file replaced"));
  g_clear_pointer(&why, g_free);

  /* 2^55 bytes at 512: the area is 8 TiB, in a sparse file. */
  buf = slurp(fx->path, &len);
  assert_true(len >= META_END);
  claim_size(buf, huge, 512);
  spit(fx->path, buf, META_END);
  assert_int_equal(truncate(fx->path, (off_t)(META_END + (huge / 512 / 8))), 0);

  r = cbt_bmfile_open_image(fx->path, false, IMG_SIZE, IMG_INODE, &f, &why);
  assert_int_equal(r, -ESTALE);
  assert_non_null(strstr(why, "bitmap covers 36028797018963968 bytes"));
  g_clear_pointer(&why, g_free);
  r = cbt_bmfile_open(fx->path, false, &f, &why);
  if (r != -ENOMEM)
    print_error("open: %d %s\n", r, why ? why : "-");
  assert_int_equal(r, -ENOMEM);
  assert_null(f);
  assert_non_null(strstr(why, "more than this machine's memory"));
  g_clear_pointer(&why, g_free);
}

/* Holes in the data areas read as zeros and cost nothing; the data
 * around them is read. */
static void
test_sparse_data(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *why = NULL;
  struct cbt_bitmap want;
  cbt_bmfile *f = NULL;
  uint64_t off;
  int fd;

  /* 512-byte granules: about 25 KiB of bits, 7 pages. */
  assert_int_equal(cbt_bmfile_create(fx->path, IMG_SIZE, IMG_INODE, 512,
                                     "active", &f, &why), 0);
  cbt_bitmap_set_range(cbt_bmfile_entry_bitmap(f, 0), 0, 512);
  cbt_bitmap_set_range(cbt_bmfile_entry_bitmap(f, 0), 90 * MiB, 1);
  cbt_bitmap_set_range(cbt_bmfile_entry_bitmap(f, 0), IMG_SIZE - 1, 1);
  copy_bits(&want, cbt_bmfile_entry_bitmap(f, 0));
  assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
  assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);

  /* Punch out the all-zero pages 1 to 4 of the area. */
  f = open_ok(fx->path, false);
  cbt_bmfile_free(f);
  fd = open(fx->path, O_RDWR);
  assert_true(fd >= 0);
  {
    uint8_t e[128];

    assert_int_equal(pread(fd, e, 128, DIR0), 128);
    off = get64(e + 72);
  }
  if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                (off_t)(off + PAGE), 4 * PAGE) < 0) {
    close(fd);
    cbt_bitmap_destroy(&want);
    skip();
  }
  close(fd);
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_true(cbt_bmfile_entry_data_ok(f, 0));
  assert_same_bits(cbt_bmfile_entry_bitmap(f, 0), &want);
  cbt_bmfile_free(f);
  cbt_bitmap_destroy(&want);
}

/* --- generation counter ------------------------------------------------- */

/* Make both metadata copies of the file at @path hold what its newest copy
 * holds, with generation @top in the copy of @top's parity and @top - 1 in
 * the other: as if a writer had counted up to @top. */
static void
set_generations(const char *path, uint64_t top)
{
  size_t len;
  g_autofree uint8_t *buf = slurp(path, &len);
  unsigned n = newest_slot(buf);
  uint8_t hdr[PAGE], dir[DIR1 - DIR0];

  memcpy(hdr, buf + n * PAGE, PAGE);
  memcpy(dir, buf + get64(hdr + 96), sizeof dir);
  for (unsigned slot = 0; slot < 2; slot++) {
    uint8_t *h = buf + slot * PAGE;
    uint64_t dir_off = slot ? DIR1 : DIR0;

    memcpy(h, hdr, PAGE);
    memcpy(buf + dir_off, dir, sizeof dir);
    put32(h + 20, slot);
    put64(h + 24, top % 2 == slot ? top : top - 1);
    put64(h + 96, dir_off);
    fix_header_crc(buf, slot);
  }
  spit(path, buf, len);
}

/* Generations of both copies as on disk. */
static void
disk_generations(const char *path, uint64_t gen[2])
{
  size_t len;
  g_autofree uint8_t *buf = slurp(path, &len);

  gen[0] = get64(buf + 24);
  gen[1] = get64(buf + PAGE + 24);
}

/* The counter never wraps: from a file whose newest copy has generation
 * 2^64-1 (or close), the "not clean" update of a writer must be what a
 * reader finds after a crash -- a wrap to 0 would lose to the CLEAN copy,
 * which a reader would then trust without the writes since. */
static void
test_generation_limit(void **state)
{
  struct fixture *fx = *state;
  const uint64_t tops[] = { UINT64_MAX, UINT64_MAX - 1, UINT64_C(1) << 63,
                            (UINT64_C(1) << 63) - 1 };

  for (size_t i = 0; i < G_N_ELEMENTS(tops); i++) {
    g_autofree char *why = NULL;
    cbt_bmfile *f = NULL;
    uint64_t gen[2];

    g_unlink(fx->path);
    assert_int_equal(cbt_bmfile_create(fx->path, IMG_SIZE, IMG_INODE, 65536,
                                       "active", &f, &why), 0);
    cbt_bitmap_set_range(cbt_bmfile_entry_bitmap(f, 0), 1 * MiB, 1);
    assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
    set_generations(fx->path, tops[i]);

    f = open_ok(fx->path, false);
    assert_true(cbt_bmfile_found_clean(f));
    assert_true(cbt_bmfile_generation(f) == tops[i]);
    cbt_bmfile_free(f);

    /* A daemon starts (lazy mode), takes writes that never reach the
     * file, and crashes. */
    f = open_ok(fx->path, true);
    assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
    cbt_bitmap_set_range(cbt_bmfile_entry_bitmap(f, 0), 5 * MiB, 1);
    cbt_bmfile_free(f);

    disk_generations(fx->path, gen);
    /* Consecutive: the copies hold the last two generations. */
    if ((gen[0] > gen[1] ? gen[0] - gen[1] : gen[1] - gen[0]) != 1)
      fail_msg("top %" PRIu64 ": generations %" PRIu64 " and %" PRIu64
               " on disk", tops[i], gen[0], gen[1]);
    f = open_ok(fx->path, false);
    if (cbt_bmfile_found_clean(f))
      fail_msg("top %" PRIu64 ": after the crash the file reads as clean "
               "(generation %" PRIu64 "; on disk %" PRIu64 ", %" PRIu64 ")",
               tops[i], cbt_bmfile_generation(f), gen[0], gen[1]);
    assert_false(cbt_bmfile_entry_trusted(f, 0, NULL));
    assert_true(cbt_bitmap_test(cbt_bmfile_entry_bitmap(f, 0), 1 * MiB));
    /* Renormalised when it reached 2^63: never near the limit again. */
    if (tops[i] >= (UINT64_C(1) << 63))
      assert_true(cbt_bmfile_generation(f) < 16);
    cbt_bmfile_free(f);

    /* The next writer goes on from there: clean shutdown, then clean. */
    f = open_ok(fx->path, true);
    assert_int_equal(cbt_bmfile_mark_dirty(f, &why), 0);
    cbt_bitmap_set_range(cbt_bmfile_entry_bitmap(f, 0), 7 * MiB, 1);
    assert_int_equal(cbt_bmfile_close_clean(f, &why), 0);
    f = open_ok(fx->path, false);
    assert_true(cbt_bmfile_found_clean(f));
    assert_null(cbt_bmfile_recovery_note(f));
    assert_true(cbt_bitmap_test(cbt_bmfile_entry_bitmap(f, 0), 7 * MiB));
    assert_true(cbt_bmfile_entry_flags(f, 0) & CBT_BMF_INCONSISTENT);
    cbt_bmfile_free(f);
  }
}

/* Run in a child process by test_generation_powercut: open @path for
 * writing, mark it in use, set a bit and shut down cleanly.  Exit 0 when
 * all of that worked (a simulated power cut kills the process before). */
static int
child_update(const char *path)
{
  g_autofree char *why = NULL;
  cbt_bmfile *f = NULL;

  if (cbt_bmfile_open(path, true, &f, &why) < 0 ||
      cbt_bmfile_mark_dirty(f, &why) < 0) {
    fprintf(stderr, "child: %s\n", why ? why : "?");
    cbt_bmfile_free(f);
    return 2;
  }
  cbt_bitmap_set_range(cbt_bmfile_entry_bitmap(f, 0), 5 * MiB, 1);
  if (cbt_bmfile_close_clean(f, &why) < 0) {
    fprintf(stderr, "child: %s\n", why ? why : "?");
    return 3;
  }
  return 0;
}

/* Run child_update on a fresh file at @path whose newest generation is
 * 2^64-1, in a child process with a power cut before its write @at.
 * True if the cut happened (the child was killed); false if the child
 * finished (no write @at: the update is complete, or fault injection is
 * not built in). */
static bool
cut_update_at(const char *self, const char *path, unsigned at)
{
  g_autofree char *why = NULL;
  g_autofree char *at_s = g_strdup_printf("%u", at);
  g_autofree char *err = NULL;
  g_auto(GStrv) env = g_get_environ();
  char *argv[] = { (char *)self, (char *)"--child-update", (char *)path, NULL };
  cbt_bmfile *f = NULL;
  int status = 0;

  g_unlink(path);
  assert_int_equal(cbt_bmfile_create(path, IMG_SIZE, IMG_INODE, 65536,
                                     "active", &f, &why), 0);
  cbt_bmfile_free(f);
  set_generations(path, UINT64_MAX);
  env = g_environ_setenv(env, "CBT_FI_POWERCUT_FILE", path, TRUE);
  env = g_environ_setenv(env, "CBT_FI_POWERCUT_AT", at_s, TRUE);
  assert_true(g_spawn_sync(NULL, argv, env, G_SPAWN_DEFAULT, NULL, NULL, NULL,
                           &err, &status, NULL));
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
    return false;
  if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
    fail_msg("child with a cut at %u: status 0x%x: %s", at, status, err);
  return true;
}

/* A power cut before each write of that update (lib/fault-inject.c, in
 * builds with -Dfault_injection=true) on a file at generation 2^64-1: the
 * renormalisation and the update keep the file readable at every point,
 * and once a cut finds it not clean, no later cut finds it clean again. */
static void
test_generation_powercut(void **state)
{
  struct fixture *fx = *state;
  char *self = g_file_read_link("/proc/self/exe", NULL);
  bool seen_dirty = false;
  cbt_bmfile *f;
  unsigned at;

  assert_non_null(self);
  for (at = 1; at < 100 && cut_update_at(self, fx->path, at); at++) {
    bool clean, bit;

    f = open_ok(fx->path, false);
    clean = cbt_bmfile_found_clean(f);
    bit = cbt_bitmap_test(cbt_bmfile_entry_bitmap(f, 0), 5 * MiB);
    if (g_getenv("CBT_TEST_VERBOSE"))
      print_message("cut at %u: generation %" PRIu64 ", %s, bit %d\n", at,
                    cbt_bmfile_generation(f), clean ? "clean" : "not clean", bit);
    if (clean && bit)
      fail_msg("cut at %u: clean with the new bit before the update ended", at);
    if (clean && seen_dirty)
      fail_msg("cut at %u: clean again after an earlier cut found it in use", at);
    seen_dirty |= !clean;
    cbt_bmfile_free(f);
  }
  g_free(self);
  if (at == 1)
    skip();                    /* built without fault injection */
  assert_true(at < 100);
  assert_true(seen_dirty);
  /* The uncut update: clean, with the bit, at a small generation. */
  f = open_ok(fx->path, false);
  assert_true(cbt_bmfile_found_clean(f));
  assert_true(cbt_bitmap_test(cbt_bmfile_entry_bitmap(f, 0), 5 * MiB));
  assert_true(cbt_bmfile_generation(f) < 16);
  cbt_bmfile_free(f);
}

int
main(int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_crc32c),
    cmocka_unit_test_setup_teardown(test_create_open, setup, teardown),
    cmocka_unit_test_setup_teardown(test_create_errors, setup, teardown),
    cmocka_unit_test_setup_teardown(test_entries, setup, teardown),
    cmocka_unit_test_setup_teardown(test_sync_crash_inconsistent, setup, teardown),
    cmocka_unit_test_setup_teardown(test_crash_safe, setup, teardown),
    cmocka_unit_test_setup_teardown(test_sync_concurrent, setup, teardown),
    cmocka_unit_test_setup_teardown(test_corrupt_header_bytes, setup, teardown),
    cmocka_unit_test_setup_teardown(test_corrupt_header_fields, setup, teardown),
    cmocka_unit_test_setup_teardown(test_header_extension_preserved, setup, teardown),
    cmocka_unit_test_setup_teardown(test_checkpoint_id, setup, teardown),
    cmocka_unit_test_setup_teardown(test_corrupt_directory, setup, teardown),
    cmocka_unit_test_setup_teardown(test_corrupt_data, setup, teardown),
    cmocka_unit_test_setup_teardown(test_truncated, setup, teardown),
    cmocka_unit_test_setup_teardown(test_one_copy_damaged, setup, teardown),
    cmocka_unit_test_setup_teardown(test_claims_bounded, setup, teardown),
    cmocka_unit_test_setup_teardown(test_sparse_data, setup, teardown),
    cmocka_unit_test_setup_teardown(test_generation_limit, setup, teardown),
    cmocka_unit_test_setup_teardown(test_generation_powercut, setup, teardown),
    cmocka_unit_test_setup_teardown(test_resize, setup, teardown),
    cmocka_unit_test_setup_teardown(test_resize_crash, setup, teardown),
  };

  if (argc == 3 && strcmp(argv[1], "--child-update") == 0)
    return child_update(argv[2]);
  return cmocka_run_group_tests(tests, NULL, NULL);
}
