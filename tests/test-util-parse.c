/* Unit tests for cbt_parse_size (lib/util.c), the one parser behind
 * --granularity, --scratch-limit and memory:SIZE. */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>

#include <cmocka.h>

#include "cbt/util.h"

static void
test_sizes(void **state)
{
  static const struct { const char *s; uint64_t v; } good[] = {
    { "0", 0 }, { "65536", 65536 }, { "64K", 65536 }, { "64k", 65536 },
    { "64KiB", 65536 }, { "64KB", 65536 }, { "512B", 512 }, { "1M", 1 << 20 },
    { "10G", UINT64_C(10) << 30 }, { "1T", UINT64_C(1) << 40 },
    { "16777215T", UINT64_C(16777215) << 40 },
    { "18446744073709551615", UINT64_MAX },
  };
  static const char *bad[] = {
    "", "K", "-5M", "+5M", " 5M", "5 M", "5Q", "5iB", "5Mi B", "5MiBB", "0x10",
    "1.5G", "5MB!", "12Q",
  };
  static const char *range[] = { "18446744073709551616", "16777216T", "99999999999999999999K" };
  uint64_t v;

  (void)state;
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    assert_int_equal(cbt_parse_size(good[i].s, &v), 0);
    assert_true(v == good[i].v);
  }
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    assert_int_equal(cbt_parse_size(bad[i], &v), -EINVAL);
  for (size_t i = 0; i < sizeof range / sizeof range[0]; i++)
    assert_int_equal(cbt_parse_size(range[i], &v), -ERANGE);
}

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_sizes),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
