/* Unit tests for the qcow2 backup writer (lib/qcow2/qcow2-writer.c).
 *
 * Each finished file is read back by a small independent qcow2 parser in
 * this file (header, extensions, L1/L2, refcounts, following
 * docs/interop/qcow2.txt) which checks the structure the way `qemu-img
 * check` would: every entry well formed, every host cluster referenced
 * exactly once and refcounted 1, nothing leaked.  Guest contents are
 * compared with an in-memory model of the same workload.  Interop with
 * qemu itself is tested by test-qcow2-writer-interop.sh.
 */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "cbt/qcow2-writer.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define TiB (UINT64_C(1) << 40)

#define OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define COPIED      (UINT64_C(1) << 63)
#define ZERO_FLAG   UINT64_C(1)
/* What unallocated clusters read as in the model of a backed image. */
#define BACKING_BYTE 0xee

struct fixture {
  char *dir;
  char *path;
};

static int
setup(void **state)
{
  struct fixture *fx = g_new0(struct fixture, 1);
  g_autofree char *tmpl = g_build_filename(g_get_tmp_dir(), "cbt-q2w-XXXXXX", NULL);

  fx->dir = g_strdup(g_mkdtemp(tmpl));
  assert_non_null(fx->dir);
  fx->path = g_build_filename(fx->dir, "backup.qcow2", NULL);
  *state = fx;
  return 0;
}

static int
teardown(void **state)
{
  struct fixture *fx = *state;

  g_unlink(fx->path);
  g_rmdir(fx->dir);
  g_free(fx->dir);
  g_free(fx->path);
  g_free(fx);
  return 0;
}

/* --- an independent reader --------------------------------------------- */

static uint16_t
be16(const uint8_t *p)
{
  uint16_t v;

  memcpy(&v, p, 2);
  return be16toh(v);
}

static uint32_t
be32(const uint8_t *p)
{
  uint32_t v;

  memcpy(&v, p, 4);
  return be32toh(v);
}

static uint64_t
be64(const uint8_t *p)
{
  uint64_t v;

  memcpy(&v, p, 8);
  return be64toh(v);
}

struct img {
  int fd;
  uint64_t file_size;
  uint32_t cs, cluster_bits;
  uint64_t size;
  uint32_t l1_size;
  uint64_t l1_off, rt_off;
  uint32_t rt_clusters;
  char *backing, *backing_fmt;
  uint64_t *l1;
  GHashTable *l2;             /* L2 offset -> uint64_t[cs/8], host order */
};

static void
pread_all(int fd, void *buf, size_t len, uint64_t off)
{
  assert_int_equal(pread(fd, buf, len, (off_t)off), (ssize_t)len);
}

/* Parse and check the header of @path; the checks mirror what qemu
 * requires of a v3 image with no optional features. */
static void
img_open(struct img *im, const char *path)
{
  uint8_t h[104];
  struct stat st;
  uint64_t pos, end_ext = 0;
  g_autofree uint8_t *c0 = NULL;

  memset(im, 0, sizeof *im);
  im->fd = open(path, O_RDONLY | O_CLOEXEC);
  assert_true(im->fd >= 0);
  assert_int_equal(fstat(im->fd, &st), 0);
  im->file_size = (uint64_t)st.st_size;
  pread_all(im->fd, h, sizeof h, 0);
  assert_int_equal(be32(h + 0), 0x514649fb);
  assert_int_equal(be32(h + 4), 3);
  im->cluster_bits = be32(h + 20);
  assert_true(im->cluster_bits >= 9 && im->cluster_bits <= 21);
  im->cs = 1u << im->cluster_bits;
  im->size = be64(h + 24);
  assert_true(im->size > 0 && im->size % 512 == 0);
  assert_int_equal(be32(h + 32), 0);               /* crypt_method */
  im->l1_size = be32(h + 36);
  im->l1_off = be64(h + 40);
  im->rt_off = be64(h + 48);
  im->rt_clusters = be32(h + 56);
  assert_int_equal(be32(h + 60), 0);               /* nb_snapshots */
  assert_int_equal(be64(h + 64), 0);
  assert_int_equal(be64(h + 72), 0);               /* incompatible */
  assert_int_equal(be64(h + 80), 0);               /* compatible */
  assert_int_equal(be64(h + 88), 0);               /* autoclear */
  assert_int_equal(be32(h + 96), 4);               /* refcount_order */
  assert_int_equal(be32(h + 100), 104);            /* header_length */
  assert_int_equal(im->l1_off % im->cs, 0);
  assert_int_equal(im->rt_off % im->cs, 0);
  assert_true(im->rt_clusters > 0);
  /* L1 exactly as large as the virtual size needs. */
  {
    uint64_t clusters = (im->size + im->cs - 1) / im->cs;
    uint64_t per_l2 = im->cs / 8;

    assert_int_equal(im->l1_size, (clusters + per_l2 - 1) / per_l2);
  }

  /* Extensions, then the backing file name in cluster 0. */
  c0 = g_malloc(im->cs);
  pread_all(im->fd, c0, im->cs, 0);
  for (pos = 104; pos + 8 <= im->cs;) {
    uint32_t type = be32(c0 + pos), len = be32(c0 + pos + 4);

    assert_true(pos + 8 + len <= im->cs);
    if (type == 0) {
      assert_int_equal(len, 0);
      end_ext = pos + 8;
      break;
    }
    assert_int_equal(type, 0xe2792aca);            /* the only one we write */
    assert_null(im->backing_fmt);
    im->backing_fmt = g_strndup((const char *)c0 + pos + 8, len);
    pos += 8 + ((len + 7) & ~7u);
  }
  assert_true(end_ext > 0);
  if (be64(h + 8)) {
    uint64_t off = be64(h + 8);
    uint32_t n = be32(h + 16);

    assert_true(off >= end_ext && off + n <= im->cs && n > 0 && n <= 1023);
    im->backing = g_strndup((const char *)c0 + off, n);
    assert_non_null(im->backing_fmt);
  } else {
    assert_null(im->backing_fmt);
  }

  im->l1 = g_new0(uint64_t, im->l1_size);
  {
    g_autofree uint8_t *raw = g_malloc((size_t)im->l1_size * 8);

    pread_all(im->fd, raw, (size_t)im->l1_size * 8, im->l1_off);
    for (uint32_t i = 0; i < im->l1_size; i++)
      im->l1[i] = be64(raw + 8 * i);
  }
  im->l2 = g_hash_table_new_full(g_int64_hash, g_int64_equal, g_free, g_free);
}

