/* Unit tests for the in-memory dirty bitmap (lib/bitmap/bitmap.c): marking and
 * clearing unaligned ranges, the partial last granule, extents (checked
 * against a naive model on random operations), merge, resize, dirty byte
 * counts, the pages_dirty protocol, and concurrent marking while a third
 * thread writes pages out the way bmfile-write.c does. */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <endian.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>
#include <glib.h>

#include "cbt/bitmap.h"

#define MiB (UINT64_C(1) << 20)

static void
test_init_errors(void **state)
{
  struct cbt_bitmap bm;

  (void)state;
  assert_int_equal(cbt_bitmap_init(&bm, MiB, 0), -EINVAL);
  assert_int_equal(cbt_bitmap_init(&bm, MiB, 256), -EINVAL);
  assert_int_equal(cbt_bitmap_init(&bm, MiB, 1000), -EINVAL);
  assert_int_equal(cbt_bitmap_init(&bm, CBT_BITMAP_MAX_SIZE + 1, 65536), -EFBIG);
  cbt_bitmap_destroy(&bm);   /* safe on the zeroed result */

  assert_int_equal(cbt_bitmap_init(&bm, 0, 512), 0);
  assert_int_equal(bm.nbits, 0);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 0);
  cbt_bitmap_set_range(&bm, 0, 100);
  cbt_bitmap_set_all(&bm);
  assert_false(cbt_bitmap_test(&bm, 0));
  cbt_bitmap_destroy(&bm);

  /* 64 TiB at 64 KiB: 2^30 bits, 128 MiB of words, 32768 pages. */
  assert_int_equal(cbt_bitmap_init(&bm, UINT64_C(64) << 40, 65536), 0);
  assert_int_equal(bm.nbits, UINT64_C(1) << 30);
  assert_int_equal(bm.npages, 32768);
  cbt_bitmap_set_range(&bm, (UINT64_C(64) << 40) - 1, 1);
  assert_true(cbt_bitmap_test(&bm, (UINT64_C(64) << 40) - 65536));
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 65536);
  cbt_bitmap_destroy(&bm);
}

static void
test_set_unaligned(void **state)
{
  struct cbt_bitmap bm;
  const uint64_t size = MiB + 1000;   /* last granule holds 1000 bytes */

  (void)state;
  assert_int_equal(cbt_bitmap_init(&bm, size, 4096), 0);
  assert_int_equal(bm.nbits, 257);
  assert_int_equal(bm.gran_shift, 12);

  cbt_bitmap_set_range(&bm, 5000, 1);
  assert_false(cbt_bitmap_test(&bm, 4095));
  assert_true(cbt_bitmap_test(&bm, 4096));
  assert_true(cbt_bitmap_test(&bm, 8191));
  assert_false(cbt_bitmap_test(&bm, 8192));
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 4096);

  /* Zero length marks nothing. */
  cbt_bitmap_set_range(&bm, 100000, 0);
  assert_false(cbt_bitmap_test(&bm, 100000));

  /* Across a word boundary: granules 60..70. */
  cbt_bitmap_set_range(&bm, 60 * 4096 + 17, 10 * 4096);
  for (uint64_t g = 59; g <= 71; g++)
    assert_int_equal(cbt_bitmap_test(&bm, g * 4096 + 5), g >= 60 && g <= 70);
  assert_int_equal(bm.words[0], UINT64_C(0xf) << 60 | 2);
  assert_int_equal(bm.words[1], 0x7f);

  /* Clamped at the end: the partial granule counts 1000 bytes. */
  cbt_bitmap_set_range(&bm, size - 10, UINT64_MAX);
  assert_true(cbt_bitmap_test(&bm, size - 1));
  assert_false(cbt_bitmap_test(&bm, size));
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 4096 + 11 * 4096 + 1000);
  cbt_bitmap_set_range(&bm, size, 4096);        /* past the end: no-op */
  cbt_bitmap_set_range(&bm, UINT64_MAX, 4096);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 4096 + 11 * 4096 + 1000);
  /* No bit past nbits ever gets set. */
  assert_int_equal(bm.words[4], 1);
  assert_int_equal(bm.words[5], 0);

  cbt_bitmap_set_all(&bm);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), size);
  assert_int_equal(bm.words[4], 1);
  cbt_bitmap_clear_all(&bm);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 0);
  cbt_bitmap_destroy(&bm);
}

