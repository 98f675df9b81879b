/* cbt prune: retention.  Keep the newest N chains of a repository (a
 * chain is a full backup and the incrementals on top of it) and delete
 * the older chains whole, so that every backup left still restores.
 *
 * It takes the repository's exclusive lock (a directory's flock, or the
 * S3 lock object), so no backup writes and no restore of a directory
 * reads while files go; rewrites the manifest first and deletes the files
 * after (repo_prune), so a crash in between leaves unlisted files, never
 * a manifest naming missing ones.  The newest chain is never touched.
 * cbt-nightly.sh calls it after each backup.
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"

int
cmd_prune(int argc, char **argv)
{
  g_autofree char *dir = NULL;
  g_autoptr(repo) r = NULL;
  g_autoptr(json_object) jo = NULL;
  gboolean json = FALSE, dry_run = FALSE;
  gint keep = 0;
  GError *error = NULL;
  json_object *jf;
  unsigned chains = 0, drop;
  guint count = 0;
  GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository: a directory or s3://BUCKET/PREFIX", "DIR" },
    { "keep-chains", 'k', 0, G_OPTION_ARG_INT, &keep, "chains to keep, newest first (>= 1)", "N" },
    { "dry-run", 'n', 0, G_OPTION_ARG_NONE, &dry_run, "only say what would be deleted", NULL },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &json, "print the result as JSON on stdout", NULL },
    CLI_S3_OPTION,
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("prune", "", "Delete the oldest whole chains of a repository.",
                       "Keeps the newest N chains (a full backup and its incrementals)\n"
                       "and deletes older chains whole: the manifest is rewritten first,\n"
                       "then the files are deleted.  Takes the repository's lock: fails\n"
                       "while a backup runs.\n\n" CLI_EXIT_CODES_HELP,
                       entries);

  if (!cli_parse(octx, "prune", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc > 1)
    return cli_usage_error("prune", "unexpected argument '%s'", argv[1]);
  if (!dir)
    return cli_usage_error("prune", "--repo is required");
  if (keep < 1)
    return cli_usage_error("prune", "--keep-chains N is required, N >= 1");
  if (!repo_open(dir, dry_run ? REPO_LOCK_NONE : REPO_LOCK_EXCLUSIVE, false, &r, &error))
    return cli_report(error);

  for (guint i = 0; i < r->backups->len; i++)
    chains += strcmp(((repo_backup *)g_ptr_array_index(r->backups, i))->kind, "full") == 0;
  drop = chains > (unsigned)keep ? chains - (unsigned)keep : 0;
  /* The backups of the oldest @drop chains: up to the (drop + 1)-th full. */
  for (unsigned seen = 0; count < r->backups->len; count++) {
    const repo_backup *b = g_ptr_array_index(r->backups, count);

    if (strcmp(b->kind, "full") == 0 && ++seen > drop)
      break;
  }
  if (drop == 0)
    count = 0;

  jo = json_object_new_object();
  jf = json_object_new_array();
  cli_json_add_str(jo, "repository", r->dir);
  cli_json_add_u64(jo, "chains", chains);
  cli_json_add_u64(jo, "keep-chains", (uint64_t)keep);
  cli_json_add_u64(jo, "pruned-chains", drop);
  cli_json_add_bool(jo, "dry-run", dry_run);
  json_object_object_add(jo, "files", jf);
  for (guint i = 0; i < count; i++)
    json_object_array_add(jf, json_object_new_string(
                                  ((repo_backup *)g_ptr_array_index(r->backups, i))->file));

  if (!json)
    for (guint i = 0; i < count; i++)
      printf("%s %s\n", dry_run ? "would prune" : "pruning",
             ((repo_backup *)g_ptr_array_index(r->backups, i))->file);
  if (count > 0 && !dry_run && !repo_prune(r, count, &error))
    return cli_report(error);
  if (json) {
    if (!cli_json_print(jo, &error))
      return cli_report(error);
  } else {
    if (drop == 0)
      printf("%u chains, keeping up to %d: nothing to prune\n", chains, keep);
    else
      printf("%s %u of %u chains (%u backups), keeping %d\n",
             dry_run ? "would prune" : "pruned", drop, chains, count, keep);
    if (!cli_flush_stdout(&error))
      return cli_report(error);
  }
  return CLI_EXIT_OK;
}
