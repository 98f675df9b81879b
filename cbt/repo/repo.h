/* The repository layer of the cbt CLI: the repository and its manifest,
 * the directory and S3 backends behind one interface, files read and
 * written wherever they live, chunk checksums, streamed reads, backup
 * chains, and the NBD pull that fills a new backup.  One header, one
 * section per defining file.  It depends on the S3 client (s3/s3.h), the
 * messages (../msg.h) and lib/, never on the commands.
 */
#ifndef CBT_REPO_H
#define CBT_REPO_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include <glib.h>
#include <json-c/json.h>

#include "msg.h"
#include "s3.h"

/* repo.c ---------------------------------------------------------------- */

/* A backup repository: DIR/manifest.json plus one qcow2 file per backup
 * (the format is described at the top of repo.c). */
#define REPO_MANIFEST     "manifest.json"
#define REPO_LOCK_FILE    ".lock"
#define REPO_PARTIAL_SUFFIX ".partial"
#define REPO_CHUNK_SIZE   (UINT64_C(64) << 20)   /* checksum granule */

/* The algorithm of a backup's chunk checksums (checksum.c has the
 * functions): the manifest names it per entry ("checksum"). */
enum chunk_alg {
  CHUNK_SHA256,               /* every manifest before "checksum"; S3 default */
  CHUNK_XXH128,               /* XXH3 128-bit; the directory default */
};

typedef struct repo_backup {
  unsigned seq;               /* 1, 2, ...: never reused in a repository */
  char *kind;                 /* "full" or "incremental" */
  char *file;                 /* base name in the repository */
  char *backing;              /* base name of the previous backup, or NULL */
  char *time;                 /* ISO 8601 UTC, when the checkpoint began */
  int64_t time_unix;
  double seconds;             /* how long the backup took */
  char *checkpoint;           /* daemon checkpoint id (16 hex), or NULL */
  char *bitmap_uuid;          /* daemon bitmap uuid, or NULL */
  uint64_t image_size;        /* virtual size in bytes */
  uint64_t granularity;       /* bitmap granularity (0 without bitmap) */
  uint64_t cluster_size;      /* of the qcow2 file */
  uint64_t bytes_copied;      /* read over NBD */
  uint64_t data_bytes;        /* guest bytes stored as data */
  uint64_t zero_bytes;        /* guest bytes stored as zero clusters */
  uint64_t file_size;         /* of the qcow2 file */
  uint64_t chunk_size;        /* checksum granule */
  enum chunk_alg checksum;    /* of @sums */
  GPtrArray *sums;            /* hex strings, one per chunk of the file */
} repo_backup;

struct repo_s3;
enum repo_lock { REPO_LOCK_NONE, REPO_LOCK_SHARED, REPO_LOCK_EXCLUSIVE };

typedef struct repo {
  char *dir;                  /* the directory, or "s3://BUCKET/PREFIX" */
  int lock_fd;                /* -1 when not locked (directory only) */
  unsigned next_seq;
  GPtrArray *backups;         /* repo_backup *, oldest first */
  struct repo_s3 *s3;         /* NULL for a directory (repo-s3.c) */
  const struct repo_backend *backend;   /* where it is stored */
} repo;

/* A repository's storage, as repo.c uses it: a directory (repo-dir.c) or
 * an S3 bucket (repo-s3.c).  Each call holds the lock it needs (see
 * repo_open); lock_check is false with the reason when the exclusive
 * lock was lost (S3 lock objects can expire). */
struct repo_backend {
  const char *name;
  bool (*open)(repo *r, const char *where, enum repo_lock lock, bool create,
               GError **error);
  void (*close)(repo *r);
  bool (*put_manifest)(repo *r, const char *text, GError **error);
  bool (*clean_stale)(repo *r, GError **error);
  bool (*lock_check)(repo *r, GError **error);
  bool (*delete_file)(repo *r, const char *file, GError **error);
};
extern const struct repo_backend repo_dir_backend;   /* repo-dir.c */
extern const struct repo_backend repo_s3_backend;    /* repo-s3.c */