static void
img_close(struct img *im)
{
  close(im->fd);
  g_free(im->backing);
  g_free(im->backing_fmt);
  g_free(im->l1);
  g_hash_table_destroy(im->l2);
}

static const uint64_t *
img_l2(struct img *im, uint64_t off)
{
  uint64_t *t = g_hash_table_lookup(im->l2, &off);

  if (!t) {
    g_autofree uint8_t *raw = g_malloc(im->cs);

    pread_all(im->fd, raw, im->cs, off);
    t = g_new(uint64_t, im->cs / 8);
    for (uint32_t i = 0; i < im->cs / 8; i++)
      t[i] = be64(raw + 8 * i);
    g_hash_table_insert(im->l2, g_memdup2(&off, sizeof off), t);
  }
  return t;
}

/* The L2 entry of guest cluster @ci, 0 when its L2 table is absent. */
static uint64_t
img_entry(struct img *im, uint64_t ci)
{
  uint64_t l1e = im->l1[ci / (im->cs / 8)];

  if (!(l1e & OFFSET_MASK))
    return 0;
  return img_l2(im, l1e & OFFSET_MASK)[ci % (im->cs / 8)];
}

/* Guest bytes [off, off+len); unallocated clusters read as @unalloc. */
static void
img_read(struct img *im, uint64_t off, uint64_t len, uint8_t *out, int unalloc)
{
  while (len) {
    uint64_t ci = off / im->cs, in = off % im->cs;
    uint64_t n = MIN(len, im->cs - in);
    uint64_t e = img_entry(im, ci);

    if (e & ZERO_FLAG)
      memset(out, 0, n);
    else if (e & OFFSET_MASK)
      pread_all(im->fd, out, n, (e & OFFSET_MASK) + in);
    else
      memset(out, unalloc, n);
    off += n;
    len -= n;
    out += n;
  }
}

static void
ref_cluster(uint8_t *expect, uint64_t nclusters, uint64_t off, uint32_t cs)
{
  assert_int_equal(off % cs, 0);
  assert_true(off / cs < nclusters);
  expect[off / cs]++;
}

/* What `qemu-img check` verifies, for our kind of image: entries well
 * formed with COPIED set, every host cluster referenced once and its
 * refcount 1, and no cluster in the file unreferenced. */
