/* Unit tests for the instant restore's progress file (lib/restore-state.c,
 * restore-state-format.md): round trip, the write rules (bits only go
 * up, only changed pages are written), and what a reader must reject. */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <glib.h>

#include "cbt/crc32c.h"
#include "cbt/restore-state.h"
#include "cbt/util.h"

static char *
tmp_path(void)
{
  char *dir = g_dir_make_tmp("rstate-XXXXXX", NULL);

  assert_non_null(dir);
  return dir;
}

static struct cbt_rstate_info
sample(void)
{
  struct cbt_rstate_info info = {
    .image_size = (UINT64_C(1) << 30) + 4096,     /* 16385 bits of 64 KiB */
    .output_ino = 1234,
    .source_ino = 5678,
    .granularity = 65536,
  };
  strcpy(info.source_name, "incremental-2024.qcow2");
  return info;
}

static void
test_round_trip(void **state)
{
  g_autofree char *dir = tmp_path();
  g_autofree char *p = g_build_filename(dir, "s", NULL);
  struct cbt_rstate_info info = sample();
  cbt_rstate *s = NULL;
  g_autofree uint64_t *w = NULL;
  uint64_t nbits = cbt_rstate_nbits(info.image_size, info.granularity);
  uint64_t nwords = (nbits + 63) / 64;
  struct stat st;

  (void)state;
  assert_int_equal(nbits, 16385);
  assert_int_equal(cbt_rstate_create(p, &info, NULL), 0);
  assert_int_equal(cbt_rstate_create(p, &info, NULL), -EEXIST);
  assert_int_equal(cbt_rstate_open(p, true, &s, NULL), 0);
  assert_int_equal(cbt_rstate_get_info(s)->output_ino, 1234);
  assert_string_equal(cbt_rstate_get_info(s)->source_name, "incremental-2024.qcow2");
  assert_int_equal(cbt_rstate_count(s), 0);
  assert_false(cbt_rstate_complete(s));

  /* Bits in the first and the last page; then all. */
  w = g_new0(uint64_t, nwords);
  w[0] = 5;
  w[nwords - 1] = 1;                /* bit 16384, the last one */
  assert_int_equal(cbt_rstate_store(s, w, NULL), 0);
  cbt_rstate_free(s);
  assert_int_equal(cbt_rstate_open(p, false, &s, NULL), 0);
  assert_int_equal(cbt_rstate_count(s), 3);
  assert_true(cbt_rstate_words(s)[0] == 5);
  cbt_rstate_free(s);

  /* Clearing a bit is refused and writes nothing. */
  assert_int_equal(cbt_rstate_open(p, true, &s, NULL), 0);
  w[0] = 4;
  assert_int_equal(cbt_rstate_store(s, w, NULL), -EINVAL);
  for (uint64_t i = 0; i < nwords; i++)
    w[i] = ~UINT64_C(0);
  w[nwords - 1] = 1;
  assert_int_equal(cbt_rstate_store(s, w, NULL), 0);
  assert_true(cbt_rstate_complete(s));
  cbt_rstate_free(s);
  assert_int_equal(cbt_rstate_open(p, false, &s, NULL), 0);
  assert_true(cbt_rstate_complete(s));
  cbt_rstate_free(s);
  assert_int_equal(stat(p, &st), 0);
  assert_int_equal(st.st_size, 4096 + 4096);
  unlink(p);
  rmdir(dir);
}

/* Write @len bytes at @off of @p. */
static void
poke(const char *p, uint64_t off, const void *buf, size_t len)
{
  int fd = open(p, O_WRONLY);

  assert_true(fd >= 0);
  assert_int_equal(pwrite(fd, buf, len, (off_t)off), (ssize_t)len);
  close(fd);
}

/* Re-checksum the header of @p after a change, so that the field checks
 * (not the checksum) are what must refuse it. */
static void
fix_crc(const char *p)
{
  uint8_t h[4096];
  int fd = open(p, O_RDWR);

  assert_true(fd >= 0);
  assert_int_equal(pread(fd, h, sizeof h, 0), (ssize_t)sizeof h);
  cbt_put_be32(h + 4092, cbt_crc32c(0, h, 4092));
  assert_int_equal(pwrite(fd, h, sizeof h, 0), (ssize_t)sizeof h);
  close(fd);
}

static void
expect_refused(const char *p, int err)
{
  cbt_rstate *s = NULL;
  g_autofree char *why = NULL;

  assert_int_equal(cbt_rstate_open(p, false, &s, &why), err);
  assert_null(s);
  assert_non_null(why);
}

static void
test_rejects(void **state)
{
  g_autofree char *dir = tmp_path();
  g_autofree char *p = g_build_filename(dir, "s", NULL);
  struct cbt_rstate_info info = sample();
  uint8_t one = 1, x = 0x80;
  uint32_t v32;
  uint64_t v64;
  static const struct { uint64_t off; int crc; int err; } cases[] = {
    { 0, 0, -EINVAL },              /* magic */
    { 8, 1, -ENOTSUP },             /* version */
    { 100, 0, -EBADMSG },           /* a byte under the checksum */
    { 44, 1, -EBADMSG },            /* reserved field */
    { 400, 1, -EBADMSG },           /* reserved area */
  };

  (void)state;
  for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
    unlink(p);
    assert_int_equal(cbt_rstate_create(p, &info, NULL), 0);
    poke(p, cases[i].off, &x, 1);
    if (cases[i].crc)
      fix_crc(p);
    expect_refused(p, cases[i].err);
  }
  /* Granularity not a power of two; nbits that does not match. */
  unlink(p);
  assert_int_equal(cbt_rstate_create(p, &info, NULL), 0);
  v32 = htole32(65537);
  poke(p, 40, &v32, 4);
  fix_crc(p);
  expect_refused(p, -EBADMSG);
  unlink(p);
  assert_int_equal(cbt_rstate_create(p, &info, NULL), 0);
  v64 = htole64(16384);
  poke(p, 48, &v64, 8);
  fix_crc(p);
  expect_refused(p, -EBADMSG);
  /* A bit past the last granule (bit 16385). */
  unlink(p);
  assert_int_equal(cbt_rstate_create(p, &info, NULL), 0);
  poke(p, 4096 + 16384 / 8, (uint8_t[]){ 2 }, 1);
  expect_refused(p, -EBADMSG);
  /* ... but the last granule itself is fine. */
  poke(p, 4096 + 16384 / 8, &one, 1);
  {
    cbt_rstate *s = NULL;

    assert_int_equal(cbt_rstate_open(p, false, &s, NULL), 0);
    assert_int_equal(cbt_rstate_count(s), 1);
    cbt_rstate_free(s);
  }
  /* Truncated. */
  assert_int_equal(truncate(p, 4096 + 100), 0);
  expect_refused(p, -EBADMSG);
  assert_int_equal(truncate(p, 100), 0);
  expect_refused(p, -EBADMSG);
  unlink(p);
  /* Bad arguments are refused at creation. */
  info.granularity = 1000;
  assert_int_equal(cbt_rstate_create(p, &info, NULL), -EINVAL);
  info = sample();
  info.source_name[0] = 0;
  assert_int_equal(cbt_rstate_create(p, &info, NULL), -EINVAL);
  assert_int_equal(access(p, F_OK), -1);
  rmdir(dir);
}

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_round_trip),
    cmocka_unit_test(test_rejects),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
