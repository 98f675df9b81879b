/* fuzz-s3-xml: the parsers of S3 response bodies (cbt/s3/s3-xml.c), which
 * read whatever the server, or anything between it and us, sends.
 *
 * Input: one response body, handed over in a buffer of exactly its size
 * (no NUL after it), so a read past the end is a finding.  Every parser
 * gets the same bytes (each wants another root element, so at most one
 * of them accepts a given body; the others must refuse it cleanly).
 * Beyond "no crash, no leak": a refusal comes with an S3_ERROR_PROTOCOL
 * error and leaves nothing allocated in the result; an accepted body
 * gives what the callers rely on without checking again: an error code
 * and message that are NULL or non-empty, list entries with every field
 * set, a next token or marker that is NULL or non-empty, non-empty upload
 * ids, ETags without their quotes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-util.h"
#include "s3.h"

static void G_GNUC_NORETURN
fail(const char *what)
{
  fprintf(stderr, "fuzz-s3-xml: %s\n", what);
  abort();
}

static void
check_refusal(bool ok, GError *err, const char *what)
{
  if (ok) {
    if (err)
      fail(what);
    return;
  }
  if (!err || err->domain != S3_ERROR || err->code != S3_ERROR_PROTOCOL || !err->message)
    fail(what);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  const char *body = (const char *)data;
  GError *err = NULL;
  bool ok;

  {
    char *code = NULL, *message = NULL;

    if (s3_xml_error(body, size, &code, &message)) {
      if ((code && !*code) || (message && !*message))
        fail("error: an empty code or message instead of NULL");
    } else if (code || message) {
      fail("error: refused but returned a code or message");
    }
    g_free(code);
    g_free(message);
  }

  {
    s3_list_page page;

    ok = s3_xml_list_objects(body, size, &page, &err);
    check_refusal(ok, err, "list objects: refusal without a protocol error");
    if (ok) {
      if (!page.entries || !page.prefixes)
        fail("list objects: no arrays");
      if (page.next_token && !*page.next_token)
        fail("list objects: an empty next token");
      for (guint i = 0; i < page.entries->len; i++) {
        const s3_entry *e = g_ptr_array_index(page.entries, i);

        if (!e->key || !e->etag || !e->last_modified)
          fail("list objects: an entry with a NULL field");
        if (strlen(e->etag) >= 2 && e->etag[0] == '"' &&
            e->etag[strlen(e->etag) - 1] == '"')
          fail("list objects: an ETag still quoted");
      }
      for (guint i = 0; i < page.prefixes->len; i++)
        if (!g_ptr_array_index(page.prefixes, i))
          fail("list objects: a NULL prefix");
    } else if (page.entries || page.prefixes || page.next_token) {
      fail("list objects: refused but left a result");
    }
    s3_list_page_clear(&page);
    g_clear_error(&err);
  }

  {
    char *id = NULL;

    ok = s3_xml_upload_id(body, size, &id, &err);
    check_refusal(ok, err, "upload id: refusal without a protocol error");
    if (ok ? !id || !*id : id != NULL)
      fail("upload id: empty, or set on a refusal");
    g_free(id);
    g_clear_error(&err);
  }

  {
    char *etag = NULL;

    ok = s3_xml_complete(body, size, &etag, &err);
    check_refusal(ok, err, "complete: refusal without a protocol error");
    if (ok ? !etag : etag != NULL)
      fail("complete: no ETag, or one set on a refusal");
    g_free(etag);
    g_clear_error(&err);
  }

  {
    s3_uploads_page page;

    /* Whether the request asked for URL encoding: the last byte's parity,
     * which leaves the body's XML as it is. */
    ok = s3_xml_list_uploads(body, size, size > 0 && (data[size - 1] & 1), &page, &err);
    check_refusal(ok, err, "list uploads: refusal without a protocol error");
    if (ok) {
      if (!page.uploads)
        fail("list uploads: no array");
      if ((page.next_key_marker && !*page.next_key_marker) ||
          (page.next_upload_id_marker && !*page.next_upload_id_marker))
        fail("list uploads: an empty marker");
      for (guint i = 0; i < page.uploads->len; i++) {
        const s3_upload_entry *u = g_ptr_array_index(page.uploads, i);

        if (!u->key || !u->upload_id || !*u->upload_id || !u->initiated)
          fail("list uploads: an entry with a NULL field or an empty id");
      }
    } else if (page.uploads || page.next_key_marker || page.next_upload_id_marker) {
      fail("list uploads: refused but left a result");
    }
    s3_uploads_page_clear(&page);
    g_clear_error(&err);
  }
  return 0;
}