repo_backup *repo_backup_new(void);
void repo_backup_free(repo_backup *b);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(repo_backup, repo_backup_free)
void repo_free(repo *r);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(repo, repo_free)

/* Open repository @where, a directory or "s3://BUCKET/PREFIX" (repo-s3.c;
 * the S3 client is configured by cli_s3_client), taking @lock without
 * waiting (a conflict is an error naming the holder's pid when known).
 * With @create a missing directory is created and a missing manifest
 * means an empty repository; without, both are errors (a missing bucket
 * is always one).  A malformed manifest is CLI_EXIT_DAMAGED. */
bool repo_open(const char *where, enum repo_lock lock, bool create, repo **out,
               GError **error);
/* The manifest text of @r's backups with "next-seq" @next_seq (caller
 * frees): what repo_add and repo_prune write. */
char *repo_manifest_text(const repo *r, unsigned next_seq);
#define REPO_MANIFEST_MAX (64u << 20)   /* refuse larger manifests */
/* Parse the manifest text in @text (@len bytes, NUL-terminated or not),
 * named @where in messages, into r->backups and r->next_seq (replaced
 * only on success).  Every entry is checked (names, kinds, the chain,
 * checksum counts); a malformed manifest is CLI_EXIT_DAMAGED.  repo_open
 * uses it on DIR/manifest.json; the fuzz target fuzz/fuzz-manifest.c on
 * arbitrary bytes. */
bool repo_parse_manifest(repo *r, const char *text, size_t len, const char *where,
                         GError **error);
/* DIR/@file.  Caller frees. */
char *repo_path(const repo *r, const char *file);
/* Open the repository's file @file (a plain name from the manifest)
 * read-only, as a regular file in the repository: a symbolic link (it
 * could lead out of the repository) or anything else (a FIFO would block)
 * is refused with CLI_EXIT_DAMAGED, a missing or unreadable file with
 * CLI_EXIT_FAILED.  Returns the descriptor (O_CLOEXEC) or -1. */
int repo_open_file(const repo *r, const char *file, GError **error);
/* The newest backup, or NULL in an empty repository. */
const repo_backup *repo_newest(const repo *r);
/* The backup named @name: its seq number, file name, or file name without
 * ".qcow2"; "latest" is the newest. */
bool repo_find(const repo *r, const char *name, const repo_backup **out,
               GError **error);
/* Index in r->backups of the full backup that starts @b's chain. */
guint repo_chain_start(const repo *r, const repo_backup *b);
/* Remove what a killed run left (exclusive lock held): *.partial files,
 * manifest temp files, and backup files not (yet) in the manifest whose
 * seq is >= next_seq, or older than every listed one (an interrupted
 * prune; S3: also leftover multipart uploads).  Each removal is a note. */
bool repo_clean_stale(repo *r, GError **error);
/* Why an unlisted backup file with sequence number @seq is stale (a
 * backup or a prune that did not finish), or NULL if it is not. */
const char *repo_stale_reason(const repo *r, unsigned seq);
/* The file name for the next backup of @kind at @now. Caller frees. */
char *repo_next_file(const repo *r, const char *kind, GDateTime *now);
/* Append @b (ownership taken) and rewrite the manifest atomically: temp
 * file, fsync, rename, fsync of the directory.  On failure @b is dropped
 * and the manifest on disk is the old one. */
bool repo_add(repo *r, repo_backup *b, GError **error);
/* False, with the reason, when the exclusive lock of @r was lost (an S3
 * lock that could not be refreshed in time); a directory's never is. */
bool repo_lock_check(repo *r, GError **error);
/* Delete the repository file @file (exclusive lock held); a missing one
 * is no error. */
bool repo_delete_file(repo *r, const char *file, GError **error);
/* Drop the @count oldest backups (whole chains: the one after them is a
 * full backup, or none is left) with the exclusive lock held: the
 * manifest is rewritten first, then their files are deleted. */
bool repo_prune(repo *r, guint count, GError **error);
/* One manifest entry as JSON (caller owns the object). */
json_object *repo_backup_to_json(const repo_backup *b);

/* Whether @name is a file the manifest lists. */
bool repo_listed(const repo *r, const char *name);

