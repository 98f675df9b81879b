/* The XML bodies of S3 responses, parsed with GMarkup.
 *
 * GMarkup reads a well-formed subset of XML: UTF-8 only, the five
 * predefined entities and character references, no DTD (so no entity
 * expansion to blow up, and nothing fetched from anywhere).  That is all
 * S3 sends.  We build a small tree of the document (element name, text,
 * children), bounded in depth and size, and read the few fields we need
 * from it by name; elements we do not know are ignored, so a server that
 * adds fields does not break us, and a missing field we need is an error
 * naming it.
 *
 * Listings are requested with encoding-type=url, so that keys holding
 * bytes XML 1.0 cannot carry still come through; when the response says
 * <EncodingType>url</EncodingType>, keys and prefixes are decoded here,
 * '+' as a space as S3 writes it (a '+' in a key arrives as %2B).
 */
#include <string.h>

#include "s3.h"

/* A body is at most 16 MiB (s3.c); these bound the tree built from it. */
#define MAX_DEPTH 16
#define MAX_NODES 1000000u

typedef struct xnode {
  char *name;
  GString *text;
  GPtrArray *kids;          /* xnode */
} xnode;

static void
xnode_free(xnode *n)
{
  if (!n)
    return;
  g_free(n->name);
  g_string_free(n->text, TRUE);
  g_ptr_array_unref(n->kids);
  g_free(n);
}

G_DEFINE_AUTOPTR_CLEANUP_FUNC(xnode, xnode_free)

static xnode *
xnode_new(const char *name)
{
  xnode *n = g_new0(xnode, 1);

  n->name = g_strdup(name);
  n->text = g_string_new(NULL);
  n->kids = g_ptr_array_new_with_free_func((GDestroyNotify)xnode_free);
  return n;
}

struct build {
  xnode *root;
  GPtrArray *stack;         /* xnode *, not owned */
  guint nodes;
};

static void
on_start(GMarkupParseContext *ctx, const char *name, const char **attr_names,
         const char **attr_values, gpointer data, GError **error)
{
  struct build *b = data;
  xnode *n;

  (void)ctx;
  (void)attr_names;
  (void)attr_values;
  if (b->stack->len >= MAX_DEPTH || ++b->nodes > MAX_NODES) {
    g_set_error(error, G_MARKUP_ERROR, G_MARKUP_ERROR_INVALID_CONTENT,
                "document nested deeper than %d or larger than %u elements", MAX_DEPTH,
                MAX_NODES);
    return;
  }
  if (b->stack->len == 0 && b->root) {
    g_set_error(error, G_MARKUP_ERROR, G_MARKUP_ERROR_INVALID_CONTENT,
                "a second root element <%s>", name);
    return;
  }
  n = xnode_new(name);
  if (b->stack->len == 0)
    b->root = n;
  else
    g_ptr_array_add(((xnode *)g_ptr_array_index(b->stack, b->stack->len - 1))->kids, n);
  g_ptr_array_add(b->stack, n);
}

static void
on_end(GMarkupParseContext *ctx, const char *name, gpointer data, GError **error)
{
  struct build *b = data;

  (void)ctx;
  (void)name;
  (void)error;
  g_ptr_array_set_size(b->stack, b->stack->len - 1);
}

static void
on_text(GMarkupParseContext *ctx, const char *text, gsize len, gpointer data,
        GError **error)
{
  struct build *b = data;

  (void)ctx;
  (void)error;
  if (b->stack->len > 0)
    g_string_append_len(((xnode *)g_ptr_array_index(b->stack, b->stack->len - 1))->text,
                        text, (gssize)len);
}

/* The tree of @body, whose root must be <@root>.  NULL and *@error if it
 * is not well-formed or has another root. */
