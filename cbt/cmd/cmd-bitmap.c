/* cbt bitmap create|info|dump|check|resize: look after dirty bitmap files.
 *
 * info, dump and check open the file read-only: a running cbt-filterd
 * holds it open read-write, and reading beside it is safe (the library
 * validates what it reads; a file in use is simply "not clean", because
 * the daemon clears CLEAN before it accepts the first write).  Only
 * resize writes to an existing bitmap file, and only to one that is
 * CLEAN (so no daemon is using it) unless --force says it crashed.
 *
 * Exit codes (cli.h): check separates "this file is damaged or belongs to
 * another image" (CLI_EXIT_DAMAGED) from "it could not be read at all"
 * (CLI_EXIT_FAILED), so a cron job can tell a broken bitmap from a
 * missing mount.  The library's open errors map as -EINVAL (bad magic),
 * -ENOTSUP (version/features) and -EBADMSG (corrupt) -> damaged; every
 * other errno -> failed.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "cbt/bitmap-file.h"
#include "cbt/bitmap.h"
#include "cbt/image.h"
#include "cli.h"

#define CRASH_SAFE_MEANING \
  "every bit was durable before its write, so backups from it stay incremental"
#define NOT_CLEAN_MEANING \
  "the daemon did not shut down cleanly (or is running); " \
  "backups from this bitmap will be full"

typedef struct cbt_image cbt_image;
G_DEFINE_AUTOPTR_CLEANUP_FUNC(cbt_image, cbt_image_close)

/* After option parsing every subcommand takes exactly one PATH. */
static int
path_usage_error(const char *cmd, int argc, char **argv)
{
  if (argc < 2)
    return cli_usage_error(cmd, "missing PATH");
  return cli_usage_error(cmd, "unexpected argument '%s'", argv[2]);
}

/* The image a bitmap must belong to, for open_bitmap_mode. */
struct image_id {
  const char *path;
  uint64_t size, ino;
};

/* Open @path and validate it; with @img, refuse it before its bits are
 * loaded if it was made for another image.  On failure @error names the
 * file and the library's reason, with code CLI_EXIT_DAMAGED if the file is
 * there but is not a valid bitmap file (or belongs to another image),
 * CLI_EXIT_FAILED if it could not be read. */
static bool
open_bitmap_mode(const char *path, bool writable, const struct image_id *img,
                 cbt_bmfile **out, GError **error)
{
  g_autofree char *why = NULL;
  struct stat st;
  int r;

  /* The library calls a directory "not a regular file" with -EINVAL, the
   * code of a bad magic; a directory is not a damaged bitmap. */
  if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: not a regular file", path);
    return false;
  }
  r = img ? cbt_bmfile_open_image(path, writable, img->size, img->ino, out, &why)
          : cbt_bmfile_open(path, writable, out, &why);
  if (r == -ESTALE && img) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: does not belong to %s: %s",
                path, img->path, why ? why : g_strerror(-r));
    return false;
  }
  if (r < 0) {
    bool damaged = r == -EINVAL || r == -ENOTSUP || r == -EBADMSG;

    g_set_error(error, CLI_ERROR, damaged ? CLI_EXIT_DAMAGED : CLI_EXIT_FAILED,
                "%s: %s", path, why ? why : g_strerror(-r));
    return false;
  }
  return true;
}

static bool
open_bitmap(const char *path, cbt_bmfile **out, GError **error)
{
  return open_bitmap_mode(path, false, NULL, out, error);
}

/* Open @img the way cbt-filterd does (format detected) and return its
 * identity: virtual size and inode. */
static bool
image_identity(const char *img, uint64_t *size, uint64_t *ino, GError **error)
{
  g_autoptr(cbt_image) image = NULL;
  g_autofree char *why = NULL;
  int r = cbt_image_open(img, NULL, true, false, &image, &why);

  if (r < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s",
                why ? why : g_strerror(-r));
    return false;
  }
  *size = image->size;
  *ino = image->ino;
  return true;
}

