/* Unit tests for NBD wire encoding and request validation (lib/nbd-wire.c). */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <string.h>

#include <cmocka.h>

#include "cbt/nbd-proto.h"

static const struct cbt_nbd_caps caps_rw = {
  .export_size = 1 << 20,
  .max_block = CBT_NBD_MAX_BLOCK,
  .read_only = false,
  .structured_replies = true,
  .fast_zero = true,
  .n_meta_contexts = 1,
};

static struct cbt_nbd_request
mkreq(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length)
{
  struct cbt_nbd_request r = {
    .magic = NBD_REQUEST_MAGIC, .flags = flags, .type = type,
    .cookie = 0x1122334455667788ull, .offset = offset, .length = length,
  };
  return r;
}

static void
test_request_roundtrip(void **state)
{
  (void)state;
  struct cbt_nbd_request in = mkreq(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA,
                                    0x0102030405060708ull, 0xa0b0c0d0);
  struct cbt_nbd_request out;
  uint8_t buf[NBD_REQUEST_SIZE];
  static const uint8_t expect[NBD_REQUEST_SIZE] = {
    0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01,
    0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    0xa0, 0xb0, 0xc0, 0xd0,
  };

  cbt_nbd_request_encode(&in, buf);
  assert_memory_equal(buf, expect, sizeof expect);
  cbt_nbd_request_decode(buf, &out);
  assert_int_equal(out.magic, in.magic);
  assert_int_equal(out.flags, in.flags);
  assert_int_equal(out.type, in.type);
  assert_true(out.cookie == in.cookie);
  assert_true(out.offset == in.offset);
  assert_int_equal(out.length, in.length);
}

static void
test_reply_encodings(void **state)
{
  (void)state;
  uint8_t s[NBD_SIMPLE_REPLY_SIZE], c[NBD_CHUNK_HEADER_SIZE], o[NBD_OPT_REPLY_HEADER_SIZE];
  static const uint8_t es[] = { 0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22,
                                0, 0, 0, 0, 0, 0, 0, 9 };
  static const uint8_t ec[] = { 0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2,
                                0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 12 };
  static const uint8_t eo[] = { 0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,
                                0, 0, 0, 7, 0x80, 0, 0, 1, 0, 0, 0, 0 };

  cbt_nbd_simple_reply_encode(s, NBD_EINVAL, 9);
  assert_memory_equal(s, es, sizeof es);
  cbt_nbd_chunk_header_encode(c, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_HOLE, 7, 12);
  assert_memory_equal(c, ec, sizeof ec);
  cbt_nbd_opt_reply_encode(o, NBD_OPT_GO, NBD_REP_ERR_UNSUP, 0);
  assert_memory_equal(o, eo, sizeof eo);
}

static void
test_validate_ranges(void **state)
{
  (void)state;
  struct cbt_nbd_request r;

  r = mkreq(NBD_CMD_READ, 0, 0, 4096);
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_SUCCESS);
  r = mkreq(NBD_CMD_READ, 0, (1 << 20) - 512, 512);      /* ends at the end */
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_SUCCESS);
  r = mkreq(NBD_CMD_READ, 0, (1 << 20) - 511, 512);      /* one byte past */
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_EINVAL);
  r = mkreq(NBD_CMD_WRITE, 0, 1 << 20, 1);
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_ENOSPC);
  r = mkreq(NBD_CMD_WRITE_ZEROES, 0, 1 << 20, 1);
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_ENOSPC);
  r = mkreq(NBD_CMD_READ, 0, UINT64_MAX - 10, 4096);     /* offset+len wraps */
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_EINVAL);
  r = mkreq(NBD_CMD_TRIM, 0, UINT64_MAX, UINT32_MAX);
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_EINVAL);
  r = mkreq(NBD_CMD_READ, 0, 0, CBT_NBD_MAX_BLOCK + 1);  /* too large */
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_EOVERFLOW);
  r = mkreq(NBD_CMD_WRITE, 0, 0, UINT32_MAX);
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_EOVERFLOW);
  /* Commands without payload may cover more than the max block. */
  struct cbt_nbd_caps big = caps_rw;
  big.export_size = 1ull << 40;
  r = mkreq(NBD_CMD_TRIM, 0, 0, UINT32_MAX);
  assert_int_equal(cbt_nbd_request_validate(&r, &big), NBD_SUCCESS);
  r = mkreq(NBD_CMD_BLOCK_STATUS, 0, 0, 0);
  assert_int_equal(cbt_nbd_request_validate(&r, &caps_rw), NBD_EINVAL);
}

