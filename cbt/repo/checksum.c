/* Checksums of a repository file in fixed-size chunks.
 *
 * The manifest records, for every backup file, a checksum of each
 * chunk-size piece of the file's bytes (repo.c), with one of two
 * algorithms that the entry names:
 *
 *   sha256  SHA-256 through OpenSSL's libcrypto (EVP), which uses the
 *           CPU's SHA instructions where there are any (SHA-NI on x86, the
 *           ARMv8 crypto extensions): ~1.8 GB/s per core on the project's
 *           machine, which made it most of a backup's CPU.  Every manifest
 *           before the "checksum" field had these; S3 repositories still
 *           default to it, because the S3 upload reuses each chunk's
 *           SHA-256 as the part's SigV4 payload hash (repo-write.c).
 *   xxh128  XXH3's 128-bit hash (libxxhash), the fast non-cryptographic
 *           checksum of the field (rsync >= 3.2 and zstd use xxHash):
 *           over 10 GB/s per core with SSE2, so a backup's or a verify's
 *           CPU goes to moving bytes.  It detects damage (bit rot, a torn
 *           or misplaced write), not an attacker who edits the file and
 *           the manifest: neither algorithm guards against that, since the
 *           manifest sits next to the files.
 *
 * Either is written as lower-case hex of the canonical (big-endian) form,
 * the text that `sha256sum` or `xxh128sum` prints for the chunk's bytes.
 * struct chunk_hash hides which one a caller has.
 *
 * This file computes the sums three ways:
 *
 *   sums_stream   fed the file's bytes in order, as they are written or
 *                 read (cbt backup hashes while the data streams, without
 *                 a second pass over the file; stream.c's lanes use
 *                 chunk_hash directly for restore and verify);
 *   sums_range    one chunk read back from a file (cbt backup's chunk 0,
 *                 whose first cluster, the qcow2 header, is written last);
 *   repo_checksum_file  a whole file, chunks hashed in parallel (the
 *                 fallback when a stream could not be hashed in order).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <xxhash.h>

#include "cbt/uring-io.h"
#include "cbt/util.h"
#include "repo.h"

/* Small enough to stay in the cache between the read and the hash, and a
 * fresh buffer's page faults are few (4 MiB made reading back a 20 MiB
 * incremental's chunk 0 take 3.7 ms, 1 MiB 2.4 ms); the file's readahead
 * keeps the disk busy either way (a full's chunk 0: the same ~30 ms). */
#define READ_BUF (1u << 20)

G_DEFINE_AUTOPTR_CLEANUP_FUNC(EVP_MD_CTX, EVP_MD_CTX_free)

/* --- SHA-256 (also the S3 upload's payload hash) ------------------------- */

EVP_MD_CTX *
sha_new(void)
{
  EVP_MD_CTX *c = EVP_MD_CTX_new();

  if (!c || EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1)
    g_error("libcrypto: cannot set up SHA-256");   /* out of memory */
  return c;
}

void
sha_update(EVP_MD_CTX *c, const void *buf, size_t len)
{
  if (EVP_DigestUpdate(c, buf, len) != 1)
    g_error("libcrypto: SHA-256 update failed");
}

static char *
hex_of(const unsigned char *md, size_t n)
{
  static const char digits[] = "0123456789abcdef";
  char *hex = g_malloc(2 * n + 1);

  for (size_t i = 0; i < n; i++) {
    hex[2 * i] = digits[md[i] >> 4];
    hex[2 * i + 1] = digits[md[i] & 15];
  }
  hex[2 * n] = '\0';
  return hex;
}

char *
sha_hex(EVP_MD_CTX *c)
{
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;

  if (EVP_DigestFinal_ex(c, md, &n) != 1 || n != 32 ||
      EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1)
    g_error("libcrypto: SHA-256 final failed");
  return hex_of(md, n);
}

/* --- the algorithms ------------------------------------------------------ */

static const struct {
  const char *name;
  size_t hex_len;
} algs[] = {
  [CHUNK_SHA256] = { "sha256", 64 },
  [CHUNK_XXH128] = { "xxh128", 32 },
};

const char *
chunk_alg_name(enum chunk_alg alg)
{
  g_assert((size_t)alg < G_N_ELEMENTS(algs));
  return algs[alg].name;
}

size_t
chunk_alg_hex_len(enum chunk_alg alg)
{
  g_assert((size_t)alg < G_N_ELEMENTS(algs));
  return algs[alg].hex_len;
}

