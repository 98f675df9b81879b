/* The manifest of a backup repository: its model, parsing and writing,
 * and the questions asked of it (find a backup, its chain, stale files).
 * The repository's layout and format:
 *
 *   DIR/manifest.json                     the list of backups (below)
 *   DIR/000001-full-20250102T030405Z.qcow2   a full backup (no backing file)
 *   DIR/000002-inc-20250103T030405Z.qcow2    an incremental: backing file is
 *                                         the previous backup, relative name,
 *                                         backing format qcow2
 *   DIR/.lock                             flock(2) target, holds the pid of
 *                                         the backup that holds it; a
 *                                         regular file (never followed)
 *   DIR/NAME.qcow2.partial                a backup being written (never
 *                                         listed; removed by the next run)
 *
 * manifest.json:
 *   { "format": "cbt-backup-repository", "version": 1 or 2, "next-seq": N,
 *     "backups": [ ENTRY, ... ] }          oldest first
 * ENTRY: "seq", "kind" ("full" | "incremental"), "file", "backing" (file
 * name or null), "time" (ISO 8601 UTC, when the checkpoint began),
 * "time-unix", "seconds", "checkpoint" (the daemon's checkpoint id that
 * this backup ends at: the next incremental holds the changes since it;
 * null without a bitmap), "bitmap-uuid", "image-size", "granularity",
 * "cluster-size", "bytes-copied", "data-bytes", "zero-bytes",
 * "file-size", "chunk-size", "checksum" (the algorithm: "sha256" or
 * "xxh128"; absent means "sha256"), and under the algorithm's own name
 * ("sha256": [...] or "xxh128": [...]) the hex checksum of each
 * chunk-size piece of the file, so verify can name the offset of a
 * mismatch.
 *
 * Versions: a manifest whose entries are all sha256 is written as
 * version 1, exactly as before "checksum" existed but for that field,
 * which older cbt ignores, so they still read, verify and restore it.
 * One xxh128 entry makes it version 2, which older cbt refuses with
 * "manifest version 2 is not supported" instead of failing on a missing
 * "sha256".  We read both; an entry without "checksum" is sha256.
 *
 * A chain is a full backup and the incrementals after it; each
 * incremental's backing file is the entry just before it.  Readers reject
 * a manifest that breaks this, so restore never follows a wrong chain.
 *
 * Storage (the "backends"): repo-dir.c keeps a repository in a directory
 * (flock, fsync and rename), repo-s3.c in an S3 bucket (lock object,
 * multipart uploads, one PUT for the manifest); repo-write.c writes a new
 * backup file into either.  This file holds what they share: the manifest
 * model, its parsing and writing, and the dispatch to the backend.
 * Either backend lists a file in the manifest only once it is complete
 * and replaces the manifest atomically, so the manifest lists only
 * complete files; a crash leaves at most a partial file or upload, or an
 * unlisted file whose seq is >= next-seq, and repo_clean_stale removes
 * them under the lock.  Pruning (repo_prune) rewrites the manifest before
 * it deletes files, so a crash there leaves unlisted files older than
 * every listed one, which repo_clean_stale removes too.
 *
 * Checksums (checksum.c) are over the backup file's own bytes, in the
 * canonical hex those tools print, so `sha256sum` or `xxh128sum` (Debian
 * package xxhash) can check a chunk without knowing qcow2:
 *   dd if=FILE bs=64M skip=K count=1 iflag=fullblock | xxh128sum
 * cbt backup hashes the file as the writer lays it down (data clusters are
 * appended in order, the metadata after them); only chunk 0, which holds
 * the header written last, is read back.  New directory repositories get
 * xxh128, S3 ones sha256 (its part uploads reuse the chunk's SHA-256 as
 * their payload hash, repo-write.c); `cbt backup --checksum` chooses, and
 * a chain may mix them: each entry names its own.
 *
 * Locking: backup and prune hold the repository exclusively, restore and
 * verify shared (S3 has no shared lock), list not at all; the backends
 * say how.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cbt/util.h"
#include "repo.h"

#define MANIFEST_FORMAT  "cbt-backup-repository"
#define MANIFEST_VERSION_SHA256 1    /* every entry sha256 */
#define MANIFEST_VERSION         2    /* the newest we read and write */