static void
test_validate_flags_and_commands(void **state)
{
  (void)state;
  struct cbt_nbd_request r;
  struct cbt_nbd_caps c = caps_rw;

  r = mkreq(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_SUCCESS);
  r = mkreq(NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EINVAL);
  r = mkreq(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_SUCCESS);
  r = mkreq(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO |
            NBD_CMD_FLAG_FUA, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_SUCCESS);
  r = mkreq(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_SUCCESS);
  r = mkreq(0x42, 0, 0, 0);                                /* unknown command */
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EINVAL);
  r = mkreq(NBD_CMD_FLUSH, 0, 0, 0);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_SUCCESS);
  r = mkreq(NBD_CMD_FLUSH, 0, 4096, 0);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EINVAL);
  r = mkreq(NBD_CMD_READ, 1u << 15, 0, 512);               /* unknown flag */
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EINVAL);

  /* Without structured replies DF is not allowed; without contexts no
   * BLOCK_STATUS; without fast zero support, no FAST_ZERO. */
  c.structured_replies = false;
  c.n_meta_contexts = 0;
  c.fast_zero = false;
  r = mkreq(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EINVAL);
  r = mkreq(NBD_CMD_BLOCK_STATUS, 0, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EINVAL);
  r = mkreq(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EINVAL);

  /* Read-only exports refuse every change with EPERM. */
  c = caps_rw;
  c.read_only = true;
  r = mkreq(NBD_CMD_WRITE, 0, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EPERM);
  r = mkreq(NBD_CMD_TRIM, 0, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EPERM);
  r = mkreq(NBD_CMD_WRITE_ZEROES, 0, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_EPERM);
  r = mkreq(NBD_CMD_READ, 0, 0, 512);
  assert_int_equal(cbt_nbd_request_validate(&r, &c), NBD_SUCCESS);
}

static void
test_payload_and_names(void **state)
{
  (void)state;
  struct cbt_nbd_request r = mkreq(NBD_CMD_WRITE, 0, 0, 777);

  assert_int_equal(cbt_nbd_request_payload(&r), 777);
  r.type = NBD_CMD_WRITE_ZEROES;
  assert_int_equal(cbt_nbd_request_payload(&r), 0);
  assert_string_equal(cbt_nbd_cmd_name(NBD_CMD_BLOCK_STATUS), "BLOCK_STATUS");
  assert_string_equal(cbt_nbd_err_name(NBD_ENOSPC), "ENOSPC");
  assert_int_equal(cbt_nbd_errno_to_wire(ENOSPC), NBD_ENOSPC);
  assert_int_equal(cbt_nbd_errno_to_wire(EDQUOT), NBD_ENOSPC);
  assert_int_equal(cbt_nbd_errno_to_wire(EROFS), NBD_EPERM);
  assert_int_equal(cbt_nbd_errno_to_wire(EBADF), NBD_EIO);
  assert_int_equal(cbt_nbd_errno_to_wire(0), NBD_SUCCESS);
}

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_request_roundtrip),
    cmocka_unit_test(test_reply_encodings),
    cmocka_unit_test(test_validate_ranges),
    cmocka_unit_test(test_validate_flags_and_commands),
    cmocka_unit_test(test_payload_and_names),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