/* Index of entry @name, or an error listing the names there are. */
static bool
find_entry(cbt_bmfile *f, const char *name, unsigned *idx, GError **error)
{
  g_autoptr(GString) names = g_string_new(NULL);
  int r = cbt_bmfile_find(f, name);

  if (r >= 0) {
    *idx = (unsigned)r;
    return true;
  }
  for (unsigned i = 0; i < cbt_bmfile_entry_count(f); i++)
    g_string_append_printf(names, "%s'%s'", i ? ", " : "",
                           cbt_bmfile_entry_name(f, i));
  g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
              "%s: no bitmap named '%s' (the file has %s)", cbt_bmfile_path(f),
              name, names->len ? names->str : "none");
  return false;
}

static char *
format_uuid(const cbt_bmfile *f)
{
  uint8_t u[16];

  cbt_bmfile_uuid(f, u);
  return g_strdup_printf("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
                         "%02x%02x%02x%02x%02x%02x",
                         u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8],
                         u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

static const struct {
  uint32_t bit;
  const char *name;
} flag_names[] = {
  { CBT_BMF_ACTIVE, "active" },
  { CBT_BMF_FROZEN, "frozen" },
  { CBT_BMF_INCONSISTENT, "inconsistent" },
};

/* ---- create ----------------------------------------------------------- */

static char *create_image;
static char *create_granularity;
static char *opt_name;

static const GOptionEntry create_entries[] = {
  { "image", 'i', 0, G_OPTION_ARG_FILENAME, &create_image, "The image the bitmap tracks (required)", "IMG" },
  { "granularity", 'g', 0, G_OPTION_ARG_STRING, &create_granularity, "Bytes per bit: a power of two from 512 to 1G (default 64K)", "SIZE" },
  { "name", 'n', 0, G_OPTION_ARG_STRING, &opt_name, "Name of the bitmap (default cbt)", "NAME" },
  { NULL }
};

/* --granularity: a power of two from 512 bytes to 1 GiB, as cbt-filterd
 * takes it. */
static bool
parse_granularity(const char *s, uint64_t *gran, GError **error)
{
  if (!cli_parse_size("--granularity", s, gran, error))
    return false;
  if (*gran < CBT_BITMAP_MIN_GRANULARITY || *gran > (UINT64_C(1) << 30) ||
      (*gran & (*gran - 1)) != 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_USAGE,
                "--granularity %s: expected a power of two from 512 to 1G", s);
    return false;
  }
  return true;
}

static bool
do_create(const char *path, uint64_t gran, GError **error)
{
  g_autoptr(cbt_bmfile) f = NULL;
  g_autofree char *why = NULL;
  g_autofree char *hsize = NULL;
  g_autofree char *hgran = NULL;
  uint64_t size, ino;
  int r;

  if (!image_identity(create_image, &size, &ino, error))
    return false;
  r = cbt_bmfile_create(path, size, ino, (uint32_t)gran, opt_name, &f, &why);
  if (r < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path,
                why ? why : g_strerror(-r));
    return false;
  }
  hsize = cli_format_size(size);
  hgran = cli_format_size(gran);
  cli_note("%s: created bitmap '%s' for %s (%s, inode %" PRIu64 "), granularity %s",
           path, opt_name, create_image, hsize, ino, hgran);
  return true;
}

