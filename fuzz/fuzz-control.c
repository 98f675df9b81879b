/* fuzz-control: the daemon's control socket requests (filterd/control.c,
 * control_reply: what a control client's thread runs for each line).
 *
 * Input: the bytes a client sends; each '\n'-terminated line is handed to
 * control_reply as ctl_thread does (lines are capped at 64 KiB there; a
 * longer one closes the connection, so it ends the input here too, and
 * an unterminated last line is never answered).  Every reply must be one
 * line of JSON: an object with "return" or "error".
 *
 * The daemon state is set up once, as cbt-filterd --image memory:64M
 * --bitmap DIR/fuzz.bitmap --tracking lazy --scratch DIR would (the files
 * are in the process's private directory, fuzz-util.h), with a few
 * megabytes marked dirty, so status reports a real bitmap and every
 * command runs for real: checkpoint-begin with and without a
 * point-in-time view (no guest writes are in flight, so the quiesce and
 * the view need no worker threads), checkpoint-commit and -abort with
 * right, wrong and malformed ids (getrandom below makes the right id
 * predictable).  Side effects are undone after each
 * input: a checkpoint still in progress is aborted, so every input
 * starts from a state with no checkpoint (the active bitmap's bits and
 * checkpoint id do change from input to input, as on a real daemon).
 * Not covered: the socket I/O of ctl_thread and the NBD side.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <json.h>

#include "fuzz-util.h"
#include "internal.h"

#define MAX_LINE (64 * 1024)

struct server srv;
static char *bitmap_path;

/* Checkpoint ids come from getrandom(2) (tracking.c).  Here every 8-byte
 * request gets the same bytes, so every checkpoint is c0ffee00c0ffee00
 * and an input can commit (or abort by id) the checkpoint it began; other
 * sizes (the bitmap file's uuid) still go to the kernel. */
ssize_t
getrandom(void *buf, size_t len, unsigned int flags)
{
  const uint64_t id = UINT64_C(0xc0ffee00c0ffee00);

  if (len == sizeof id) {
    memcpy(buf, &id, sizeof id);
    return sizeof id;
  }
  return syscall(SYS_getrandom, buf, len, flags);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *why = NULL;
  const char *dir = fuzz_dir("control");
  struct tracking_config tc = {
    .name = "cbt",
    .crash_safe = false,
  };

  (void)argc;
  (void)argv;
  bitmap_path = fuzz_path("fuzz.bitmap");
  tc.path = bitmap_path;
  srv.image_path = "memory:64M";
  srv.export_name = "fuzz";
  srv.scratch_dir = dir;
  srv.n_workers = 1;
  if (cbt_image_open_memory("64M", false, &srv.image, &why) < 0) {
    fprintf(stderr, "fuzz-control: memory image: %s\n", why);
    abort();
  }
  srv.tracking = tracking_open(&tc, &error);
  if (!srv.tracking) {
    fprintf(stderr, "fuzz-control: %s\n", error->message);
    abort();
  }
  tracking_mark(srv.tracking, 0, 1 << 20);
  tracking_mark(srv.tracking, 40 << 20, 3 << 20);
  /* From here a line per checkpoint is noise (set-up errors above still
   * print). */
  log_quiet = true;
  return 0;
}

static void
check_reply(const char *line, const char *reply)
{
  size_t n = strlen(reply);
  json_object *o;

  if (n == 0 || reply[n - 1] != '\n' || memchr(reply, '\n', n - 1)) {
    fprintf(stderr, "fuzz-control: reply to '%s' is not one line: '%s'\n", line, reply);
    abort();
  }
  o = json_tokener_parse(reply);
  if (!o || !json_object_is_type(o, json_type_object) ||
      (!json_object_object_get_ex(o, "return", NULL) &&
       !json_object_object_get_ex(o, "error", NULL))) {
    fprintf(stderr, "fuzz-control: reply to '%s' is not a result: '%s'\n", line, reply);
    abort();
  }
  json_object_put(o);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  size_t pos = 0;

  while (pos < size) {
    const uint8_t *nl = memchr(data + pos, '\n', size - pos);
    size_t n = nl ? (size_t)(nl - (data + pos)) : size - pos;
    g_autofree char *line = NULL;
    g_autofree char *reply = NULL;

    if (!nl || n >= MAX_LINE)
      break;
    line = g_malloc(n + 1);
    memcpy(line, data + pos, n);
    line[n] = '\0';
    reply = control_reply(line, n);
    if (reply)
      check_reply(line, reply);
    pos += n + 1;
  }
  /* Back to "no checkpoint" for the next input. */
  tracking_checkpoint_abort(srv.tracking, NULL, NULL);
  return 0;
}