/* repo-dir.c ------------------------------------------------------------ */

/* For repo.c: the directory backend (repo_path and repo_open_file above
 * are defined there too). */
bool repo_dir_open(repo *r, const char *dir, enum repo_lock lock, bool create,
                   GError **error);
void repo_dir_close(repo *r);
bool repo_dir_put_manifest(repo *r, const char *text, GError **error);
bool repo_dir_clean_stale(repo *r, GError **error);
bool repo_dir_delete_file(repo *r, const char *file, GError **error);

/* repo-s3.c ------------------------------------------------------------- */

/* A repository in an S3 bucket: the directory layout with PREFIX/ in
 * place of DIR/ (docs/s3.md).  For readers of such a repository: */
bool repo_is_s3(const repo *r);
/* The client (owned by @r) and the bucket, or NULL for a directory. */
s3_client *repo_s3(const repo *r);
const char *repo_s3_bucket(const repo *r);
/* The object key of repository file @file ("PREFIX/FILE"); caller frees. */
char *repo_s3_key(const repo *r, const char *file);
/* For repo.c: open, free, stale cleaning and manifest replacement of an
 * S3 repository. */
bool repo_s3_open(repo *r, const char *url, enum repo_lock lock, bool create,
                  GError **error);
void repo_s3_free(struct repo_s3 *s);
bool repo_s3_put_manifest(repo *r, const char *text, GError **error);
bool repo_s3_clean_stale(repo *r, GError **error);
bool repo_s3_lock_check(repo *r, GError **error);
bool repo_s3_delete_file(repo *r, const char *file, GError **error);

/* repo-write.c ---------------------------------------------------------- */

/* One new backup file being written into a repository, a directory
 * (NAME.partial, renamed at commit) or S3 (a streaming multipart upload),
 * through a qcow2 writer; the design is at the top of repo-write.c. */
struct cbt_qcow2_writer;
struct cbt_qcow2_writer_opts;
typedef struct repo_wfile repo_wfile;
/* Start file @file of @r (exclusive lock held) for an image described by
 * @wo, its chunks to be summed with @alg.  Caller frees (repo_wfile_free). */
bool repo_wfile_new(repo *r, const char *file, const struct cbt_qcow2_writer_opts *wo,
                    enum chunk_alg alg, repo_wfile **out, GError **error);
/* The writer to fill (thread-safe as cbt_qcow2_writer_write is); owned by
 * the wfile. */
struct cbt_qcow2_writer *repo_wfile_writer(repo_wfile *f);
/* Path or URL of the file, for messages. */
const char *repo_wfile_name(const repo_wfile *f);
/* False with the storage's own reason when a write failed because of it
 * (an S3 error, the lock lost): better than the writer's errno. */
bool repo_wfile_check(repo_wfile *f, GError **error);
/* Finish the writer and make the file complete under its name; *@sums
 * (caller's) gets the checksum (the @alg given to repo_wfile_new) of each
 * REPO_CHUNK_SIZE chunk, *@size the file size.  Then list it (repo_add)
 * and call repo_wfile_keep. */
bool repo_wfile_commit(repo_wfile *f, GPtrArray **sums, uint64_t *size, GError **error);
void repo_wfile_keep(repo_wfile *f);
/* Free; unless kept, remove what was written (partial or committed). */
void repo_wfile_free(repo_wfile *f);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(repo_wfile, repo_wfile_free)

/* checksum.c ------------------------------------------------------------ */

/* SHA-256 through libcrypto (SHA-NI where the CPU has it).  sha_new
 * returns a context ready for sha_update; sha_hex finishes it as 64
 * lower-case hex digits (caller frees) and readies it for the next
 * message.  libcrypto failing here means out of memory: they abort.
 * (The S3 upload uses these: its payload hash is always SHA-256.) */
typedef struct evp_md_ctx_st EVP_MD_CTX;
EVP_MD_CTX *sha_new(void);
void sha_update(EVP_MD_CTX *c, const void *buf, size_t len);
char *sha_hex(EVP_MD_CTX *c);

