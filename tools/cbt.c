/* cbt: the backup command line (subcommands come with the backup work). */
#include <stdio.h>
#include <string.h>

int
main(int argc, char **argv)
{
  if (argc > 1 && strcmp(argv[1], "--version") == 0) {
    printf("cbt 0.1.0\n");
    return 0;
  }
  fprintf(stderr, "cbt: no subcommands yet\n");
  return 2;
}
