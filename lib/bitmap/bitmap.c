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
 *
 * pages_used is the summary that lets memory follow the bits that exist:
 * a page of words whose bit is clear holds no set bit and is never read
 * (counting, scanning, copying and clearing skip it).  A kernel may back
 * even a read of never-written anonymous memory with a fresh page, so a
 * walk over the whole words area of a bitmap that claims a huge image
 * would cost its full size.  A marker sets the page's summary bit before
 * it ORs a word of the page, so whoever sees the word's new value sees
 * the summary bit too (both precede the release fence of the page mark,
 * and a reader that finds the summary clear read before the OR).  Bits in
 * pages_used are only ever set while others may mark; they are a
 * conservative "may hold bits".
 */
#include <errno.h>
#include <string.h>
#include <endian.h>
#include <sys/mman.h>

#include <glib.h>

#include "cbt/bitmap.h"
#include "cbt/fault-inject.h"

static inline uint64_t
load_word(const uint64_t *w)
{
  return __atomic_load_n(w, __ATOMIC_RELAXED);
}

static inline bool
page_used(const struct cbt_bitmap *bm, uint64_t page)
{
  return (__atomic_load_n(&bm->pages_used[page / 64], __ATOMIC_RELAXED) >>
          (page % 64)) & 1;
}

static inline void
use_page(struct cbt_bitmap *bm, uint64_t page)
{
  uint64_t bit = UINT64_C(1) << (page % 64);

  if (!(__atomic_load_n(&bm->pages_used[page / 64], __ATOMIC_RELAXED) & bit))
    __atomic_fetch_or(&bm->pages_used[page / 64], bit, __ATOMIC_RELAXED);
}

/* Word @w, or 0 without touching its page when the page holds no bit. */
static inline uint64_t
word_at(const struct cbt_bitmap *bm, uint64_t w)
{
  return page_used(bm, w / CBT_BITMAP_WORDS_PER_PAGE) ? load_word(&bm->words[w]) : 0;
}

/* The first page >= @page (and < @limit) that may hold bits, or @limit.
 * Whole summary words of unused pages are skipped at once. */