static int
bitmap_create(int argc, char **argv)
{
  g_autoptr(GOptionContext) ctx = cli_option_context("bitmap create",
      "PATH --image IMG",
      "Create the dirty bitmap file PATH for the image IMG, with one active,\n"
      "clean bitmap.  The file records IMG's size and inode; cbt-filterd\n"
      "refuses to use it with any other image.  PATH must not exist.",
      NULL, create_entries);
  g_autoptr(GError) error = NULL;
  uint64_t gran = CBT_BITMAP_DEFAULT_GRANULARITY;

  if (!cli_parse(ctx, "bitmap create", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc != 2)
    return path_usage_error("bitmap create", argc, argv);
  if (!create_image)
    return cli_usage_error("bitmap create", "--image IMG is required");
  if (create_granularity && !parse_granularity(create_granularity, &gran, &error))
    return cli_usage_error("bitmap create", "%s", error->message);
  if (!opt_name)
    opt_name = g_strdup("cbt");
  if (!do_create(argv[1], gran, &error))
    return cli_report(g_steal_pointer(&error));
  return CLI_EXIT_OK;
}

/* ---- info ------------------------------------------------------------- */

static gboolean opt_json;

static const GOptionEntry info_entries[] = {
  { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json, "Print one JSON object (keys below)", NULL },
  { NULL }
};

static json_object *
entry_json(cbt_bmfile *f, unsigned idx)
{
  const struct cbt_bitmap *bm = cbt_bmfile_entry_bitmap(f, idx);
  uint32_t flags = cbt_bmfile_entry_flags(f, idx);
  uint64_t dirty = cbt_bitmap_dirty_bytes(bm);
  json_object *e = json_object_new_object();
  json_object *fl = json_object_new_array();

  cli_json_add_str(e, "name", cbt_bmfile_entry_name(f, idx));
  for (size_t i = 0; i < G_N_ELEMENTS(flag_names); i++)
    if (flags & flag_names[i].bit)
      json_object_array_add(fl, json_object_new_string(flag_names[i].name));
  json_object_object_add(e, "flags", fl);
  cli_json_add_bool(e, "active", flags & CBT_BMF_ACTIVE);
  cli_json_add_bool(e, "frozen", flags & CBT_BMF_FROZEN);
  cli_json_add_bool(e, "inconsistent", flags & CBT_BMF_INCONSISTENT);
  cli_json_add_u64(e, "granularity", bm->granularity);
  cli_json_add_u64(e, "dirty_bytes", dirty);
  cli_json_add_percent(e, "dirty_percent", cli_percent(dirty, bm->size));
  cli_json_add_bool(e, "data_checksum_ok", cbt_bmfile_entry_data_ok(f, idx));
  cli_json_add_u64(e, "data_crc32c", cbt_bmfile_entry_data_crc(f, idx));
  {
    const char *why = NULL;

    cli_json_add_bool(e, "trusted", cbt_bmfile_entry_trusted(f, idx, &why));
    cli_json_add_str(e, "trusted_why", why);
  }
  if (cbt_bmfile_entry_checkpoint(f, idx)) {
    g_autofree char *cp = g_strdup_printf("%016" PRIx64, cbt_bmfile_entry_checkpoint(f, idx));
    cli_json_add_str(e, "checkpoint", cp);
  } else {
    cli_json_add_str(e, "checkpoint", NULL);
  }
  return e;
}

static bool
info_json(cbt_bmfile *f, GError **error)
{
  g_autoptr(json_object) o = json_object_new_object();
  g_autofree char *uuid = format_uuid(f);
  json_object *arr = json_object_new_array();

  cli_json_add_str(o, "path", cbt_bmfile_path(f));
  cli_json_add_u64(o, "format_version", cbt_bmfile_version(f));
  cli_json_add_str(o, "uuid", uuid);
  cli_json_add_u64(o, "image_size", cbt_bmfile_image_size(f));
  cli_json_add_u64(o, "image_inode", cbt_bmfile_image_inode(f));
  cli_json_add_bool(o, "clean", cbt_bmfile_found_clean(f));
  cli_json_add_bool(o, "crash_safe", cbt_bmfile_found_crash_safe(f));
  cli_json_add_u64(o, "generation", cbt_bmfile_generation(f));
  cli_json_add_str(o, "recovery_note", cbt_bmfile_recovery_note(f));
  cli_json_add_u64(o, "header_crc32c", cbt_bmfile_header_crc(f));
  cli_json_add_u64(o, "directory_crc32c", cbt_bmfile_dir_crc(f));
  for (unsigned i = 0; i < cbt_bmfile_entry_count(f); i++)
    json_object_array_add(arr, entry_json(f, i));
  json_object_object_add(o, "bitmaps", arr);
  return cli_json_print(o, error);
}

static bool
info_human(cbt_bmfile *f, GError **error)
{
  g_autofree char *uuid = format_uuid(f);
  g_autofree char *hsize = cli_format_size(cbt_bmfile_image_size(f));
  const char *note = cbt_bmfile_recovery_note(f);

  printf("%s\n", cbt_bmfile_path(f));
  printf("  format version:  %" PRIu32 "\n", cbt_bmfile_version(f));
  printf("  uuid:            %s\n", uuid);
  printf("  image size:      %s (%" PRIu64 " bytes)\n", hsize, cbt_bmfile_image_size(f));
  printf("  image inode:     %" PRIu64 "\n", cbt_bmfile_image_inode(f));
  if (cbt_bmfile_found_clean(f))
    printf("  state:           clean\n");
  else if (cbt_bmfile_found_crash_safe(f))
    printf("  state:           not clean, written in crash-safe mode: " CRASH_SAFE_MEANING "\n");
  else
    printf("  state:           not clean: " NOT_CLEAN_MEANING "\n");
  printf("  generation:      %" PRIu64 "\n", cbt_bmfile_generation(f));
  printf("  checksums:       header crc32c 0x%08" PRIx32 ", directory crc32c 0x%08" PRIx32 "\n",
         cbt_bmfile_header_crc(f), cbt_bmfile_dir_crc(f));
  if (note)
    printf("  recovery:        newest metadata copy unusable (%s); "
           "read the previous generation\n", note);

  for (unsigned i = 0; i < cbt_bmfile_entry_count(f); i++) {
    const struct cbt_bitmap *bm = cbt_bmfile_entry_bitmap(f, i);
    uint32_t flags = cbt_bmfile_entry_flags(f, i);
    uint64_t dirty = cbt_bitmap_dirty_bytes(bm);
    g_autofree char *hgran = cli_format_size(bm->granularity);
    g_autofree char *hdirty = cli_format_size(dirty);
    g_autoptr(GString) fl = g_string_new(NULL);

    for (size_t j = 0; j < G_N_ELEMENTS(flag_names); j++)
      if (flags & flag_names[j].bit)
        g_string_append_printf(fl, "%s%s", fl->len ? ", " : "", flag_names[j].name);
    printf("bitmap '%s'\n", cbt_bmfile_entry_name(f, i));
    printf("  flags:           %s\n", fl->len ? fl->str : "none");
    printf("  granularity:     %s\n", hgran);
    printf("  dirty:           %s (%" PRIu64 " bytes), %.2f%% of the image\n",
           hdirty, dirty, cli_percent(dirty, bm->size));
    printf("  data checksum:   crc32c 0x%08" PRIx32 ", %s\n", cbt_bmfile_entry_data_crc(f, i),
           cbt_bmfile_entry_data_ok(f, i) ? "ok" :
           cbt_bmfile_found_crash_safe(f) ? "stale (normal in crash-safe mode)" :
           "mismatch (expected after an unclean shutdown)");
    if (cbt_bmfile_entry_checkpoint(f, i))
      printf("  checkpoint:      %016" PRIx64 " (changes since that checkpoint)\n",
             cbt_bmfile_entry_checkpoint(f, i));
    else
      printf("  checkpoint:      none (no backup taken from it yet)\n");
    {
      const char *why = NULL;

      if (!cbt_bmfile_entry_trusted(f, i, &why))
        printf("  trusted:         no (%s): the next backup from it will be full\n", why);
      else
        printf("  trusted:         yes (%s)\n", why);
    }
  }
  return cli_flush_stdout(error);
}

static int
bitmap_info(int argc, char **argv)
{
  g_autoptr(GOptionContext) ctx = cli_option_context("bitmap info", "PATH",
      "Show what the bitmap file PATH holds.  The file is opened read-only;\n"
      "it may be in use by a running cbt-filterd (it then shows as not clean).",
      "JSON keys (--json), stable:\n"
      "  path, format_version, uuid, image_size, image_inode, header_crc32c,\n"
      "  directory_crc32c,\n"
      "  clean            false: the daemon did not shut down cleanly or is running;\n"
      "                   no bit in the file may be trusted\n"
      "  generation, recovery_note (string or null),\n"
      "  bitmaps          array of objects with keys:\n"
      "    name, flags (array of \"active\", \"frozen\", \"inconsistent\"),\n"
      "    active, frozen, inconsistent (booleans), granularity (bytes),\n"
      "    dirty_bytes, dirty_percent (of image_size, 2 decimals),\n"
      "    data_checksum_ok, data_crc32c, checkpoint (16 hex digits or null),\n"
      "    trusted          clean and not inconsistent and data_checksum_ok:\n"
      "                     usable for an incremental backup\n"
      "Sizes and offsets are in bytes.",
      info_entries);
  g_autoptr(cbt_bmfile) f = NULL;
  g_autoptr(GError) error = NULL;

  if (!cli_parse(ctx, "bitmap info", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc != 2)
    return path_usage_error("bitmap info", argc, argv);
  if (!open_bitmap(argv[1], &f, &error) ||
      !(opt_json ? info_json(f, &error) : info_human(f, &error)))
    return cli_report(g_steal_pointer(&error));
  return CLI_EXIT_OK;
}

/* ---- dump ------------------------------------------------------------- */

static const GOptionEntry dump_entries[] = {
  { "name", 'n', 0, G_OPTION_ARG_STRING, &opt_name, "Bitmap to dump (default cbt)", "NAME" },
  { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json, "Print a JSON array of {offset, length}", NULL },
  { NULL }
};

static bool
do_dump(cbt_bmfile *f, const char *name, GError **error)
{
  g_autoptr(json_object) arr = opt_json ? json_object_new_array() : NULL;
  const struct cbt_bitmap *bm;
  uint64_t offset = 0, nextents = 0, dirty_total = 0;
  unsigned idx;

  if (!find_entry(f, name, &idx, error))
    return false;
  bm = cbt_bmfile_entry_bitmap(f, idx);
  if (!cbt_bmfile_found_clean(f) && !cbt_bmfile_found_crash_safe(f))
    cli_note("%s: not clean: " NOT_CLEAN_MEANING, cbt_bmfile_path(f));
  else if (!cbt_bmfile_entry_trusted(f, idx, NULL))
    cli_note("%s: bitmap '%s' is inconsistent: its bits are untrusted and "
             "the next backup from it will be full", cbt_bmfile_path(f), name);

  /* cbt_bitmap_extent returns maximal runs, so adjacent dirty granules
   * come out merged. */
  while (offset < bm->size) {
    bool dirty;
    uint64_t len = cbt_bitmap_extent(bm, offset, bm->size - offset, &dirty);

    if (len == 0)
      break;
    if (dirty) {
      nextents++;
      dirty_total += len;
      if (arr) {
        json_object *e = json_object_new_object();

        cli_json_add_u64(e, "offset", offset);
        cli_json_add_u64(e, "length", len);
        json_object_array_add(arr, e);
      } else {
        printf("%" PRIu64 " %" PRIu64 "\n", offset, len);
      }
    }
    offset += len;
  }
  if (arr)
    return cli_json_print(arr, error);
  if (!cli_quiet)
    printf("# bitmap '%s': %" PRIu64 " extent%s, %" PRIu64 " bytes dirty "
           "(%.2f%% of %" PRIu64 "), granularity %" PRIu32 "\n",
           name, nextents, nextents == 1 ? "" : "s", dirty_total,
           cli_percent(dirty_total, bm->size), bm->size, bm->granularity);
  return cli_flush_stdout(error);
}

static int
bitmap_dump(int argc, char **argv)
{
  g_autoptr(GOptionContext) ctx = cli_option_context("bitmap dump", "PATH",
      "List the dirty extents of one bitmap in PATH: merged runs of dirty\n"
      "granules, one \"OFFSET LENGTH\" line each (decimal bytes), then a\n"
      "summary line starting with '#' (left out with --quiet).  The file is\n"
      "opened read-only.",
      "JSON (--json): an array of {\"offset\": N, \"length\": N}, in bytes.",
      dump_entries);
  g_autoptr(cbt_bmfile) f = NULL;
  g_autoptr(GError) error = NULL;

  if (!cli_parse(ctx, "bitmap dump", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc != 2)
    return path_usage_error("bitmap dump", argc, argv);
  if (!open_bitmap(argv[1], &f, &error) ||
      !do_dump(f, opt_name ? opt_name : "cbt", &error))
    return cli_report(g_steal_pointer(&error));
  return CLI_EXIT_OK;
}

/* ---- check ------------------------------------------------------------ */

static char *check_image;

static const GOptionEntry check_entries[] = {
  { "image", 'i', 0, G_OPTION_ARG_FILENAME, &check_image, "Also check that PATH belongs to IMG (size and inode)", "IMG" },
  { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json, "Print one JSON object (keys below)", NULL },
  { NULL }
};

/* Validate @path (and its identity against --image).  Returns the exit
 * code; *@reason gets the message of a failure, *@notes what a valid file
 * still wants a human to know, *@clean the clean flag if the file opened. */
static int
do_check(const char *path, char **reason, GPtrArray *notes, int *clean)
{
  g_autoptr(cbt_bmfile) f = NULL;
  g_autoptr(GError) error = NULL;
  struct image_id img = { check_image, 0, 0 };
  const char *rec;
  int code;

  *clean = -1;
  /* With --image the identity is compared before the bits are loaded. */
  if (check_image && !image_identity(check_image, &img.size, &img.ino, &error))
    goto failed;
  if (!open_bitmap_mode(path, false, check_image ? &img : NULL, &f, &error))
    goto failed;
  *clean = cbt_bmfile_found_clean(f);

  if (!*clean && cbt_bmfile_found_crash_safe(f))
    g_ptr_array_add(notes, g_strdup_printf("not clean, written in crash-safe mode: "
                                           CRASH_SAFE_MEANING));
  else if (!*clean)
    g_ptr_array_add(notes, g_strdup_printf("not clean: " NOT_CLEAN_MEANING));
  rec = cbt_bmfile_recovery_note(f);
  if (rec)
    g_ptr_array_add(notes, g_strdup_printf("newest metadata copy unusable (%s); "
                                           "the previous generation is intact", rec));
  for (unsigned i = 0; i < cbt_bmfile_entry_count(f); i++) {
    const char *name = cbt_bmfile_entry_name(f, i);

    if (cbt_bmfile_entry_flags(f, i) & CBT_BMF_INCONSISTENT)
      g_ptr_array_add(notes, g_strdup_printf("bitmap '%s' is inconsistent: "
                                             "its bits are untrusted", name));
    if (!cbt_bmfile_entry_data_ok(f, i))
      g_ptr_array_add(notes, g_strdup_printf("bitmap '%s': data checksum mismatch "
                                             "(%s)", name, cbt_bmfile_found_crash_safe(f)
                                             ? "normal in crash-safe mode"
                                             : "expected after an unclean shutdown"));
  }
  return CLI_EXIT_OK;

failed:
  code = error->domain == CLI_ERROR ? error->code : CLI_EXIT_FAILED;
  *reason = g_strdup(error->message);
  return code;
}

static int
bitmap_check(int argc, char **argv)
{
  g_autoptr(GOptionContext) ctx = cli_option_context("bitmap check", "PATH [--image IMG]",
      "Validate the bitmap file PATH fully (headers, directory, checksums) and,\n"
      "with --image, that it belongs to IMG.  Prints \"ok\" or the reason.\n"
      "A file that is merely not clean is valid (exit 0) but untrusted.\n"
      "Exit 0 valid, 4 damaged or made for another image, 1 unreadable.",
      "JSON keys (--json), stable:\n"
      "  path, status (\"ok\", \"damaged\" or \"failed\"), ok (boolean),\n"
      "  reason (string or null), clean (boolean, null if unreadable),\n"
      "  notes (array of strings)\n"
      "The exit status is the same with --json.",
      check_entries);
  g_autoptr(GPtrArray) notes = g_ptr_array_new_with_free_func(g_free);
  g_autoptr(GError) error = NULL;
  g_autofree char *reason = NULL;
  const char *path;
  int code, clean;

  if (!cli_parse(ctx, "bitmap check", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc != 2)
    return path_usage_error("bitmap check", argc, argv);
  path = argv[1];
  code = do_check(path, &reason, notes, &clean);

  if (opt_json) {
    g_autoptr(json_object) o = json_object_new_object();
    json_object *arr = json_object_new_array();

    cli_json_add_str(o, "path", path);
    cli_json_add_str(o, "status", code == CLI_EXIT_OK ? "ok" :
                     code == CLI_EXIT_DAMAGED ? "damaged" : "failed");
    cli_json_add_bool(o, "ok", code == CLI_EXIT_OK);
    cli_json_add_str(o, "reason", reason);
    json_object_object_add(o, "clean", clean < 0 ? NULL : json_object_new_boolean(clean));
    for (unsigned i = 0; i < notes->len; i++)
      json_object_array_add(arr, json_object_new_string(notes->pdata[i]));
    json_object_object_add(o, "notes", arr);
    if (!cli_json_print(o, &error))
      return cli_report(g_steal_pointer(&error));
    return code;
  }

  if (code != CLI_EXIT_OK) {
    cli_error("%s", reason);
    return code;
  }
  printf("%s: ok%s\n", path, notes->len ? ", with notes:" : "");
  for (unsigned i = 0; i < notes->len; i++)
    printf("  %s\n", (const char *)notes->pdata[i]);
  if (!cli_flush_stdout(&error))
    return cli_report(g_steal_pointer(&error));
  return CLI_EXIT_OK;
}

/* ---- resize ----------------------------------------------------------- */

static char *resize_image;
static gboolean resize_force;

static const GOptionEntry resize_entries[] = {
  { "image", 'i', 0, G_OPTION_ARG_FILENAME, &resize_image, "The resized image (required; same file, same inode)", "IMG" },
  { "force", 'f', 0, G_OPTION_ARG_NONE, &resize_force, "Resize a file that is not clean (the daemon crashed; make sure it is not running)", NULL },
  { NULL }
};

static bool
do_resize(const char *path, GError **error)
{
  g_autoptr(cbt_bmfile) f = NULL;
  g_autofree char *why = NULL;
  g_autofree char *hold = NULL;
  g_autofree char *hnew = NULL;
  uint64_t size, ino, old;
  unsigned n;
  int r;

  if (!image_identity(resize_image, &size, &ino, error) ||
      !open_bitmap_mode(path, true, NULL, &f, error))
    return false;
  old = cbt_bmfile_image_size(f);
  n = cbt_bmfile_entry_count(f);
  if (ino != cbt_bmfile_image_inode(f)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED,
                "%s: does not belong to %s: image file replaced: bitmap was "
                "made for inode %" PRIu64 ", image is inode %" PRIu64
                "; create a new bitmap instead", path, resize_image,
                cbt_bmfile_image_inode(f), ino);
    return false;
  }
  /* A daemon using the file keeps it not clean; resizing under it would
   * lose its writes.  After a crash the bits are untrusted anyway. */
  if (!cbt_bmfile_found_clean(f) && !resize_force) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "%s: not clean: cbt-filterd may be running on it (stop it "
                "first); if it crashed, resize with --force", path);
    return false;
  }
  hold = cli_format_size(old);
  hnew = cli_format_size(size);
  if (size == old) {
    cli_note("%s: already covers %s (%" PRIu64 " bytes): nothing to do",
             path, hnew, size);
    return true;
  }
  r = cbt_bmfile_resize(f, size, &why);
  if (r < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: resize to %" PRIu64
                " bytes: %s", path, size, why ? why : g_strerror(-r));
    return false;
  }
  /* Clean already if it was; after --force this is the clean shutdown of
   * a writer (entries stay INCONSISTENT). */
  r = cbt_bmfile_close_clean(g_steal_pointer(&f), &why);
  if (r < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path,
                why ? why : g_strerror(-r));
    return false;
  }
  if (size > old)
    cli_note("%s: grew from %s (%" PRIu64 " bytes) to %s (%" PRIu64 " bytes): "
             "new area marked dirty in %u bitmap%s", path, hold, old, hnew,
             size, n, n == 1 ? "" : "s");
  else
    cli_note("%s: shrank from %s (%" PRIu64 " bytes) to %s (%" PRIu64 " bytes): "
             "bits past the new end dropped in %u bitmap%s", path, hold, old,
             hnew, size, n, n == 1 ? "" : "s");
  return true;
}

