/* The set of metadata clusters of a qcow2 file (API and design:
 * cbt/qcow2-metaset.h): a directory of lazily allocated bit leaves.
 * Leaves are never freed before clear; removals are rare (an old refcount
 * table after relocation) and a leaf that held metadata is likely to again.
 */
#include <string.h>

#include <glib.h>

#include "cbt/qcow2-metaset.h"

#define LEAF_BITS  CBT_QCOW2_METASET_LEAF_BITS
#define LEAF_MASK  ((UINT64_C(1) << LEAF_BITS) - 1)
#define LEAF_WORDS ((UINT64_C(1) << LEAF_BITS) / 64)

void
cbt_qcow2_metaset_init(struct cbt_qcow2_metaset *s)
{
  memset(s, 0, sizeof *s);
}

void
cbt_qcow2_metaset_clear(struct cbt_qcow2_metaset *s)
{
  for (uint64_t i = 0; i < s->nleaves; i++)
    g_free(s->leaves[i]);
  g_free(s->leaves);
  cbt_qcow2_metaset_init(s);
}

/* The leaf for cluster @c, created (and the directory grown) if needed. */
static uint64_t *
leaf_for(struct cbt_qcow2_metaset *s, uint64_t c)
{
  uint64_t i = c >> LEAF_BITS;

  if (i >= s->nleaves) {
    uint64_t n = s->nleaves * 2 > i + 1 ? s->nleaves * 2 : i + 1;

    s->leaves = g_renew(uint64_t *, s->leaves, n);
    memset(s->leaves + s->nleaves, 0, (n - s->nleaves) * sizeof *s->leaves);
    s->nleaves = n;
  }
  if (!s->leaves[i])
    s->leaves[i] = g_new0(uint64_t, LEAF_WORDS);
  return s->leaves[i];
}

/* [@first, @first + @n) cut at UINT64_MAX: the end of the range. */
static uint64_t
range_end(uint64_t first, uint64_t n)
{
  return n > UINT64_MAX - first ? UINT64_MAX : first + n;
}

uint64_t
cbt_qcow2_metaset_add(struct cbt_qcow2_metaset *s, uint64_t first, uint64_t n)
{
  uint64_t end = range_end(first, n), had = 0;

  for (uint64_t c = first; c < end; c++) {
    uint64_t *leaf = leaf_for(s, c), bit = c & LEAF_MASK;
    uint64_t m = UINT64_C(1) << (bit % 64);

    if (leaf[bit / 64] & m) {
      had++;
    } else {
      leaf[bit / 64] |= m;
      s->count++;
    }
  }
  return had;
}

void
cbt_qcow2_metaset_remove(struct cbt_qcow2_metaset *s, uint64_t first, uint64_t n)
{
  uint64_t end = range_end(first, n);

  for (uint64_t c = first; c < end && (c >> LEAF_BITS) < s->nleaves; c++) {
    uint64_t *leaf = s->leaves[c >> LEAF_BITS], bit = c & LEAF_MASK;
    uint64_t m = UINT64_C(1) << (bit % 64);

    if (!leaf) {
      c |= LEAF_MASK;                 /* the loop's c++ goes to the next leaf */
      continue;
    }
    if (leaf[bit / 64] & m) {
      leaf[bit / 64] &= ~m;
      s->count--;
    }
  }
}

uint64_t
cbt_qcow2_metaset_find(const struct cbt_qcow2_metaset *s, uint64_t first,
                       uint64_t n)
{
  uint64_t end = range_end(first, n), c = first;

  while (c < end) {
    uint64_t i = c >> LEAF_BITS, limit;
    const uint64_t *leaf;

    if (i >= s->nleaves)
      return CBT_QCOW2_METASET_NONE;
    /* i < 2^49, so the next leaf's first cluster does not overflow. */
    limit = (i + 1) << LEAF_BITS;
    if (limit > end)
      limit = end;
    leaf = s->leaves[i];
    if (!leaf) {
      c = limit;
      continue;
    }
    while (c < limit) {
      uint64_t bit = c & LEAF_MASK, w = leaf[bit / 64] >> (bit % 64);

      if (w) {
        /* A word never straddles two leaves, so a hit past limit is past
         * the end of the range. */
        uint64_t hit = c + (uint64_t)__builtin_ctzll(w);
        return hit < limit ? hit : CBT_QCOW2_METASET_NONE;
      }
      c += 64 - bit % 64;
    }
    c = limit;
  }
  return CBT_QCOW2_METASET_NONE;
}