static void
test_clear_range(void **state)
{
  struct cbt_bitmap bm;

  (void)state;
  assert_int_equal(cbt_bitmap_init(&bm, MiB, 4096), 0);
  cbt_bitmap_set_all(&bm);
  /* Touches granules 1 and 2 partially: both are cleared. */
  cbt_bitmap_clear_range(&bm, 4096 + 100, 4096);
  assert_true(cbt_bitmap_test(&bm, 0));
  assert_false(cbt_bitmap_test(&bm, 4096));
  assert_false(cbt_bitmap_test(&bm, 2 * 4096));
  assert_true(cbt_bitmap_test(&bm, 3 * 4096));
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), MiB - 2 * 4096);
  cbt_bitmap_clear_range(&bm, 0, 0);
  assert_true(cbt_bitmap_test(&bm, 0));
  cbt_bitmap_clear_range(&bm, 100 * 4096, UINT64_MAX);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 98 * 4096);
  cbt_bitmap_destroy(&bm);
}

/* Naive model of extent(). */
static uint64_t
model_extent(const bool *g, uint64_t size, uint32_t gran, uint64_t offset,
             uint64_t max_len, bool *dirty)
{
  uint64_t end = offset + MIN(max_len, size - offset);
  uint64_t o = offset;

  *dirty = g[offset / gran];
  while (o < end && g[o / gran] == *dirty)
    o = (o / gran + 1) * gran;
  return MIN(o, end) - offset;
}

static void
test_extent(void **state)
{
  struct cbt_bitmap bm;
  const uint32_t gran = 512;
  const uint64_t size = 300 * 512 + 77;
  const uint64_t ngran = 301;
  bool model[301] = { false };
  bool dirty;
  GRand *rnd = g_rand_new_with_seed(42);

  (void)state;
  assert_int_equal(cbt_bitmap_init(&bm, size, gran), 0);

  /* All clean: one run to the end; max_len and size clamp it. */
  assert_int_equal(cbt_bitmap_extent(&bm, 0, UINT64_MAX, &dirty), size);
  assert_false(dirty);
  assert_int_equal(cbt_bitmap_extent(&bm, 1000, 5000, &dirty), 5000);
  assert_int_equal(cbt_bitmap_extent(&bm, size - 1, 10, &dirty), 1);
  assert_int_equal(cbt_bitmap_extent(&bm, size, 10, &dirty), 0);
  assert_int_equal(cbt_bitmap_extent(&bm, 0, 0, &dirty), 0);

  cbt_bitmap_set_all(&bm);
  assert_int_equal(cbt_bitmap_extent(&bm, 3, UINT64_MAX, &dirty), size - 3);
  assert_true(dirty);
  cbt_bitmap_clear_all(&bm);

  /* A dirty run ending mid-word, starting mid-granule. */
  cbt_bitmap_set_range(&bm, 10 * 512, 100 * 512);
  assert_int_equal(cbt_bitmap_extent(&bm, 10 * 512 + 7, UINT64_MAX, &dirty),
                   100 * 512 - 7);
  assert_true(dirty);
  assert_int_equal(cbt_bitmap_extent(&bm, 0, UINT64_MAX, &dirty), 10 * 512);
  assert_false(dirty);
  assert_int_equal(cbt_bitmap_extent(&bm, 110 * 512, UINT64_MAX, &dirty),
                   size - 110 * 512);
  assert_false(dirty);
  cbt_bitmap_clear_all(&bm);

  /* Random operations against the model. */
  for (int round = 0; round < 2000; round++) {
    uint64_t off = (uint64_t)g_rand_int_range(rnd, 0, (gint32)size);
    uint64_t len = (uint64_t)g_rand_int_range(rnd, 0, 40 * 512);
    uint64_t q = (uint64_t)g_rand_int_range(rnd, 0, (gint32)size);
    uint64_t ml = (uint64_t)g_rand_int_range(rnd, 1, (gint32)size + 10);
    bool set = g_rand_boolean(rnd);
    bool d1, d2;
    uint64_t want, got;

    if (set)
      cbt_bitmap_set_range(&bm, off, len);
    else
      cbt_bitmap_clear_range(&bm, off, len);
    if (len) {
      uint64_t last = MIN(off + len, size) - 1;

      for (uint64_t g = off / gran; g <= last / gran; g++)
        model[g] = set;
    }
    for (uint64_t g = 0; g < ngran; g++)
      assert_int_equal(cbt_bitmap_test(&bm, g * gran), model[g]);
    want = model_extent(model, size, gran, q, ml, &d1);
    got = cbt_bitmap_extent(&bm, q, ml, &d2);
    assert_int_equal(got, want);
    assert_int_equal(d1, d2);
  }
  g_rand_free(rnd);
  cbt_bitmap_destroy(&bm);
}

