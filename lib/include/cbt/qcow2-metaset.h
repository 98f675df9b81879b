/* The set of host clusters of a qcow2 file that hold metadata (header, L1
 * table, refcount table, refcount blocks, L2 tables), for the overlap
 * checks of the image backend (lib/image/image-qcow2-meta.c): guest data
 * must never be written to a cluster in the set, and the allocator never
 * hands one out, whatever its refcount says.
 *
 * A two-level bitmap over host cluster indices: a directory of pointers,
 * one per 2^15 clusters, to 4 KiB leaves of bits, allocated the first time
 * a cluster in their range joins the set.  Membership is O(1) (two loads),
 * adding and removing O(1) per cluster.  Memory: 8 bytes per 2^15 clusters
 * up to the highest member, plus 4 KiB per stretch of 2^15 clusters that
 * holds a member; at worst one bit per cluster of the file (2 MiB for a
 * 1 TiB file of 64 KiB clusters).
 *
 * Pure data structure, no locking: the owner serialises writers against
 * readers (the backend modifies it under its lock).
 */
#ifndef CBT_QCOW2_METASET_H
#define CBT_QCOW2_METASET_H

#include <stdbool.h>
#include <stdint.h>

#define CBT_QCOW2_METASET_LEAF_BITS 15u          /* clusters per leaf: 2^15 */
#define CBT_QCOW2_METASET_NONE      UINT64_MAX   /* "no member" from find */

struct cbt_qcow2_metaset {
  uint64_t **leaves;            /* leaves[i]: clusters i << LEAF_BITS .. , or NULL */
  uint64_t nleaves;             /* entries in leaves[] */
  uint64_t count;               /* clusters in the set */
};

/* An empty set (a zeroed struct is one too). */
void cbt_qcow2_metaset_init(struct cbt_qcow2_metaset *s);

/* Free everything; the set is empty afterwards. */
void cbt_qcow2_metaset_clear(struct cbt_qcow2_metaset *s);

/* Add clusters [@first, @first + @n).  Returns how many of them were
 * members already (non-zero means two metadata structures overlap). */
uint64_t cbt_qcow2_metaset_add(struct cbt_qcow2_metaset *s, uint64_t first,
                               uint64_t n);

/* Remove clusters [@first, @first + @n); non-members are ignored. */
void cbt_qcow2_metaset_remove(struct cbt_qcow2_metaset *s, uint64_t first,
                              uint64_t n);

/* The lowest member in [@first, @first + @n), or CBT_QCOW2_METASET_NONE.
 * A range running past UINT64_MAX is cut there. */
uint64_t cbt_qcow2_metaset_find(const struct cbt_qcow2_metaset *s,
                                uint64_t first, uint64_t n);

/* Whether cluster @c is a member. */
static inline bool
cbt_qcow2_metaset_has(const struct cbt_qcow2_metaset *s, uint64_t c)
{
  uint64_t i = c >> CBT_QCOW2_METASET_LEAF_BITS;
  uint64_t bit = c & ((UINT64_C(1) << CBT_QCOW2_METASET_LEAF_BITS) - 1);

  return i < s->nleaves && s->leaves[i] &&
         (s->leaves[i][bit / 64] >> (bit % 64)) & 1;
}

#endif
