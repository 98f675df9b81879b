/* A client of cbt-filterd's control socket.
 *
 * The protocol (filterd/control.c): one JSON request per line, one JSON
 * reply per line, {"return": ...} or {"error": {"class", "desc"}}.  Every
 * command we use returns the daemon's status, so one parser serves all.
 *
 * Blocking I/O on a unix socket; reads are capped (a reply larger than
 * MAX_REPLY is a protocol error, not an allocation without bound).  EINTR
 * is retried: a backup interrupted by SIGINT still has to talk to the
 * daemon to abort its checkpoint, and the signal is seen by the caller.
 */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cli.h"

#define MAX_REPLY (1u << 20)

G_DEFINE_QUARK(cbt-control-error-quark, control_error)

struct control {
  char *path;
  int fd;
  GString *in;                  /* received bytes not yet consumed */
};

void
control_status_clear(struct control_status *st)
{
  g_free(st->uuid);
  g_free(st->checkpoint);
  g_free(st->context);
  g_free(st->cp_id);
  g_free(st->cp_previous);
  g_free(st->cp_context);
  g_free(st->pit_mode);
  g_free(st->pit_export);
  g_free(st->pit_failed);
  memset(st, 0, sizeof *st);
}

bool
control_connect(const char *path, control **out, GError **error)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  control *c;
  int fd;

  if (strlen(path) >= sizeof sa.sun_path) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_USAGE, "control socket %s: path too long", path);
    return false;
  }
  strcpy(sa.sun_path, path);
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "control socket %s: %s (is cbt-filterd running with --control?)",
                path, g_strerror(errno));
    if (fd >= 0)
      close(fd);
    return false;
  }
  c = g_new0(control, 1);
  c->path = g_strdup(path);
  c->fd = fd;
  c->in = g_string_new(NULL);
  *out = c;
  return true;
}

void
control_close(control *c)
{
  if (!c)
    return;
  close(c->fd);
  g_free(c->path);
  g_string_free(c->in, TRUE);
  g_free(c);
}

static bool
send_line(control *c, const char *line, GError **error)
{
  size_t len = strlen(line), done = 0;

  while (done < len) {
    ssize_t r = send(c->fd, line + done, len - done, MSG_NOSIGNAL);

    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "control socket %s: send: %s",
                  c->path, g_strerror(errno));
      return false;
    }
    done += (size_t)r;
  }
  return true;
}

/* One reply line, without its newline.  Caller frees. */
static char *
recv_line(control *c, GError **error)
{
  char buf[4096];

  for (;;) {
    char *nl = memchr(c->in->str, '\n', c->in->len);
    ssize_t r;

    if (nl) {
      size_t n = (size_t)(nl - c->in->str);
      char *line = g_strndup(c->in->str, n);

      g_string_erase(c->in, 0, (gssize)n + 1);
      return line;
    }
    if (c->in->len > MAX_REPLY) {
      g_set_error(error, CONTROL_ERROR, CONTROL_ERR_PROTOCOL,
                  "control socket %s: reply longer than %u bytes", c->path, MAX_REPLY);
      return NULL;
    }
    r = recv(c->fd, buf, sizeof buf, 0);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "control socket %s: %s", c->path,
                  r == 0 ? "the daemon closed the connection" : g_strerror(errno));
      return NULL;
    }
    g_string_append_len(c->in, buf, r);
  }
}

static enum control_error
class_code(const char *cls)
{
  static const struct { const char *name; enum control_error code; } map[] = {
    { "CheckpointInProgress", CONTROL_ERR_IN_PROGRESS },
    { "NoCheckpoint", CONTROL_ERR_NO_CHECKPOINT },
    { "CheckpointMismatch", CONTROL_ERR_MISMATCH },
    { "NoBitmap", CONTROL_ERR_NO_BITMAP },
    { "ReadOnly", CONTROL_ERR_READ_ONLY },
    { "BadRequest", CONTROL_ERR_BAD_REQUEST },
  };

  for (size_t i = 0; i < G_N_ELEMENTS(map); i++)
    if (strcmp(cls, map[i].name) == 0)
      return map[i].code;
  return CONTROL_ERR_GENERIC;
}

/* Typed members of the status object; absent or mistyped members are a
 * protocol error. */
static bool
member(json_object *o, const char *key, json_type type, bool nullable,
       json_object **v)
{
  *v = NULL;
  if (!o || !json_object_object_get_ex(o, key, v))
    return false;
  if (!*v)
    return nullable;
  return json_object_is_type(*v, type);
}

static bool
str_member(json_object *o, const char *key, bool nullable, char **out)
{
  json_object *v;

  if (!member(o, key, json_type_string, nullable, &v))
    return false;
  *out = v ? g_strdup(json_object_get_string(v)) : NULL;
  return true;
}