static void
test_extent_large(void **state)
{
  struct cbt_bitmap bm;
  const uint64_t size = UINT64_C(1) << 40;    /* 1 TiB at 64 KiB: 2 MiB */
  bool dirty;

  (void)state;
  assert_int_equal(cbt_bitmap_init(&bm, size, 65536), 0);
  assert_int_equal(cbt_bitmap_nwords(&bm) * 8, 2 * MiB);
  cbt_bitmap_set_range(&bm, size / 2, size / 4);
  assert_int_equal(cbt_bitmap_extent(&bm, 0, UINT64_MAX, &dirty), size / 2);
  assert_false(dirty);
  assert_int_equal(cbt_bitmap_extent(&bm, size / 2, UINT64_MAX, &dirty), size / 4);
  assert_true(dirty);
  assert_int_equal(cbt_bitmap_extent(&bm, size / 2 + 5, 1 << 20, &dirty), 1 << 20);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), size / 4);
  cbt_bitmap_destroy(&bm);
}

static void
test_merge(void **state)
{
  struct cbt_bitmap a, b, c;

  (void)state;
  assert_int_equal(cbt_bitmap_init(&a, MiB, 4096), 0);
  assert_int_equal(cbt_bitmap_init(&b, MiB, 4096), 0);
  assert_int_equal(cbt_bitmap_init(&c, MiB, 8192), 0);
  assert_int_equal(cbt_bitmap_merge(&a, &c), -EINVAL);
  cbt_bitmap_destroy(&c);
  assert_int_equal(cbt_bitmap_init(&c, MiB + 1, 4096), 0);
  assert_int_equal(cbt_bitmap_merge(&a, &c), -EINVAL);
  cbt_bitmap_destroy(&c);

  cbt_bitmap_set_range(&a, 0, 4096);
  cbt_bitmap_set_range(&b, 0, 8192);
  cbt_bitmap_set_range(&b, MiB - 1, 1);
  memset(a.pages_dirty, 0, 8);
  assert_int_equal(cbt_bitmap_merge(&a, &b), 0);
  assert_int_equal(cbt_bitmap_dirty_bytes(&a), 3 * 4096);
  assert_true(cbt_bitmap_test(&a, 4096));
  assert_true(cbt_bitmap_test(&a, MiB - 1));
  assert_true(a.pages_dirty[0] & 1);
  /* Merging again changes nothing and marks nothing. */
  memset(a.pages_dirty, 0, 8);
  assert_int_equal(cbt_bitmap_merge(&a, &b), 0);
  assert_int_equal(a.pages_dirty[0], 0);
  cbt_bitmap_destroy(&a);
  cbt_bitmap_destroy(&b);
}