repo_backup *
repo_backup_new(void)
{
  repo_backup *b = g_new0(repo_backup, 1);

  b->sums = g_ptr_array_new_with_free_func(g_free);
  return b;
}

void
repo_backup_free(repo_backup *b)
{
  if (!b)
    return;
  g_free(b->kind);
  g_free(b->file);
  g_free(b->backing);
  g_free(b->time);
  g_free(b->checkpoint);
  g_free(b->bitmap_uuid);
  if (b->sums)
    g_ptr_array_unref(b->sums);
  g_free(b);
}

const repo_backup *
repo_newest(const repo *r)
{
  return r->backups->len ? g_ptr_array_index(r->backups, r->backups->len - 1) : NULL;
}

/* A file name we accept in the manifest: a plain name in the directory. */
static bool
plain_name(const char *s)
{
  return s && *s && *s != '.' && !strchr(s, '/') && strlen(s) < 256;
}

static bool
is_hex_id(const char *s)
{
  if (!s || strlen(s) != 16)
    return false;
  for (; *s; s++)
    if (!g_ascii_isxdigit(*s))
      return false;
  return true;
}

/* --- manifest parsing -------------------------------------------------- */

static bool
get_member(json_object *o, const char *key, json_type type, bool nullable,
           json_object **out, const char *where, GError **error)
{
  json_object *v = NULL;

  if (!json_object_object_get_ex(o, key, &v)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: missing \"%s\"", where, key);
    return false;
  }
  if ((v == NULL && !nullable) || (v != NULL && !json_object_is_type(v, type))) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: \"%s\" has the wrong type",
                where, key);
    return false;
  }
  *out = v;
  return true;
}

static bool
get_str(json_object *o, const char *key, bool nullable, char **out,
        const char *where, GError **error)
{
  json_object *v;

  if (!get_member(o, key, json_type_string, nullable, &v, where, error))
    return false;
  *out = v ? g_strdup(json_object_get_string(v)) : NULL;
  return true;
}

static bool
get_u64(json_object *o, const char *key, uint64_t *out, const char *where,
        GError **error)
{
  json_object *v;

  if (!get_member(o, key, json_type_int, false, &v, where, error))
    return false;
  if (json_object_get_int64(v) < 0 && json_object_get_uint64(v) == 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: \"%s\" is negative", where, key);
    return false;
  }
  *out = json_object_get_uint64(v);
  return true;
}

