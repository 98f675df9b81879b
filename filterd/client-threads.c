/* Short-lived threads that each serve one client socket with blocking I/O
 * (control connections).
 *
 * A set caps how many run at once, refuses new ones while the daemon
 * stops, and can break and await them all: stop_all shuts every socket
 * down, which wakes any blocked recv/send, then waits for the threads to
 * say they are done.
 */
#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

static void
forget_fd(struct client_threads *ct, int fd)
{
  for (guint i = 0; ct->fds && i < ct->fds->len; i++) {
    if (g_array_index(ct->fds, int, i) == fd) {
      g_array_remove_index_fast(ct->fds, i);
      break;
    }
  }
}

bool
client_threads_start(struct client_threads *ct, int fd, const char *peer,
                     void *(*fn)(void *), void *arg)
{
  pthread_attr_t attr;
  pthread_t t;
  int r;

  g_mutex_lock(&ct->lock);
  if (!ct->fds)
    ct->fds = g_array_new(FALSE, FALSE, sizeof(int));
  if (atomic_load(&srv.stopping) || ct->count >= ct->max) {
    g_mutex_unlock(&ct->lock);
    if (!atomic_load(&srv.stopping))
      log_error("%s: too many %s at once; refused", peer, ct->what);
    return false;
  }
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  r = pthread_create(&t, &attr, fn, arg);
  pthread_attr_destroy(&attr);
  if (r != 0) {
    g_mutex_unlock(&ct->lock);
    log_error("%s: cannot start a thread for %s: %s", peer, ct->what, g_strerror(r));
    return false;
  }
  ct->count++;
  g_array_append_val(ct->fds, fd);
  g_mutex_unlock(&ct->lock);
  return true;
}

void
client_threads_done(struct client_threads *ct, int fd)
{
  g_mutex_lock(&ct->lock);
  forget_fd(ct, fd);
  close(fd);
  ct->count--;
  g_cond_broadcast(&ct->cond);
  g_mutex_unlock(&ct->lock);
}

void
client_threads_stop_all(struct client_threads *ct)
{
  g_mutex_lock(&ct->lock);
  for (guint i = 0; ct->fds && i < ct->fds->len; i++)
    shutdown(g_array_index(ct->fds, int, i), SHUT_RDWR);
  while (ct->count > 0)
    g_cond_wait(&ct->cond, &ct->lock);
  if (ct->fds)
    g_array_free(ct->fds, TRUE);
  ct->fds = NULL;
  g_mutex_unlock(&ct->lock);
}
