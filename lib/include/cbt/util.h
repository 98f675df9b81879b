/* Small helpers shared by lib/, the daemon and the CLI. */
#ifndef CBT_UTIL_H
#define CBT_UTIL_H

#include <stddef.h>

/* The struct that embeds @ptr as @member.  Goes through void * so that
 * -Wcast-align accepts it: the member really is inside such a struct. */
#define cbt_container_of(ptr, type, member) \
  ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

#endif