static void
img_check(struct img *im)
{
  uint64_t nclusters = (im->file_size + im->cs - 1) / im->cs;
  g_autofree uint8_t *expect = g_malloc0(nclusters);
  g_autofree uint8_t *rt = g_malloc((size_t)im->rt_clusters * im->cs);
  g_autofree uint8_t *blk = g_malloc(im->cs);
  uint64_t per_block = im->cs / 2;

  assert_int_equal(im->file_size % im->cs, 0);
  ref_cluster(expect, nclusters, 0, im->cs);
  for (uint64_t c = 0; c < ((uint64_t)im->l1_size * 8 + im->cs - 1) / im->cs; c++)
    ref_cluster(expect, nclusters, im->l1_off + c * im->cs, im->cs);
  for (uint32_t i = 0; i < im->l1_size; i++) {
    uint64_t l1e = im->l1[i];
    const uint64_t *l2;

    if (!l1e)
      continue;
    assert_int_equal(l1e & ~(OFFSET_MASK | COPIED), 0);
    assert_true(l1e & COPIED);
    ref_cluster(expect, nclusters, l1e & OFFSET_MASK, im->cs);
    l2 = img_l2(im, l1e & OFFSET_MASK);
    for (uint32_t k = 0; k < im->cs / 8; k++) {
      uint64_t e = l2[k];
      uint64_t ci = (uint64_t)i * (im->cs / 8) + k;

      assert_int_equal(e & ~(OFFSET_MASK | COPIED | ZERO_FLAG), 0);
      if (ci * im->cs >= im->size)
        assert_int_equal(e, 0);
      if (e & OFFSET_MASK) {
        assert_true(e & COPIED);
        ref_cluster(expect, nclusters, e & OFFSET_MASK, im->cs);
      } else {
        assert_int_equal(e & COPIED, 0);
      }
    }
  }
  for (uint32_t c = 0; c < im->rt_clusters; c++)
    ref_cluster(expect, nclusters, im->rt_off + (uint64_t)c * im->cs, im->cs);
  pread_all(im->fd, rt, (size_t)im->rt_clusters * im->cs, im->rt_off);
  for (uint64_t b = 0; b < (uint64_t)im->rt_clusters * im->cs / 8; b++) {
    uint64_t off = be64(rt + 8 * b);

    if (b * per_block >= nclusters) {
      assert_int_equal(off, 0);
      continue;
    }
    /* Every cluster is in use, so every block covering one exists. */
    assert_int_not_equal(off, 0);
    assert_int_equal(off & ~OFFSET_MASK, 0);
    ref_cluster(expect, nclusters, off, im->cs);
  }
  for (uint64_t b = 0; b * per_block < nclusters; b++) {
    pread_all(im->fd, blk, im->cs, be64(rt + 8 * b));
    for (uint64_t k = 0; k < per_block; k++) {
      uint64_t c = b * per_block + k;
      uint16_t rc = be16(blk + 2 * k);

      if (c < nclusters) {
        assert_int_equal(expect[c], 1);    /* referenced once, no leak */
        assert_int_equal(rc, 1);
      } else {
        assert_int_equal(rc, 0);
      }
    }
  }
}

/* Sum of guest bytes per entry kind, to check data_bytes / zero_bytes
 * against the real mapping; @size is the caller's virtual size. */
static void
img_count(struct img *im, uint64_t size, uint64_t *data, uint64_t *zero)
{
  *data = *zero = 0;
  for (uint64_t ci = 0; ci * im->cs < size; ci++) {
    uint64_t e = img_entry(im, ci), n = MIN(im->cs, size - ci * im->cs);

    if (e & ZERO_FLAG)
      *zero += n;
    else if (e & OFFSET_MASK)
      *data += n;
  }
}

/* --- helpers ------------------------------------------------------------- */

static uint64_t
rnd(uint64_t *s)
{
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * UINT64_C(2685821657736338717);
}

static void
fill_random(uint8_t *buf, uint64_t len, uint64_t *s)
{
  for (uint64_t i = 0; i < len; i += 8) {
    uint64_t v = rnd(s) | 1;    /* never an all-zero cluster by accident */

    memcpy(buf + i, &v, MIN(8, len - i));
  }
}

static cbt_qcow2_writer *
create_ok(const char *path, uint64_t size, uint32_t cs, const char *backing)
{
  struct cbt_qcow2_writer_opts o = {
    .size = size, .cluster_size = cs, .backing_file = backing,
    .backing_format = backing ? "qcow2" : NULL,
  };
  cbt_qcow2_writer *w = NULL;
  g_autofree char *why = NULL;
  int r = cbt_qcow2_writer_create(path, &o, &w, &why);

  if (r < 0)
    fail_msg("create: %s", why);
  return w;
}

static void
finish_ok(cbt_qcow2_writer *w)
{
  g_autofree char *why = NULL;
  int r = cbt_qcow2_writer_finish(w, &why);

  if (r < 0)
    fail_msg("finish: %s", why);
}

/* --- tests --------------------------------------------------------------- */

static int
create_err(const char *path, const struct cbt_qcow2_writer_opts *o)
{
  cbt_qcow2_writer *w = NULL;
  g_autofree char *why = NULL;
  int r = cbt_qcow2_writer_create(path, o, &w, &why);

  if (r < 0) {
    assert_null(w);
    assert_non_null(why);
    assert_false(g_file_test(path, G_FILE_TEST_EXISTS));
  } else {
    cbt_qcow2_writer_free(w);
    g_unlink(path);
  }
  return r;
}

