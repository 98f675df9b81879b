/* Unit tests for the metadata cluster set (lib/qcow2-metaset.c):
 * membership, ranges across leaves, add counting members that were there
 * already, remove, find at leaf and word edges and near UINT64_MAX, and a
 * long random sequence against a plain bitmap.
 */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <glib.h>

#include "cbt/qcow2-metaset.h"

#define LEAF (UINT64_C(1) << CBT_QCOW2_METASET_LEAF_BITS)
#define NONE CBT_QCOW2_METASET_NONE

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

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_empty),
    cmocka_unit_test(test_add_remove),
    cmocka_unit_test(test_find),
    cmocka_unit_test(test_random),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
