/* Writing one backup as a qcow2 file (version 3, docs/interop/qcow2.txt).
 *
 * A full backup is a qcow2 image without a backing file; an incremental is
 * an overlay whose backing file is the previous backup, so that only the
 * clusters that changed are stored and unchanged ones read through.  The
 * writer streams guest clusters into the file in whatever order they
 * arrive (several threads may write at once) and lays down all metadata
 * (L2 tables, L1 table, refcounts, header) once, in cbt_qcow2_writer_finish.
 * Until finish has returned 0 the file is not a valid qcow2 image (its
 * first cluster is a hole), so a crash never leaves a plausible-looking
 * half backup behind; the caller unlinks the file on failure.
 *
 * Memory: the L2 tables are kept in memory until finish.  A table (one
 * cluster, covering cluster_size / 8 guest clusters) is allocated the first
 * time a cluster in its range is written or zeroed, so the cost is
 * 8 bytes per guest cluster in every touched L2 range: at most
 * virtual_size / (cluster_size / 8), i.e. 128 MiB per TiB of touched
 * virtual disk with 64 KiB clusters (plus an 8-byte pointer per L1 entry).
 *
 * Errors: functions return 0 or -errno.  Those with @why store in *@why a
 * g_strdup'd sentence naming the reason when they fail and @why is not NULL
 * (caller frees; *@why must be NULL on entry).
 *   -EINVAL  bad argument (alignment, range, option values)
 *   -EFBIG   the image would exceed a qcow2 or qemu limit
 *   -EIO     finish after an earlier failed write (the file is unusable)
 *   -EEXIST  create: @path exists
 * and I/O errors as they come from the kernel.
 */
#ifndef CBT_QCOW2_WRITER_H
#define CBT_QCOW2_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <glib.h>

/* Default cluster size and the accepted range (powers of two). */
#define CBT_QCOW2_WRITER_DEFAULT_CLUSTER_SIZE  65536u
#define CBT_QCOW2_WRITER_MIN_CLUSTER_SIZE      512u
#define CBT_QCOW2_WRITER_MAX_CLUSTER_SIZE      (2u << 20)
/* Longest backing file name the format allows, in bytes. */
#define CBT_QCOW2_WRITER_BACKING_NAME_MAX      1023u

typedef struct cbt_qcow2_writer cbt_qcow2_writer;

struct cbt_qcow2_writer_opts {
  uint64_t size;              /* virtual size in bytes, > 0, any value */
  uint32_t cluster_size;      /* power of two, 512 .. 2 MiB; 0 = 64 KiB */
  const char *backing_file;   /* stored verbatim (relative names resolve
                               * against this file's directory), or NULL */
  const char *backing_format; /* "qcow2" or "raw"; required with a backing
                               * file, must be NULL without one */
};

/* Create @path (O_EXCL, mode 0600) for a new image described by @o.
 * Validates everything that can be validated up front: the cluster size,
 * the virtual size against qemu's 32 MiB L1 table limit (-EFBIG; 64 TiB
 * needs clusters of at least 16 KiB, the 64 KiB default reaches 2 PiB),
 * the backing names, and that header, extension and backing file name fit
 * in the first cluster.  qemu counts virtual sizes in 512-byte sectors, so
 * the size recorded in the header is @o->size rounded up to a multiple of
 * 512 (as qemu-img create does); the bytes past @o->size read as zeros.
 * On success *@out owns the open file; on failure nothing is left at
 * @path. */
int cbt_qcow2_writer_create(const char *path,
                            const struct cbt_qcow2_writer_opts *o,
                            cbt_qcow2_writer **out, char **why);

/* Sink mode: no file; the bytes of the image go to @sink instead (the
 * design note of qcow2-writer.c).  @sink->data gets every byte from
 * offset cluster_size to the end exactly once, in increasing offset
 * order without gaps, as the stream of set_stream does (data clusters
 * from the writing threads, one call at a time; metadata from finish);
 * @sink->head gets cluster 0, the header, last, from finish.  Either
 * returns 0 or -errno; an error fails the write (or finish) that handed
 * the bytes on, and every later write fails with it.  In sink mode a
 * write to a guest cluster that already has a host cluster fails with
 * -ENOTSUP (the bytes were handed on and cannot be rewritten), and
 * set_stream / set_write_behind do nothing useful.  finish does no
 * syncing: the sink makes the result durable. */
struct cbt_qcow2_writer_sink {
  int (*data)(void *opaque, uint64_t offset, const void *buf, size_t len);
  int (*head)(void *opaque, const void *buf, size_t len);
  void *opaque;
};
int cbt_qcow2_writer_create_sink(const struct cbt_qcow2_writer_opts *o,
                                 const struct cbt_qcow2_writer_sink *sink,
                                 cbt_qcow2_writer **out, char **why);