/* The manifest's name of @alg ("sha256", "xxh128") and the length of its
 * hex text (64, 32). */
const char *chunk_alg_name(enum chunk_alg alg);
size_t chunk_alg_hex_len(enum chunk_alg alg);
/* *@out = the algorithm named @name; false for a name we do not know. */
bool chunk_alg_parse(const char *name, enum chunk_alg *out);

/* One checksum being computed, whichever the algorithm: new, update with
 * the bytes in order, hex to finish.  chunk_hash_hex returns the
 * lower-case hex of the canonical digest (what sha256sum or xxh128sum
 * print; caller frees) and readies @h for the next message.  One thread
 * at a time per chunk_hash; a library failure (out of memory) aborts. */
typedef struct chunk_hash chunk_hash;
chunk_hash *chunk_hash_new(enum chunk_alg alg);
void chunk_hash_free(chunk_hash *h);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(chunk_hash, chunk_hash_free)
void chunk_hash_update(chunk_hash *h, const void *buf, size_t len);
char *chunk_hash_hex(chunk_hash *h);
/* The hex checksum of @len bytes at @buf in one call (caller frees). */
char *chunk_hash_data(enum chunk_alg alg, const void *buf, size_t len);

/* The @alg checksums of @path in chunks of @chunk bytes, chunks hashed in
 * parallel: *@sums gets one hex string per chunk, *@size the file size.
 * Caller frees *@sums. */
bool repo_checksum_file(enum chunk_alg alg, const char *path, uint64_t chunk,
                        GPtrArray **sums, uint64_t *size, GError **error);
/* The @alg checksum (hex, caller frees) of [@off, @off + @len) of the
 * file open on @fd (@path names it in the error), read through
 * cbt/uring-io.h. */
char *sums_range(enum chunk_alg alg, int fd, const char *path, uint64_t off,
                 uint64_t len, GError **error);

/* Per-chunk @alg checksums of a file whose bytes are fed in order.  Bytes
 * below @start (a multiple of @chunk) are ignored: their chunks are
 * someone else's business and stay NULL in the result.  Feeding anything
 * but the next bytes (a gap, an overlap) marks the stream broken: the
 * caller must then hash the file another way.  One thread at a time. */