static xnode *
parse(const char *body, size_t len, const char *root, GError **error)
{
  static const GMarkupParser parser = {
    .start_element = on_start,
    .end_element = on_end,
    .text = on_text,
  };
  struct build b = { .stack = g_ptr_array_new() };
  GMarkupParseContext *ctx;
  GError *err = NULL;
  bool ok;

  if (len > G_MAXSSIZE) {
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL, "response too large to parse");
    g_ptr_array_unref(b.stack);
    return NULL;
  }
  ctx = g_markup_parse_context_new(&parser, G_MARKUP_TREAT_CDATA_AS_TEXT, &b, NULL);
  ok = g_markup_parse_context_parse(ctx, body, (gssize)len, &err) &&
       g_markup_parse_context_end_parse(ctx, &err);
  g_markup_parse_context_free(ctx);
  g_ptr_array_unref(b.stack);
  if (ok && !b.root)
    g_set_error(&err, G_MARKUP_ERROR, G_MARKUP_ERROR_EMPTY, "no element");
  if (err) {
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL, "malformed XML response: %s",
                err->message);
    g_error_free(err);
    xnode_free(b.root);
    return NULL;
  }
  if (strcmp(b.root->name, root) != 0) {
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL, "XML response <%s>, expected <%s>",
                b.root->name, root);
    xnode_free(b.root);
    return NULL;
  }
  return b.root;
}

/* The first child of @n named @name, or NULL. */
static const xnode *
child(const xnode *n, const char *name)
{
  for (guint i = 0; i < n->kids->len; i++) {
    const xnode *k = g_ptr_array_index(n->kids, i);

    if (strcmp(k->name, name) == 0)
      return k;
  }
  return NULL;
}

/* The text of @n's child @name (not a copy), or NULL. */
static const char *
text(const xnode *n, const char *name)
{
  const xnode *k = child(n, name);

  return k ? k->text->str : NULL;
}

static char *
need(const xnode *n, const char *name, GError **error)
{
  const char *t = text(n, name);

  if (!t) {
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL, "<%s> without <%s>", n->name, name);
    return NULL;
  }
  return g_strdup(t);
}

static bool
is_true(const xnode *n, const char *name)
{
  const char *t = text(n, name);

  return t && g_ascii_strcasecmp(t, "true") == 0;
}

static char *
unquote(const char *s)
{
  size_t n = strlen(s);

  if (n >= 2 && s[0] == '"' && s[n - 1] == '"')
    return g_strndup(s + 1, n - 2);
  return g_strdup(s);
}

/* @s as the server sent it, URL-decoded if @url. */
static char *
decode(const char *s, bool url, const char *what, GError **error)
{
  g_autofree char *plus = NULL;
  char *out;

  if (!url)
    return g_strdup(s);
  plus = g_strdup(s);
  g_strdelimit(plus, "+", ' ');
  out = g_uri_unescape_string(plus, NULL);
  if (!out)
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL, "%s '%s': bad URL encoding", what, s);
  return out;
}

bool
s3_xml_error(const char *body, size_t len, char **code, char **message)
{
  g_autoptr(xnode) root = parse(body, len, "Error", NULL);
  const char *c, *m;

  if (!root)
    return false;
  c = text(root, "Code");
  m = text(root, "Message");
  *code = c && *c ? g_strdup(c) : NULL;
  /* Stripped first: a message of white space only (or cut short by a NUL
   * byte) is no message. */
  *message = m ? g_strstrip(g_strdup(m)) : NULL;
  if (*message && !**message)
    g_clear_pointer(message, g_free);
  return true;
}

void
s3_list_page_clear(s3_list_page *p)
{
  if (p->entries)
    g_ptr_array_unref(p->entries);
  if (p->prefixes)
    g_ptr_array_unref(p->prefixes);
  g_free(p->next_token);
  memset(p, 0, sizeof *p);
}

bool
s3_xml_list_objects(const char *body, size_t len, s3_list_page *page, GError **error)
{
  g_autoptr(xnode) root = parse(body, len, "ListBucketResult", error);
  const char *enc, *tok;
  bool url;

  memset(page, 0, sizeof *page);
  if (!root)
    return false;
  enc = text(root, "EncodingType");
  url = enc && strcmp(enc, "url") == 0;
  page->entries = g_ptr_array_new_with_free_func((GDestroyNotify)s3_entry_free);
  page->prefixes = g_ptr_array_new_with_free_func(g_free);
  page->truncated = is_true(root, "IsTruncated");
  tok = text(root, "NextContinuationToken");
  page->next_token = tok && *tok ? g_strdup(tok) : NULL;

  for (guint i = 0; i < root->kids->len; i++) {
    const xnode *k = g_ptr_array_index(root->kids, i);

    if (strcmp(k->name, "Contents") == 0) {
      g_autoptr(s3_entry) e = g_new0(s3_entry, 1);
      const char *key = text(k, "Key"), *size = text(k, "Size");
      const char *etag = text(k, "ETag"), *lm = text(k, "LastModified");
      guint64 v;

      if (!key || !size || !g_ascii_string_to_unsigned(size, 10, 0, G_MAXUINT64, &v, NULL)) {
        g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                    "<Contents> without a <Key> or a numeric <Size>");
        goto fail;
      }
      if (!(e->key = decode(key, url, "key", error)))
        goto fail;
      e->size = v;
      e->etag = unquote(etag ? etag : "");
      e->last_modified = g_strdup(lm ? lm : "");
      g_ptr_array_add(page->entries, g_steal_pointer(&e));
    } else if (strcmp(k->name, "CommonPrefixes") == 0) {
      const char *p = text(k, "Prefix");
      char *d;

      if (!p) {
        g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL, "<CommonPrefixes> without <Prefix>");
        goto fail;
      }
      if (!(d = decode(p, url, "prefix", error)))
        goto fail;
      g_ptr_array_add(page->prefixes, d);
    }
  }
  return true;

