/* In-memory dirty bitmap.
 *
 * Bit i covers image bytes [i * granularity, (i + 1) * granularity); the
 * last granule may extend past @size and then covers only up to @size.
 * Bits are stored LSB-first in 64-bit words (bit i is bit i % 64 of word
 * i / 64), in host byte order; the bitmap file's loader and writer
 * (lib/bitmap/bmfile-load.c, bmfile-write.c) convert from and to the
 * little-endian on-disk form.
 *
 * Concurrency: the marking and reading functions (set_range, clear_range,
 * set_all, clear_all, test, extent, dirty_bytes, merge into a bitmap nobody
 * else merges into) may run from any number of threads at once, lock-free,
 * and alongside cbt_bmfile_sync() writing the bitmap out.  init, destroy and
 * resize need the caller to exclude every other user.
 *
 * pages_dirty has one bit per 4096-byte page of @words (512 words), set
 * whenever a word in that page actually changed.  The writer of the bitmap
 * file clears a page's bit (atomic, acquire) before it copies the page, so
 * a change racing with the copy leaves the bit set for the next write-out.
 *
 * pages_used has one bit per page of @words too: clear means the page holds
 * no set bit, and then nothing here reads it.  So a bitmap costs memory
 * for the pages that hold bits, never for the whole area @size implies,
 * whatever the kernel does on a read of untouched anonymous memory.  The
 * bit is set before the first word of the page changes and stays set.
 */
#ifndef CBT_BITMAP_H
#define CBT_BITMAP_H

#include <stdbool.h>
#include <stdint.h>

#define CBT_BITMAP_MIN_GRANULARITY     512u
#define CBT_BITMAP_DEFAULT_GRANULARITY 65536u
/* Largest image a bitmap may cover (1 EiB), so that every byte offset and
 * bit count below fits comfortably in 64 bits. */
#define CBT_BITMAP_MAX_SIZE            (UINT64_C(1) << 60)
#define CBT_BITMAP_PAGE_SIZE           4096u
#define CBT_BITMAP_WORDS_PER_PAGE      (CBT_BITMAP_PAGE_SIZE / 8u)

struct cbt_bitmap {
  uint64_t size;          /* image bytes covered */
  uint32_t granularity;   /* power of two >= 512 */
  unsigned gran_shift;    /* log2(granularity) */
  uint64_t nbits;         /* ceil(size / granularity) */
  uint64_t *words;        /* npages * 512 words; bits >= nbits are zero */
  uint64_t *pages_dirty;  /* one bit per page of words changed since write-out */
  uint64_t *pages_used;   /* one bit per page of words that may hold a set bit */
  uint64_t npages;        /* pages of words allocated (at least 1) */
};

/* Number of 64-bit words that hold @nbits bits. */
static inline uint64_t
cbt_bitmap_nwords(const struct cbt_bitmap *bm)
{
  return (bm->nbits + 63) / 64;
}

/* Set up @bm for an image of @size bytes, every granule clean and every
 * pages_dirty bit clear.  Returns 0, -EINVAL if @granularity is not a power
 * of two >= 512, -EFBIG if @size > CBT_BITMAP_MAX_SIZE, or -ENOMEM.  On
 * error @bm is zeroed (destroy is still safe). */
int cbt_bitmap_init(struct cbt_bitmap *bm, uint64_t size, uint32_t granularity);

/* Free the arrays; @bm is zeroed.  Safe on a zeroed bitmap. */
void cbt_bitmap_destroy(struct cbt_bitmap *bm);

/* Set up @dst as a copy of @src (bits and pages_dirty), with its own
 * arrays.  0 or -ENOMEM (@dst zeroed).  No one may change @src meanwhile. */
int cbt_bitmap_dup(const struct cbt_bitmap *src, struct cbt_bitmap *dst);

/* Mark dirty every granule that touches [offset, offset + len), clamped to
 * size.  Lock-free and syscall-free; safe from many threads.
 *
 * Ordering contract: the word ORs are relaxed; a release fence separates
 * them from the pages_dirty update, which pairs with the acquire in the
 * writer's page claim.  So a write-out that starts after this call returns
 * either copies the new bits or leaves the page marked for the next one.
 * (A call that finds its bits already set by a concurrent caller returns
 * without waiting for that caller to mark the page; the bits reach disk no
 * later than the write-out after both calls returned.  A caller that needs
 * them durable sooner marks the pages itself: cbt_bitmap_mark_range.) */
void cbt_bitmap_set_range(struct cbt_bitmap *bm, uint64_t offset, uint64_t len);