static void
test_create_args(void **state)
{
  struct fixture *fx = *state;
  g_autofree char *long_name = g_strnfill(1024, 'a');
  g_autofree char *name_1023 = g_strnfill(1023, 'a');
  g_autofree char *name_400 = g_strnfill(400, 'b');
  struct cbt_qcow2_writer_opts o;

#define TRY(expect, ...) do {                                            \
    o = (struct cbt_qcow2_writer_opts){ __VA_ARGS__ };                  \
    assert_int_equal(create_err(fx->path, &o), (expect));               \
  } while (0)

  TRY(0, .size = MiB);
  TRY(-EINVAL, .size = 0);
  TRY(-EINVAL, .size = MiB, .cluster_size = 256);
  TRY(-EINVAL, .size = MiB, .cluster_size = 3000);
  TRY(-EINVAL, .size = MiB, .cluster_size = 4 * MiB);
  TRY(0, .size = MiB, .cluster_size = 512);
  TRY(0, .size = MiB, .cluster_size = 2 * MiB);
  TRY(-EFBIG, .size = UINT64_MAX);
  TRY(-EFBIG, .size = 64 * TiB, .cluster_size = 4096);   /* L1 > 32 MiB */
  TRY(0, .size = 64 * TiB, .cluster_size = 16384);
  TRY(0, .size = 64 * TiB);
  TRY(-EINVAL, .size = MiB, .backing_format = "qcow2");
  TRY(-EINVAL, .size = MiB, .backing_file = "base.qcow2");
  TRY(-EINVAL, .size = MiB, .backing_file = "", .backing_format = "raw");
  TRY(-EINVAL, .size = MiB, .backing_file = "b", .backing_format = "vmdk");
  TRY(-EINVAL, .size = MiB, .backing_file = long_name, .backing_format = "raw");
  TRY(0, .size = MiB, .backing_file = name_1023, .backing_format = "raw");
  TRY(-EINVAL, .size = MiB, .cluster_size = 512, .backing_file = name_400,
      .backing_format = "qcow2");
  TRY(0, .size = MiB, .cluster_size = 1024, .backing_file = name_400,
      .backing_format = "qcow2");
#undef TRY

  /* O_EXCL */
  {
    cbt_qcow2_writer *w = create_ok(fx->path, MiB, 0, NULL);
    cbt_qcow2_writer *w2 = NULL;
    g_autofree char *why = NULL;

    o = (struct cbt_qcow2_writer_opts){ .size = MiB };
    assert_int_equal(cbt_qcow2_writer_create(fx->path, &o, &w2, &why), -EEXIST);
    assert_null(w2);
    assert_non_null(why);
    cbt_qcow2_writer_free(w);
  }
  assert_int_equal(cbt_qcow2_writer_create(fx->path, NULL, NULL, NULL), -EINVAL);
  cbt_qcow2_writer_free(NULL);
}

static void
test_io_args(void **state)
{
  struct fixture *fx = *state;
  const uint32_t cs = 4096;
  const uint64_t size = 10 * cs + 1024;
  g_autoptr(cbt_qcow2_writer) w = create_ok(fx->path, size, cs, NULL);
  g_autofree uint8_t *buf = g_malloc0(4 * cs);
  g_autofree char *why = NULL;

  memset(buf, 0x5a, 4 * cs);
  assert_int_equal(cbt_qcow2_writer_cluster_size(w), cs);
  assert_int_equal(cbt_qcow2_writer_write(w, 512, buf, cs), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_write(w, 0, buf, cs - 512), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_write(w, 0, buf, cs + 512), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_write(w, 10 * cs, buf, cs), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_write(w, 10 * cs, buf, 512), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_write(w, 11 * cs, buf, 0), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_write(w, 0, NULL, cs), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_zero(w, UINT64_MAX - cs + 1, 2 * cs), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_zero(w, 8 * cs, UINT64_MAX - 2 * cs + 1), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_zero(w, 0, 3 * cs + 1), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_zero(w, cs, 0), 0);
  assert_int_equal(cbt_qcow2_writer_write(w, cs, NULL, 0), 0);
  /* Ending exactly at the virtual size is allowed, in one go or alone. */
  assert_int_equal(cbt_qcow2_writer_write(w, 8 * cs, buf, 2 * cs + 1024), 0);
  assert_int_equal(cbt_qcow2_writer_write(w, 10 * cs, buf, 1024), 0);
  assert_int_equal(cbt_qcow2_writer_zero(w, 10 * cs, 1024), 0);
  assert_int_equal(cbt_qcow2_writer_data_bytes(w), 2 * cs);
  assert_int_equal(cbt_qcow2_writer_zero_bytes(w), 1024);
  assert_int_equal(cbt_qcow2_writer_zero(w, 9 * cs, cs + 1024), 0);
  assert_int_equal(cbt_qcow2_writer_data_bytes(w), cs);
  assert_int_equal(cbt_qcow2_writer_zero_bytes(w), cs + 1024);

  finish_ok(w);
  assert_int_equal(cbt_qcow2_writer_write(w, 0, buf, cs), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_zero(w, 0, cs), -EINVAL);
  assert_int_equal(cbt_qcow2_writer_finish(w, &why), -EINVAL);
  assert_non_null(why);
}