/* Store guest data @buf for [@offset, @offset + @len).  @offset must be
 * cluster aligned; @len a multiple of the cluster size, or ending exactly
 * at the virtual size (the last cluster may be partial).  @len 0 is a
 * no-op.  A cluster whose data is all zero is stored as a zero cluster
 * (no data; it hides backing data), except that on an image without a
 * backing file a cluster never written before is simply left unallocated,
 * which reads as zeros too.  Clusters may come in any order; rewriting a
 * cluster overwrites its host cluster in place.
 *
 * Thread-safe: host clusters are assigned under the writer's mutex and the
 * data is written outside it, so calls from several threads proceed in
 * parallel.  Concurrent calls for the same cluster leave either caller's
 * data.  An I/O error is returned and also remembered: finish then fails
 * with -EIO, because the metadata already points at the cluster. */
int cbt_qcow2_writer_write(cbt_qcow2_writer *w, uint64_t offset,
                           const void *buf, size_t len);

/* Make [@offset, @offset + @len) read as zeros, hiding backing data.
 * Same alignment rules as write.  Each cluster becomes a v3 zero cluster.
 * A cluster that held data keeps its host cluster as a "preallocated zero
 * cluster" (zero flag plus host offset, allowed by qcow2 v3): its refcount
 * stays exactly 1, nothing leaks, and a later write of that cluster reuses
 * the host cluster.  Without a backing file, untouched clusters stay
 * unallocated (they read as zeros already) and cost no memory.
 * Thread-safe like write. */
int cbt_qcow2_writer_zero(cbt_qcow2_writer *w, uint64_t offset, uint64_t len);

/* Complete the image: write the L2 tables, the L1 table and the refcount
 * table and blocks after the data, fdatasync, then write the header
 * cluster (header, backing format extension, backing file name) and
 * fdatasync again, so the header never becomes durable before what it
 * points at.  Closes the file and fsyncs its directory.  No write or zero may run concurrently or
 * follow.  Afterwards `qemu-img check` finds no errors or leaks.  On
 * failure the file is invalid and should be unlinked; finish cannot be
 * retried (-EINVAL). */
int cbt_qcow2_writer_finish(cbt_qcow2_writer *w, char **why);

/* Release @w, closing the file if finish did not.  Never touches the file
 * otherwise: after a failure the caller unlinks it.  NULL is fine. */
void cbt_qcow2_writer_free(cbt_qcow2_writer *w);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(cbt_qcow2_writer, cbt_qcow2_writer_free)

/* Watching the file's bytes as they are written, in file order (cbt backup
 * hashes the file this way instead of reading it back).  Set before the
 * first write.  @fn is then called with every byte of the file from
 * offset cluster_size to its end exactly once, in increasing offset order
 * without gaps, each piece after it was written: the data clusters (from
 * the threads that write them, one call at a time, so a thread may wait
 * for its turn until the writes before it in the file are reported), then
 * the metadata from finish.  Last, finish reports cluster 0, the header,
 * with @offset 0.  The bytes of a partial last guest cluster are reported
 * padded with zeros, as they are in the file.
 *
 * The order holds only while every host cluster is written once.  A write
 * that lands on a host cluster reported before (a guest cluster written
 * twice), or a failed data write, makes the stream incomplete:
 * cbt_qcow2_writer_stream_intact then returns false and the caller must
 * read the file instead. */
typedef void (*cbt_qcow2_writer_stream_fn)(void *opaque, uint64_t offset,
                                           const void *buf, size_t len);
void cbt_qcow2_writer_set_stream(cbt_qcow2_writer *w, cbt_qcow2_writer_stream_fn fn,
                                 void *opaque);
bool cbt_qcow2_writer_stream_intact(const cbt_qcow2_writer *w);

/* Write data to disk while the file grows, not only in finish: data is
 * handed to writeback in file order as it is appended (in pieces of at
 * most 8 MiB), and at each boundary of @window bytes a writing thread
 * waits until the window before the one just completed is written back,
 * so at most ~2 windows of the file are dirty in the page cache, and
 * drops the windows written back from the cache (set before the first
 * write; 0: off, the default).  finish still fdatasyncs; this only
 * spreads the work, and makes a writer that is faster than its disk wait
 * for it, so progress shown by the caller is progress to the disk. */
void cbt_qcow2_writer_set_write_behind(cbt_qcow2_writer *w, uint64_t window);

/* Guest bytes that currently read as data stored in this file / as zero
 * clusters stored in this file (the last cluster counts only up to the
 * virtual size).  Zeros left unallocated on an image without backing file
 * are in neither.  May be called at any time, also from other threads. */
uint64_t cbt_qcow2_writer_data_bytes(const cbt_qcow2_writer *w);
uint64_t cbt_qcow2_writer_zero_bytes(const cbt_qcow2_writer *w);

/* Cluster size in use (the default resolved). */
uint32_t cbt_qcow2_writer_cluster_size(const cbt_qcow2_writer *w);

#endif
