/* Unit tests for the parsers of S3 response bodies (cbt/s3/s3-xml.c): the
 * bodies Ceph RGW sent (recorded in fuzz/corpus/s3-xml/rgw-*, some
 * repeated here), the shapes AWS documents, and hostile or broken XML,
 * which must be refused with S3_ERROR_PROTOCOL and nothing left
 * allocated.  Bodies are passed without a terminating NUL where it
 * matters (the parsers take a length). */
#undef NDEBUG
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "s3.h"

#define XMLDECL "<?xml version=\"1.0\" encoding=\"UTF-8\"?>"
#define NS " xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\""

/* A copy of @s without its NUL, so that a read past the end is ASan's. */
static char *
exact(const char *s, size_t *len)
{
  *len = strlen(s);
  return g_memdup2(s, *len ? *len : 1);
}

static void
assert_protocol_error(GError *err)
{
  assert_non_null(err);
  assert_true(err->domain == S3_ERROR);
  assert_int_equal(err->code, S3_ERROR_PROTOCOL);
}

/* ---- <Error> --------------------------------------------------------- */

static void
test_error(void **state)
{
  static const char rgw[] =
    XMLDECL "<Error><Code>NoSuchKey</Code><Message></Message><BucketName>seeds"
    "</BucketName><RequestId>tx0000031b5bd2ade5665b7-006b089543-1007-default</RequestId>"
    "<HostId>1007-default-default</HostId></Error>";
  static const char aws[] =
    XMLDECL "<Error>\n  <Code>SignatureDoesNotMatch</Code>\n  <Message>The request "
    "signature we calculated does not match the signature you provided. &amp; more"
    "</Message>\n</Error>";
  char *code = NULL, *message = NULL;
  size_t len;
  g_autofree char *b = exact(rgw, &len);

  (void)state;
  assert_true(s3_xml_error(b, len, &code, &message));
  assert_string_equal(code, "NoSuchKey");
  assert_null(message);     /* RGW's empty <Message> */
  g_clear_pointer(&code, g_free);

  g_free(b);
  b = exact(aws, &len);
  assert_true(s3_xml_error(b, len, &code, &message));
  assert_string_equal(code, "SignatureDoesNotMatch");
  assert_string_equal(message, "The request signature we calculated does not match the "
                      "signature you provided. & more");
  g_clear_pointer(&code, g_free);
  g_clear_pointer(&message, g_free);

  /* A message of white space only, or one a NUL byte cuts down to white
   * space (fuzz-s3-xml found it), is no message. */
  {
    static const char ws[] = "<Error><Code>X</Code><Message>\n\0\0)</Message></Error>";
    static const char ws2[] = "<Error><Message> \t\n</Message></Error>";

    assert_true(s3_xml_error(ws, sizeof ws - 1, &code, &message));
    assert_string_equal(code, "X");
    assert_null(message);
    g_clear_pointer(&code, g_free);
    assert_true(s3_xml_error(ws2, sizeof ws2 - 1, &code, &message));
    assert_null(message);
  }

  /* No <Code>: still an error body, the caller falls back to the status. */
  assert_true(s3_xml_error("<Error/>", 8, &code, &message));
  assert_null(code);
  assert_null(message);

  /* Not an error body. */
  assert_false(s3_xml_error("<ListBucketResult/>", 19, &code, &message));
  assert_false(s3_xml_error("", 0, &code, &message));
  assert_false(s3_xml_error("<html>502 Bad Gateway</html>", 28, &code, &message));
  assert_null(code);
  assert_null(message);
}

/* ---- ListObjectsV2 --------------------------------------------------- */