/* Random writes, zero writes and zeroing against an in-memory model, then
 * structural check and read-back. */
static void
random_workload(const char *path, uint32_t cs, uint64_t nclusters,
                uint64_t partial, bool backed, uint64_t seed)
{
  const uint64_t size = (nclusters - 1) * cs + partial;
  const uint64_t disk_size = (size + 511) & ~UINT64_C(511);
  g_autoptr(cbt_qcow2_writer) w = create_ok(path, size, cs,
                                            backed ? "../base.qcow2" : NULL);
  g_autofree uint8_t *model = g_malloc(disk_size);
  g_autofree uint8_t *got = g_malloc(disk_size);
  g_autofree uint8_t *buf = g_malloc(8 * (uint64_t)cs);
  uint64_t s = seed, data = 0, zero = 0;
  struct img im;

  memset(model, backed ? BACKING_BYTE : 0, disk_size);
  for (int op = 0; op < 120; op++) {
    uint64_t ci = rnd(&s) % nclusters, off = ci * cs;
    uint64_t want = (1 + rnd(&s) % 8) * cs;   /* MIN evaluates twice */
    uint64_t len = MIN(want, size - off);
    unsigned kind = (unsigned)(rnd(&s) % 4);

    if (kind <= 1) {
      fill_random(buf, len, &s);
      if (rnd(&s) % 3 == 0)     /* one all-zero cluster inside the write */
        memset(buf, 0, MIN(cs, len));
      assert_int_equal(cbt_qcow2_writer_write(w, off, buf, len), 0);
      memcpy(model + off, buf, len);
    } else if (kind == 2) {
      memset(buf, 0, len);
      assert_int_equal(cbt_qcow2_writer_write(w, off, buf, len), 0);
      memset(model + off, 0, len);
    } else {
      assert_int_equal(cbt_qcow2_writer_zero(w, off, len), 0);
      memset(model + off, 0, len);
    }
    /* Past the virtual size the last cluster reads as zeros once it is
     * written or zeroed. */
    if (off + len == size)
      memset(model + size, 0, disk_size - size);
  }
  finish_ok(w);

  img_open(&im, path);
  assert_int_equal(im.size, disk_size);
  assert_int_equal(im.cs, cs);
  if (backed) {
    assert_string_equal(im.backing, "../base.qcow2");
    assert_string_equal(im.backing_fmt, "qcow2");
  } else {
    assert_null(im.backing);
  }
  img_check(&im);
  img_read(&im, 0, disk_size, got, backed ? BACKING_BYTE : 0);
  assert_memory_equal(got, model, disk_size);
  img_count(&im, size, &data, &zero);
  assert_int_equal(cbt_qcow2_writer_data_bytes(w), data);
  assert_int_equal(cbt_qcow2_writer_zero_bytes(w), zero);
  if (!backed)
    for (uint64_t ci = 0; ci < nclusters; ci++)
      assert_int_not_equal(img_entry(&im, ci), ZERO_FLAG);
  img_close(&im);
}

static void
test_random(void **state)
{
  struct fixture *fx = *state;
  static const uint32_t sizes[] = { 512, 4096, 65536, 2 * 1024 * 1024 };

  for (size_t i = 0; i < G_N_ELEMENTS(sizes); i++) {
    uint32_t cs = sizes[i];
    uint64_t n = cs == 2 * MiB ? 9 : cs == 512 ? 300 : 37;
    /* 512: the last cluster half a sector long (header size rounds up). */
    uint64_t partials[] = { cs, cs >= 4096 ? cs / 2 + 512 : 256 };

    for (size_t p = 0; p < 2; p++) {
      for (int backed = 0; backed < 2; backed++) {
        random_workload(fx->path, cs, n, partials[p], backed,
                        i * 4 + p * 2 + (uint64_t)backed + 1);
        assert_int_equal(g_unlink(fx->path), 0);
      }
    }
  }
}

/* Rewrites go in place; zeroing keeps the host cluster (preallocated zero
 * cluster) and a later write reuses it. */
