/* An S3 client for the cbt CLI: the object store a repository can live on.
 *
 * One header for the S3 files, one section per file that defines the
 * symbols (as cli.h does for the CLI):
 *   s3-config.c     configuration from the environment, s3:// URLs
 *   s3.c            the client, its connections, and the signed request
 *                   with retries that every call goes through
 *   s3-object.c     the one-request operations: PUT, GET, ranged GET,
 *                   HEAD, DELETE, LIST, create bucket
 *   s3-xml.c        the XML response bodies, parsed with GMarkup
 *   s3-multipart.c  multipart uploads: the five calls, and a streaming
 *                   uploader with several parts in flight
 *   s3-lock.c       a lock object with an owner and an expiry
 * docs/s3.md describes the configuration, the retry policy, the lock
 * protocol and the planned repository layout.
 *
 * Every function that talks to the server is synchronous and may be
 * called from several threads at once on one s3_client.  Errors are
 * GErrors in the S3_ERROR domain; the message names the operation, the
 * object and the cause ("S3 PUT s3://b/k: access denied
 * (SignatureDoesNotMatch: ...)").  A GError of another domain never comes
 * out of these functions.
 */
#ifndef CBT_S3_H
#define CBT_S3_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <glib.h>

/* s3.c ------------------------------------------------------------------ */

#define S3_ERROR (s3_error_quark())
GQuark s3_error_quark(void);

/* What went wrong, for callers that act on it (the lock, a repository
 * deciding between "absent" and "failed"). */
enum s3_error_code {
  S3_ERROR_FAILED,          /* anything not below */
  S3_ERROR_CONFIG,          /* bad configuration, URL or argument */
  S3_ERROR_CONNECT,         /* endpoint unreachable, still after retries */
  S3_ERROR_ACCESS_DENIED,   /* 403: credentials, signature, permissions */
  S3_ERROR_NO_SUCH_BUCKET,  /* 404 NoSuchBucket */
  S3_ERROR_NOT_FOUND,       /* 404 NoSuchKey / NoSuchUpload, or on HEAD */
  S3_ERROR_PRECONDITION,    /* 412: a conditional request's condition */
  S3_ERROR_EXISTS,          /* 409 BucketAlreadyExists / ...OwnedByYou */
  S3_ERROR_FULL,            /* the store is out of space or quota */
  S3_ERROR_SERVER,          /* 5xx or SlowDown, still after retries */
  S3_ERROR_PROTOCOL,        /* a response we cannot use */
  S3_ERROR_LOCKED,          /* s3-lock.c: another owner holds the lock */
  S3_ERROR_CANCELLED,       /* the client's cancel flag was set */
};

typedef struct s3_config s3_config;
typedef struct s3_client s3_client;

/* A client for @cfg (copied).  Fails on an unusable configuration:
 * missing credentials, an endpoint that is not http(s)://host. */
