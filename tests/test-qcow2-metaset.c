/* Unit tests for the metadata cluster set (lib/qcow2/qcow2-metaset.c) and the
 * overlap checks the qcow2 backend builds on it (lib/image/image-qcow2-meta.c).
 *
 * The set: membership, ranges across leaves, add counting members that
 * were there already, remove, find at leaf and word edges and near
 * UINT64_MAX, and a long random sequence against a plain bitmap.
 *
 * The backend, on small images made by the qcow2 writer and damaged here
 * byte by byte: a header cluster with refcount 0 is never handed out for
 * guest data; a guest write through an L2 entry that points at the L1
 * table fails with -EIO, names the L1 table, refuses all later changes,
 * keeps reads working and leaves the corrupt bit on disk, so the image
 * opens read-only only; metadata overlapping metadata is refused at open.
 */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <glib.h>

#include "cbt/image.h"
#include "cbt/qcow2-metaset.h"
#include "cbt/qcow2-writer.h"
#include "cbt/qcow2.h"

#define LEAF (UINT64_C(1) << CBT_QCOW2_METASET_LEAF_BITS)
#define NONE CBT_QCOW2_METASET_NONE

/* ---- the set ----------------------------------------------------------- */

static void
test_empty(void **state)
{
  struct cbt_qcow2_metaset s;

  (void)state;
  cbt_qcow2_metaset_init(&s);
  assert_false(cbt_qcow2_metaset_has(&s, 0));
  assert_false(cbt_qcow2_metaset_has(&s, UINT64_MAX));
  assert_true(cbt_qcow2_metaset_find(&s, 0, UINT64_MAX) == NONE);
  cbt_qcow2_metaset_remove(&s, 0, 100);
  assert_int_equal(s.count, 0);
  cbt_qcow2_metaset_clear(&s);
  cbt_qcow2_metaset_clear(&s);         /* twice is fine */
}

static void
test_add_remove(void **state)
{
  struct cbt_qcow2_metaset s;

  (void)state;
  cbt_qcow2_metaset_init(&s);
  assert_int_equal(cbt_qcow2_metaset_add(&s, 0, 1), 0);
  assert_true(cbt_qcow2_metaset_has(&s, 0));
  assert_false(cbt_qcow2_metaset_has(&s, 1));

  /* A range across a leaf boundary, then one overlapping it by 3. */
  assert_int_equal(cbt_qcow2_metaset_add(&s, LEAF - 5, 10), 0);
  assert_int_equal(s.count, 11);
  for (uint64_t c = LEAF - 5; c < LEAF + 5; c++)
    assert_true(cbt_qcow2_metaset_has(&s, c));
  assert_false(cbt_qcow2_metaset_has(&s, LEAF - 6));
  assert_false(cbt_qcow2_metaset_has(&s, LEAF + 5));
  assert_int_equal(cbt_qcow2_metaset_add(&s, LEAF + 2, 5), 3);
  assert_int_equal(s.count, 13);

  /* Far away: the directory grows, the leaves between stay absent. */
  assert_int_equal(cbt_qcow2_metaset_add(&s, UINT64_C(1) << 30, 1), 0);
  assert_true(cbt_qcow2_metaset_has(&s, UINT64_C(1) << 30));
  assert_false(cbt_qcow2_metaset_has(&s, (UINT64_C(1) << 30) - 1));
  assert_int_equal(s.count, 14);

  cbt_qcow2_metaset_remove(&s, LEAF - 10, 12);      /* partly members */
  assert_int_equal(s.count, 7);
  assert_false(cbt_qcow2_metaset_has(&s, LEAF - 5));
  assert_true(cbt_qcow2_metaset_has(&s, LEAF + 2));
  cbt_qcow2_metaset_remove(&s, 0, UINT64_MAX);
  assert_int_equal(s.count, 0);
  assert_false(cbt_qcow2_metaset_has(&s, UINT64_C(1) << 30));
  cbt_qcow2_metaset_clear(&s);
}

