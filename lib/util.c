/* Helpers shared by lib/ (declared in cbt/util.h). */
#include <stdarg.h>

#include <glib.h>

#include "cbt/util.h"

int
cbt_fail(char **why, int err, const char *fmt, ...)
{
  if (why && !*why) {
    va_list ap;

    va_start(ap, fmt);
    *why = g_strdup_vprintf(fmt, ap);
    va_end(ap);
  }
  return err;
}