static void
test_list_truncated(void **state)
{
  /* RGW, max-keys=2, encoding-type=url: keys "a b+c" and "big". */
  static const char page1[] =
    XMLDECL "<ListBucketResult" NS "><EncodingType>url</EncodingType><Name>seeds</Name>"
    "<Prefix></Prefix><MaxKeys>2</MaxKeys><IsTruncated>true</IsTruncated><Contents>"
    "<Key>a%20b%2Bc</Key><LastModified>2026-11-26T20:23:30.453Z</LastModified><ETag>"
    "&quot;9dd4e461268c8034f5c8564e155c67a6&quot;</ETag><Size>1</Size><StorageClass>"
    "STANDARD</StorageClass><Type>Normal</Type></Contents><Contents><Key>big</Key>"
    "<LastModified>2026-11-26T20:23:31.670Z</LastModified><ETag>&quot;"
    "5f363e0e58a95f06cbe9bbc662c5dfb6&quot;</ETag><Size>5242880</Size><StorageClass>"
    "STANDARD</StorageClass><Type>Normal</Type></Contents><NextContinuationToken>big"
    "</NextContinuationToken><KeyCount>2</KeyCount></ListBucketResult>";
  /* The last page: "dir/x%y" and a key in UTF-8, not truncated. */
  static const char page2[] =
    XMLDECL "<ListBucketResult" NS "><EncodingType>url</EncodingType><IsTruncated>false"
    "</IsTruncated><Contents><Key>dir%2Fx%25y</Key><Size>18446744073709551615</Size>"
    "</Contents><Contents><Key>%C3%A9t%C3%A9/%D0%BA</Key><Size>0</Size><ETag>"
    "&quot;d41d8cd98f00b204e9800998ecf8427e-2&quot;</ETag></Contents>"
    "<ContinuationToken>big</ContinuationToken></ListBucketResult>";
  s3_list_page p;
  GError *err = NULL;
  size_t len;
  g_autofree char *b = exact(page1, &len);
  const s3_entry *e;

  (void)state;
  assert_true(s3_xml_list_objects(b, len, &p, &err));
  assert_null(err);
  assert_true(p.truncated);
  assert_string_equal(p.next_token, "big");
  assert_int_equal(p.entries->len, 2);
  assert_int_equal(p.prefixes->len, 0);
  e = g_ptr_array_index(p.entries, 0);
  assert_string_equal(e->key, "a b+c");
  assert_true(e->size == 1);
  assert_string_equal(e->etag, "9dd4e461268c8034f5c8564e155c67a6");
  assert_string_equal(e->last_modified, "2026-11-26T20:23:30.453Z");
  e = g_ptr_array_index(p.entries, 1);
  assert_string_equal(e->key, "big");
  assert_true(e->size == 5242880);
  s3_list_page_clear(&p);

  g_free(b);
  b = exact(page2, &len);
  assert_true(s3_xml_list_objects(b, len, &p, &err));
  assert_false(p.truncated);
  assert_null(p.next_token);
  assert_int_equal(p.entries->len, 2);
  e = g_ptr_array_index(p.entries, 0);
  assert_string_equal(e->key, "dir/x%y");
  assert_true(e->size == UINT64_MAX);
  assert_string_equal(e->etag, "");
  assert_string_equal(e->last_modified, "");
  e = g_ptr_array_index(p.entries, 1);
  assert_string_equal(e->key, "\xc3\xa9t\xc3\xa9/\xd0\xba");
  assert_string_equal(e->etag, "d41d8cd98f00b204e9800998ecf8427e-2");
  s3_list_page_clear(&p);
}

static void
test_list_prefixes_and_plain_keys(void **state)
{
  /* Without <EncodingType>url</EncodingType> keys are taken as they are:
   * '%' and '+' stay. */
  static const char plain[] =
    "<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>a+b%20c</Key>"
    "<Size>7</Size></Contents><CommonPrefixes><Prefix>x+y/</Prefix></CommonPrefixes>"
    "</ListBucketResult>";
  static const char delim[] =
    XMLDECL "<ListBucketResult" NS "><EncodingType>url</EncodingType><Delimiter>/"
    "</Delimiter><IsTruncated>false</IsTruncated><CommonPrefixes><Prefix>dir/</Prefix>"
    "</CommonPrefixes><CommonPrefixes><Prefix>%C3%A9t%C3%A9/</Prefix></CommonPrefixes>"
    "</ListBucketResult>";
  static const char empty[] =
    XMLDECL "<ListBucketResult" NS "><Name>seeds</Name><Prefix>nothing</Prefix><MaxKeys>"
    "1000</MaxKeys><IsTruncated>false</IsTruncated><KeyCount>0</KeyCount>"
    "</ListBucketResult>";
  s3_list_page p;
  GError *err = NULL;

  (void)state;
  assert_true(s3_xml_list_objects(plain, strlen(plain), &p, &err));
  assert_string_equal(((s3_entry *)g_ptr_array_index(p.entries, 0))->key, "a+b%20c");
  assert_string_equal(g_ptr_array_index(p.prefixes, 0), "x+y/");
  s3_list_page_clear(&p);

  assert_true(s3_xml_list_objects(delim, strlen(delim), &p, &err));
  assert_int_equal(p.entries->len, 0);
  assert_int_equal(p.prefixes->len, 2);
  assert_string_equal(g_ptr_array_index(p.prefixes, 0), "dir/");
  assert_string_equal(g_ptr_array_index(p.prefixes, 1), "\xc3\xa9t\xc3\xa9/");
  s3_list_page_clear(&p);

  assert_true(s3_xml_list_objects(empty, strlen(empty), &p, &err));
  assert_int_equal(p.entries->len, 0);
  assert_false(p.truncated);
  s3_list_page_clear(&p);
}