fail:
  s3_list_page_clear(page);
  return false;
}

bool
s3_xml_upload_id(const char *body, size_t len, char **upload_id, GError **error)
{
  g_autoptr(xnode) root = parse(body, len, "InitiateMultipartUploadResult", error);

  if (!root || !(*upload_id = need(root, "UploadId", error)))
    return false;
  if (!**upload_id) {
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL, "empty <UploadId>");
    g_clear_pointer(upload_id, g_free);
    return false;
  }
  return true;
}

bool
s3_xml_complete(const char *body, size_t len, char **etag, GError **error)
{
  g_autoptr(xnode) root = parse(body, len, "CompleteMultipartUploadResult", error);
  g_autofree char *e = NULL;

  if (!root || !(e = need(root, "ETag", error)))
    return false;
  *etag = unquote(e);
  return true;
}

void
s3_upload_entry_free(s3_upload_entry *u)
{
  if (!u)
    return;
  g_free(u->key);
  g_free(u->upload_id);
  g_free(u->initiated);
  g_free(u);
}

G_DEFINE_AUTOPTR_CLEANUP_FUNC(s3_upload_entry, s3_upload_entry_free)

void
s3_uploads_page_clear(s3_uploads_page *p)
{
  if (p->uploads)
    g_ptr_array_unref(p->uploads);
  g_free(p->next_key_marker);
  g_free(p->next_upload_id_marker);
  memset(p, 0, sizeof *p);
}

bool
s3_xml_list_uploads(const char *body, size_t len, bool url_asked, s3_uploads_page *page,
                    GError **error)
{
  g_autoptr(xnode) root = parse(body, len, "ListMultipartUploadsResult", error);
  const char *enc, *km, *um;
  bool url, url_keys;

  memset(page, 0, sizeof *page);
  if (!root)
    return false;
  enc = text(root, "EncodingType");
  url = enc && strcmp(enc, "url") == 0;
  /* RGW (18) encodes the keys as asked but sends no <EncodingType>, and
   * its NextKeyMarker unencoded: trust the request for the keys, the
   * response for the marker. */
  url_keys = url || url_asked;
  page->uploads = g_ptr_array_new_with_free_func((GDestroyNotify)s3_upload_entry_free);
  page->truncated = is_true(root, "IsTruncated");
  km = text(root, "NextKeyMarker");
  um = text(root, "NextUploadIdMarker");
  if (km && *km && !(page->next_key_marker = decode(km, url, "key marker", error)))
    goto fail;
  page->next_upload_id_marker = um && *um ? g_strdup(um) : NULL;

  for (guint i = 0; i < root->kids->len; i++) {
    const xnode *k = g_ptr_array_index(root->kids, i);
    g_autoptr(s3_upload_entry) u = NULL;
    const char *key, *id, *init;

    if (strcmp(k->name, "Upload") != 0)
      continue;
    key = text(k, "Key");
    id = text(k, "UploadId");
    init = text(k, "Initiated");
    if (!key || !id || !*id) {
      g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL, "<Upload> without <Key> or <UploadId>");
      goto fail;
    }
    u = g_new0(s3_upload_entry, 1);
    if (!(u->key = decode(key, url_keys, "key", error)))
      goto fail;
    u->upload_id = g_strdup(id);
    u->initiated = g_strdup(init ? init : "");
    g_ptr_array_add(page->uploads, g_steal_pointer(&u));
  }
  return true;

fail:
  s3_uploads_page_clear(page);
  return false;
}
