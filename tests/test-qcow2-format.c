/* Unit tests for the qcow2 format layer (lib/qcow2/qcow2.c): a valid v2 and v3
 * header decode to the right fields, every header field that can be wrong
 * is rejected with the right error and a reason naming it, header
 * extensions (backing format, feature names) are parsed and bounded, and
 * L1/L2/refcount table entries decode, including compressed descriptors
 * and reserved bits.  Byte offsets come from QEMU's docs/interop/qcow2.txt,
 * so the tests hold the code to the spec. */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <endian.h>
#include <errno.h>
#include <string.h>

#include <cmocka.h>
#include <glib.h>

#include "cbt/qcow2.h"

#define CS 65536u                        /* cluster size of the test image */
#define FILE_SIZE (UINT64_C(4) * CS)

static uint8_t img[CS];

static void put32(uint32_t off, uint32_t v) { v = htobe32(v); memcpy(img + off, &v, 4); }
static void put64(uint32_t off, uint64_t v) { v = htobe64(v); memcpy(img + off, &v, 8); }

/* A v3 header like `qemu-img create -f qcow2 x 1G` makes: reftable in
 * cluster 1, L1 in cluster 3, end-of-extensions right after the header. */
static void
make_v3(void)
{
  memset(img, 0, sizeof img);
  put32(0, CBT_QCOW2_MAGIC);
  put32(4, 3);
  put32(20, 16);
  put64(24, UINT64_C(1) << 30);
  put32(36, 2);                          /* 1 GiB / 512 MiB per entry */
  put64(40, 3 * CS);
  put64(48, CS);
  put32(56, 1);
  put32(96, 4);
  put32(100, 112);
}

static void
make_v2(void)
{
  make_v3();
  put32(4, 2);
  memset(img + 72, 0, 40);
}

static int
decode(struct cbt_qcow2_info *h, char **why)
{
  g_free(*why);
  *why = NULL;
  return cbt_qcow2_header_decode(img, sizeof img, FILE_SIZE, h, why);
}

static void
expect(int err, const char *word)
{
  struct cbt_qcow2_info h;
  g_autofree char *why = NULL;
  int r = decode(&h, &why);

  if (r != err || !why || !strstr(why, word))
    fail_msg("expected %d mentioning '%s', got %d: %s", err, word, r,
             why ? why : "(no reason)");
}

static void
test_valid_v3(void **state)
{
  struct cbt_qcow2_info h;
  g_autofree char *why = NULL;

  (void)state;
  make_v3();
  assert_int_equal(decode(&h, &why), 0);
  assert_null(why);
  assert_int_equal(h.version, 3);
  assert_int_equal(h.cluster_bits, 16);
  assert_int_equal(h.cluster_size, CS);
  assert_int_equal(h.size, UINT64_C(1) << 30);
  assert_int_equal(h.l1_size, 2);
  assert_int_equal(h.l1_table_offset, 3 * CS);
  assert_int_equal(h.refcount_table_offset, CS);
  assert_int_equal(h.refcount_table_clusters, 1);
  assert_int_equal(h.refcount_order, 4);
  assert_int_equal(h.header_length, 112);
  assert_string_equal(h.backing_file, "");
}

static void
test_valid_v2(void **state)
{
  struct cbt_qcow2_info h;
  g_autofree char *why = NULL;

  (void)state;
  make_v2();
  assert_int_equal(decode(&h, &why), 0);
  assert_int_equal(h.version, 2);
  assert_int_equal(h.header_length, 72);
  assert_int_equal(h.refcount_order, 4);
  /* v2 ignores bytes 72.. even if they look like v3 fields */
  put64(72, 1);
  assert_int_equal(decode(&h, &why), 0);
}