static void
test_find(void **state)
{
  struct cbt_qcow2_metaset s;

  (void)state;
  cbt_qcow2_metaset_init(&s);
  cbt_qcow2_metaset_add(&s, 63, 1);
  cbt_qcow2_metaset_add(&s, 64, 1);
  cbt_qcow2_metaset_add(&s, 3 * LEAF + 1, 1);

  assert_true(cbt_qcow2_metaset_find(&s, 0, 63) == NONE);
  assert_true(cbt_qcow2_metaset_find(&s, 0, 64) == 63);
  assert_true(cbt_qcow2_metaset_find(&s, 63, 1) == 63);
  assert_true(cbt_qcow2_metaset_find(&s, 64, 1) == 64);
  assert_true(cbt_qcow2_metaset_find(&s, 65, 1) == NONE);
  assert_true(cbt_qcow2_metaset_find(&s, 0, 0) == NONE);
  /* Over absent leaves into a present one, and just short of the member. */
  assert_true(cbt_qcow2_metaset_find(&s, 65, 10 * LEAF) == 3 * LEAF + 1);
  assert_true(cbt_qcow2_metaset_find(&s, 65, 3 * LEAF + 1 - 65) == NONE);
  assert_true(cbt_qcow2_metaset_find(&s, 65, 3 * LEAF + 2 - 65) == 3 * LEAF + 1);
  /* Past the directory, and ranges that would wrap around. */
  assert_true(cbt_qcow2_metaset_find(&s, 100 * LEAF, UINT64_MAX) == NONE);
  assert_true(cbt_qcow2_metaset_find(&s, 64, UINT64_MAX) == 64);
  assert_true(cbt_qcow2_metaset_find(&s, UINT64_MAX - 1, 10) == NONE);
  cbt_qcow2_metaset_clear(&s);
}

/* Random adds, removes and finds against a plain bitmap of 8 leaves. */
static void
test_random(void **state)
{
  const uint64_t span = 8 * LEAF;
  struct cbt_qcow2_metaset s;
  g_autofree uint8_t *ref = g_malloc0(span);
  GRand *rnd = g_rand_new_with_seed(12);
  uint64_t count = 0;

  (void)state;
  cbt_qcow2_metaset_init(&s);
  for (int i = 0; i < 20000; i++) {
    uint64_t first = g_rand_int_range(rnd, 0, (gint32)span);
    uint64_t n = g_rand_int_range(rnd, 0, 200);
    int op = g_rand_int_range(rnd, 0, 3);

    if (first + n > span)
      n = span - first;
    if (op == 0) {
      uint64_t had = 0;

      for (uint64_t c = first; c < first + n; c++) {
        had += ref[c];
        count += !ref[c];
        ref[c] = 1;
      }
      assert_int_equal(cbt_qcow2_metaset_add(&s, first, n), had);
    } else if (op == 1 && g_rand_int_range(rnd, 0, 3) == 0) {
      for (uint64_t c = first; c < first + n; c++) {
        count -= ref[c];
        ref[c] = 0;
      }
      cbt_qcow2_metaset_remove(&s, first, n);
    } else {
      uint64_t want = NONE;

      n *= 300;                        /* finds cover longer stretches */
      if (first + n > span)
        n = span - first;
      for (uint64_t c = first; c < first + n; c++) {
        if (ref[c]) {
          want = c;
          break;
        }
      }
      assert_true(cbt_qcow2_metaset_find(&s, first, n) == want);
      assert_int_equal(cbt_qcow2_metaset_has(&s, first), ref[first]);
    }
    assert_int_equal(s.count, count);
  }
  g_rand_free(rnd);
  cbt_qcow2_metaset_clear(&s);
}

/* ---- the backend ------------------------------------------------------- */

#define CS    4096u                    /* cluster size of the test images */
#define VSIZE (UINT64_C(8) << 20)      /* four L2 tables of 2 MiB each */

static char *dir;

static int
setup(void **state)
{
  (void)state;
  dir = g_dir_make_tmp("cbt-test-metaset.XXXXXX", NULL);
  return dir ? 0 : -1;
}

static int
teardown(void **state)
{
  g_autofree char *cmd = g_strdup_printf("rm -rf '%s'", dir);

  (void)state;
  assert_int_equal(system(cmd), 0);
  g_free(dir);
  dir = NULL;
  return 0;
}