bool
chunk_alg_parse(const char *name, enum chunk_alg *out)
{
  for (size_t i = 0; i < G_N_ELEMENTS(algs); i++)
    if (name && strcmp(name, algs[i].name) == 0) {
      *out = (enum chunk_alg)i;
      return true;
    }
  return false;
}

struct chunk_hash {
  enum chunk_alg alg;
  EVP_MD_CTX *sha;                /* CHUNK_SHA256 */
  XXH3_state_t *xxh;              /* CHUNK_XXH128 */
};

chunk_hash *
chunk_hash_new(enum chunk_alg alg)
{
  chunk_hash *h = g_new0(chunk_hash, 1);

  h->alg = alg;
  switch (alg) {
  case CHUNK_SHA256:
    h->sha = sha_new();
    break;
  case CHUNK_XXH128:
    h->xxh = XXH3_createState();
    if (!h->xxh || XXH3_128bits_reset(h->xxh) != XXH_OK)
      g_error("libxxhash: cannot set up XXH128");   /* out of memory */
    break;
  }
  return h;
}

void
chunk_hash_free(chunk_hash *h)
{
  if (!h)
    return;
  EVP_MD_CTX_free(h->sha);
  XXH3_freeState(h->xxh);
  g_free(h);
}

void
chunk_hash_update(chunk_hash *h, const void *buf, size_t len)
{
  switch (h->alg) {
  case CHUNK_SHA256:
    sha_update(h->sha, buf, len);
    break;
  case CHUNK_XXH128:
    /* Fails only for a NULL state or buffer (with len > 0). */
    if (XXH3_128bits_update(h->xxh, buf, len) != XXH_OK)
      g_error("libxxhash: XXH128 update failed");
    break;
  }
}

char *
chunk_hash_hex(chunk_hash *h)
{
  XXH128_canonical_t c;

  switch (h->alg) {
  case CHUNK_SHA256:
    return sha_hex(h->sha);
  case CHUNK_XXH128:
    /* Canonical = big endian, high 64 bits first: xxh128sum's text. */
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(h->xxh));
    XXH3_128bits_reset(h->xxh);
    return hex_of(c.digest, sizeof c.digest);
  }
  g_assert_not_reached();
}

char *
chunk_hash_data(enum chunk_alg alg, const void *buf, size_t len)
{
  g_autoptr(chunk_hash) h = chunk_hash_new(alg);

  chunk_hash_update(h, buf, len);
  return chunk_hash_hex(h);
}

/* --- a stream in file order --------------------------------------------- */

struct sums_stream {
  uint64_t chunk;
  uint64_t skip;                  /* bytes below this are not hashed */
  uint64_t pos;                   /* next offset expected */
  bool broken;                    /* a gap or overlap was fed */
  chunk_hash *h;
  GPtrArray *hex;                 /* index: chunk; NULL where not hashed */
};

sums_stream *
sums_stream_new(enum chunk_alg alg, uint64_t chunk, uint64_t start)
{
  sums_stream *s = g_new0(sums_stream, 1);

  g_assert(chunk > 0 && start % chunk == 0);
  s->chunk = chunk;
  s->skip = start;
  s->pos = start;
  s->h = chunk_hash_new(alg);
  s->hex = g_ptr_array_new_with_free_func(g_free);
  g_ptr_array_set_size(s->hex, (guint)(start / chunk));
  return s;
}

void
sums_stream_free(sums_stream *s)
{
  if (!s)
    return;
  chunk_hash_free(s->h);
  g_ptr_array_unref(s->hex);
  g_free(s);
}

void
sums_stream_feed(sums_stream *s, uint64_t off, const void *buf, size_t len)
{
  const uint8_t *p = buf;

  if (off + len <= s->skip || s->broken)
    return;
  if (off < s->skip) {
    p += s->skip - off;
    len -= (size_t)(s->skip - off);
    off = s->skip;
  }
  if (off != s->pos) {
    s->broken = true;
    return;
  }
  while (len > 0) {
    uint64_t room = s->chunk - s->pos % s->chunk;
    size_t n = (size_t)MIN((uint64_t)len, room);

    chunk_hash_update(s->h, p, n);
    p += n;
    len -= n;
    s->pos += n;
    if (s->pos % s->chunk == 0)
      g_ptr_array_add(s->hex, chunk_hash_hex(s->h));
  }
}

bool
sums_stream_intact(const sums_stream *s)
{
  return !s->broken;
}