static void
test_bad_fields(void **state)
{
  (void)state;
  make_v3(); put32(0, 0x514649fa); expect(-EINVAL, "magic");
  make_v3(); put32(4, 1); expect(-ENOTSUP, "version 1");
  make_v3(); put32(4, 4); expect(-ENOTSUP, "version 4");
  make_v3(); put32(20, 8); expect(-EBADMSG, "cluster_bits");
  make_v3(); put32(20, 22); expect(-ENOTSUP, "cluster size");
  make_v3(); put32(32, 1); expect(-ENOTSUP, "encryption");
  make_v3(); put32(32, 2); expect(-ENOTSUP, "LUKS");
  make_v3(); put32(36, 1); expect(-EBADMSG, "too small");
  make_v3(); put32(36, 0x10000000); expect(-EBADMSG, "too large");
  make_v3(); put64(40, 3 * CS + 512); expect(-EBADMSG, "l1_table_offset");
  make_v3(); put64(40, 0); expect(-EBADMSG, "l1_table_offset");
  make_v3(); put64(40, 4 * CS); expect(-EBADMSG, "l1_table_offset");
  make_v3(); put64(48, 0); expect(-EBADMSG, "refcount_table_offset");
  make_v3(); put64(48, CS + 8); expect(-EBADMSG, "refcount_table_offset");
  make_v3(); put32(56, 4); expect(-EBADMSG, "refcount_table_offset");
  make_v3(); put32(56, 0); expect(-EBADMSG, "refcount_table_clusters");
  make_v3(); put32(56, 0x10000); expect(-EBADMSG, "refcount_table_clusters");
  make_v3(); put32(60, 1); put64(64, 7); expect(-EBADMSG, "snapshots_offset");
  make_v3(); put64(72, CBT_QCOW2_INCOMPAT_DIRTY); expect(-ENOTSUP, "dirty");
  make_v3(); put64(72, CBT_QCOW2_INCOMPAT_CORRUPT); expect(-ENOTSUP, "corrupt");
  make_v3(); put64(72, CBT_QCOW2_INCOMPAT_DATA_FILE); expect(-ENOTSUP, "external data file");
  make_v3(); put64(72, CBT_QCOW2_INCOMPAT_COMPRESSION); img[104] = 1;
  expect(-ENOTSUP, "compression");
  make_v3(); img[104] = 1; expect(-EBADMSG, "compression_type");
  make_v3(); put64(72, CBT_QCOW2_INCOMPAT_EXTL2); expect(-ENOTSUP, "extended L2");
  make_v3(); put64(72, UINT64_C(1) << 5); expect(-ENOTSUP, "bit 5");
  make_v3(); put64(72, UINT64_C(1) << 63); expect(-ENOTSUP, "bit 63");
  make_v3(); put32(96, 3); expect(-ENOTSUP, "refcount width 8");
  make_v3(); put32(96, 5); expect(-ENOTSUP, "refcount width 32");
  make_v3(); put32(96, 7); expect(-EBADMSG, "refcount_order");
  make_v3(); put32(100, 100); expect(-EBADMSG, "header_length");
  make_v3(); put32(100, 108); expect(-EBADMSG, "header_length");
  make_v3(); put32(100, CS + 8); expect(-EBADMSG, "header_length");
  make_v3(); put64(24, UINT64_C(1) << 63); expect(-ENOTSUP, "too large");
}

static void
test_compat_ok(void **state)
{
  struct cbt_qcow2_info h;
  g_autofree char *why = NULL;

  (void)state;
  /* Compatible and autoclear bits never stop a reader. */
  make_v3();
  put64(80, ~UINT64_C(0));
  put64(88, ~UINT64_C(0));
  assert_int_equal(decode(&h, &why), 0);
  assert_int_equal(h.autoclear_features, ~UINT64_C(0));
}

/* The corrupt bit stops a writer, not a reader that asks to be let in;
 * every other check still applies. */
static void
test_allow_corrupt(void **state)
{
  struct cbt_qcow2_info h;
  g_autofree char *why = NULL;

  (void)state;
  make_v3();
  put64(72, CBT_QCOW2_INCOMPAT_CORRUPT);
  assert_int_equal(cbt_qcow2_header_decode_flags(img, sizeof img, FILE_SIZE,
                                                 CBT_QCOW2_DECODE_ALLOW_CORRUPT,
                                                 &h, &why), 0);
  assert_null(why);
  assert_int_equal(h.incompatible_features, CBT_QCOW2_INCOMPAT_CORRUPT);
  put64(72, CBT_QCOW2_INCOMPAT_CORRUPT | CBT_QCOW2_INCOMPAT_DIRTY);
  assert_int_equal(cbt_qcow2_header_decode_flags(img, sizeof img, FILE_SIZE,
                                                 CBT_QCOW2_DECODE_ALLOW_CORRUPT,
                                                 &h, &why), -ENOTSUP);
  assert_non_null(strstr(why, "dirty"));
}