typedef struct sums_stream sums_stream;
sums_stream *sums_stream_new(enum chunk_alg alg, uint64_t chunk, uint64_t start);
void sums_stream_free(sums_stream *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(sums_stream, sums_stream_free)
void sums_stream_feed(sums_stream *s, uint64_t off, const void *buf, size_t len);
bool sums_stream_intact(const sums_stream *s);
/* The next offset expected (the end of what was fed). */
uint64_t sums_stream_pos(const sums_stream *s);
/* The hex strings, one per chunk up to the last byte fed (the last chunk
 * may be short); must be intact.  Caller frees the array. */
GPtrArray *sums_stream_end(sums_stream *s);

/* stream.c -------------------------------------------------------------- */

/* Read repository files through one io_uring with a deep queue, checking
 * the manifest's checksums on threads as the bytes arrive (the design is
 * at the top of stream.c).  cbt restore and cbt verify use it. */
struct stream_range { uint64_t off, len; };
struct rfile;
struct stream_file {
  const struct rfile *rf;         /* a directory file or an S3 object */
  uint64_t size;                  /* the manifest's file size */
  GArray *ranges;                 /* struct stream_range, ascending, to read */
  const GPtrArray *sums;          /* the manifest's chunk checksums, or NULL: */
  uint64_t chunk_size;            /* not checked (then ranges may be any) */
  enum chunk_alg checksum;        /* the algorithm of @sums */
};
typedef struct stream stream;
struct stream_piece;
struct stream_opts {
  /* Before the first read (may be NULL): e.g. start work with stream_hold. */
  bool (*start)(void *opaque, stream *s, GError **error);
  /* A piece arrived (main thread).  Its buffer stays valid while the
   * callback runs, and after it for each stream_write or stream_ref. */
  bool (*piece)(void *opaque, struct stream_piece *p, GError **error);
  /* A few times a second and at the end (may be NULL). */
  void (*progress)(void *opaque, uint64_t bytes_read);
  /* A chunk of file @file does not match (main thread; @error is taken).
   * NULL: a mismatch stops the run with that error. */
  void (*mismatch)(void *opaque, unsigned file, GError *error);
  void *opaque;
};
/* Read every range of every file in order; returns when all the work
 * started is done.  A checksum mismatch is CLI_EXIT_DAMAGED naming the
 * file and byte range; a file shorter than @size too. */
bool stream_run(const struct stream_opts *o, const struct stream_file *files,
                unsigned nfiles, GError **error);
/* A piece's bytes: file index, file offset and length. */
const uint8_t *stream_piece_data(const struct stream_piece *p, unsigned *file,
                                 uint64_t *off, uint64_t *len);
/* Write @len bytes at @buf (inside the piece's buffer) to @fd at @off on
 * the stream's ring; a failure (naming @name) stops the run.  Main
 * thread only. */
void stream_write(struct stream_piece *p, int fd, const char *name, const uint8_t *buf,
                  uint64_t len, uint64_t off);
/* Keep @p's buffer for work on another thread (main thread), which ends
 * it with stream_done (any thread; @error or NULL, taken). */
void stream_ref(struct stream_piece *p);
void stream_done(struct stream_piece *p, GError *error);
/* The same for work that uses no piece. */
void stream_hold(stream *s);
void stream_release(stream *s, GError *error);

/* chain-map.c ----------------------------------------------------------- */

/* Where each guest cluster of a backup is stored in its chain (the design
 * is at the top of chain-map.c). */
struct chain_run {
  uint64_t host;                  /* file offset of the first cluster */
  uint64_t guest;                 /* guest cluster index of the first */
  uint64_t clusters;
};
struct chain_file {
  const repo_backup *backup;
  struct rfile *rf;               /* open for reading (repo-read.c) */
  const char *path;               /* its name: rf->name */
  uint64_t size;                  /* the manifest's file size (checked) */
  GArray *runs;                   /* struct chain_run: visible data, by host */
  uint64_t data_bytes;            /* in runs */
  GArray *meta;                   /* struct stream_range: what the map was read from */
};
typedef struct chain_map {
  struct chain_file *files;       /* the full backup first */
  unsigned nfiles;
  uint64_t cluster_size;
  uint64_t image_size;
  uint64_t nclusters;
  GArray *zeros;                  /* struct stream_range: guest ranges reading as zeros */
} chain_map;
void chain_map_free(chain_map *m);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(chain_map, chain_map_free)
/* Open and map the manifest's chain of @b (shared lock held by the
 * caller).  A file that disagrees with the manifest or is corrupt is
 * CLI_EXIT_DAMAGED. */
bool chain_map_build(repo *r, const repo_backup *b, chain_map **out, GError **error);
/* Index of the first run of @f that ends after file offset @host. */
guint chain_file_find(const struct chain_file *f, uint64_t host, uint64_t cs);

/* nbd-pull.c ------------------------------------------------------------ */

/* Copy an NBD export's data into a qcow2 writer over several connections
 * with many requests in flight. */
struct pull_opts {
  const char *socket;           /* unix socket, or */
  const char *uri;              /* an NBD URI */
  unsigned connections;
  uint64_t size;                /* the export must have this size */
  const char *export_name;      /* NULL: the socket's default / the URI's */
  bool release;                 /* TRIM what is stored (a point-in-time view) */
  const char *dirty_context;    /* NULL: full (all allocated data) */
  void *writer;                 /* cbt_qcow2_writer * */
  uint32_t cluster_size;        /* the writer's */
  volatile sig_atomic_t *cancel; /* non-zero: stop (a signal arrived) */
  /* Called from the calling thread a few times a second while copying. */
  void (*progress)(void *opaque, uint64_t done, uint64_t total);
  void *opaque;
};
struct pull_stats {
  uint64_t planned;             /* bytes to read */
  uint64_t copied;              /* bytes read and stored */
  uint64_t zeroed;              /* bytes made zero clusters (incremental) */
  uint64_t dirty;               /* dirty bytes found (incremental) */
};
bool pull_run(const struct pull_opts *o, struct pull_stats *st, GError **error);

/* repo-read.c ----------------------------------------------------------- */

/* One backup file opened for reading, in a directory (its descriptor) or
 * on S3 (ranged GETs); the design is at the top of repo-read.c. */
struct s3_client;
typedef struct rfile {
  char *name;                     /* path or s3://BUCKET/KEY, for messages */
  uint64_t size;                  /* found on open (fstat, HEAD) */
  int fd;                         /* directory: O_RDONLY|O_CLOEXEC; S3: -1 */
  struct s3_client *s3;           /* S3: the repository's (borrowed) */
  char *bucket, *key;
  char *etag;                     /* S3: at open; a GET seeing another fails */
  uint64_t ino;                   /* directory: its inode number; S3: 0 */
} rfile;
/* Threads of the fetch pool: ranged GETs in flight at most. */
#define RFETCH_THREADS 8
/* Open backup @b's file of @r.  A missing S3 object is CLI_EXIT_DAMAGED;
 * a directory file is opened with repo_open_file (its errors).  The size
 * is not checked here.  Caller frees (rfile_close); @r must outlive it. */
rfile *rfile_open(repo *r, const repo_backup *b, GError **error);
void rfile_close(rfile *f);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(rfile, rfile_close)
static inline bool rfile_is_s3(const rfile *f) { return f->s3 != NULL; }
/* Read exactly @len bytes at @off (any thread).  A file that ends first,
 * or an S3 object that disappeared or changed, is CLI_EXIT_DAMAGED
 * naming the range; an I/O or S3 error is CLI_EXIT_FAILED. */
bool rfile_pread(const rfile *f, void *buf, size_t len, uint64_t off, GError **error);
/* rfile_pread on a thread of the fetch pool; @done runs there with the
 * error (or NULL), which it takes. */
void rfile_fetch(const rfile *f, void *buf, size_t len, uint64_t off,
                 void (*done)(void *opaque, GError *error), void *opaque);
/* Read all of @ranges, in parallel on S3; the first error. */
struct rfile_range { uint64_t off; size_t len; void *buf; };
bool rfile_read_ranges(const rfile *f, const struct rfile_range *ranges, unsigned n,
                       GError **error);

/* chain-read.c ---------------------------------------------------------- */

/* Random reads of a backup point through its chain with a cache of file
 * blocks and readahead, every byte checked against the manifest's chunk
 * checksums before it is served (the design is at the top of
 * chain-read.c); any number of threads may read at once.  cbt mount, and
 * through it cbt serve and cbt restore --instant. */
typedef struct chain_reader chain_reader;
/* Map the manifest's chain of @b (chain_map_build) and check the chunks
 * the map was read from: damage is CLI_EXIT_DAMAGED.  @r must outlive
 * the reader. */
bool chain_reader_new(repo *r, const repo_backup *b, chain_reader **out, GError **error);
void chain_reader_free(chain_reader *cr);
const chain_map *chain_reader_map(const chain_reader *cr);
/* Read guest bytes [@off, @off + @len) (inside the image) into @buf.  A
 * chunk that does not match its checksum is CLI_EXIT_DAMAGED naming the
 * file and the chunk's byte range, for this read and every later one
 * that needs it; a read error is CLI_EXIT_FAILED (tried again next time). */
bool chain_reader_read(chain_reader *cr, void *buf, uint64_t len, uint64_t off,
                       GError **error);
/* Whether guest offset @off (inside the image) holds data or reads as
 * zeros, and for how many bytes from @off the answer stays the same. */
bool chain_reader_is_data(const chain_reader *cr, uint64_t off, uint64_t *len);
/* A number that names the point's top file as it is now: a directory
 * file's inode number (when above 2), else a hash of its name and S3
 * ETag: the same for the same file, another after it was replaced. */
uint64_t chain_reader_ident(const chain_reader *cr);
/* Chunks hashed so far, and how many of them did not match. */
void chain_reader_checked(chain_reader *cr, uint64_t *checked, uint64_t *damaged);

#endif
