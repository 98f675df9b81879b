/* In-memory dirty bitmap: marking, querying and the page snapshot used to
 * write it out.  See cbt/bitmap.h for the layout and the threading rules.
 *
 * All accesses to words and pages_dirty that may race go through the GCC
 * __atomic builtins (gcc and clang both have them), so the struct keeps
 * plain uint64_t arrays.  The one ordering that matters is between a
 * marker and the writer:
 *
 *   marker:  OR words (relaxed) ... ; fence(release); OR page bit
 *   writer:  AND ~page bit (acquire); load words (relaxed); write to disk
 *
 * Because both sides use read-modify-writes on the page bit, either the
 * writer's AND comes after the marker's OR in the page word's modification
 * order (then the acquire synchronises with the release fence and the
 * copy sees the new words), or it comes before (then the bit stays set and
 * the next write-out copies the page).  A page is marked only after all of
 * the call's words in that page were written, never before.
 */
#include <errno.h>
#include <string.h>
#include <endian.h>
#include <sys/mman.h>

#include <glib.h>

#include "cbt/bitmap.h"

static inline uint64_t
load_word(const uint64_t *w)
{
  return __atomic_load_n(w, __ATOMIC_RELAXED);
}

static bool
gran_ok(uint32_t granularity)
{
  return granularity >= CBT_BITMAP_MIN_GRANULARITY &&
         (granularity & (granularity - 1)) == 0;
}

static uint64_t
pages_for_words(uint64_t nwords)
{
  uint64_t n = (nwords + CBT_BITMAP_WORDS_PER_PAGE - 1) / CBT_BITMAP_WORDS_PER_PAGE;

  return n ? n : 1;
}

/* Word arrays of a MiB or more are mapped rather than allocated: fresh
 * anonymous pages read as zero and take no memory until written, whatever
 * the allocator would do (glibc's calloc under MALLOC_PERTURB_ and ASan's
 * shadow poisoning both touch every page).  So a bitmap file that claims
 * a huge image but holds little (bitmap-file.c does not read its holes)
 * costs what it holds. */
#define WORDS_MAP_MIN (UINT64_C(1) << 20)

