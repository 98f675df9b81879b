/* cbt list: the backups of a repository, chain by chain.
 *
 * Reads the manifest without a lock (it is replaced atomically, so a
 * concurrent backup shows up either entirely or not at all).  The JSON
 * form is the manifest's entries without their checksums (but with
 * "checksum", the algorithm), each with the number of its chain
 * (1 = oldest) added, for scripts such as
 * cbt-nightly.sh that prune whole chains.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"

int
cmd_list(int argc, char **argv)
{
  g_autofree char *dir = NULL;
  g_autoptr(repo) r = NULL;
  g_autoptr(json_object) jo = NULL;
  gboolean json = FALSE;
  GError *error = NULL;
  json_object *jl;
  unsigned chain = 0;
  GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository: a directory or s3://BUCKET/PREFIX", "DIR" },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &json, "print JSON on stdout", NULL },
    CLI_S3_OPTION,
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("list", "", "List the backups of a repository, chain by chain.",
                       CLI_EXIT_CODES_HELP, entries);

  if (!cli_parse(octx, "list", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc > 1)
    return cli_usage_error("list", "unexpected argument '%s'", argv[1]);
  if (!dir)
    return cli_usage_error("list", "--repo is required");
  if (!repo_open(dir, REPO_LOCK_NONE, false, &r, &error))
    return cli_report(error);

  jo = json_object_new_object();
  jl = json_object_new_array();
  cli_json_add_str(jo, "repository", dir);
  json_object_object_add(jo, "backups", jl);
  if (!json)
    printf("%-6s %-11s %-20s %10s %10s %10s  %s\n", "SEQ", "KIND", "TIME", "IMAGE",
           "COPIED", "FILE-SIZE", "FILE");
  for (guint i = 0; i < r->backups->len; i++) {
    const repo_backup *b = g_ptr_array_index(r->backups, i);
    json_object *e = repo_backup_to_json(b);

    if (strcmp(b->kind, "full") == 0) {
      chain++;
      if (!json)
        printf("chain %u:\n", chain);
    }
    json_object_object_del(e, chunk_alg_name(b->checksum));   /* "checksum" stays */
    json_object_object_add(e, "chain", json_object_new_int64(chain));
    json_object_array_add(jl, e);
    if (!json) {
      g_autofree char *img = cli_format_size(b->image_size);
      g_autofree char *cp = cli_format_size(b->bytes_copied);
      g_autofree char *fs = cli_format_size(b->file_size);

      printf("%-6u %-11s %-20s %10s %10s %10s  %s\n", b->seq, b->kind, b->time, img, cp,
             fs, b->file);
    }
  }
  cli_json_add_u64(jo, "chains", chain);
  cli_json_add_u64(jo, "count", r->backups->len);
  if (json ? !cli_json_print(jo, &error) : !cli_flush_stdout(&error))
    return cli_report(error);
  return CLI_EXIT_OK;
}