static void
test_truncated(void **state)
{
  struct cbt_qcow2_info h;
  g_autofree char *why = NULL;

  (void)state;
  make_v3();
  for (size_t len = 0; len < 112; len++) {
    int r = cbt_qcow2_header_decode(img, len, FILE_SIZE, &h, &why);

    assert_true(r == -EBADMSG || (len < 4 && r == -EINVAL));
    g_free(why);
    why = NULL;
  }
}

static void
test_extensions(void **state)
{
  struct cbt_qcow2_info h;
  g_autofree char *why = NULL;
  uint32_t p = 112;

  (void)state;
  make_v3();
  put32(p, CBT_QCOW2_EXT_BACKING_FMT);
  put32(p + 4, 5);
  memcpy(img + p + 8, "qcow2", 5);
  p += 16;
  put32(p, CBT_QCOW2_EXT_FEATURE_NAMES);
  put32(p + 4, 96);
  img[p + 8] = 0; img[p + 9] = 7;
  memcpy(img + p + 10, "time travel", 11);
  img[p + 56] = 0; img[p + 57] = 0;
  memcpy(img + p + 58, "dirty bit", 9);
  p += 8 + 96;
  put32(p, 0x12345678);                  /* unknown: skipped */
  put32(p + 4, 3);
  p += 16;
  put32(p, CBT_QCOW2_EXT_END);
  p += 8;
  put64(8, p);
  put32(16, 9);
  memcpy(img + p, "base.raw1", 9);
  assert_int_equal(decode(&h, &why), 0);
  assert_string_equal(h.backing_format, "qcow2");
  assert_string_equal(h.backing_file, "base.raw1");

  /* Unknown incompatible bits are named from the feature table. */
  put64(72, UINT64_C(1) << 7);
  expect(-ENOTSUP, "time travel");

  /* Backing name problems. */
  put64(72, 0);
  put32(16, 0); expect(-EBADMSG, "backing_file_size");
  put32(16, 1024); expect(-EBADMSG, "backing_file_size");
  put32(16, 9); put64(8, CS - 4); expect(-EBADMSG, "backing file name");
  put64(8, 8); expect(-EBADMSG, "overlaps");
  put64(8, p); img[p + 2] = 0; expect(-EBADMSG, "NUL");

  /* An extension longer than the cluster. */
  make_v3();
  put32(112, CBT_QCOW2_EXT_BITMAPS);
  put32(116, CS);
  expect(-EBADMSG, "extension");
  make_v3();
  put32(112, CBT_QCOW2_EXT_BACKING_FMT);
  put32(116, 100);
  expect(-EBADMSG, "backing file format");
}