static void
test_list_refused(void **state)
{
  static const char *const bad[] = {
    /* Not XML, or not a listing. */
    "",
    "<html><body>502 Bad Gateway</body></html>",
    XMLDECL "<Error><Code>NoSuchBucket</Code></Error>",
    "<ListBucketResult>",
    "<ListBucketResult></ListBucketResults>",
    "<ListBucketResult/><ListBucketResult/>",
    "<ListBucketResult/>trailing",
    /* Entries we cannot use. */
    "<ListBucketResult><Contents><Size>1</Size></Contents></ListBucketResult>",
    "<ListBucketResult><Contents><Key>k</Key></Contents></ListBucketResult>",
    "<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents></ListBucketResult>",
    "<ListBucketResult><Contents><Key>k</Key><Size>1x</Size></Contents></ListBucketResult>",
    "<ListBucketResult><Contents><Key>k</Key><Size>18446744073709551616</Size></Contents>"
    "</ListBucketResult>",
    "<ListBucketResult><CommonPrefixes/></ListBucketResult>",
    /* Bad URL encoding, and a NUL smuggled in through it. */
    "<ListBucketResult><EncodingType>url</EncodingType><Contents><Key>a%2</Key><Size>1"
    "</Size></Contents></ListBucketResult>",
    "<ListBucketResult><EncodingType>url</EncodingType><Contents><Key>a%00b</Key><Size>1"
    "</Size></Contents></ListBucketResult>",
    "<ListBucketResult><EncodingType>url</EncodingType><CommonPrefixes><Prefix>%zz"
    "</Prefix></CommonPrefixes></ListBucketResult>",
    /* XML GMarkup refuses: a DTD with entities (no expansion bombs), an
     * undefined entity, a NUL character reference, bad UTF-8. */
    "<?xml version=\"1.0\"?><!DOCTYPE l [<!ENTITY a \"aaaaaaaa\"><!ENTITY b \"&a;&a;&a;\">]>"
    "<ListBucketResult><Contents><Key>&b;</Key><Size>1</Size></Contents>"
    "</ListBucketResult>",
    "<ListBucketResult><Contents><Key>&xxe;</Key><Size>1</Size></Contents>"
    "</ListBucketResult>",
    "<ListBucketResult><Contents><Key>a&#0;b</Key><Size>1</Size></Contents>"
    "</ListBucketResult>",
    "<ListBucketResult><Contents><Key>\xff\xfe</Key><Size>1</Size></Contents>"
    "</ListBucketResult>",
  };
  GError *err = NULL;

  (void)state;
  for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
    size_t len;
    g_autofree char *b = exact(bad[i], &len);
    s3_list_page p;

    if (s3_xml_list_objects(b, len, &p, &err))
      fail_msg("accepted: %s", bad[i]);
    assert_protocol_error(err);
    assert_null(p.entries);
    assert_null(p.prefixes);
    assert_null(p.next_token);
    g_clear_error(&err);
  }
}