static void
test_rewrite_zero(void **state)
{
  struct fixture *fx = *state;
  const uint32_t cs = 65536;
  g_autoptr(cbt_qcow2_writer) w = create_ok(fx->path, 64 * cs, cs, "base");
  g_autofree uint8_t *a = g_malloc(cs), *got = g_malloc(cs);
  uint64_t s = 99, host;
  struct img im;

  fill_random(a, cs, &s);
  assert_int_equal(cbt_qcow2_writer_write(w, 3 * cs, a, cs), 0);
  assert_int_equal(cbt_qcow2_writer_write(w, 5 * cs, a, cs), 0);
  fill_random(a, cs, &s);
  assert_int_equal(cbt_qcow2_writer_write(w, 3 * cs, a, cs), 0);
  assert_int_equal(cbt_qcow2_writer_zero(w, 5 * cs, cs), 0);
  assert_int_equal(cbt_qcow2_writer_zero(w, 7 * cs, 2 * cs), 0);
  assert_int_equal(cbt_qcow2_writer_data_bytes(w), cs);
  assert_int_equal(cbt_qcow2_writer_zero_bytes(w), 3 * cs);
  finish_ok(w);

  img_open(&im, fx->path);
  img_check(&im);
  host = img_entry(&im, 3) & OFFSET_MASK;
  assert_int_equal(host, cs);                     /* first data cluster */
  assert_int_equal(img_entry(&im, 3), host | COPIED);
  assert_int_equal(img_entry(&im, 5), 2 * cs | COPIED | ZERO_FLAG);
  assert_int_equal(img_entry(&im, 7), ZERO_FLAG);
  assert_int_equal(img_entry(&im, 8), ZERO_FLAG);
  assert_int_equal(img_entry(&im, 4), 0);
  img_read(&im, 3 * cs, cs, got, BACKING_BYTE);
  assert_memory_equal(got, a, cs);
  /* Header + 2 data + 1 L2 + 1 L1 + 1 refcount table + 1 block. */
  assert_int_equal(im.file_size, 7 * cs);
  img_close(&im);
  g_unlink(fx->path);

  /* Zeroed data cluster written again: same host cluster. */
  g_clear_pointer(&w, cbt_qcow2_writer_free);
  w = create_ok(fx->path, 64 * cs, cs, NULL);
  assert_int_equal(cbt_qcow2_writer_write(w, 9 * cs, a, cs), 0);
  assert_int_equal(cbt_qcow2_writer_zero(w, 9 * cs, cs), 0);
  memset(a, 0, cs);
  assert_int_equal(cbt_qcow2_writer_write(w, 9 * cs, a, cs), 0);
  assert_int_equal(cbt_qcow2_writer_zero_bytes(w), cs);
  a[100] = 1;
  assert_int_equal(cbt_qcow2_writer_write(w, 9 * cs, a, cs), 0);
  /* No backing file: zeroing untouched clusters costs nothing. */
  assert_int_equal(cbt_qcow2_writer_zero(w, 0, 9 * cs), 0);
  assert_int_equal(cbt_qcow2_writer_write(w, 20 * cs, a + cs / 2, 0), 0);
  assert_int_equal(cbt_qcow2_writer_data_bytes(w), cs);
  assert_int_equal(cbt_qcow2_writer_zero_bytes(w), 0);
  finish_ok(w);
  img_open(&im, fx->path);
  img_check(&im);
  assert_int_equal(img_entry(&im, 9), cs | COPIED);
  for (uint64_t ci = 0; ci < 9; ci++)
    assert_int_equal(img_entry(&im, ci), 0);
  img_read(&im, 9 * cs, cs, got, 0);
  assert_memory_equal(got, a, cs);
  img_close(&im);
}

static void
test_empty(void **state)
{
  struct fixture *fx = *state;
  g_autoptr(cbt_qcow2_writer) w = create_ok(fx->path, 1000, 0, NULL);
  struct img im;

  /* A zero-filled buffer for an image without backing file: no L2. */
  {
    uint8_t zeros[1000] = { 0 };

    assert_int_equal(cbt_qcow2_writer_write(w, 0, zeros, sizeof zeros), 0);
  }
  finish_ok(w);
  img_open(&im, fx->path);
  assert_int_equal(im.size, 1024);                /* rounded to a sector */
  assert_int_equal(im.l1_size, 1);
  assert_int_equal(im.l1[0], 0);
  img_check(&im);
  img_close(&im);
}

struct tjob {
  cbt_qcow2_writer *w;
  const uint8_t *model;
  uint32_t cs;
  uint64_t nclusters;
  unsigned t, nthreads;
  bool once;                  /* write each cluster once (sink mode) */
};

static void *
thread_writer(void *opaque)
{
  struct tjob *j = opaque;
  g_autofree uint64_t *order = g_new(uint64_t, j->nclusters);
  uint64_t n = 0, s = j->t + 1000;

  for (uint64_t ci = j->t; ci < j->nclusters; ci += j->nthreads)
    order[n++] = ci;
  for (uint64_t i = n; i > 1; i--) {
    uint64_t k = rnd(&s) % i, tmp = order[i - 1];

    order[i - 1] = order[k];
    order[k] = tmp;
  }
  for (uint64_t i = 0; i < n; i++) {
    uint64_t off = order[i] * j->cs;

    assert_int_equal(cbt_qcow2_writer_write(j->w, off, j->model + off, j->cs), 0);
    if (i % 5 == 0 && !j->once)
      assert_int_equal(cbt_qcow2_writer_write(j->w, off, j->model + off, j->cs), 0);
  }
  return NULL;
}