static uint64_t
get64(int fd, uint64_t off)
{
  uint64_t v;

  assert_int_equal(pread(fd, &v, 8, (off_t)off), 8);
  return be64toh(v);
}

static void
set64(int fd, uint64_t off, uint64_t v)
{
  v = htobe64(v);
  assert_int_equal(pwrite(fd, &v, 8, (off_t)off), 8);
}

/* A fresh image @name with guest clusters 0-15 of byte 0x11 and 16 more
 * of 0x22 at 4 MiB; returns its path, and fills *@h from its header. */
static char *
make_image(const char *name, struct cbt_qcow2_info *h)
{
  char *path = g_build_filename(dir, name, NULL);
  struct cbt_qcow2_writer_opts o = { .size = VSIZE, .cluster_size = CS };
  g_autoptr(cbt_qcow2_writer) w = NULL;
  g_autofree uint8_t *buf = g_malloc(16 * CS);
  g_autofree char *why = NULL;
  uint8_t hdr[CS];
  int fd;

  assert_int_equal(cbt_qcow2_writer_create(path, &o, &w, &why), 0);
  memset(buf, 0x11, 16 * CS);
  assert_int_equal(cbt_qcow2_writer_write(w, 0, buf, 16 * CS), 0);
  memset(buf, 0x22, 16 * CS);
  assert_int_equal(cbt_qcow2_writer_write(w, 4 << 20, buf, 16 * CS), 0);
  assert_int_equal(cbt_qcow2_writer_finish(w, &why), 0);

  fd = open(path, O_RDONLY | O_CLOEXEC);
  assert_true(fd >= 0);
  assert_int_equal(pread(fd, hdr, CS, 0), CS);
  close(fd);
  assert_int_equal(cbt_qcow2_header_decode(hdr, CS, (uint64_t)CS * 1024, h, &why), 0);
  return path;
}

/* File offset of the L2 entry for guest offset @voff. */
static uint64_t
l2_entry_at(int fd, const struct cbt_qcow2_info *h, uint64_t voff)
{
  uint64_t per = CS / 8;
  uint64_t l2 = get64(fd, h->l1_table_offset + 8 * (voff / CS / per)) &
                CBT_QCOW2_OFFSET_MASK;

  assert_true(l2 != 0);
  return l2 + 8 * ((voff / CS) % per);
}

static int
io(struct cbt_image *img, enum cbt_io_type t, uint64_t off, uint64_t len, void *buf)
{
  return cbt_image_run_sync(img, t, 0, off, len, buf);
}

static void
test_header_refcount_zero(void **state)
{
  struct cbt_qcow2_info h;
  g_autofree char *path = make_image("hdr.qcow2", &h);
  g_autofree char *why = NULL;
  g_autofree uint8_t *buf = g_malloc(CS);
  struct cbt_image *img = NULL;
  uint8_t magic[4];
  int fd = open(path, O_RDWR | O_CLOEXEC);

  (void)state;
  assert_true(fd >= 0);
  /* Refcount of cluster 0: the first entry of the first refcount block. */
  assert_int_equal(pwrite(fd, "\0\0", 2, (off_t)get64(fd, h.refcount_table_offset)), 2);

  assert_int_equal(cbt_image_open_qcow2(path, false, false, &img, &why), 0);
  memset(buf, 0x55, CS);
  /* One unallocated cluster: once the first free one by refcount. */
  assert_int_equal(io(img, CBT_IO_WRITE, 6 << 20, CS, buf), 0);
  assert_int_equal(io(img, CBT_IO_FLUSH, 0, 0, NULL), 0);
  assert_null(cbt_image_qcow2_corrupt(img));
  cbt_image_close(img);

  assert_int_equal(pread(fd, magic, 4, 0), 4);
  assert_memory_equal(magic, "QFI\xfb", 4);
  close(fd);
  assert_int_equal(cbt_image_open_qcow2(path, true, false, &img, &why), 0);
  memset(buf, 0, CS);
  assert_int_equal(io(img, CBT_IO_READ, 6 << 20, CS, buf), 0);
  for (unsigned i = 0; i < CS; i++)
    assert_int_equal(buf[i], 0x55);
  cbt_image_close(img);
}