static void
test_resize(void **state)
{
  struct cbt_bitmap bm;

  (void)state;
  assert_int_equal(cbt_bitmap_init(&bm, 100 * 512 + 10, 512), 0);
  cbt_bitmap_set_range(&bm, 0, 512);
  cbt_bitmap_set_range(&bm, 100 * 512, 10);       /* partial last granule */
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 522);

  /* Grow: bits kept, new granules clean, old partial granule now counts
   * fully. */
  assert_int_equal(cbt_bitmap_resize(&bm, 10 * MiB), 0);
  assert_int_equal(bm.size, 10 * MiB);
  assert_int_equal(bm.nbits, 20480);
  assert_true(cbt_bitmap_test(&bm, 0));
  assert_true(cbt_bitmap_test(&bm, 100 * 512 + 100));
  assert_false(cbt_bitmap_test(&bm, 101 * 512));
  assert_false(cbt_bitmap_test(&bm, 10 * MiB - 1));
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 1024);
  for (uint64_t p = 0; p < bm.npages; p++)
    assert_true(bm.pages_dirty[p / 64] >> (p % 64) & 1);

  /* Shrink: bits past the end are dropped, also within the last word. */
  cbt_bitmap_set_all(&bm);
  assert_int_equal(cbt_bitmap_resize(&bm, 70 * 512), 0);
  assert_int_equal(bm.nbits, 70);
  assert_int_equal(bm.words[1], 0x3f);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 70 * 512);
  assert_int_equal(cbt_bitmap_resize(&bm, CBT_BITMAP_MAX_SIZE + 1), -EFBIG);
  assert_int_equal(bm.nbits, 70);
  cbt_bitmap_destroy(&bm);
}

static void
test_pages_dirty(void **state)
{
  struct cbt_bitmap bm;
  uint64_t page_bytes = 4096ull * 8 * 4096;     /* image bytes per page */
  uint8_t out[4096];
  uint64_t w0;

  (void)state;
  assert_int_equal(cbt_bitmap_init(&bm, 3 * page_bytes, 4096), 0);
  assert_int_equal(bm.npages, 3);
  assert_false(cbt_bitmap_claim_page(&bm, 0));
  cbt_bitmap_set_range(&bm, page_bytes + 4096 * 3, 1);
  assert_false(cbt_bitmap_claim_page(&bm, 0));
  assert_true(cbt_bitmap_claim_page(&bm, 1));
  assert_false(cbt_bitmap_claim_page(&bm, 1));
  /* No change, no mark. */
  cbt_bitmap_set_range(&bm, page_bytes + 4096 * 3, 1);
  assert_false(cbt_bitmap_claim_page(&bm, 1));
  cbt_bitmap_clear_range(&bm, 0, 4096);
  assert_false(cbt_bitmap_claim_page(&bm, 0));
  /* A range over a page boundary marks both pages. */
  cbt_bitmap_set_range(&bm, page_bytes - 4096, 8192);
  assert_true(cbt_bitmap_claim_page(&bm, 0));
  assert_true(cbt_bitmap_claim_page(&bm, 1));
  assert_false(cbt_bitmap_claim_page(&bm, 2));
  cbt_bitmap_mark_page(&bm, 2);
  assert_true(cbt_bitmap_claim_page(&bm, 2));

  /* Copy-out is little-endian, LSB first. */
  cbt_bitmap_copy_page_le(&bm, 1, out, sizeof out);
  assert_int_equal(out[0], 0x09);   /* granules 0 and 3 of page 1 */
  memcpy(&w0, out, 8);
  assert_int_equal(le64toh(w0), 9);
  cbt_bitmap_destroy(&bm);
}

/* Two markers set interleaved granules (sharing every word) while a
 * writer claims and copies pages; after a final write-out pass the copy
 * must equal the bitmap. */
struct conc {
  struct cbt_bitmap bm;
  uint64_t *disk;          /* little-endian image of the words */
  int stop;
};

struct marker {
  struct conc *c;
  unsigned parity;
};

static void *
marker_thread(void *opaque)
{
  struct marker *m = opaque;
  struct cbt_bitmap *bm = &m->c->bm;

  for (int pass = 0; pass < 4; pass++)
    for (uint64_t g = m->parity; g < bm->nbits; g += 2) {
      uint64_t gg = (g * 7919 + (uint64_t)pass) % bm->nbits;   /* scatter */

      cbt_bitmap_set_range(bm, gg * bm->granularity + 1, 1);
      cbt_bitmap_set_range(bm, g * bm->granularity, bm->granularity);
    }
  return NULL;
}