static bool
parse_entry(json_object *e, repo_backup *prev, repo_backup **out,
            const char *where_m, GError **error)
{
  g_autoptr(repo_backup) b = repo_backup_new();
  g_autofree char *where = NULL;
  json_object *v = NULL, *sums = NULL;
  g_autofree char *alg = NULL;
  uint64_t seq = 0, t = 0, nchunks;
  size_t hex_len;

  if (!json_object_is_type(e, json_type_object)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: a backup entry is not an object",
                where_m);
    return false;
  }
  if (!get_u64(e, "seq", &seq, where_m, error))
    return false;
  where = g_strdup_printf("%s: backup %" PRIu64, where_m, seq);
  if (seq == 0 || seq > UINT32_MAX || (prev && seq <= prev->seq)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: seq out of order", where);
    return false;
  }
  b->seq = (unsigned)seq;
  if (!get_str(e, "kind", false, &b->kind, where, error) ||
      !get_str(e, "file", false, &b->file, where, error) ||
      !get_str(e, "backing", true, &b->backing, where, error) ||
      !get_str(e, "time", false, &b->time, where, error) ||
      !get_u64(e, "time-unix", &t, where, error) ||
      !get_str(e, "checkpoint", true, &b->checkpoint, where, error) ||
      !get_str(e, "bitmap-uuid", true, &b->bitmap_uuid, where, error) ||
      !get_u64(e, "image-size", &b->image_size, where, error) ||
      !get_u64(e, "granularity", &b->granularity, where, error) ||
      !get_u64(e, "cluster-size", &b->cluster_size, where, error) ||
      !get_u64(e, "bytes-copied", &b->bytes_copied, where, error) ||
      !get_u64(e, "data-bytes", &b->data_bytes, where, error) ||
      !get_u64(e, "zero-bytes", &b->zero_bytes, where, error) ||
      !get_u64(e, "file-size", &b->file_size, where, error) ||
      !get_u64(e, "chunk-size", &b->chunk_size, where, error))
    return false;
  /* Entries written before "checksum" existed are SHA-256. */
  if (json_object_object_get_ex(e, "checksum", NULL) &&
      !get_str(e, "checksum", false, &alg, where, error))
    return false;
  if (!chunk_alg_parse(alg ? alg : "sha256", &b->checksum)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED,
                "%s: checksum algorithm \"%s\" is not one this cbt knows (sha256, "
                "xxh128): a newer cbt wrote it?", where, alg);
    return false;
  }
  if (!get_member(e, chunk_alg_name(b->checksum), json_type_array, false, &sums, where,
                  error))
    return false;
  /* Written back with json_object_new_int64 (repo_add): a larger value
   * would come back negative and make the whole manifest unreadable. */
  if (t > INT64_MAX) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: \"time-unix\" out of range",
                where);
    return false;
  }
  b->time_unix = (int64_t)t;
  if (json_object_object_get_ex(e, "seconds", &v) && v) {
    /* A number we can write back: "inf" or "nan" is not JSON. */
    b->seconds = json_object_get_double(v);
    if ((!json_object_is_type(v, json_type_double) &&
         !json_object_is_type(v, json_type_int)) ||
        !isfinite(b->seconds) || b->seconds < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED,
                  "%s: \"seconds\" is not a duration", where);
      return false;
    }
  }

  if (!plain_name(b->file) || !g_str_has_suffix(b->file, ".qcow2")) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: bad file name \"%s\"", where,
                b->file);
    return false;
  }
  if (strcmp(b->kind, "full") == 0) {
    if (b->backing) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED,
                  "%s: a full backup with backing file \"%s\"", where, b->backing);
      return false;
    }
  } else if (strcmp(b->kind, "incremental") == 0) {
    if (!prev || !b->backing || strcmp(b->backing, prev->file) != 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED,
                  "%s: incremental whose backing file \"%s\" is not the previous "
                  "backup \"%s\": the chain is broken", where,
                  b->backing ? b->backing : "(none)", prev ? prev->file : "(none)");
      return false;
    }
    if (prev->image_size != b->image_size) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED,
                  "%s: incremental of a %" PRIu64 "-byte image on a %" PRIu64 "-byte one",
                  where, b->image_size, prev->image_size);
      return false;
    }
  } else {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: unknown kind \"%s\"", where,
                b->kind);
    return false;
  }
  if (b->checkpoint && !is_hex_id(b->checkpoint)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: bad checkpoint id \"%s\"", where,
                b->checkpoint);
    return false;
  }
  if (b->chunk_size == 0 || b->image_size == 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: zero chunk or image size", where);
    return false;
  }
  nchunks = b->file_size / b->chunk_size + (b->file_size % b->chunk_size != 0);
  if (json_object_array_length(sums) != nchunks) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED,
                "%s: %zu checksums for a %" PRIu64 "-byte file in %" PRIu64 "-byte chunks",
                where, json_object_array_length(sums), b->file_size, b->chunk_size);
    return false;
  }
  hex_len = chunk_alg_hex_len(b->checksum);
  for (size_t i = 0; i < nchunks; i++) {
    json_object *s = json_object_array_get_idx(sums, i);

    if (!s || !json_object_is_type(s, json_type_string) ||
        (size_t)json_object_get_string_len(s) != hex_len) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: checksum %zu is malformed",
                  where, i);
      return false;
    }
    g_ptr_array_add(b->sums, g_strdup(json_object_get_string(s)));
  }
  *out = g_steal_pointer(&b);
  return true;
}