static uint64_t *
words_alloc(uint64_t npages)
{
  uint64_t bytes = npages * CBT_BITMAP_PAGE_SIZE;
  void *p;

  if (bytes > SIZE_MAX)
    return NULL;
  if (bytes < WORDS_MAP_MIN)
    return g_try_malloc0((size_t)bytes);
  p = mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE,
           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

static void
words_free(uint64_t *words, uint64_t npages)
{
  uint64_t bytes = npages * CBT_BITMAP_PAGE_SIZE;

  if (!words)
    return;
  if (bytes < WORDS_MAP_MIN)
    g_free(words);
  else
    munmap(words, (size_t)bytes);
}

int
cbt_bitmap_init(struct cbt_bitmap *bm, uint64_t size, uint32_t granularity)
{
  memset(bm, 0, sizeof *bm);
  if (!gran_ok(granularity))
    return -EINVAL;
  if (size > CBT_BITMAP_MAX_SIZE)
    return -EFBIG;

  bm->size = size;
  bm->granularity = granularity;
  bm->gran_shift = (unsigned)__builtin_ctz(granularity);
  bm->nbits = (size + granularity - 1) >> bm->gran_shift;
  bm->npages = pages_for_words(cbt_bitmap_nwords(bm));
  bm->words = words_alloc(bm->npages);
  bm->pages_dirty = g_try_new0(uint64_t, (bm->npages + 63) / 64);
  if (!bm->words || !bm->pages_dirty) {
    cbt_bitmap_destroy(bm);
    return -ENOMEM;
  }
  return 0;
}

void
cbt_bitmap_destroy(struct cbt_bitmap *bm)
{
  words_free(bm->words, bm->npages);
  g_free(bm->pages_dirty);
  memset(bm, 0, sizeof *bm);
}

int
cbt_bitmap_dup(const struct cbt_bitmap *src, struct cbt_bitmap *dst)
{
  int r = cbt_bitmap_init(dst, src->size, src->granularity);

  if (r < 0)
    return r;
  memcpy(dst->words, src->words, (size_t)src->npages * CBT_BITMAP_PAGE_SIZE);
  memcpy(dst->pages_dirty, src->pages_dirty,
         (size_t)(src->npages + 63) / 64 * sizeof(uint64_t));
  return 0;
}

void
cbt_bitmap_mark_page(struct cbt_bitmap *bm, uint64_t page)
{
  __atomic_thread_fence(__ATOMIC_RELEASE);
  __atomic_fetch_or(&bm->pages_dirty[page / 64], UINT64_C(1) << (page % 64),
                    __ATOMIC_RELAXED);
}

bool
cbt_bitmap_claim_page(struct cbt_bitmap *bm, uint64_t page)
{
  uint64_t bit = UINT64_C(1) << (page % 64);

  /* A plain load first keeps the common "page clean" case read-only. */
  if (!(load_word(&bm->pages_dirty[page / 64]) & bit))
    return false;
  return __atomic_fetch_and(&bm->pages_dirty[page / 64], ~bit,
                            __ATOMIC_ACQUIRE) & bit;
}

void
cbt_bitmap_copy_page_le(const struct cbt_bitmap *bm, uint64_t page,
                        void *out, uint32_t nbytes)
{
  const uint64_t *src = bm->words + page * CBT_BITMAP_WORDS_PER_PAGE;
  uint8_t *dst = out;

  for (uint32_t i = 0; i < nbytes / 8; i++) {
    uint64_t le = htole64(load_word(&src[i]));

    memcpy(dst + (size_t)i * 8, &le, 8);
  }
}

/* Convert [offset, offset + len) clamped to size into inclusive granule
 * numbers.  False if the clamped range is empty. */
static bool
granule_range(const struct cbt_bitmap *bm, uint64_t offset, uint64_t len,
              uint64_t *first, uint64_t *last)
{
  uint64_t end;

  if (len == 0 || offset >= bm->size)
    return false;
  end = len > bm->size - offset ? bm->size : offset + len;
  *first = offset >> bm->gran_shift;
  *last = (end - 1) >> bm->gran_shift;
  return true;
}

static inline uint64_t
word_mask(uint64_t w, uint64_t first, uint64_t last)
{
  uint64_t mask = ~UINT64_C(0);

  if (w == first / 64)
    mask &= ~UINT64_C(0) << (first % 64);
  if (w == last / 64)
    mask &= ~UINT64_C(0) >> (63 - last % 64);
  return mask;
}

/* Set or clear granules first..last (inclusive, < nbits), marking each page
 * in which a word changed once all of its words are done. */
static void
apply_range(struct cbt_bitmap *bm, uint64_t first, uint64_t last, bool set)
{
  uint64_t pending = UINT64_MAX;   /* page with unmarked changes */

  for (uint64_t w = first / 64; w <= last / 64; w++) {
    uint64_t mask = word_mask(w, first, last);
    uint64_t old = load_word(&bm->words[w]);
    uint64_t page = w / CBT_BITMAP_WORDS_PER_PAGE;

    if (pending != UINT64_MAX && pending != page) {
      cbt_bitmap_mark_page(bm, pending);
      pending = UINT64_MAX;
    }
    if (set) {
      if ((old & mask) == mask)
        continue;
      old = __atomic_fetch_or(&bm->words[w], mask, __ATOMIC_RELAXED);
      if ((old & mask) != mask)
        pending = page;
    } else {
      if ((old & mask) == 0)
        continue;
      old = __atomic_fetch_and(&bm->words[w], ~mask, __ATOMIC_RELAXED);
      if ((old & mask) != 0)
        pending = page;
    }
  }
  if (pending != UINT64_MAX)
    cbt_bitmap_mark_page(bm, pending);
}

void
cbt_bitmap_set_range(struct cbt_bitmap *bm, uint64_t offset, uint64_t len)
{
  uint64_t first, last;

  if (granule_range(bm, offset, len, &first, &last))
    apply_range(bm, first, last, true);
}

void
cbt_bitmap_clear_range(struct cbt_bitmap *bm, uint64_t offset, uint64_t len)
{
  uint64_t first, last;

  if (granule_range(bm, offset, len, &first, &last))
    apply_range(bm, first, last, false);
}

void
cbt_bitmap_clear_all(struct cbt_bitmap *bm)
{
  if (bm->nbits)
    apply_range(bm, 0, bm->nbits - 1, false);
}

void
cbt_bitmap_set_all(struct cbt_bitmap *bm)
{
  if (bm->nbits)
    apply_range(bm, 0, bm->nbits - 1, true);
}

bool
cbt_bitmap_test(const struct cbt_bitmap *bm, uint64_t offset)
{
  uint64_t bit;

  if (offset >= bm->size)
    return false;
  bit = offset >> bm->gran_shift;
  return (load_word(&bm->words[bit / 64]) >> (bit % 64)) & 1;
}

int
cbt_bitmap_merge(struct cbt_bitmap *dst, const struct cbt_bitmap *src)
{
  uint64_t nwords = cbt_bitmap_nwords(dst);
  uint64_t pending = UINT64_MAX;

  if (dst->size != src->size || dst->granularity != src->granularity)
    return -EINVAL;
  for (uint64_t w = 0; w < nwords; w++) {
    uint64_t s = load_word(&src->words[w]);
    uint64_t page = w / CBT_BITMAP_WORDS_PER_PAGE;

    if (pending != UINT64_MAX && pending != page) {
      cbt_bitmap_mark_page(dst, pending);
      pending = UINT64_MAX;
    }
    if ((s & ~load_word(&dst->words[w])) == 0)
      continue;
    if (s & ~__atomic_fetch_or(&dst->words[w], s, __ATOMIC_RELAXED))
      pending = page;
  }
  if (pending != UINT64_MAX)
    cbt_bitmap_mark_page(dst, pending);
  return 0;
}

int
cbt_bitmap_move(struct cbt_bitmap *dst, struct cbt_bitmap *src)
{
  uint64_t nwords = cbt_bitmap_nwords(src);

  if (dst->size != src->size || dst->granularity != src->granularity)
    return -EINVAL;
  for (uint64_t page = 0; page * CBT_BITMAP_WORDS_PER_PAGE < nwords; page++) {
    uint64_t end = MIN((page + 1) * CBT_BITMAP_WORDS_PER_PAGE, nwords);
    bool src_changed = false, dst_changed = false;

    for (uint64_t w = page * CBT_BITMAP_WORDS_PER_PAGE; w < end; w++) {
      uint64_t bits;

      if (load_word(&src->words[w]) == 0)
        continue;
      /* Each bit leaves src exactly once: a racing set lands either
       * before the exchange (and moves) or after it (and stays). */
      bits = __atomic_exchange_n(&src->words[w], 0, __ATOMIC_RELAXED);
      if (bits == 0)
        continue;
      src_changed = true;
      if (bits & ~__atomic_fetch_or(&dst->words[w], bits, __ATOMIC_RELAXED))
        dst_changed = true;
    }
    if (src_changed)
      cbt_bitmap_mark_page(src, page);
    if (dst_changed)
      cbt_bitmap_mark_page(dst, page);
  }
  return 0;
}

uint64_t
cbt_bitmap_dirty_bytes(const struct cbt_bitmap *bm)
{
  uint64_t nwords = cbt_bitmap_nwords(bm);
  uint64_t count = 0, bytes;
  uint64_t tail = bm->size & (bm->granularity - 1);

  for (uint64_t w = 0; w < nwords; w++)
    count += (uint64_t)__builtin_popcountll(load_word(&bm->words[w]));
  bytes = count << bm->gran_shift;
  /* The last granule covers only `tail` bytes of the image. */
  if (tail && cbt_bitmap_test(bm, bm->size - 1))
    bytes -= bm->granularity - tail;
  return bytes;
}

uint64_t
cbt_bitmap_extent(const struct cbt_bitmap *bm, uint64_t offset,
                  uint64_t max_len, bool *dirty)
{
  uint64_t end, bit, end_bit, w, diff, flip, run_end;
  bool state;

  *dirty = false;
  if (offset >= bm->size || max_len == 0)
    return 0;
  end = max_len > bm->size - offset ? bm->size : offset + max_len;
  bit = offset >> bm->gran_shift;
  end_bit = ((end - 1) >> bm->gran_shift) + 1;    /* exclusive */
  state = cbt_bitmap_test(bm, offset);
  flip = state ? ~UINT64_C(0) : 0;

  /* diff has a 1 for every granule whose state differs from ours. */
  w = bit / 64;
  diff = (load_word(&bm->words[w]) ^ flip) & (~UINT64_C(0) << (bit % 64));
  while (diff == 0) {
    w++;
    if (w * 64 >= end_bit)
      break;
    diff = load_word(&bm->words[w]) ^ flip;
  }
  if (diff == 0 || w * 64 + (uint64_t)__builtin_ctzll(diff) >= end_bit)
    run_end = end;
  else {
    run_end = (w * 64 + (uint64_t)__builtin_ctzll(diff)) << bm->gran_shift;
    if (run_end > end)
      run_end = end;
  }
  *dirty = state;
  return run_end - offset;
}

int
cbt_bitmap_resize(struct cbt_bitmap *bm, uint64_t new_size)
{
  struct cbt_bitmap nb;
  uint64_t keep;
  int r;

  r = cbt_bitmap_init(&nb, new_size, bm->granularity);
  if (r < 0)
    return r;
  keep = MIN(cbt_bitmap_nwords(bm), cbt_bitmap_nwords(&nb));
  if (keep) {
    memcpy(nb.words, bm->words, keep * 8);
    /* Bits past the new end must stay zero (format invariant). */
    if (nb.nbits % 64)
      nb.words[cbt_bitmap_nwords(&nb) - 1] &= ~UINT64_C(0) >> (64 - nb.nbits % 64);
  }
  for (uint64_t p = 0; p < nb.npages; p++)
    nb.pages_dirty[p / 64] |= UINT64_C(1) << (p % 64);
  cbt_bitmap_destroy(bm);
  *bm = nb;
  return 0;
}

bool
cbt_bitmap_all_set(const struct cbt_bitmap *bm, uint64_t offset, uint64_t len)
{
  uint64_t want;
  bool dirty;

  if (len == 0 || offset >= bm->size)
    return true;
  want = len > bm->size - offset ? bm->size - offset : len;
  return cbt_bitmap_extent(bm, offset, want, &dirty) >= want && dirty;
}