static bool
u64_member(json_object *o, const char *key, uint64_t *out)
{
  json_object *v;

  if (!member(o, key, json_type_int, false, &v))
    return false;
  *out = json_object_get_uint64(v);
  return true;
}

static bool
bool_member(json_object *o, const char *key, bool *out)
{
  json_object *v;

  if (!member(o, key, json_type_boolean, false, &v))
    return false;
  *out = json_object_get_boolean(v);
  return true;
}

static bool
parse_status(json_object *ret, struct control_status *st)
{
  json_object *bm = NULL, *cp = NULL, *pit = NULL;

  if (!u64_member(ret, "size", &st->size) ||
      !member(ret, "bitmap", json_type_object, true, &bm) ||
      !member(ret, "checkpoint", json_type_object, true, &cp))
    return false;
  st->has_bitmap = bm != NULL;
  if (bm && (!str_member(bm, "uuid", false, &st->uuid) ||
             !u64_member(bm, "granularity", &st->granularity) ||
             !bool_member(bm, "trusted", &st->trusted) ||
             !u64_member(bm, "dirty-bytes", &st->dirty_bytes) ||
             !str_member(bm, "checkpoint", true, &st->checkpoint) ||
             !str_member(bm, "context", false, &st->context)))
    return false;
  st->in_progress = cp != NULL;
  if (cp && (!str_member(cp, "checkpoint", false, &st->cp_id) ||
             !str_member(cp, "previous", true, &st->cp_previous) ||
             !bool_member(cp, "trusted", &st->cp_trusted) ||
             !u64_member(cp, "dirty-bytes", &st->cp_dirty_bytes) ||
             !str_member(cp, "context", false, &st->cp_context)))
    return false;
  /* The point-in-time view (absent from daemons before it existed). */
  if (cp && json_object_object_get_ex(cp, "point-in-time", &pit) && pit) {
    if (!json_object_is_type(pit, json_type_object) ||
        !str_member(pit, "mode", false, &st->pit_mode) ||
        !str_member(pit, "export", false, &st->pit_export) ||
        !str_member(pit, "failed", true, &st->pit_failed) ||
        !u64_member(pit, "scratch-peak", &st->pit_scratch_peak) ||
        !u64_member(pit, "copied-bytes", &st->pit_copied))
      return false;
  }
  return true;
}

/* Run @cmd with @args (taken over; may be NULL). */
static bool
execute(control *c, const char *cmd, json_object *args,
        struct control_status *st, GError **error)
{
  g_autoptr(json_object) req = json_object_new_object();
  g_autoptr(json_object) reply = NULL;
  g_autofree char *line = NULL;
  g_autofree char *in = NULL;
  json_object *ret = NULL, *err = NULL;

  if (st)
    control_status_clear(st);
  cli_json_add_str(req, "execute", cmd);
  if (args)
    json_object_object_add(req, "arguments", args);
  line = g_strdup_printf("%s\n", json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN));
  cli_debug("control: -> %s", json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN));
  if (!send_line(c, line, error) || !(in = recv_line(c, error)))
    return false;
  cli_debug("control: <- %s", in);
  reply = json_tokener_parse(in);
  if (reply && json_object_is_type(reply, json_type_object) &&
      json_object_object_get_ex(reply, "error", &err) && err &&
      json_object_is_type(err, json_type_object)) {
    json_object *cls = NULL, *desc = NULL;

    json_object_object_get_ex(err, "class", &cls);
    json_object_object_get_ex(err, "desc", &desc);
    g_set_error(error, CONTROL_ERROR,
                cls ? class_code(json_object_get_string(cls)) : CONTROL_ERR_GENERIC,
                "daemon refused %s: %s", cmd,
                desc ? json_object_get_string(desc) : "(no reason given)");
    return false;
  }
  if (!reply || !json_object_is_type(reply, json_type_object) ||
      !json_object_object_get_ex(reply, "return", &ret) || !ret ||
      (st && !parse_status(ret, st))) {
    if (st)
      control_status_clear(st);
    g_set_error(error, CONTROL_ERROR, CONTROL_ERR_PROTOCOL,
                "control socket %s: unexpected reply to %s: %.200s", c->path, cmd, in);
    return false;
  }
  return true;
}

bool
control_execute(control *c, const char *cmd, const char *checkpoint,
                struct control_status *st, GError **error)
{
  json_object *args = NULL;

  if (checkpoint) {
    args = json_object_new_object();
    cli_json_add_str(args, "checkpoint", checkpoint);
  }
  return execute(c, cmd, args, st, error);
}

bool
control_begin(control *c, const char *point_in_time, struct control_status *st,
              GError **error)
{
  json_object *args = json_object_new_object();

  cli_json_add_str(args, "point-in-time", point_in_time);
  return execute(c, "checkpoint-begin", args, st, error);
}