bool
repo_parse_manifest(repo *r, const char *text, size_t len, const char *where,
                    GError **error)
{
  g_autoptr(GPtrArray) backups =
      g_ptr_array_new_with_free_func((GDestroyNotify)repo_backup_free);
  g_autoptr(json_object) root = NULL;
  json_tokener *tok;
  json_object *v = NULL, *list = NULL;
  uint64_t next = 0, version = 0;

  if (len > REPO_MANIFEST_MAX) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: larger than %u MiB", where,
                REPO_MANIFEST_MAX >> 20);
    return false;
  }
  tok = json_tokener_new();
  root = json_tokener_parse_ex(tok, text, (int)len);
  if (!root || json_tokener_get_error(tok) != json_tokener_success) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: not valid JSON: %s", where,
                json_tokener_error_desc(json_tokener_get_error(tok)));
    json_tokener_free(tok);
    return false;
  }
  json_tokener_free(tok);
  if (!json_object_is_type(root, json_type_object) ||
      !json_object_object_get_ex(root, "format", &v) || !v ||
      !json_object_is_type(v, json_type_string) ||
      strcmp(json_object_get_string(v), MANIFEST_FORMAT) != 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED,
                "%s: not a cbt manifest (\"format\" is not \"" MANIFEST_FORMAT "\")", where);
    return false;
  }
  if (!get_u64(root, "version", &version, where, error))
    return false;
  if (version < MANIFEST_VERSION_SHA256 || version > MANIFEST_VERSION) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED,
                "%s: manifest version %" PRIu64 " is not supported (expected %d to %d)",
                where, version, MANIFEST_VERSION_SHA256, MANIFEST_VERSION);
    return false;
  }
  if (!get_u64(root, "next-seq", &next, where, error) ||
      !get_member(root, "backups", json_type_array, false, &list, where, error))
    return false;
  for (size_t i = 0; i < json_object_array_length(list); i++) {
    repo_backup *prev = backups->len ? g_ptr_array_index(backups, backups->len - 1)
                                     : NULL;
    repo_backup *b = NULL;

    if (!parse_entry(json_object_array_get_idx(list, i), prev, &b, where, error))
      return false;
    g_ptr_array_add(backups, b);
  }
  if (next == 0 || next > UINT32_MAX ||
      (backups->len &&
       next <= ((repo_backup *)g_ptr_array_index(backups, backups->len - 1))->seq)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: \"next-seq\" %" PRIu64
                " is not past the newest backup", where, next);
    return false;
  }
  if (r->backups)
    g_ptr_array_unref(r->backups);
  r->backups = g_steal_pointer(&backups);
  r->next_seq = (unsigned)next;
  return true;
}

bool
repo_find(const repo *r, const char *name, const repo_backup **out,
          GError **error)
{
  char *end = NULL;
  guint64 seq;

  if (r->backups->len == 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: the repository is empty", r->dir);
    return false;
  }
  if (!name || strcmp(name, "latest") == 0) {
    *out = repo_newest(r);
    return true;
  }
  seq = g_ascii_strtoull(name, &end, 10);
  for (guint i = 0; i < r->backups->len; i++) {
    const repo_backup *b = g_ptr_array_index(r->backups, i);
    size_t stem = strlen(b->file) - strlen(".qcow2");

    if ((end && end != name && *end == '\0' && b->seq == seq) ||
        strcmp(name, b->file) == 0 ||
        (strlen(name) == stem && strncmp(name, b->file, stem) == 0)) {
      *out = b;
      return true;
    }
  }
  g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
              "%s: no backup '%s' in the manifest (see 'cbt list')", r->dir, name);
  return false;
}

guint
repo_chain_start(const repo *r, const repo_backup *b)
{
  guint i;

  for (i = 0; i < r->backups->len; i++)
    if (g_ptr_array_index(r->backups, i) == b)
      break;
  g_assert(i < r->backups->len);
  while (i > 0 && strcmp(((repo_backup *)g_ptr_array_index(r->backups, i))->kind,
                         "full") != 0)
    i--;
  return i;
}

