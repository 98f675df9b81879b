/* Unit tests for the chunk checksums of the manifest (cbt/repo/checksum.c):
 * both algorithms against known answers (the text sha256sum and
 * xxh128sum print), a chunk_hash ready for the next message after each
 * hex, the same sums whatever the pieces the bytes come in, the
 * algorithm names the manifest uses, and sums_stream's chunking: bytes
 * below its start ignored, a short last chunk, and a gap or an overlap
 * marking the stream broken. */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "cli.h"

/* @n bytes of a fixed pseudo-random pattern (caller frees). */
static uint8_t *
pattern(size_t n)
{
  uint8_t *p = g_malloc(n);
  uint32_t x = 2463534242u;

  for (size_t i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    p[i] = (uint8_t)x;
  }
  return p;
}

static void
test_known_answers(void **state)
{
  static const struct {
    enum chunk_alg alg;
    const char *in, *hex;
  } v[] = {
    { CHUNK_SHA256, "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
    { CHUNK_SHA256, "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
    /* xxh128sum (xxHash 0.8.1): the canonical form, big endian. */
    { CHUNK_XXH128, "", "99aa06d3014798d86001c324468d497f" },
    { CHUNK_XXH128, "abc", "06b05ab6733a618578af5f94892f3950" },
  };

  (void)state;
  for (size_t i = 0; i < G_N_ELEMENTS(v); i++) {
    g_autofree char *hex = chunk_hash_data(v[i].alg, v[i].in, strlen(v[i].in));

    assert_string_equal(hex, v[i].hex);
    assert_int_equal(strlen(hex), chunk_alg_hex_len(v[i].alg));
  }
}

/* hex finishes one message and starts the next; the pieces do not matter. */
static void
test_reset_and_pieces(void **state)
{
  const size_t n = 100000;       /* past XXH3's short-input and block sizes */
  g_autofree uint8_t *data = pattern(n);

  (void)state;
  for (enum chunk_alg alg = CHUNK_SHA256; alg <= CHUNK_XXH128; alg++) {
    g_autofree char *whole = chunk_hash_data(alg, data, n);
    g_autofree char *first = NULL, *second = NULL, *empty = NULL;
    g_autoptr(chunk_hash) h = chunk_hash_new(alg);
    size_t off = 0, step = 1;

    while (off < n) {
      size_t len = MIN(step, n - off);

      chunk_hash_update(h, data + off, len);
      off += len;
      step = step * 3 + 1;          /* 1, 4, 13, ...: odd piece sizes */
    }
    first = chunk_hash_hex(h);
    assert_string_equal(first, whole);
    chunk_hash_update(h, data, n);
    second = chunk_hash_hex(h);
    assert_string_equal(second, whole);
    empty = chunk_hash_hex(h);
    assert_string_not_equal(empty, whole);
    {
      g_autofree char *want = chunk_hash_data(alg, "", 0);

      assert_string_equal(empty, want);
    }
  }
}

static void
test_names(void **state)
{
  enum chunk_alg alg = CHUNK_SHA256;

  (void)state;
  assert_true(chunk_alg_parse("xxh128", &alg));
  assert_int_equal(alg, CHUNK_XXH128);
  assert_string_equal(chunk_alg_name(alg), "xxh128");
  assert_true(chunk_alg_parse("sha256", &alg));
  assert_int_equal(alg, CHUNK_SHA256);
  assert_string_equal(chunk_alg_name(alg), "sha256");
  assert_int_equal(chunk_alg_hex_len(CHUNK_SHA256), 64);
  assert_int_equal(chunk_alg_hex_len(CHUNK_XXH128), 32);
  alg = CHUNK_XXH128;
  assert_false(chunk_alg_parse("SHA256", &alg));
  assert_false(chunk_alg_parse("md5", &alg));
  assert_false(chunk_alg_parse("", &alg));
  assert_false(chunk_alg_parse(NULL, &alg));
  assert_int_equal(alg, CHUNK_XXH128);   /* untouched */
}

/* Chunks of 1000 from 1000 on, fed in pieces from 0: chunk 0 is not
 * summed, the last one is short. */
static void
test_stream_chunks(void **state)
{
  const size_t n = 3500, chunk = 1000;
  g_autofree uint8_t *data = pattern(n);

  (void)state;
  for (enum chunk_alg alg = CHUNK_SHA256; alg <= CHUNK_XXH128; alg++) {
    g_autoptr(sums_stream) s = sums_stream_new(alg, chunk, chunk);
    g_autoptr(GPtrArray) hex = NULL;
    size_t off = 0, step = 7;

    while (off < n) {
      size_t len = MIN(step, n - off);

      sums_stream_feed(s, off, data + off, len);
      off += len;
      step = step * 2 + 3;
    }
    assert_true(sums_stream_intact(s));
    assert_int_equal(sums_stream_pos(s), n);
    hex = sums_stream_end(s);
    assert_int_equal(hex->len, 4);
    assert_null(g_ptr_array_index(hex, 0));
    for (guint c = 1; c < 4; c++) {
      g_autofree char *want =
        chunk_hash_data(alg, data + c * chunk, MIN(chunk, n - c * chunk));

      assert_string_equal(g_ptr_array_index(hex, c), want);
    }
  }
}

static void
test_stream_broken(void **state)
{
  g_autofree uint8_t *data = pattern(3000);
  g_autoptr(sums_stream) gap = sums_stream_new(CHUNK_XXH128, 1000, 0);
  g_autoptr(sums_stream) overlap = sums_stream_new(CHUNK_XXH128, 1000, 0);

  (void)state;
  sums_stream_feed(gap, 0, data, 500);
  sums_stream_feed(gap, 600, data + 600, 100);
  assert_false(sums_stream_intact(gap));
  sums_stream_feed(overlap, 0, data, 500);
  sums_stream_feed(overlap, 400, data + 400, 200);
  assert_false(sums_stream_intact(overlap));
}

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_known_answers),
    cmocka_unit_test(test_reset_and_pieces),
    cmocka_unit_test(test_names),
    cmocka_unit_test(test_stream_chunks),
    cmocka_unit_test(test_stream_broken),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