static int
bitmap_resize(int argc, char **argv)
{
  g_autoptr(GOptionContext) ctx = cli_option_context("bitmap resize",
      "PATH --image IMG",
      "After the image IMG was resized (same file, e.g. qemu-img resize or\n"
      "truncate -s), make the bitmap file PATH cover its new size; cbt-filterd\n"
      "refuses a bitmap whose size differs.  Stop the daemon first.  Every\n"
      "bitmap in PATH is resized: growing keeps the bits and marks the new\n"
      "area dirty (it was never backed up), shrinking drops the bits past the\n"
      "new end.  The change is atomic: a crash leaves the old or the new size.\n"
      "Refused (exit 4) if IMG is another file (inode differs).",
      "Exit 0 done (or nothing to do), 1 failed or not clean, 2 usage,\n"
      "4 PATH is damaged or belongs to another image.",
      resize_entries);
  g_autoptr(GError) error = NULL;

  if (!cli_parse(ctx, "bitmap resize", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc != 2)
    return path_usage_error("bitmap resize", argc, argv);
  if (!resize_image)
    return cli_usage_error("bitmap resize", "--image IMG is required");
  if (!do_resize(argv[1], &error))
    return cli_report(g_steal_pointer(&error));
  return CLI_EXIT_OK;
}

/* ---- dispatch --------------------------------------------------------- */

static const struct {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *summary;
} subcommands[] = {
  { "create", bitmap_create, "PATH --image IMG [--granularity 64K] [--name cbt]" },
  { "info", bitmap_info, "PATH [--json]" },
  { "dump", bitmap_dump, "PATH [--name cbt] [--json]" },
  { "check", bitmap_check, "PATH [--image IMG] [--json]" },
  { "resize", bitmap_resize, "PATH --image IMG [--force]" },
};

static void
bitmap_usage(void)
{
  printf("Usage:\n");
  for (size_t i = 0; i < G_N_ELEMENTS(subcommands); i++)
    printf("  cbt bitmap %s %s\n", subcommands[i].name, subcommands[i].summary);
  printf("\n"
         "Create, inspect and validate the dirty bitmap files of cbt-filterd,\n"
         "and resize them after their image was resized (format:\n"
         "bitmap-format.md).  'cbt bitmap SUBCOMMAND --help' for details.\n");
}

int
cmd_bitmap(int argc, char **argv)
{
  if (argc < 2)
    return cli_usage_error("bitmap", "missing subcommand (create, info, dump, check or resize)");
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
      strcmp(argv[1], "help") == 0) {
    bitmap_usage();
    return CLI_EXIT_OK;
  }
  for (size_t i = 0; i < G_N_ELEMENTS(subcommands); i++)
    if (strcmp(argv[1], subcommands[i].name) == 0)
      return subcommands[i].run(argc - 1, argv + 1);
  return cli_usage_error("bitmap", "unknown subcommand '%s' (expected create, "
                         "info, dump, check or resize)", argv[1]);
}