static void
write_out(struct conc *c)
{
  for (uint64_t p = 0; p < c->bm.npages; p++)
    if (cbt_bitmap_claim_page(&c->bm, p))
      cbt_bitmap_copy_page_le(&c->bm, p, c->disk + p * 512, 4096);
}

static void *
writer_thread(void *opaque)
{
  struct conc *c = opaque;

  while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE))
    write_out(c);
  return NULL;
}

static void
test_concurrent(void **state)
{
  struct conc c = { .stop = 0 };
  struct marker m[2] = { { &c, 0 }, { &c, 1 } };
  pthread_t t[3];
  const uint64_t size = 64 * MiB + 512 * 3;

  (void)state;
  assert_int_equal(cbt_bitmap_init(&c.bm, size, 512), 0);
  c.disk = g_new0(uint64_t, c.bm.npages * 512);
  assert_int_equal(pthread_create(&t[2], NULL, writer_thread, &c), 0);
  for (int i = 0; i < 2; i++)
    assert_int_equal(pthread_create(&t[i], NULL, marker_thread, &m[i]), 0);
  for (int i = 0; i < 2; i++)
    pthread_join(t[i], NULL);
  __atomic_store_n(&c.stop, 1, __ATOMIC_RELEASE);
  pthread_join(t[2], NULL);
  write_out(&c);

  assert_int_equal(cbt_bitmap_dirty_bytes(&c.bm), size);
  for (uint64_t w = 0; w < c.bm.npages * 512; w++)
    assert_int_equal(le64toh(c.disk[w]), c.bm.words[w]);
  g_free(c.disk);
  cbt_bitmap_destroy(&c.bm);
}

/* cbt_bitmap_move: every bit set by a racing thread ends up in exactly
 * one of the two bitmaps, and both mark the pages that changed. */
struct mover_ctx {
  struct cbt_bitmap *src;
  uint64_t ngran;
};

static void *
setter_thread(void *arg)
{
  struct mover_ctx *m = arg;

  for (uint64_t g = 0; g < m->ngran; g++)
    cbt_bitmap_set_range(m->src, g * 512, 1);
  return NULL;
}

static void
test_move(void **state)
{
  (void)state;
  struct cbt_bitmap a, b, other;
  struct mover_ctx m;
  pthread_t t;
  const uint64_t ngran = 1u << 20;                  /* 256 pages of words */

  assert_int_equal(cbt_bitmap_init(&a, 512 * ngran, 512), 0);
  assert_int_equal(cbt_bitmap_init(&b, 512 * ngran, 512), 0);
  assert_int_equal(cbt_bitmap_init(&other, 512 * ngran, 1024), 0);
  assert_int_equal(cbt_bitmap_move(&other, &a), -EINVAL);

  /* Plain move: src ends empty, dst holds the bits, pages marked. */
  cbt_bitmap_set_range(&a, 512 * 5, 512 * 3);
  for (uint64_t p = 0; p < a.npages; p++) {
    cbt_bitmap_claim_page(&a, p);
    cbt_bitmap_claim_page(&b, p);
  }
  assert_int_equal(cbt_bitmap_move(&b, &a), 0);
  assert_int_equal(cbt_bitmap_dirty_bytes(&a), 0);
  assert_int_equal(cbt_bitmap_dirty_bytes(&b), 512 * 3);
  assert_true(cbt_bitmap_test(&b, 512 * 7) && !cbt_bitmap_test(&b, 512 * 8));
  assert_true(cbt_bitmap_claim_page(&a, 0));
  assert_true(cbt_bitmap_claim_page(&b, 0));
  assert_false(cbt_bitmap_claim_page(&b, 1));

  /* Racing setter: the union of both is every granule, none twice. */
  cbt_bitmap_clear_all(&b);
  m.src = &a;
  m.ngran = ngran;
  assert_int_equal(pthread_create(&t, NULL, setter_thread, &m), 0);
  for (int i = 0; i < 50; i++)
    assert_int_equal(cbt_bitmap_move(&b, &a), 0);
  pthread_join(t, NULL);
  assert_int_equal(cbt_bitmap_dirty_bytes(&a) + cbt_bitmap_dirty_bytes(&b), 512 * ngran);
  for (uint64_t w = 0; w < cbt_bitmap_nwords(&a); w++)
    assert_int_equal(a.words[w] & b.words[w], 0);

  cbt_bitmap_destroy(&a);
  cbt_bitmap_destroy(&b);
  cbt_bitmap_destroy(&other);
}