/* Mark clean every granule that touches [offset, offset + len), clamped to
 * size -- including partially covered granules at either end, so a caller
 * that wants "forget only what was fully rewritten" must round inward
 * itself.  Same concurrency as set_range. */
void cbt_bitmap_clear_range(struct cbt_bitmap *bm, uint64_t offset, uint64_t len);

/* Every granule clean / dirty.  Same concurrency as set_range; marks the
 * pages whose words changed. */
void cbt_bitmap_clear_all(struct cbt_bitmap *bm);
void cbt_bitmap_set_all(struct cbt_bitmap *bm);

/* Is the granule holding byte @offset dirty?  False for offset >= size. */
bool cbt_bitmap_test(const struct cbt_bitmap *bm, uint64_t offset);

/* dst |= src.  Returns 0, or -EINVAL if size or granularity differ. */
int cbt_bitmap_merge(struct cbt_bitmap *dst, const struct cbt_bitmap *src);

/* Bytes of the image covered by dirty granules; the last granule counts
 * only up to size. */
/* Move every set bit of @src into @dst (dst |= src; src = 0), word by word
 * with atomic exchanges, so that other threads may keep setting bits in
 * @src meanwhile: each such bit ends up in exactly one of the two.  Only
 * one mover or merger may write @dst at a time.  -EINVAL if the geometry
 * differs. */
int cbt_bitmap_move(struct cbt_bitmap *dst, struct cbt_bitmap *src);

uint64_t cbt_bitmap_dirty_bytes(const struct cbt_bitmap *bm);

/* Length of the run of granules in the same state as the one at @offset,
 * measured from @offset and clamped to @max_len and to size; *@dirty gets
 * that state.  @offset must be < size (returns 0 otherwise, and for
 * @max_len == 0).  Whole words of equal state are skipped at once, so long
 * clean or dirty runs cost one load per 64 granules. */
uint64_t cbt_bitmap_extent(const struct cbt_bitmap *bm, uint64_t offset,
                           uint64_t max_len, bool *dirty);

/* Is every granule touching [offset, offset + len) (clamped to size) set?
 * True for an empty range.  Lock-free, like extent; the answer can be
 * stale by the time it returns unless the caller knows bits only get set. */
bool cbt_bitmap_all_set(const struct cbt_bitmap *bm, uint64_t offset, uint64_t len);

/* Change the covered size to @new_size.  Growing keeps every bit and adds
 * clean granules; a partial last granule that was dirty stays dirty and so
 * now also reports the newly added bytes it covers (over-reporting is the
 * safe direction).  Shrinking drops the bits past the new end.  Every page
 * is marked for write-out.  Not thread-safe.  Returns 0, -EFBIG or -ENOMEM
 * (on error @bm is unchanged). */
int cbt_bitmap_resize(struct cbt_bitmap *bm, uint64_t new_size);

/* Word @w of the bits (0 past the end), read atomically; a page that holds
 * no bit reads as 0 without being touched.  For callers that copy the
 * bits word by word. */
uint64_t cbt_bitmap_word(const struct cbt_bitmap *bm, uint64_t w);

/* Mark for write-out every page holding a granule that touches
 * [offset, offset + len), changed or not.  A crash-safe commit calls it
 * for the range it makes durable: the bits may have been set by another
 * thread that has not marked its page yet, and durability must not depend
 * on that thread. */
void cbt_bitmap_mark_range(struct cbt_bitmap *bm, uint64_t offset, uint64_t len);

/* For the bitmap file (lib/bitmap/bmfile-*.c) --------------------------- */

/* The loader filled page @page's words directly: note it as used if any
 * of its words is non-zero.  Not thread-safe (load time only). */
void cbt_bitmap_page_loaded(struct cbt_bitmap *bm, uint64_t page);

/* Atomically clear page @page's pages_dirty bit (acquire) and return
 * whether it was set.  Call before copying the page, so a change racing
 * with the copy marks the page again. */
bool cbt_bitmap_claim_page(struct cbt_bitmap *bm, uint64_t page);

/* Mark page @page for write-out again (after a failed write). */
void cbt_bitmap_mark_page(struct cbt_bitmap *bm, uint64_t page);

/* Copy the first @nbytes (<= 4096, a multiple of 8) bytes of page @page to
 * @out as little-endian words, each read with an atomic load. */
void cbt_bitmap_copy_page_le(const struct cbt_bitmap *bm, uint64_t page,
                             void *out, uint32_t nbytes);

#endif