static void
test_deep_nesting(void **state)
{
  GString *s = g_string_new("<ListBucketResult>");
  s3_list_page p;
  GError *err = NULL;

  (void)state;
  for (int i = 0; i < 100000; i++)
    g_string_append(s, "<a>");
  assert_false(s3_xml_list_objects(s->str, s->len, &p, &err));
  assert_protocol_error(err);
  assert_non_null(strstr(err->message, "deeper"));
  g_clear_error(&err);
  g_string_free(s, TRUE);
}

/* ---- multipart ------------------------------------------------------- */

static void
test_upload_id(void **state)
{
  static const char rgw[] =
    XMLDECL "<InitiateMultipartUploadResult" NS "><Bucket>seeds</Bucket><Key>big</Key>"
    "<UploadId>2~TFZY46Dezw5w8ahAmxW-F7jhYegB2On</UploadId>"
    "</InitiateMultipartUploadResult>";
  static const char *const bad[] = {
    "<InitiateMultipartUploadResult><Key>k</Key></InitiateMultipartUploadResult>",
    "<InitiateMultipartUploadResult><UploadId></UploadId></InitiateMultipartUploadResult>",
    "<Error><Code>AccessDenied</Code></Error>",
    "<InitiateMultipartUploadResult><UploadId>x</UploadId>",
  };
  char *id = NULL;
  GError *err = NULL;
  size_t len;
  g_autofree char *b = exact(rgw, &len);

  (void)state;
  assert_true(s3_xml_upload_id(b, len, &id, &err));
  assert_string_equal(id, "2~TFZY46Dezw5w8ahAmxW-F7jhYegB2On");
  g_free(id);
  id = NULL;
  for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
    assert_false(s3_xml_upload_id(bad[i], strlen(bad[i]), &id, &err));
    assert_null(id);
    assert_protocol_error(err);
    g_clear_error(&err);
  }
}

static void
test_complete(void **state)
{
  /* RGW 16 answers an empty <ETag> (s3_mpu_complete then computes it),
   * a retry of a completed upload the real one; AWS quotes it. */
  static const char rgw_empty[] =
    XMLDECL "<CompleteMultipartUploadResult" NS "><Location>localhost/seeds/big"
    "</Location><Bucket>seeds</Bucket><Key>big</Key><ETag></ETag>"
    "</CompleteMultipartUploadResult>";
  static const char rgw_retry[] =
    XMLDECL "<CompleteMultipartUploadResult" NS "><Location>localhost/seeds/big"
    "</Location><Bucket>seeds</Bucket><Key>big</Key><ETag>"
    "81485c0e873d222199469076b60f30e9-1</ETag></CompleteMultipartUploadResult>";
  static const char aws[] =
    XMLDECL "<CompleteMultipartUploadResult" NS "><ETag>&quot;"
    "3858f62230ac3c915f300c664312c11f-9&quot;</ETag></CompleteMultipartUploadResult>";
  static const char *const bad[] = {
    "<CompleteMultipartUploadResult><Key>k</Key></CompleteMultipartUploadResult>",
    /* A 200 that failed: s3.c looks for <Error> first, this must not
     * pass as a result either. */
    "<Error><Code>InternalError</Code></Error>",
    "<CompleteMultipartUploadResult><ETag>x</ETag></CompleteMultipartUploadResult>junk",
  };
  char *etag = NULL;
  GError *err = NULL;

  (void)state;
  assert_true(s3_xml_complete(rgw_empty, strlen(rgw_empty), &etag, &err));
  assert_string_equal(etag, "");
  g_clear_pointer(&etag, g_free);
  assert_true(s3_xml_complete(rgw_retry, strlen(rgw_retry), &etag, &err));
  assert_string_equal(etag, "81485c0e873d222199469076b60f30e9-1");
  g_clear_pointer(&etag, g_free);
  assert_true(s3_xml_complete(aws, strlen(aws), &etag, &err));
  assert_string_equal(etag, "3858f62230ac3c915f300c664312c11f-9");
  g_clear_pointer(&etag, g_free);
  for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
    assert_false(s3_xml_complete(bad[i], strlen(bad[i]), &etag, &err));
    assert_null(etag);
    assert_protocol_error(err);
    g_clear_error(&err);
  }
}