static void
test_write_onto_l1(void **state)
{
  struct cbt_qcow2_info h;
  g_autofree char *path = make_image("l1.qcow2", &h);
  g_autofree char *why = NULL;
  g_autofree uint8_t *buf = g_malloc(CS);
  g_autofree uint8_t *l1_before = g_malloc(CS);
  g_autofree uint8_t *l1_after = g_malloc(CS);
  struct cbt_image *img = NULL;
  const char *reason;
  int fd = open(path, O_RDWR | O_CLOEXEC);

  (void)state;
  assert_true(fd >= 0);
  set64(fd, l2_entry_at(fd, &h, CS), h.l1_table_offset | CBT_QCOW2_COPIED);
  assert_int_equal(pread(fd, l1_before, CS, (off_t)h.l1_table_offset), CS);

  assert_int_equal(cbt_image_open_qcow2(path, false, false, &img, &why), 0);
  memset(buf, 0x99, CS);
  assert_int_equal(io(img, CBT_IO_WRITE, CS, 100, buf), -EIO);
  reason = cbt_image_qcow2_corrupt(img);
  assert_non_null(reason);
  assert_non_null(strstr(reason, "the L1 table"));
  /* Every later change is refused, reads go on. */
  assert_int_equal(io(img, CBT_IO_WRITE, 1 << 20, CS, buf), -EIO);
  assert_int_equal(io(img, CBT_IO_ZERO, 0, CS, NULL), -EIO);
  assert_int_equal(io(img, CBT_IO_TRIM, 0, CS, NULL), -EIO);
  assert_int_equal(io(img, CBT_IO_READ, 0, CS, buf), 0);
  for (unsigned i = 0; i < CS; i++)
    assert_int_equal(buf[i], 0x11);
  assert_int_equal(io(img, CBT_IO_FLUSH, 0, 0, NULL), 0);
  cbt_image_close(img);

  assert_int_equal(pread(fd, l1_after, CS, (off_t)h.l1_table_offset), CS);
  assert_memory_equal(l1_before, l1_after, CS);
  assert_true(get64(fd, CBT_QCOW2_OFF_INCOMPAT) & CBT_QCOW2_INCOMPAT_CORRUPT);
  close(fd);

  img = NULL;
  g_free(why);
  why = NULL;
  assert_int_equal(cbt_image_open_qcow2(path, false, false, &img, &why), -ENOTSUP);
  assert_non_null(strstr(why, "marked corrupt"));
  g_free(why);
  why = NULL;
  assert_int_equal(cbt_image_open_qcow2(path, true, false, &img, &why), 0);
  assert_null(cbt_image_qcow2_corrupt(img));
  assert_int_equal(io(img, CBT_IO_READ, 4 << 20, CS, buf), 0);
  assert_int_equal(buf[0], 0x22);
  cbt_image_close(img);
}

static void
test_metadata_overlap_at_open(void **state)
{
  struct cbt_qcow2_info h;
  g_autofree char *path = make_image("meta.qcow2", &h);
  g_autofree char *why = NULL;
  struct cbt_image *img = NULL;
  int fd = open(path, O_RDWR | O_CLOEXEC);

  (void)state;
  assert_true(fd >= 0);
  /* L1 entry 1 (guest 2-4 MiB, empty) at the refcount table. */
  set64(fd, h.l1_table_offset + 8, h.refcount_table_offset | CBT_QCOW2_COPIED);
  close(fd);
  assert_int_equal(cbt_image_open_qcow2(path, false, false, &img, &why), -EBADMSG);
  assert_non_null(strstr(why, "L2 table of L1 entry 1"));
  assert_non_null(strstr(why, "overlaps the refcount table"));
  g_free(why);
  why = NULL;
  assert_int_equal(cbt_image_open_qcow2(path, true, false, &img, &why), 0);
  cbt_image_close(img);
}

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_empty),
    cmocka_unit_test(test_add_remove),
    cmocka_unit_test(test_find),
    cmocka_unit_test(test_random),
    cmocka_unit_test_setup_teardown(test_header_refcount_zero, setup, teardown),
    cmocka_unit_test_setup_teardown(test_write_onto_l1, setup, teardown),
    cmocka_unit_test_setup_teardown(test_metadata_overlap_at_open, setup, teardown),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