s3_client *s3_client_new(const s3_config *cfg, GError **error);
void s3_client_free(s3_client *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(s3_client, s3_client_free)
const char *s3_client_region(const s3_client *c);
/* Cancellation (a signal handler sets *@flag, e.g. to the signal number;
 * NULL: none).  Once *@flag is non-zero, a request in progress stops
 * within about a second (curl's progress callback, and the sleeps between
 * tries, look at it) and fails with S3_ERROR_CANCELLED; requests started
 * afterwards (the cleanup: aborting an upload, releasing a lock) get one
 * try each, all of them together within S3_CANCEL_GRACE_MS of the first,
 * and then fail with S3_ERROR_CANCELLED without being sent.  Set it
 * before the client is shared between threads. */
#define S3_CANCEL_GRACE_MS 5000
void s3_client_set_cancel(s3_client *c, const volatile sig_atomic_t *flag);

/* What a HEAD or GET tells about an object. */
typedef struct s3_object_info {
  uint64_t size;            /* whole object, also after a ranged GET */
  char *etag;               /* as the server sent it, quotes removed */
  gint64 last_modified;     /* Unix time (server clock), -1 if unknown */
  gint64 server_time;       /* the response's Date (server clock), or -1 */
} s3_object_info;

void s3_object_info_clear(s3_object_info *info);

/* The request underneath, for the other S3 files (s3.c's design note
 * says how it is signed and retried).  Fill in the first
 * group, call s3_perform, read the second group, s3_request_clear. */
typedef struct s3_request {
  const char *op;           /* for messages: "PUT", "upload part" */
  const char *method;       /* GET PUT POST HEAD DELETE */
  const char *bucket;       /* NULL: the service itself */
  const char *key;          /* NULL or "": the bucket itself */
  const char *query;        /* from s3_query, or NULL */
  const void *body;         /* PUT and POST */
  size_t body_len;
  const char *payload_sha256; /* SHA-256 of body (64 lowercase hex
                             * digits) if the caller has it, or NULL:
                             * over http:// it is sent as the payload
                             * hash instead of one computed again */
  const char *headers[4];   /* "name: value", lowercase names; signed */
  void *dst;                /* 2xx body into this buffer (ranged GET), */
  size_t dst_cap;           /* of this size; else into body_out */
  size_t max_body;          /* cap of body_out for 2xx (0: 16 MiB) */
  bool error_in_200;        /* a 200 may carry <Error> (complete) */
  bool no_grace;            /* not cleanup (a part): begun after the
                             * cancel, fail it unsent */

  long status;              /* last HTTP status, 0 if none */
  GByteArray *body_out;
  size_t dst_len;
  s3_object_info info;
  guint attempts;
  char *err_code;           /* S3 error code of a refusal, or NULL */
} s3_request;

/* Send @r, retrying as the top of s3.c says.  True for a 2xx answer; on
 * false, r->status and r->err_code tell what the server said last. */
bool s3_perform(s3_client *c, s3_request *r, GError **error);
void s3_request_clear(s3_request *r);
/* "a=1&b=2": NAME, VALUE pairs up to a NULL name, encoded and sorted as
 * SigV4 wants; a pair with a NULL value is left out, "" gives "NAME=".
 * Caller frees. */
char *s3_query(const char *name, const char *value, ...) G_GNUC_NULL_TERMINATED;

/* s3-config.c ----------------------------------------------------------- */

/* Where and as whom to connect.  s3_config_from_env fills it the way the
 * AWS tools do:
 *   AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL   endpoint (default
 *                         https://s3.REGION.amazonaws.com)
 *   AWS_REGION, else AWS_DEFAULT_REGION          region (us-east-1)
 *   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY      credentials (required)
 *   AWS_SESSION_TOKEN                             temporary credentials
 *   AWS_CA_BUNDLE                                 CA file for https
 *   AWS_MAX_ATTEMPTS                              tries per request (5)
 *   CBT_S3_ADDRESSING_STYLE  path | virtual: bucket in the path
 *                         (http://host/bucket/key) or in the host name
 *                         (http://bucket.host/key); default path with a
 *                         custom endpoint, virtual for AWS.
 * Fields the caller sets afterwards (command-line options) win. */
struct s3_config {
  char *endpoint;           /* scheme://host[:port][/path], no final '/' */
  char *region;
  char *access_key;
  char *secret_key;
  char *session_token;      /* may be NULL */
  char *ca_bundle;          /* may be NULL */
  bool path_style;
  guint max_attempts;       /* >= 1 */
  guint retry_base_ms;      /* first backoff; doubles per attempt */
  guint retry_max_ms;       /* cap of one backoff */
  guint retry_budget_ms;    /* no new try starts this long after the first */
};

bool s3_config_from_env(s3_config *cfg, GError **error);
void s3_config_clear(s3_config *cfg);
/* Set cfg->endpoint (and the addressing default that goes with it). */
bool s3_config_set_endpoint(s3_config *cfg, const char *url, GError **error);

/* "s3://BUCKET" or "s3://BUCKET/KEY": *@bucket and *@key (the rest after
 * the first '/', possibly "", never NULL) are the caller's. */
bool s3_url_parse(const char *url, char **bucket, char **key, GError **error);

/* s3-object.c ----------------------------------------------------------- */

/* Conditions on a PUT (NULL: none). */
typedef struct s3_put_cond {
  bool if_absent;           /* If-None-Match: *: only if no such key */
  const char *if_match;     /* If-Match: only if the key's ETag is this */
} s3_put_cond;

/* PUT @len bytes from @data as BUCKET/KEY.  A failed condition is
 * S3_ERROR_PRECONDITION.  *@etag (may be NULL) gets the new ETag. */
bool s3_put_object(s3_client *c, const char *bucket, const char *key, const void *data,
                   size_t len, const s3_put_cond *cond, char **etag, GError **error);

/* GET the whole object, refusing one larger than @max bytes (0: 16 MiB)
 * with S3_ERROR_PROTOCOL rather than allocating without bound.  *@data is
 * the caller's; @info (may be NULL) is filled and must be cleared. */
bool s3_get_object(s3_client *c, const char *bucket, const char *key, size_t max,
                   GBytes **data, s3_object_info *info, GError **error);

/* GET bytes [@off, @off + @len) into @buf.  *@got is @len, or less when
 * the object ends first (0 when @off is at or past its end).  @info (may
 * be NULL) gets the object's size and ETag. */
bool s3_get_range(s3_client *c, const char *bucket, const char *key, uint64_t off,
                  size_t len, void *buf, size_t *got, s3_object_info *info,
                  GError **error);

/* Send the DELETE @r (s3_perform) where "not found" means done: success
 * then, as for any 2xx.  Clears @r. */
bool s3_perform_delete(s3_client *c, s3_request *r, GError **error);
/* HEAD: a missing key is S3_ERROR_NOT_FOUND. */
bool s3_head_object(s3_client *c, const char *bucket, const char *key,
                    s3_object_info *info, GError **error);

/* DELETE; deleting a key that does not exist succeeds (as in S3). */
bool s3_delete_object(s3_client *c, const char *bucket, const char *key, GError **error);

/* Create a bucket.  One that someone else owns is S3_ERROR_EXISTS; one
 * we own already is success in us-east-1 (S3's old behaviour, RGW's too)
 * and S3_ERROR_EXISTS elsewhere. */
bool s3_create_bucket(s3_client *c, const char *bucket, GError **error);

/* One object of a listing. */
typedef struct s3_entry {
  char *key;
  uint64_t size;
  char *etag;
  char *last_modified;      /* ISO 8601 as the server sent it */
} s3_entry;

void s3_entry_free(s3_entry *e);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(s3_entry, s3_entry_free)

/* Every object whose key starts with @prefix ("" for all), in key order,
 * through as many ListObjectsV2 pages (of up to @page_size keys, 0: the
 * server's default, 1000) as it takes.  With a @delimiter ("/"), keys
 * that have it after the prefix are rolled up into *@prefixes (may be
 * NULL then).  *@entries holds s3_entry, *@prefixes strings; the caller
 * frees both arrays. */
bool s3_list(s3_client *c, const char *bucket, const char *prefix, const char *delimiter,
             guint page_size, GPtrArray **entries, GPtrArray **prefixes, GError **error);

/* What follows @prefix (NULL or "": all) in @key, or NULL when @key does
 * not start with it.  The keys of a listing answer are the server's word
 * (or that of anything between): s3_list and s3_mpu_list drop, with a
 * note, every key outside the prefix they asked for, so that nothing a
 * caller deletes or aborts lies outside it, and callers take the name
 * of a listed key with this, never by skipping strlen(prefix) bytes. */
const char *s3_key_under(const char *key, const char *prefix);

/* Whether @key, listed under @prefix of @bucket, really is under it; a
 * note names it when not (the listings' check, for s3-multipart.c). */
bool s3_listed_key_ok(const char *bucket, const char *prefix, const char *key);

/* s3-xml.c -------------------------------------------------------------- */

/* Parsers of the response bodies we use.  Each takes the body as
 * received (not NUL-terminated), refuses anything that is not
 * well-formed XML with the expected root element, and returns what it
 * found in caller-owned memory.  They do no I/O, so the fuzzer and the
 * tests can feed them anything. */

/* <Error><Code>..</Code><Message>..</Message></Error>: *@code and
 * *@message (either may be missing: NULL). */
bool s3_xml_error(const char *body, size_t len, char **code, char **message);

/* One page of ListObjectsV2 (encoding-type=url: keys and prefixes are
 * URL-decoded here). */
typedef struct s3_list_page {
  GPtrArray *entries;       /* s3_entry */
  GPtrArray *prefixes;      /* char *, CommonPrefixes */
  bool truncated;
  char *next_token;         /* NextContinuationToken, NULL if none */
} s3_list_page;

void s3_list_page_clear(s3_list_page *p);
bool s3_xml_list_objects(const char *body, size_t len, s3_list_page *page,
                         GError **error);

/* InitiateMultipartUploadResult: *@upload_id. */
bool s3_xml_upload_id(const char *body, size_t len, char **upload_id, GError **error);

/* CompleteMultipartUploadResult: *@etag, quotes removed. */
bool s3_xml_complete(const char *body, size_t len, char **etag, GError **error);

/* One in-progress multipart upload. */
typedef struct s3_upload_entry {
  char *key;
  char *upload_id;
  char *initiated;          /* ISO 8601 */
} s3_upload_entry;

void s3_upload_entry_free(s3_upload_entry *u);

/* One page of ListMultipartUploads. */
typedef struct s3_uploads_page {
  GPtrArray *uploads;       /* s3_upload_entry */
  bool truncated;
  char *next_key_marker;
  char *next_upload_id_marker;
} s3_uploads_page;

void s3_uploads_page_clear(s3_uploads_page *p);
/* @url_asked: the request had encoding-type=url.  Keys are then decoded
 * even when the response does not say <EncodingType>url</EncodingType>
 * (Ceph RGW encodes them without saying so); NextKeyMarker is decoded
 * only when it says so (RGW sends it as is, AWS encoded). */
bool s3_xml_list_uploads(const char *body, size_t len, bool url_asked,
                         s3_uploads_page *page, GError **error);

/* s3-multipart.c -------------------------------------------------------- */

/* S3's limits on multipart uploads: every part but the last is at least
 * S3_PART_MIN bytes, no part is larger than S3_PART_MAX, and an upload has
 * at most S3_MAX_PARTS parts. */
#define S3_PART_MIN ((size_t)5 << 20)
#define S3_PART_MAX ((size_t)5 << 30)
#define S3_MAX_PARTS 10000u

/* The five calls.  Part numbers count from 1.  *@etag of a part is the
 * caller's; complete takes the parts' ETags in order, [i] for part i + 1,
 * a NULL for a number not used (S3 allows gaps).  Abort of an upload
 * that no longer exists succeeds. */
bool s3_mpu_create(s3_client *c, const char *bucket, const char *key, char **upload_id,
                   GError **error);
bool s3_mpu_put_part(s3_client *c, const char *bucket, const char *key,
                     const char *upload_id, guint part, const void *data, size_t len,
                     char **etag, GError **error);
/* The same with the SHA-256 of @data (64 lowercase hex digits, or NULL)
 * known to the caller, who then spares the client a pass over the part
 * over http:// (s3_request's payload_sha256).  A wrong one is refused
 * by the server (XAmzContentSHA256Mismatch). */
bool s3_mpu_put_part_sha256(s3_client *c, const char *bucket, const char *key,
                            const char *upload_id, guint part, const void *data,
                            size_t len, const char *payload_sha256, char **etag,
                            GError **error);
bool s3_mpu_complete(s3_client *c, const char *bucket, const char *key,
                     const char *upload_id, GPtrArray *etags, char **etag,
                     GError **error);
bool s3_mpu_abort(s3_client *c, const char *bucket, const char *key,
                  const char *upload_id, GError **error);
/* The uploads in progress under @prefix (all pages): s3_upload_entry
 * items, the caller's. */
bool s3_mpu_list(s3_client *c, const char *bucket, const char *prefix,
                 GPtrArray **uploads, GError **error);

/* A streaming upload of one object of unknown size: bytes are written in
 * order, cut into parts of @part_size, and each full part is uploaded by
 * one of @jobs threads while the caller goes on writing.  Memory is
 * bounded: at most @jobs parts in flight plus the one being filled.  An
 * object smaller than one part is sent as a single PUT at the end (no
 * multipart upload is created).  The object appears only when
 * s3_upload_finish succeeds; s3_upload_free of an unfinished upload
 * aborts it (the parts are deleted).  One thread writes at a time. */
typedef struct s3_upload s3_upload;

s3_upload *s3_upload_new(s3_client *c, const char *bucket, const char *key,
                         size_t part_size, guint jobs, GError **error);
/* Fails with the error of any part that failed so far, and from then on. */
bool s3_upload_write(s3_upload *u, const void *data, size_t len, GError **error);
/* The upload's id, or NULL while no part has been sent. */
const char *s3_upload_id(const s3_upload *u);
/* Send what is left, wait for every part and complete; *@etag (may be
 * NULL) gets the object's ETag.  On failure the upload is aborted. */
bool s3_upload_finish(s3_upload *u, char **etag, GError **error);
/* A writer that hashes what it writes in pieces of the part size (a
 * backup's checksum chunks) can spare the client a second pass over the
 * bytes: before the write that completes a part (or before finishing,
 * for a short last part), it gives the SHA-256 (64 lowercase hex
 * digits) of that whole part and its length.  The part is then sent
 * with it as its payload hash (over http://).  A part whose length
 * turns out to differ is hashed as usual, and so is an object sent as
 * one PUT. */
void s3_upload_part_sha256(s3_upload *u, const char *hex, size_t len);
/* For objects whose beginning is known last (a qcow2 header): after
 * s3_upload_reserve_first (before the first write) the bytes written are
 * parts from 2 on: 2, 3, ... when @max_first (the most s3_upload_finish_first
 * will be given) is at most the part size, else after the up to 16 part
 * numbers @first will be cut into.  s3_upload_finish_first sends @first
 * as those parts (at least S3_PART_MIN bytes unless nothing else was
 * written: then the object is @first alone, one PUT) and completes;
 * @first_sha256 (or NULL) is @first's SHA-256, used as the payload hash
 * when @first is one part.  The object is @first followed by what was
 * written.  Failure aborts the upload. */
void s3_upload_reserve_first(s3_upload *u, size_t max_first);
bool s3_upload_finish_first(s3_upload *u, const void *first, size_t len,
                            const char *first_sha256, char **etag, GError **error);
/* Stop: wait for the parts in flight, abort the upload (best effort). */
void s3_upload_free(s3_upload *u);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(s3_upload, s3_upload_free)

/* s3-lock.c ------------------------------------------------------------- */

/* A lock object with an owner and an expiry (docs/s3.md, "Lock"): the
 * object KEY holds JSON naming its owner (a random token, host, pid,
 * note) and a time to live; the lock is free when the object is absent,
 * or when the server's clock says more than ttl seconds passed since it
 * was last written.  Acquire creates it with a conditional PUT
 * (If-None-Match: *), or replaces an expired one with If-Match on its
 * ETag, and reads it back to check that it holds our token. */
typedef struct s3_lock s3_lock;

/* Take the lock or fail with S3_ERROR_LOCKED naming the holder and when
 * its lock expires.  @note (may be NULL) goes into the lock object. */
bool s3_lock_acquire(s3_client *c, const char *bucket, const char *key, guint ttl,
                     const char *note, s3_lock **out, GError **error);
/* The same with @flags: S3_LOCK_PROCESS says the lock lives only as long
 * as this process (the lock object records it, with our boot id and pid
 * namespace), and lets this acquire take over such a lock of a process on
 * this host (same host name) that is gone, without waiting for its ttl:
 * one of an earlier boot, or one of our boot and pid namespace whose pid
 * no process has.  One in another pid namespace cannot be judged: it is
 * an S3_ERROR_LOCKED that says so and how to remove the lock. */
#define S3_LOCK_PROCESS 1u
bool s3_lock_acquire_flags(s3_client *c, const char *bucket, const char *key, guint ttl,
                           const char *note, unsigned flags, s3_lock **out,
                           GError **error);
/* Rewrite the lock (If-Match on our last ETag) to restart its ttl; fails
 * with S3_ERROR_LOCKED if it is no longer ours. */
bool s3_lock_refresh(s3_lock *l, GError **error);
/* Delete the lock if it is still ours; frees nothing. */
bool s3_lock_release(s3_lock *l, GError **error);
/* The random token that identifies this owner. */
const char *s3_lock_token(const s3_lock *l);
/* The lock at BUCKET/KEY as taken by another process of the same owner
 * (cbt s3 lock acquire printed @token): fails with S3_ERROR_LOCKED if the
 * lock holds another token, S3_ERROR_NOT_FOUND if there is none.  Then
 * refresh and release work on it as on one acquired here. */
bool s3_lock_resume(s3_client *c, const char *bucket, const char *key,
                    const char *token, s3_lock **out, GError **error);
/* Forget @l without releasing it (the lock stays until its ttl ends). */
void s3_lock_free(s3_lock *l);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(s3_lock, s3_lock_free)

/* s3-config.c: the program's clients ---------------------------------- */

/* S3 repositories.  cli_s3_client makes a client the way the AWS
 * tools do (AWS_* variables, s3_config_from_env) with --s3-endpoint, when
 * given, winning over AWS_ENDPOINT_URL (and path-style addressing going
 * with it, unless CBT_S3_ADDRESSING_STYLE says otherwise). */
extern char *cli_s3_endpoint;
bool cli_s3_client(s3_client **out, GError **error);
/* When set (before cli_s3_client), the clients it makes stop their
 * requests once *cli_s3_cancel is non-zero (s3_client_set_cancel). */
extern const volatile sig_atomic_t *cli_s3_cancel;

#endif /* CBT_S3_H */