static void
test_threads(void **state)
{
  struct fixture *fx = *state;
  const uint32_t cs = 4096;
  const uint64_t nclusters = 4000;
  const unsigned nthreads = 8;
  g_autoptr(cbt_qcow2_writer) w = create_ok(fx->path, nclusters * cs, cs, "b");
  g_autofree uint8_t *model = g_malloc(nclusters * cs);
  g_autofree uint8_t *got = g_malloc(nclusters * cs);
  pthread_t tids[8];
  struct tjob jobs[8];
  uint64_t s = 5, data, zero;
  struct img im;

  fill_random(model, nclusters * cs, &s);
  for (uint64_t ci = 0; ci < nclusters; ci += 7)
    memset(model + ci * cs, 0, cs);
  for (unsigned t = 0; t < nthreads; t++) {
    jobs[t] = (struct tjob){ w, model, cs, nclusters, t, nthreads, false };
    assert_int_equal(pthread_create(&tids[t], NULL, thread_writer, &jobs[t]), 0);
  }
  for (unsigned t = 0; t < nthreads; t++)
    pthread_join(tids[t], NULL);
  finish_ok(w);

  img_open(&im, fx->path);
  img_check(&im);
  img_read(&im, 0, nclusters * cs, got, BACKING_BYTE);
  assert_memory_equal(got, model, nclusters * cs);
  img_count(&im, nclusters * cs, &data, &zero);
  assert_int_equal(zero, (nclusters + 6) / 7 * cs);
  assert_int_equal(data + zero, nclusters * cs);
  assert_int_equal(cbt_qcow2_writer_data_bytes(w), data);
  img_close(&im);
}

/* Sink mode: no file; the bytes arrive in file order (checked here) and
 * the header last.  Put together they must be a valid image holding what
 * eight threads wrote (each cluster once), a partial last cluster
 * included; rewriting a cluster is refused without changing anything;
 * a sink error fails the write and everything after it. */
struct sink_buf {
  GMutex lock;
  GByteArray *bytes;          /* the file as assembled */
  uint64_t end;               /* next offset expected */
  bool head_seen, out_of_order;
  uint64_t fail_at;           /* fail data reaching this offset (0: never) */
};

static int
sink_data(void *opaque, uint64_t off, const void *buf, size_t len)
{
  struct sink_buf *sb = opaque;
  int r = 0;

  g_mutex_lock(&sb->lock);
  if (off != sb->end || sb->head_seen)
    sb->out_of_order = true;
  if (sb->fail_at && off + len > sb->fail_at) {
    r = -ENOSPC;
  } else {
    if (sb->bytes->len < off + len)
      g_byte_array_set_size(sb->bytes, (guint)(off + len));
    memcpy(sb->bytes->data + off, buf, len);
    sb->end = off + len;
  }
  g_mutex_unlock(&sb->lock);
  return r;
}

static int
sink_head(void *opaque, const void *buf, size_t len)
{
  struct sink_buf *sb = opaque;

  memcpy(sb->bytes->data, buf, len);
  sb->head_seen = true;
  return 0;
}

static cbt_qcow2_writer *
create_sink_ok(struct sink_buf *sb, uint64_t size, uint32_t cs, const char *backing)
{
  struct cbt_qcow2_writer_opts o = {
    .size = size, .cluster_size = cs, .backing_file = backing,
    .backing_format = backing ? "qcow2" : NULL,
  };
  struct cbt_qcow2_writer_sink sink = { sink_data, sink_head, sb };
  cbt_qcow2_writer *w = NULL;
  g_autofree char *why = NULL;

  g_mutex_init(&sb->lock);
  sb->bytes = g_byte_array_new();
  g_byte_array_set_size(sb->bytes, cs);
  sb->end = cs;
  if (cbt_qcow2_writer_create_sink(&o, &sink, &w, &why) < 0)
    fail_msg("create_sink: %s", why);
  return w;
}