static uint64_t
next_used_page(const struct cbt_bitmap *bm, uint64_t page, uint64_t limit)
{
  while (page < limit) {
    uint64_t sw = __atomic_load_n(&bm->pages_used[page / 64], __ATOMIC_RELAXED) >>
                  (page % 64);

    if (sw)
      return MIN(page + (uint64_t)__builtin_ctzll(sw), limit);
    page = (page / 64 + 1) * 64;
  }
  return limit;
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
 * a huge image but holds little (bmfile-load.c does not read its holes)
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
  bm->pages_used = g_try_new0(uint64_t, (bm->npages + 63) / 64);
  if (!bm->words || !bm->pages_dirty || !bm->pages_used) {
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
  g_free(bm->pages_used);
  memset(bm, 0, sizeof *bm);
}

int
cbt_bitmap_dup(const struct cbt_bitmap *src, struct cbt_bitmap *dst)
{
  int r = cbt_bitmap_init(dst, src->size, src->granularity);

  if (r < 0)
    return r;
  for (uint64_t p = next_used_page(src, 0, src->npages); p < src->npages;
       p = next_used_page(src, p + 1, src->npages)) {
    use_page(dst, p);
    memcpy(dst->words + p * CBT_BITMAP_WORDS_PER_PAGE,
           src->words + p * CBT_BITMAP_WORDS_PER_PAGE, CBT_BITMAP_PAGE_SIZE);
  }
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

  if (!page_used(bm, page)) {
    memset(out, 0, nbytes);
    return;
  }
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
 * in which a word changed once all of its words are done.  Setting makes
 * each page used before its first word changes; clearing skips the pages
 * that hold no bit without reading them. */
static void
apply_range(struct cbt_bitmap *bm, uint64_t first, uint64_t last, bool set)
{
  uint64_t pending = UINT64_MAX;   /* page with unmarked changes */
  uint64_t used = UINT64_MAX;      /* page known used by this call */

  for (uint64_t w = first / 64; w <= last / 64; w++) {
    uint64_t mask = word_mask(w, first, last);
    uint64_t page = w / CBT_BITMAP_WORDS_PER_PAGE;
    uint64_t old;

    if (pending != UINT64_MAX && pending != page) {
      cbt_bitmap_mark_page(bm, pending);
      pending = UINT64_MAX;
    }
    if (page != used) {
      if (set) {
        use_page(bm, page);
      } else if (!page_used(bm, page)) {
        /* Nothing to clear here: go on at the next page that may hold
         * bits (the loop's w++ lands on its first word). */
        uint64_t next = next_used_page(bm, page + 1, bm->npages);

        if (next * CBT_BITMAP_WORDS_PER_PAGE > last / 64)
          break;
        w = next * CBT_BITMAP_WORDS_PER_PAGE - 1;
        continue;
      }
      used = page;
    }
    old = load_word(&bm->words[w]);
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
  if (pending != UINT64_MAX) {
    if (set)
      cbt_fi_mark_stall(first << bm->gran_shift, (last + 1) << bm->gran_shift);
    cbt_bitmap_mark_page(bm, pending);
  }
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
  return (word_at(bm, bit / 64) >> (bit % 64)) & 1;
}

int
cbt_bitmap_merge(struct cbt_bitmap *dst, const struct cbt_bitmap *src)
{
  uint64_t nwords = cbt_bitmap_nwords(dst);

  if (dst->size != src->size || dst->granularity != src->granularity)
    return -EINVAL;
  for (uint64_t page = next_used_page(src, 0, src->npages); page < src->npages;
       page = next_used_page(src, page + 1, src->npages)) {
    uint64_t end = MIN((page + 1) * CBT_BITMAP_WORDS_PER_PAGE, nwords);
    bool changed = false;

    for (uint64_t w = page * CBT_BITMAP_WORDS_PER_PAGE; w < end; w++) {
      uint64_t s = load_word(&src->words[w]);

      if (s == 0 || (s & ~word_at(dst, w)) == 0)
        continue;
      use_page(dst, page);
      if (s & ~__atomic_fetch_or(&dst->words[w], s, __ATOMIC_RELAXED))
        changed = true;
    }
    if (changed)
      cbt_bitmap_mark_page(dst, page);
  }
  return 0;
}

int
cbt_bitmap_move(struct cbt_bitmap *dst, struct cbt_bitmap *src)
{
  uint64_t nwords = cbt_bitmap_nwords(src);

  if (dst->size != src->size || dst->granularity != src->granularity)
    return -EINVAL;
  for (uint64_t page = next_used_page(src, 0, src->npages); page < src->npages;
       page = next_used_page(src, page + 1, src->npages)) {
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
      use_page(dst, page);
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

  for (uint64_t page = next_used_page(bm, 0, bm->npages); page < bm->npages;
       page = next_used_page(bm, page + 1, bm->npages)) {
    uint64_t end = MIN((page + 1) * CBT_BITMAP_WORDS_PER_PAGE, nwords);

    for (uint64_t w = page * CBT_BITMAP_WORDS_PER_PAGE; w < end; w++)
      count += (uint64_t)__builtin_popcountll(load_word(&bm->words[w]));
  }
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
  diff = (word_at(bm, w) ^ flip) & (~UINT64_C(0) << (bit % 64));
  while (diff == 0) {
    w++;
    if (w * 64 >= end_bit)
      break;
    /* A clean run crosses the pages that hold no bit without reading
     * them; a dirty one ends at the first of them (word_at gives 0). */
    if (!state && w % CBT_BITMAP_WORDS_PER_PAGE == 0) {
      uint64_t limit = (end_bit - 1) / 64 / CBT_BITMAP_WORDS_PER_PAGE + 1;

      w = next_used_page(bm, w / CBT_BITMAP_WORDS_PER_PAGE, limit) *
          CBT_BITMAP_WORDS_PER_PAGE;
      if (w * 64 >= end_bit)
        break;
    }
    diff = word_at(bm, w) ^ flip;
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
  for (uint64_t p = next_used_page(bm, 0, bm->npages);
       p * CBT_BITMAP_WORDS_PER_PAGE < keep; p = next_used_page(bm, p + 1, bm->npages)) {
    uint64_t w0 = p * CBT_BITMAP_WORDS_PER_PAGE;

    use_page(&nb, p);
    memcpy(nb.words + w0, bm->words + w0,
           MIN(CBT_BITMAP_WORDS_PER_PAGE, keep - w0) * 8);
  }
  /* Bits past the new end must stay zero (format invariant). */
  if (keep && nb.nbits % 64 && page_used(&nb, (cbt_bitmap_nwords(&nb) - 1) /
                                                CBT_BITMAP_WORDS_PER_PAGE))
    nb.words[cbt_bitmap_nwords(&nb) - 1] &= ~UINT64_C(0) >> (64 - nb.nbits % 64);
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

uint64_t
cbt_bitmap_word(const struct cbt_bitmap *bm, uint64_t w)
{
  return w < cbt_bitmap_nwords(bm) ? word_at(bm, w) : 0;
}

void
cbt_bitmap_page_loaded(struct cbt_bitmap *bm, uint64_t page)
{
  const uint64_t *src = bm->words + page * CBT_BITMAP_WORDS_PER_PAGE;

  for (unsigned i = 0; i < CBT_BITMAP_WORDS_PER_PAGE; i++)
    if (src[i]) {
      use_page(bm, page);
      return;
    }
}

void
cbt_bitmap_mark_range(struct cbt_bitmap *bm, uint64_t offset, uint64_t len)
{
  uint64_t first, last;

  if (!granule_range(bm, offset, len, &first, &last))
    return;
  for (uint64_t p = first / 64 / CBT_BITMAP_WORDS_PER_PAGE;
       p <= last / 64 / CBT_BITMAP_WORDS_PER_PAGE; p++)
    cbt_bitmap_mark_page(bm, p);
}
