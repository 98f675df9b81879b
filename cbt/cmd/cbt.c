/* cbt: the command line of the changed-block-tracking backup system.
 *
 *   cbt [--quiet|--verbose] SUBCOMMAND [ARGS...]
 *
 * main() handles only what comes before the subcommand (global flags,
 * --help, --version, `help SUBCOMMAND`) and hands the rest of argv, from
 * the subcommand's name on, to that subcommand's entry point from the
 * table below.  Each subcommand parses its own options and returns the
 * exit status (cli.h, "Exit codes").
 */
#include <locale.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"

/* The project() version, passed by meson.build. */
#ifndef PACKAGE_VERSION
#error "PACKAGE_VERSION must be defined by the build"
#endif

struct command {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *summary;
};

/* One line per subcommand; cmd_NAME is declared in cli.h. */
static const struct command commands[] = {
  { "bitmap", cmd_bitmap, "create, inspect, validate and resize dirty bitmap files" },
  { "backup", cmd_backup, "pull a full or incremental backup into a repository" },
  { "restore", cmd_restore, "rebuild the image as of one backup (raw, qcow2 or NBD)" },
  { "verify", cmd_verify, "check the backup files against the manifest checksums" },
  { "list", cmd_list, "list the backups of a repository, chain by chain" },
  { "prune", cmd_prune, "delete the oldest whole chains of a repository" },
  { "mount", cmd_mount, "show one backup as a read-only disk file (FUSE)" },
  { "umount", cmd_umount, "end a cbt mount" },
  { "serve", cmd_serve, "serve one backup read-only over NBD (cbt-filterd)" },
};

static void
usage(FILE *fp)
{
  fprintf(fp,
          "Usage: cbt [--quiet|--verbose] SUBCOMMAND [ARGS...]\n"
          "       cbt help [SUBCOMMAND]\n"
          "       cbt --version\n"
          "\n"
          "Back up disk images served by cbt-filterd, using its dirty bitmap.\n"
          "\n"
          "Subcommands:\n");
  for (size_t i = 0; i < G_N_ELEMENTS(commands); i++)
    fprintf(fp, "  %-10s %s\n", commands[i].name, commands[i].summary);
  fprintf(fp,
          "\n"
          "Options:\n"
          "  -h, --help      Show this help; 'cbt SUBCOMMAND --help' for a subcommand\n"
          "  -q, --quiet     Print only errors and results\n"
          "  -v, --verbose   Explain what is being done\n"
          "  -V, --version   Show the version\n"
          "\n"
          CLI_EXIT_CODES_HELP);
}

static const struct command *
find_command(const char *name)
{
  for (size_t i = 0; i < G_N_ELEMENTS(commands); i++)
    if (strcmp(commands[i].name, name) == 0)
      return &commands[i];
  return NULL;
}

int
main(int argc, char **argv)
{
  const struct command *cmd;
  int i;

  /* Only the character set (GOption's help prints UTF-8 when it can);
   * numbers stay in the C locale so that scripts can parse them. */
  setlocale(LC_CTYPE, "");
  g_set_prgname("cbt");
  /* Global flags before the subcommand; the subcommand parses the rest. */
  for (i = 1; i < argc && argv[i][0] == '-'; i++) {
    const char *a = argv[i];

    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      return CLI_EXIT_OK;
    } else if (strcmp(a, "-V") == 0 || strcmp(a, "--version") == 0) {
      printf("cbt %s\n", PACKAGE_VERSION);
      return CLI_EXIT_OK;
    } else if (strcmp(a, "-q") == 0 || strcmp(a, "--quiet") == 0) {
      cli_quiet = TRUE;
    } else if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
      cli_verbose = TRUE;
    } else {
      return cli_usage_error(NULL, "unknown option '%s'", a);
    }
  }
  if (cli_quiet && cli_verbose)
    return cli_usage_error(NULL, "--quiet and --verbose exclude each other");
  if (i == argc)
    return cli_usage_error(NULL, "missing subcommand");

  if (strcmp(argv[i], "help") == 0) {
    if (i + 1 == argc) {
      usage(stdout);
      return CLI_EXIT_OK;
    }
    cmd = find_command(argv[i + 1]);
    if (!cmd)
      return cli_usage_error(NULL, "help: unknown subcommand '%s'", argv[i + 1]);
    {
      /* "cbt help bitmap dump" is "cbt bitmap dump --help". */
      static char help[] = "--help";
      int n = argc - (i + 1);
      g_autofree char **hargv = g_new0(char *, (size_t)n + 2);

      memcpy(hargv, argv + i + 1, (size_t)n * sizeof *hargv);
      hargv[n] = help;
      return cmd->run(n + 1, hargv);
    }
  }

  if (strcmp(argv[i], "s3") == 0)     /* hidden: a debugging S3 client, cmd-s3.c */
    return cmd_s3(argc - i, argv + i);
  cmd = find_command(argv[i]);
  if (!cmd)
    return cli_usage_error(NULL, "unknown subcommand '%s'", argv[i]);
  return cmd->run(argc - i, argv + i);
}
