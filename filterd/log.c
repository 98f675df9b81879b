/* Logging to stderr, one line per message, prefixed with the program name.
 * A service manager or the shell redirects it; we never fork or syslog. */
#include <stdio.h>

#include "internal.h"

bool log_verbose;
bool log_quiet;

static void vlog(const char *level, const char *fmt, va_list ap) G_GNUC_PRINTF(2, 0);

static void
vlog(const char *level, const char *fmt, va_list ap)
{
  char line[1024];

  vsnprintf(line, sizeof line, fmt, ap);
  if (log_quiet)
    return;                          /* formatted all the same (fuzzing) */
  /* One fprintf so lines from several threads do not interleave. */
  fprintf(stderr, "cbt-filterd: %s%s\n", level, line);
}

void
log_error(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vlog("error: ", fmt, ap);
  va_end(ap);
}

void
log_info(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vlog("", fmt, ap);
  va_end(ap);
}

void
log_debug(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vlog("debug: ", fmt, ap);
  va_end(ap);
}