static void
test_l2_entries(void **state)
{
  struct cbt_qcow2_map m;

  (void)state;
  assert_int_equal(cbt_qcow2_l2_decode(0, 16, 3, &m), 0);
  assert_int_equal(m.type, CBT_QCOW2_UNALLOCATED);
  assert_int_equal(cbt_qcow2_l2_decode(1, 16, 3, &m), 0);
  assert_int_equal(m.type, CBT_QCOW2_ZERO_PLAIN);
  assert_int_equal(cbt_qcow2_l2_decode(1, 16, 2, &m), -EBADMSG);   /* v2 */
  assert_int_equal(cbt_qcow2_l2_decode(CBT_QCOW2_COPIED | 0x50000, 16, 3, &m), 0);
  assert_int_equal(m.type, CBT_QCOW2_NORMAL);
  assert_int_equal(m.host_offset, 0x50000);
  assert_true(m.copied);
  assert_int_equal(cbt_qcow2_l2_decode(CBT_QCOW2_COPIED | 0x50001, 16, 3, &m), 0);
  assert_int_equal(m.type, CBT_QCOW2_ZERO_ALLOC);
  assert_int_equal(cbt_qcow2_l2_decode(0x50200, 16, 3, &m), -EBADMSG);  /* misaligned */
  assert_int_equal(cbt_qcow2_l2_decode(0x50200, 9, 3, &m), 0);
  assert_int_equal(cbt_qcow2_l2_decode(0x50002, 16, 3, &m), -EBADMSG);  /* bit 1 */
  assert_int_equal(cbt_qcow2_l2_decode(0x50000 | (UINT64_C(1) << 56), 16, 3, &m), -EBADMSG);
  assert_int_equal(cbt_qcow2_l2_decode(CBT_QCOW2_COPIED, 16, 3, &m), -EBADMSG);

  /* Compressed, 64 KiB clusters: x = 54; offset 0x12345, 3 more sectors. */
  uint64_t e = CBT_QCOW2_COMPRESSED_BIT | (UINT64_C(3) << 54) | 0x12345;
  assert_int_equal(cbt_qcow2_l2_decode(e, 16, 3, &m), 0);
  assert_int_equal(m.type, CBT_QCOW2_COMPRESSED);
  assert_int_equal(m.host_offset, 0x12345);
  assert_int_equal(m.comp_len, 4 * 512 - 0x145);
  assert_int_equal(cbt_qcow2_l2_decode(e | CBT_QCOW2_COPIED, 16, 3, &m), -EBADMSG);
  /* 512-byte clusters: x = 61, one sector field bit; offsets above bit 55
   * must be zero. */
  e = CBT_QCOW2_COMPRESSED_BIT | (UINT64_C(1) << 61) | 0x200;
  assert_int_equal(cbt_qcow2_l2_decode(e, 9, 3, &m), 0);
  assert_int_equal(m.comp_len, 1024);
  e = CBT_QCOW2_COMPRESSED_BIT | (UINT64_C(1) << 57);
  assert_int_equal(cbt_qcow2_l2_decode(e, 9, 3, &m), -EBADMSG);

  assert_int_equal(cbt_qcow2_l2_encode(0x50000, false), CBT_QCOW2_COPIED | 0x50000);
  assert_int_equal(cbt_qcow2_l2_encode(0, true), 1);
  assert_int_equal(cbt_qcow2_l2_encode(0, false), 0);
}

static void
test_l1_reftable(void **state)
{
  uint64_t off;
  bool copied;

  (void)state;
  assert_int_equal(cbt_qcow2_l1_decode(CBT_QCOW2_COPIED | 0x30000, 16, &off, &copied), 0);
  assert_int_equal(off, 0x30000);
  assert_true(copied);
  assert_int_equal(cbt_qcow2_l1_decode(0, 16, &off, &copied), 0);
  assert_int_equal(off, 0);
  assert_int_equal(cbt_qcow2_l1_decode(0x30001, 16, &off, &copied), -EBADMSG);
  assert_int_equal(cbt_qcow2_l1_decode(0x30000 | (UINT64_C(1) << 60), 16, &off, &copied), -EBADMSG);
  assert_int_equal(cbt_qcow2_l1_decode(0x31000, 16, &off, &copied), -EBADMSG);
  assert_int_equal(cbt_qcow2_reftable_decode(0x20000, 16, &off), 0);
  assert_int_equal(off, 0x20000);
  assert_int_equal(cbt_qcow2_reftable_decode(0x20100, 16, &off), -EBADMSG);
  assert_int_equal(cbt_qcow2_reftable_decode(0x20001, 16, &off), -EBADMSG);
  assert_int_equal(cbt_qcow2_l1_entries_needed(UINT64_C(1) << 30, 16), 2);
  assert_int_equal(cbt_qcow2_l1_entries_needed((UINT64_C(1) << 30) + 1, 16), 3);
  assert_int_equal(cbt_qcow2_l1_entries_needed(0, 16), 0);
  assert_int_equal(cbt_qcow2_l1_entries_needed(1 << 20, 9), 32);
}

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_valid_v3),
    cmocka_unit_test(test_valid_v2),
    cmocka_unit_test(test_bad_fields),
    cmocka_unit_test(test_compat_ok),
    cmocka_unit_test(test_allow_corrupt),
    cmocka_unit_test(test_truncated),
    cmocka_unit_test(test_extensions),
    cmocka_unit_test(test_l2_entries),
    cmocka_unit_test(test_l1_reftable),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