/* all_set against a naive model: random ranges, including ones that end
 * past the image and a partial last granule. */
static void
test_all_set(void **state)
{
  struct cbt_bitmap bm;
  const uint64_t size = 1000 * 512 + 100;   /* 1001 granules, the last short */
  GRand *rnd = g_rand_new_with_seed(7);

  (void)state;
  assert_int_equal(cbt_bitmap_init(&bm, size, 512), 0);
  assert_true(cbt_bitmap_all_set(&bm, 0, 0));
  assert_true(cbt_bitmap_all_set(&bm, size, 4096));
  assert_false(cbt_bitmap_all_set(&bm, 0, 1));
  cbt_bitmap_set_range(&bm, 512, 1024);          /* granules 1, 2 */
  assert_true(cbt_bitmap_all_set(&bm, 512, 1024));
  assert_true(cbt_bitmap_all_set(&bm, 600, 100));
  assert_false(cbt_bitmap_all_set(&bm, 511, 2));
  assert_false(cbt_bitmap_all_set(&bm, 1500, 100));
  cbt_bitmap_set_range(&bm, size - 1, 1);        /* the short last granule */
  assert_true(cbt_bitmap_all_set(&bm, size - 50, UINT64_MAX - size));
  for (int i = 0; i < 2000; i++) {
    uint64_t off = g_rand_int_range(rnd, 0, (gint32)size);
    uint64_t len = g_rand_int_range(rnd, 1, 20000);
    uint64_t end = MIN(off + len, size);
    bool want = true;

    if (g_rand_boolean(rnd))
      cbt_bitmap_set_range(&bm, g_rand_int_range(rnd, 0, (gint32)size),
                           g_rand_int_range(rnd, 1, 8000));
    for (uint64_t o = off / 512 * 512; o < end; o += 512)
      want &= cbt_bitmap_test(&bm, o);
    assert_int_equal(cbt_bitmap_all_set(&bm, off, len), want);
  }
  g_rand_free(rnd);
  cbt_bitmap_destroy(&bm);
}

/* Pages of words that hold no bit are never read: every such page is made
 * inaccessible (PROT_NONE), so a read of one kills the test with SIGSEGV
 * instead of quietly costing a page of memory (some kernels back a read of
 * untouched anonymous memory with a real page).  4 GiB at 512-byte
 * granules is 1 MiB of words, which bitmap.c maps rather than allocates;
 * two pages hold bits. */