uint64_t
sums_stream_pos(const sums_stream *s)
{
  return s->pos;
}

GPtrArray *
sums_stream_end(sums_stream *s)
{
  GPtrArray *out;

  g_assert(!s->broken);
  if (s->pos % s->chunk != 0)
    g_ptr_array_add(s->hex, chunk_hash_hex(s->h));
  out = g_steal_pointer(&s->hex);
  s->hex = g_ptr_array_new_with_free_func(g_free);
  return out;
}

/* --- one range of a file ---------------------------------------------- */

char *
sums_range(enum chunk_alg alg, int fd, const char *path, uint64_t off, uint64_t len,
           GError **error)
{
  g_autoptr(chunk_hash) c = chunk_hash_new(alg);
  g_autofree uint8_t *buf = g_malloc((size_t)MIN(len, (uint64_t)READ_BUF));

  while (len > 0) {
    size_t n = (size_t)MIN(len, (uint64_t)READ_BUF);
    int r = cbt_io_pread(fd, buf, n, off);

    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: reading at offset %" PRIu64
                  ": %s", path, off, g_strerror(-r));
      return NULL;
    }
    chunk_hash_update(c, buf, n);
    off += n;
    len -= n;
  }
  return chunk_hash_hex(c);
}

/* --- a whole file, chunks in parallel ------------------------------------ */

/* Chunks are independent, so they are hashed by one thread per CPU; each
 * thread takes the next chunk index. */
struct sum_job {
  enum chunk_alg alg;
  const char *path;
  int fd;
  uint64_t size, chunk;
  guint nchunks;
  atomic_uint next;
  char **hex;                     /* [nchunks] */
  GMutex lock;
  GError *error;                  /* the first failure */
};

static gpointer
sum_thread(gpointer opaque)
{
  struct sum_job *j = opaque;
  unsigned i;

  while ((i = atomic_fetch_add(&j->next, 1)) < j->nchunks) {
    uint64_t off = (uint64_t)i * j->chunk;
    GError *err = NULL;

    j->hex[i] = sums_range(j->alg, j->fd, j->path, off, MIN(j->chunk, j->size - off),
                           &err);
    if (!j->hex[i]) {
      g_mutex_lock(&j->lock);
      if (!j->error)
        j->error = err;
      else
        g_error_free(err);
      g_mutex_unlock(&j->lock);
      atomic_store(&j->next, j->nchunks);
    }
  }
  cbt_io_thread_cleanup();
  return NULL;
}

bool
repo_checksum_file(enum chunk_alg alg, const char *path, uint64_t chunk,
                   GPtrArray **sums, uint64_t *size, GError **error)
{
  struct sum_job j = { .alg = alg, .path = path, .chunk = chunk };
  g_autofree char *why = NULL;
  g_autoptr(GPtrArray) out = NULL;
  GThread *threads[16];
  guint nthreads;
  struct stat st;

  j.fd = cbt_open_regular(path, O_RDONLY | O_CLOEXEC, &st, &why);
  if (j.fd < 0) {
    g_set_error(error, CLI_ERROR, j.fd == -EINVAL ? CLI_EXIT_DAMAGED : CLI_EXIT_FAILED,
                "%s", why);
    return false;
  }
  j.size = (uint64_t)st.st_size;
  j.nchunks = (guint)(j.size / chunk + (j.size % chunk != 0));
  j.hex = g_new0(char *, j.nchunks + 1);
  g_mutex_init(&j.lock);
  posix_fadvise(j.fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  nthreads = CLAMP((guint)g_get_num_processors(), 1, G_N_ELEMENTS(threads));
  nthreads = MIN(nthreads, MAX(j.nchunks, 1));
  for (guint t = 0; t < nthreads; t++)
    threads[t] = g_thread_new("checksum", sum_thread, &j);
  for (guint t = 0; t < nthreads; t++)
    g_thread_join(threads[t]);
  close(j.fd);
  g_mutex_clear(&j.lock);
  if (j.error) {
    g_propagate_error(error, j.error);
    g_strfreev(j.hex);
    return false;
  }
  out = g_ptr_array_new_full(j.nchunks, g_free);
  for (guint i = 0; i < j.nchunks; i++)
    g_ptr_array_add(out, j.hex[i]);
  g_free(j.hex);                  /* the strings moved to @out */
  *size = j.size;
  *sums = g_steal_pointer(&out);
  return true;
}