static void
test_sink(void **state)
{
  struct fixture *fx = *state;
  const uint32_t cs = 4096;
  const uint64_t nclusters = 3000, size = nclusters * cs - 1000;
  struct sink_buf sb = { 0 };
  g_autoptr(cbt_qcow2_writer) w = create_sink_ok(&sb, size, cs, "b");
  g_autofree uint8_t *model = g_malloc0(nclusters * cs);
  g_autofree uint8_t *got = g_malloc(nclusters * cs);
  g_autofree uint8_t *junk = g_malloc(cs);
  pthread_t tids[8];
  struct tjob jobs[8];
  uint64_t s = 9;
  struct img im;
  int fd;

  fill_random(model, size, &s);
  for (uint64_t ci = 0; ci < nclusters; ci += 5)
    memset(model + ci * cs, 0, cs);
  for (unsigned t = 0; t < 8; t++) {
    jobs[t] = (struct tjob){ w, model, cs, nclusters - 1, t, 8, true };
    assert_int_equal(pthread_create(&tids[t], NULL, thread_writer, &jobs[t]), 0);
  }
  for (unsigned t = 0; t < 8; t++)
    pthread_join(tids[t], NULL);
  /* The partial last cluster. */
  assert_int_equal(cbt_qcow2_writer_write(w, (nclusters - 1) * cs,
                                          model + (nclusters - 1) * cs,
                                          size - (nclusters - 1) * cs), 0);
  /* A rewrite is refused; zeroing a written cluster is fine. */
  fill_random(junk, cs, &s);
  assert_int_equal(cbt_qcow2_writer_write(w, 1 * cs, junk, cs), -ENOTSUP);
  assert_int_equal(cbt_qcow2_writer_zero(w, 2 * cs, cs), 0);
  memset(model + 2 * cs, 0, cs);
  finish_ok(w);
  assert_true(sb.head_seen);
  assert_false(sb.out_of_order);
  assert_true(cbt_qcow2_writer_stream_intact(w));

  fd = open(fx->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  assert_true(fd >= 0);
  assert_int_equal(write(fd, sb.bytes->data, sb.bytes->len), (ssize_t)sb.bytes->len);
  close(fd);
  img_open(&im, fx->path);
  img_check(&im);
  img_read(&im, 0, size, got, BACKING_BYTE);
  assert_memory_equal(got, model, size);
  img_close(&im);
  g_byte_array_unref(sb.bytes);
  g_mutex_clear(&sb.lock);
}

static void
test_sink_error(void **state)
{
  const uint32_t cs = 4096;
  struct sink_buf sb = { .fail_at = 10 * cs };
  g_autoptr(cbt_qcow2_writer) w = create_sink_ok(&sb, 100 * cs, cs, NULL);
  g_autofree uint8_t *a = g_malloc(8 * cs);
  g_autofree char *why = NULL;
  uint64_t s = 4;

  (void)state;
  fill_random(a, 8 * cs, &s);
  assert_int_equal(cbt_qcow2_writer_write(w, 0, a, 8 * cs), 0);
  assert_int_equal(cbt_qcow2_writer_write(w, 8 * cs, a, 8 * cs), -ENOSPC);
  assert_true(cbt_qcow2_writer_write(w, 50 * cs, a, cs) < 0);
  assert_true(cbt_qcow2_writer_finish(w, &why) < 0);
  assert_false(sb.head_seen);
  g_byte_array_unref(sb.bytes);
  g_mutex_clear(&sb.lock);
}

/* 64 TiB virtual disk: L1 of 131072 entries, sparse file. */
static void
test_large(void **state)
{
  struct fixture *fx = *state;
  const uint32_t cs = 65536;
  const uint64_t size = 64 * TiB;
  g_autoptr(cbt_qcow2_writer) w = create_ok(fx->path, size, cs, "full.qcow2");
  g_autofree uint8_t *a = g_malloc(cs), *got = g_malloc(cs);
  uint64_t s = 3, offs[] = { 0, 33 * TiB + 7 * cs, size - cs };
  uint64_t used = 0;
  struct img im;

  for (size_t i = 0; i < G_N_ELEMENTS(offs); i++) {
    fill_random(a, cs, &s);
    assert_int_equal(cbt_qcow2_writer_write(w, offs[i], a, cs), 0);
  }
  assert_int_equal(cbt_qcow2_writer_zero(w, 40 * TiB, MiB), 0);
  finish_ok(w);

  img_open(&im, fx->path);
  assert_int_equal(im.size, size);
  assert_int_equal(im.l1_size, 131072);
  for (uint32_t i = 0; i < im.l1_size; i++)
    used += im.l1[i] != 0;
  assert_int_equal(used, 4);
  img_check(&im);
  img_read(&im, size - cs, cs, got, BACKING_BYTE);
  assert_memory_equal(got, a, cs);
  assert_int_equal(img_entry(&im, 40 * TiB / cs), ZERO_FLAG);
  assert_int_equal(img_entry(&im, 40 * TiB / cs + 16), 0);
  img_close(&im);
}

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(test_create_args, setup, teardown),
    cmocka_unit_test_setup_teardown(test_io_args, setup, teardown),
    cmocka_unit_test_setup_teardown(test_random, setup, teardown),
    cmocka_unit_test_setup_teardown(test_rewrite_zero, setup, teardown),
    cmocka_unit_test_setup_teardown(test_empty, setup, teardown),
    cmocka_unit_test_setup_teardown(test_threads, setup, teardown),
    cmocka_unit_test_setup_teardown(test_large, setup, teardown),
    cmocka_unit_test_setup_teardown(test_sink, setup, teardown),
    cmocka_unit_test(test_sink_error),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