static void
test_untouched_pages(void **state)
{
  const uint64_t page_bytes = UINT64_C(4096) * 8 * 512;   /* image bytes per page */
  const uint64_t size = UINT64_C(4) << 30;
  struct cbt_bitmap bm, other, copy;
  uint8_t out[4096], zero[4096] = { 0 };
  uint64_t off, len;
  bool dirty;
  unsigned runs = 0;

  (void)state;
  assert_int_equal(sysconf(_SC_PAGESIZE), CBT_BITMAP_PAGE_SIZE);
  assert_int_equal(cbt_bitmap_init(&bm, size, 512), 0);
  assert_int_equal(bm.npages, 256);
  cbt_bitmap_set_range(&bm, 3 * page_bytes + 512, 4096);           /* page 3 */
  cbt_bitmap_set_range(&bm, 200 * page_bytes - 512, 1024);          /* 199, 200 */
  for (uint64_t p = 0; p < bm.npages; p++) {
    bool used = p == 3 || p == 199 || p == 200;

    assert_int_equal(bm.pages_used[p / 64] >> (p % 64) & 1, used);
    if (!used)
      assert_int_equal(mprotect(bm.words + p * CBT_BITMAP_WORDS_PER_PAGE,
                                CBT_BITMAP_PAGE_SIZE, PROT_NONE), 0);
  }

  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 4096 + 1024);
  assert_false(cbt_bitmap_test(&bm, 100 * page_bytes));
  assert_true(cbt_bitmap_test(&bm, 3 * page_bytes + 512));
  for (off = 0; off < size; off += len) {
    len = cbt_bitmap_extent(&bm, off, size - off, &dirty);
    assert_true(len > 0);
    runs++;
  }
  assert_int_equal(runs, 5);               /* clean, dirty, clean, dirty, clean */
  assert_int_equal(cbt_bitmap_extent(&bm, 200 * page_bytes - 512, size, &dirty), 1024);
  assert_true(dirty);
  assert_true(cbt_bitmap_all_set(&bm, 3 * page_bytes + 512, 4096));
  assert_false(cbt_bitmap_all_set(&bm, 10 * page_bytes, 512));
  assert_int_equal(cbt_bitmap_word(&bm, 50 * CBT_BITMAP_WORDS_PER_PAGE), 0);
  cbt_bitmap_copy_page_le(&bm, 50, out, sizeof out);
  assert_memory_equal(out, zero, sizeof out);

  /* dup, merge, move and resize copy only the pages that hold bits. */
  assert_int_equal(cbt_bitmap_dup(&bm, &copy), 0);
  assert_int_equal(cbt_bitmap_dirty_bytes(&copy), 4096 + 1024);
  cbt_bitmap_destroy(&copy);
  assert_int_equal(cbt_bitmap_init(&other, size, 512), 0);
  assert_int_equal(cbt_bitmap_merge(&other, &bm), 0);
  assert_int_equal(cbt_bitmap_dirty_bytes(&other), 4096 + 1024);
  cbt_bitmap_clear_all(&other);
  assert_int_equal(cbt_bitmap_move(&other, &bm), 0);
  assert_int_equal(cbt_bitmap_dirty_bytes(&other), 4096 + 1024);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 0);
  cbt_bitmap_set_range(&bm, 3 * page_bytes, 512);
  cbt_bitmap_clear_range(&bm, 0, size);
  cbt_bitmap_clear_all(&bm);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 0);
  cbt_bitmap_set_range(&bm, 199 * page_bytes, 512);
  assert_int_equal(cbt_bitmap_resize(&bm, size / 2), 0);
  assert_int_equal(cbt_bitmap_dirty_bytes(&bm), 0);
  assert_int_equal(cbt_bitmap_resize(&bm, size), 0);
  cbt_bitmap_destroy(&bm);
  cbt_bitmap_destroy(&other);
}

/* mark_range marks every page holding the range's granules, whether or
 * not their bits changed now (a crash-safe commit whose bits another
 * thread set must still get them written). */
static void
test_mark_range(void **state)
{
  const uint64_t page_bytes = UINT64_C(4096) * 8 * 512;
  struct cbt_bitmap bm;

  (void)state;
  assert_int_equal(cbt_bitmap_init(&bm, 4 * page_bytes, 512), 0);
  cbt_bitmap_set_range(&bm, page_bytes - 512, 1024);
  for (uint64_t p = 0; p < bm.npages; p++)
    (void)cbt_bitmap_claim_page(&bm, p);
  cbt_bitmap_set_range(&bm, page_bytes - 512, 1024);   /* already set */
  assert_int_equal(bm.pages_dirty[0], 0);
  cbt_bitmap_mark_range(&bm, page_bytes - 512, 1024);
  assert_int_equal(bm.pages_dirty[0], 0x3);
  cbt_bitmap_mark_range(&bm, 4 * page_bytes, 512);        /* past the end */
  assert_int_equal(bm.pages_dirty[0], 0x3);
  cbt_bitmap_destroy(&bm);
}

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_init_errors),
    cmocka_unit_test(test_set_unaligned),
    cmocka_unit_test(test_clear_range),
    cmocka_unit_test(test_extent),
    cmocka_unit_test(test_extent_large),
    cmocka_unit_test(test_merge),
    cmocka_unit_test(test_resize),
    cmocka_unit_test(test_pages_dirty),
    cmocka_unit_test(test_concurrent),
    cmocka_unit_test(test_move),
    cmocka_unit_test(test_all_set),
    cmocka_unit_test(test_untouched_pages),
    cmocka_unit_test(test_mark_range),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