char *
repo_next_file(const repo *r, const char *kind, GDateTime *now)
{
  g_autofree char *ts = g_date_time_format(now, "%Y%m%dT%H%M%SZ");

  return g_strdup_printf("%06u-%s-%s.qcow2", r->next_seq,
                         strcmp(kind, "full") == 0 ? "full" : "inc", ts);
}

/* --- stale files ------------------------------------------------------- */

const char *
repo_stale_reason(const repo *r, unsigned seq)
{
  if (seq >= r->next_seq)
    return "finished but never entered in the manifest";
  /* Chains only grow forwards and prune drops the oldest: an unlisted
   * file older than every listed one was pruned from the manifest by a
   * prune that did not get to delete it. */
  if (r->backups->len &&
      seq < ((const repo_backup *)g_ptr_array_index(r->backups, 0))->seq)
    return "pruned from the manifest by a prune that did not finish";
  return NULL;
}

bool
repo_listed(const repo *r, const char *name)
{
  for (guint i = 0; i < r->backups->len; i++)
    if (strcmp(((repo_backup *)g_ptr_array_index(r->backups, i))->file, name) == 0)
      return true;
  return false;
}

/* --- manifest writing -------------------------------------------------- */

json_object *
repo_backup_to_json(const repo_backup *b)
{
  json_object *o = json_object_new_object();
  json_object *sums = json_object_new_array();
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  json_object_object_add(o, "seq", json_object_new_int64(b->seq));
  cli_json_add_str(o, "kind", b->kind);
  cli_json_add_str(o, "file", b->file);
  cli_json_add_str(o, "backing", b->backing);
  cli_json_add_str(o, "time", b->time);
  json_object_object_add(o, "time-unix", json_object_new_int64(b->time_unix));
  g_ascii_formatd(buf, sizeof buf, "%.3f", b->seconds);
  json_object_object_add(o, "seconds", json_object_new_double_s(b->seconds, buf));
  cli_json_add_str(o, "checkpoint", b->checkpoint);
  cli_json_add_str(o, "bitmap-uuid", b->bitmap_uuid);
  cli_json_add_u64(o, "image-size", b->image_size);
  cli_json_add_u64(o, "granularity", b->granularity);
  cli_json_add_u64(o, "cluster-size", b->cluster_size);
  cli_json_add_u64(o, "bytes-copied", b->bytes_copied);
  cli_json_add_u64(o, "data-bytes", b->data_bytes);
  cli_json_add_u64(o, "zero-bytes", b->zero_bytes);
  cli_json_add_u64(o, "file-size", b->file_size);
  cli_json_add_u64(o, "chunk-size", b->chunk_size);
  cli_json_add_str(o, "checksum", chunk_alg_name(b->checksum));
  for (guint i = 0; i < b->sums->len; i++)
    json_object_array_add(sums, json_object_new_string(g_ptr_array_index(b->sums, i)));
  json_object_object_add(o, chunk_alg_name(b->checksum), sums);
  return o;
}

char *
repo_manifest_text(const repo *r, unsigned next_seq)
{
  g_autoptr(json_object) root = json_object_new_object();
  json_object *list = json_object_new_array();
  const char *text;
  int version = MANIFEST_VERSION_SHA256;

  /* Version 1 while older cbt can check every entry (see the top). */
  for (guint i = 0; i < r->backups->len; i++)
    if (((const repo_backup *)g_ptr_array_index(r->backups, i))->checksum != CHUNK_SHA256)
      version = MANIFEST_VERSION;
  cli_json_add_str(root, "format", MANIFEST_FORMAT);
  json_object_object_add(root, "version", json_object_new_int(version));
  json_object_object_add(root, "next-seq", json_object_new_int64(next_seq));
  for (guint i = 0; i < r->backups->len; i++)
    json_object_array_add(list, repo_backup_to_json(g_ptr_array_index(r->backups, i)));
  json_object_object_add(root, "backups", list);
  text = json_object_to_json_string_ext(root, JSON_C_TO_STRING_PRETTY |
                                        JSON_C_TO_STRING_SPACED |
                                        JSON_C_TO_STRING_NOSLASHESCAPE);
  return g_strconcat(text, "\n", NULL);
}
