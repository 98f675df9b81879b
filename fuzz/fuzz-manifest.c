/* fuzz-manifest: the backup repository's manifest reader (cbt/repo/manifest.c,
 * repo_parse_manifest: the code repo_open runs on DIR/manifest.json).
 *
 * Input: the manifest text, handed over in a buffer of exactly its size
 * (no NUL after it), so a read past the end is a finding.  A manifest
 * that parses is checked against the rules the readers rely on (restore
 * follows the chain without checking it again): seqs increasing and below
 * next-seq, a full backup first in every chain with no backing file, each
 * incremental backed by the entry before it with the same image size,
 * plain .qcow2 file names, a known checksum algorithm and one checksum
 * of its length (64 hex digits for sha256, 32 for xxh128) per chunk; then
 * written with repo_manifest_text, as repo_add writes it, which must
 * parse back to the same entries, algorithm and sums included (only
 * "time-unix" and "seconds" may not survive the round trip unchanged:
 * JSON numbers).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "fuzz-util.h"

static void G_GNUC_NORETURN
fail(const repo_backup *b, const char *what)
{
  fprintf(stderr, "fuzz-manifest: backup %u (%s): %s\n", b->seq,
          b->file ? b->file : "?", what);
  abort();
}

static void
check(const repo *r)
{
  for (guint i = 0; i < r->backups->len; i++) {
    const repo_backup *b = g_ptr_array_index(r->backups, i);
    const repo_backup *prev = i ? g_ptr_array_index(r->backups, i - 1) : NULL;
    uint64_t chunks;

    if (b->seq == 0 || b->seq >= r->next_seq || (prev && b->seq <= prev->seq))
      fail(b, "seq out of order");
    if (!b->file || strchr(b->file, '/') || b->file[0] == '.' ||
        !g_str_has_suffix(b->file, ".qcow2"))
      fail(b, "file name not a plain .qcow2 name");
    if (strcmp(b->kind, "full") == 0) {
      if (b->backing)
        fail(b, "full backup with a backing file");
    } else if (strcmp(b->kind, "incremental") == 0) {
      if (!prev || !b->backing || strcmp(b->backing, prev->file) != 0)
        fail(b, "incremental not backed by the entry before it");
      if (prev->image_size != b->image_size)
        fail(b, "incremental of another image size");
    } else {
      fail(b, "unknown kind");
    }
    if (b->chunk_size == 0 || b->image_size == 0)
      fail(b, "zero chunk or image size");
    chunks = b->file_size / b->chunk_size + (b->file_size % b->chunk_size != 0);
    if (b->checksum != CHUNK_SHA256 && b->checksum != CHUNK_XXH128)
      fail(b, "unknown checksum algorithm");
    if (b->sums->len != chunks)
      fail(b, "checksum count does not match the file size");
    for (guint k = 0; k < b->sums->len; k++)
      if (strlen(g_ptr_array_index(b->sums, k)) != chunk_alg_hex_len(b->checksum))
        fail(b, "checksum not as long as its algorithm's");
  }
}

static bool
same_str(const char *a, const char *b)
{
  return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static bool
same_sums(const GPtrArray *a, const GPtrArray *b)
{
  if (a->len != b->len)
    return false;
  for (guint k = 0; k < a->len; k++)
    if (strcmp(g_ptr_array_index(a, k), g_ptr_array_index(b, k)) != 0)
      return false;
  return true;
}

/* Write the parsed manifest out as repo_add does and read it back. */
static void
round_trip(const repo *r)
{
  g_autoptr(repo) again = g_new0(repo, 1);
  g_autoptr(GError) error = NULL;
  g_autofree char *text = repo_manifest_text(r, r->next_seq);

  again->lock_fd = -1;
  if (!repo_parse_manifest(again, text, strlen(text), "round trip", &error)) {
    fprintf(stderr, "fuzz-manifest: a manifest written back does not parse: %s\n%s\n",
            error->message, text);
    abort();
  }
  if (again->next_seq != r->next_seq || again->backups->len != r->backups->len) {
    fprintf(stderr, "fuzz-manifest: the round trip changed next-seq or the count\n");
    abort();
  }
  for (guint i = 0; i < r->backups->len; i++) {
    const repo_backup *a = g_ptr_array_index(r->backups, i);
    const repo_backup *b = g_ptr_array_index(again->backups, i);

    if (a->seq != b->seq || !same_str(a->kind, b->kind) || !same_str(a->file, b->file) ||
        !same_str(a->backing, b->backing) || !same_str(a->time, b->time) ||
        !same_str(a->checkpoint, b->checkpoint) ||
        !same_str(a->bitmap_uuid, b->bitmap_uuid) || a->image_size != b->image_size ||
        a->granularity != b->granularity || a->cluster_size != b->cluster_size ||
        a->bytes_copied != b->bytes_copied || a->data_bytes != b->data_bytes ||
        a->zero_bytes != b->zero_bytes || a->file_size != b->file_size ||
        a->chunk_size != b->chunk_size || a->checksum != b->checksum ||
        !same_sums(a->sums, b->sums))
      fail(a, "changed by the round trip");
  }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  g_autoptr(repo) r = g_new0(repo, 1);
  g_autoptr(GError) error = NULL;
  g_autofree char *text = g_malloc(size ? size : 1);

  r->lock_fd = -1;
  memcpy(text, data, size);
  if (!repo_parse_manifest(r, text, size, "manifest.json", &error)) {
    if (!error || !error->message) {
      fprintf(stderr, "fuzz-manifest: refused without a reason\n");
      abort();
    }
    return 0;
  }
  check(r);
  round_trip(r);
  return 0;
}