static void
test_list_uploads(void **state)
{
  /* RGW 16 with encoding-type=url: the keys encoded, but no
   * <EncodingType>, and NextKeyMarker as is. */
  static const char rgw[] =
    XMLDECL "<ListMultipartUploadsResult" NS "><Bucket>seeds</Bucket><NextKeyMarker>a b+c"
    "</NextKeyMarker><NextUploadIdMarker>2~Nz2xrBK2mAd_XPtVXtxZ-UUxba0apET"
    "</NextUploadIdMarker><MaxUploads>1</MaxUploads><IsTruncated>true</IsTruncated>"
    "<Upload><Key>a%20b%2Bc</Key><UploadId>2~Nz2xrBK2mAd_XPtVXtxZ-UUxba0apET</UploadId>"
    "<Initiator><ID>cbt</ID></Initiator><Initiated>2026-11-26T20:23:38.716Z</Initiated>"
    "</Upload></ListMultipartUploadsResult>";
  /* AWS: says <EncodingType>, encodes the marker too. */
  static const char aws[] =
    "<ListMultipartUploadsResult><EncodingType>url</EncodingType><NextKeyMarker>a%20b%2Bc"
    "</NextKeyMarker><IsTruncated>false</IsTruncated><Upload><Key>x%2By</Key><UploadId>u1"
    "</UploadId></Upload></ListMultipartUploadsResult>";
  static const char *const bad[] = {
    "<ListMultipartUploadsResult><Upload><Key>k</Key></Upload></ListMultipartUploadsResult>",
    "<ListMultipartUploadsResult><Upload><Key>k</Key><UploadId></UploadId></Upload>"
    "</ListMultipartUploadsResult>",
    "<ListMultipartUploadsResult><Upload><UploadId>u</UploadId></Upload>"
    "</ListMultipartUploadsResult>",
    "<ListMultipartUploadsResult><EncodingType>url</EncodingType><NextKeyMarker>%"
    "</NextKeyMarker></ListMultipartUploadsResult>",
    "<ListBucketResult/>",
  };
  s3_uploads_page p;
  GError *err = NULL;
  const s3_upload_entry *u;

  (void)state;
  assert_true(s3_xml_list_uploads(rgw, strlen(rgw), true, &p, &err));
  assert_true(p.truncated);
  assert_string_equal(p.next_key_marker, "a b+c");
  assert_string_equal(p.next_upload_id_marker, "2~Nz2xrBK2mAd_XPtVXtxZ-UUxba0apET");
  assert_int_equal(p.uploads->len, 1);
  u = g_ptr_array_index(p.uploads, 0);
  assert_string_equal(u->key, "a b+c");
  assert_string_equal(u->upload_id, "2~Nz2xrBK2mAd_XPtVXtxZ-UUxba0apET");
  assert_string_equal(u->initiated, "2026-11-26T20:23:38.716Z");
  s3_uploads_page_clear(&p);

  /* Not asked for: the key is taken as sent. */
  assert_true(s3_xml_list_uploads(rgw, strlen(rgw), false, &p, &err));
  assert_string_equal(((s3_upload_entry *)g_ptr_array_index(p.uploads, 0))->key,
                      "a%20b%2Bc");
  s3_uploads_page_clear(&p);

  assert_true(s3_xml_list_uploads(aws, strlen(aws), true, &p, &err));
  assert_false(p.truncated);
  assert_string_equal(p.next_key_marker, "a b+c");
  assert_null(p.next_upload_id_marker);
  u = g_ptr_array_index(p.uploads, 0);
  assert_string_equal(u->key, "x+y");
  assert_string_equal(u->initiated, "");
  s3_uploads_page_clear(&p);

  for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
    assert_false(s3_xml_list_uploads(bad[i], strlen(bad[i]), true, &p, &err));
    assert_null(p.uploads);
    assert_null(p.next_key_marker);
    assert_protocol_error(err);
    g_clear_error(&err);
  }
}

int
main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_error),
    cmocka_unit_test(test_list_truncated),
    cmocka_unit_test(test_list_prefixes_and_plain_keys),
    cmocka_unit_test(test_list_refused),
    cmocka_unit_test(test_deep_nesting),
    cmocka_unit_test(test_upload_id),
    cmocka_unit_test(test_complete),
    cmocka_unit_test(test_list_uploads),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
