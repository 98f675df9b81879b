/* The control socket (--control PATH): JSON requests and replies, one per
 * line, in the spirit of QMP.
 *
 *   -> {"execute": "status"}
 *   <- {"return": {...}}
 *   -> {"execute": "checkpoint-commit", "arguments": {"checkpoint": "9f..."}}
 *   <- {"error": {"class": "NoCheckpoint", "desc": "no checkpoint in progress"}}
 *
 * A request may carry an "id", echoed in its reply.  Commands: status,
 * checkpoint-begin {point-in-time?: full|incremental|off}, checkpoint-commit
 * {checkpoint}, checkpoint-abort {checkpoint?}.  A point-in-time begin opens
 * the NAME@checkpoint export (snapshot.c); status shows it under
 * checkpoint.point-in-time.  Checkpoint ids are 16 hex digits (strings, so no JSON
 * number precision is lost).  During an instant restore (restore.c) status
 * has a "restore" object with its progress (null without --restore-from),
 * and a point-in-time checkpoint is refused until the restore is complete:
 * the view would read the output, which does not hold the disk yet.
 *
 * Each control connection gets a thread with blocking I/O, like the NBD
 * negotiation: requests are rare and the operations (bitmap file writes
 * and fdatasync) are blocking anyway.  Lines are capped at 64 KiB and at
 * most MAX_CONTROL clients are served at once; a client gets IDLE_TIMEOUT
 * seconds for each request (counted from its connection or its last
 * reply), so clients that hang cannot lock the backups out for long.  A
 * malformed request gets an error reply and the connection stays open, an
 * over-long line closes it.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <json.h>

#include "internal.h"

#define MAX_CONTROL   64
#define MAX_LINE      (64 * 1024)
#define IDLE_TIMEOUT  30            /* seconds a client may take per request */

static struct client_threads controls = {
  .what = "control clients",
  .max = MAX_CONTROL,
};

static const char *
class_name(const GError *e)
{
  if (e->domain != CTL_ERROR)
    return "GenericError";
  switch (e->code) {
  case CTL_ERR_IN_PROGRESS: return "CheckpointInProgress";
  case CTL_ERR_NO_CHECKPOINT: return "NoCheckpoint";
  case CTL_ERR_MISMATCH: return "CheckpointMismatch";
  case CTL_ERR_NO_BITMAP: return "NoBitmap";
  case CTL_ERR_READ_ONLY: return "ReadOnly";
  case CTL_ERR_BAD_REQUEST: return "BadRequest";
  default: return "GenericError";
  }
}

static char *
hex_id(uint64_t id)
{
  return g_strdup_printf("%016" PRIx64, id);
}

/* Exactly 16 hex digits: no sign, no blanks, no 0x (strtoull takes all
 * of those). */
static bool
parse_id(const char *s, uint64_t *out)
{
  uint64_t v = 0;

  if (!s || strlen(s) != 16)
    return false;
  for (int i = 0; i < 16; i++) {
    if (!g_ascii_isxdigit(s[i]))
      return false;
    v = v << 4 | (uint64_t)g_ascii_xdigit_value(s[i]);
  }
  *out = v;
  return true;
}

static void
add_str(json_object *o, const char *k, const char *v)
{
  json_object_object_add(o, k, v ? json_object_new_string(v) : NULL);
}

static void
add_u64(json_object *o, const char *k, uint64_t v)
{
  json_object_object_add(o, k, json_object_new_int64((int64_t)v));
}

static void
add_bool(json_object *o, const char *k, bool v)
{
  json_object_object_add(o, k, json_object_new_boolean(v));
}

/* The point-in-time view of the checkpoint in progress, or null. */
static json_object *
view_json(void)
{
  struct snapshot_status vs;
  json_object *v;
  g_autofree char *name = NULL;

  if (!snapshot_get_status(&vs))
    return NULL;
  v = json_object_new_object();
  name = g_strconcat(srv.export_name, SNAPSHOT_SUFFIX, NULL);
  add_str(v, "mode", snapshot_mode_name(vs.mode));
  add_str(v, "export", name);
  add_str(v, "scratch-dir", vs.dir);
  add_u64(v, "scratch-limit", vs.limit);
  add_u64(v, "scratch-bytes", vs.used);
  add_u64(v, "scratch-peak", vs.peak);
  add_u64(v, "copied-bytes", vs.copied_bytes);
  add_u64(v, "copies", vs.copies);
  add_u64(v, "copies-pending", vs.copying);
  add_u64(v, "released-bytes", vs.released_bytes);
  add_str(v, "failed", vs.failed[0] ? vs.failed : NULL);
  return v;
}

/* The instant restore's progress, or null. */
static json_object *
restore_json(void)
{
  struct restore_status rs;
  json_object *v;

  if (!restore_get_status(&rs))
    return NULL;
  v = json_object_new_object();
  add_str(v, "source", rs.source);
  add_str(v, "state-file", rs.state);
  add_u64(v, "size", rs.size);
  add_u64(v, "granularity", rs.granularity);
  add_u64(v, "restored-bytes", rs.restored_bytes);
  add_u64(v, "durable-bytes", rs.durable_bytes);
  add_bool(v, "complete", rs.complete);
  add_str(v, "copier", rs.copier);
  add_u64(v, "rate", rs.rate);
  add_u64(v, "copier-bytes", rs.copier_bytes);
  add_u64(v, "on-demand-copy-bytes", rs.guest_copy_bytes);
  add_u64(v, "source-read-bytes", rs.source_read_bytes);
  add_bool(v, "source-open", rs.source_open);
  add_str(v, "failed", rs.failed[0] ? rs.failed : NULL);
  return v;
}

static json_object *
status_json(void)
{
  json_object *r = json_object_new_object();
  struct tracking_status st;

  add_str(r, "version", PACKAGE_VERSION);
  add_str(r, "image", srv.image_path);
  add_str(r, "format", srv.image->format);
  add_u64(r, "size", srv.image->size);
  add_bool(r, "read-only", srv.read_only);
  add_str(r, "export-name", srv.export_name);
  add_u64(r, "clients", workers_conn_count());
  json_object_object_add(r, "restore", restore_json());
  if (!srv.tracking) {
    json_object_object_add(r, "bitmap", NULL);
    json_object_object_add(r, "checkpoint", NULL);
    return r;
  }
  tracking_get_status(srv.tracking, &st);
  {
    json_object *b = json_object_new_object();
    g_autofree char *cp = hex_id(st.checkpoint);
    char uuid[37];

    snprintf(uuid, sizeof uuid,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             st.uuid[0], st.uuid[1], st.uuid[2], st.uuid[3], st.uuid[4], st.uuid[5],
             st.uuid[6], st.uuid[7], st.uuid[8], st.uuid[9], st.uuid[10], st.uuid[11],
             st.uuid[12], st.uuid[13], st.uuid[14], st.uuid[15]);
    add_str(b, "path", st.path);
    add_str(b, "name", st.name);
    add_str(b, "uuid", uuid);
    add_u64(b, "granularity", st.granularity);
    add_bool(b, "trusted", st.trusted);
    add_bool(b, "clean-at-start", st.found_clean);
    add_bool(b, "crash-safe-at-start", st.found_crash_safe);
    add_str(b, "tracking", st.crash_safe ? "crash-safe" : "lazy");
    add_u64(b, "dirty-bytes", st.dirty_bytes);
    add_str(b, "checkpoint", st.checkpoint ? cp : NULL);
    add_str(b, "context", st.context);
    json_object_object_add(r, "bitmap", b);
  }
  if (st.cp_in_progress) {
    json_object *c = json_object_new_object();
    g_autofree char *id = hex_id(st.checkpoint);
    g_autofree char *prev = hex_id(st.cp_previous);

    add_str(c, "checkpoint", id);
    add_str(c, "previous", st.cp_previous ? prev : NULL);
    add_bool(c, "trusted", st.cp_trusted);
    add_u64(c, "dirty-bytes", st.cp_dirty_bytes);
    add_str(c, "context", st.cp_context);
    json_object_object_add(c, "point-in-time", view_json());
    json_object_object_add(r, "checkpoint", c);
  } else {
    json_object_object_add(r, "checkpoint", NULL);
  }
  return r;
}

static bool
need_tracking(GError **error)
{
  if (srv.tracking)
    return true;
  g_set_error(error, CTL_ERROR, CTL_ERR_NO_BITMAP,
              "the daemon runs without --bitmap: no dirty tracking");
  return false;
}

static bool
get_id_arg(json_object *args, bool required, uint64_t *id, bool *given,
           GError **error)
{
  json_object *v = NULL;

  *given = args && json_object_object_get_ex(args, "checkpoint", &v) && v;
  if (!*given) {
    if (required)
      g_set_error(error, CTL_ERROR, CTL_ERR_BAD_REQUEST,
                  "missing argument 'checkpoint'");
    return !required;
  }
  if (!json_object_is_type(v, json_type_string) ||
      !parse_id(json_object_get_string(v), id)) {
    g_set_error(error, CTL_ERROR, CTL_ERR_BAD_REQUEST,
                "'checkpoint' must be a string of 16 hex digits");
    return false;
  }
  return true;
}

/* checkpoint-begin's optional "point-in-time": "full", "incremental" or
 * "off" (the default). */
static bool
get_mode_arg(json_object *args, enum snapshot_mode *mode, GError **error)
{
  json_object *v = NULL;
  const char *m;

  *mode = SNAP_OFF;
  if (!args || !json_object_object_get_ex(args, "point-in-time", &v) || !v)
    return true;
  m = json_object_is_type(v, json_type_string) ? json_object_get_string(v) : "";
  if (strcmp(m, "full") == 0)
    *mode = SNAP_FULL;
  else if (strcmp(m, "incremental") == 0)
    *mode = SNAP_INCREMENTAL;
  else if (strcmp(m, "off") != 0) {
    g_set_error(error, CTL_ERROR, CTL_ERR_BAD_REQUEST,
                "'point-in-time' must be \"full\", \"incremental\" or \"off\"");
    return false;
  }
  return true;
}

/* Run one request; returns the "return" value or NULL with @error set. */
static json_object *
execute(const char *cmd, json_object *args, GError **error)
{
  enum snapshot_mode mode;
  uint64_t id;
  bool given;

  if (strcmp(cmd, "status") == 0)
    return status_json();
  if (strcmp(cmd, "checkpoint-begin") == 0) {
    if (!need_tracking(error) || !get_mode_arg(args, &mode, error))
      return NULL;
    if (mode != SNAP_OFF && restore_active()) {
      g_set_error(error, CTL_ERROR, CTL_ERR_GENERIC,
                  "an instant restore is in progress: a point-in-time view needs "
                  "the whole disk in the image; back up once it is complete");
      return NULL;
    }
    if (!tracking_checkpoint_begin(srv.tracking, mode, NULL, error))
      return NULL;
    return status_json();
  }
  if (strcmp(cmd, "checkpoint-commit") == 0) {
    if (!need_tracking(error) || !get_id_arg(args, true, &id, &given, error) ||
        !tracking_checkpoint_commit(srv.tracking, id, error))
      return NULL;
    return status_json();
  }
  if (strcmp(cmd, "checkpoint-abort") == 0) {
    if (!need_tracking(error) || !get_id_arg(args, false, &id, &given, error) ||
        !tracking_checkpoint_abort(srv.tracking, given ? &id : NULL, error))
      return NULL;
    return status_json();
  }
  g_set_error(error, CTL_ERROR, CTL_ERR_BAD_REQUEST, "unknown command '%s'", cmd);
  return NULL;
}

/* Build the reply line for one request line. */
static char *
handle_line(const char *line)
{
  g_autoptr(GError) error = NULL;
  enum json_tokener_error jerr;
  json_object *req = json_tokener_parse_verbose(line, &jerr);
  json_object *reply = json_object_new_object();
  json_object *cmd = NULL, *args = NULL, *id = NULL, *ret = NULL;
  char *out;

  if (!req) {
    g_set_error(&error, CTL_ERROR, CTL_ERR_BAD_REQUEST, "malformed JSON: %s",
                json_tokener_error_desc(jerr));
  } else if (!json_object_is_type(req, json_type_object) ||
             !json_object_object_get_ex(req, "execute", &cmd) ||
             !json_object_is_type(cmd, json_type_string)) {
    g_set_error(&error, CTL_ERROR, CTL_ERR_BAD_REQUEST,
                "expected an object with a string member \"execute\"");
  } else if (json_object_object_get_ex(req, "arguments", &args) && args &&
             !json_object_is_type(args, json_type_object)) {
    g_set_error(&error, CTL_ERROR, CTL_ERR_BAD_REQUEST, "\"arguments\" must be an object");
  } else {
    ret = execute(json_object_get_string(cmd), args, &error);
  }
  if (req && json_object_is_type(req, json_type_object) &&
      json_object_object_get_ex(req, "id", &id))
    json_object_object_add(reply, "id", json_object_get(id));
  if (ret) {
    json_object_object_add(reply, "return", ret);
  } else {
    json_object *e = json_object_new_object();
    add_str(e, "class", class_name(error));
    add_str(e, "desc", error->message);
    json_object_object_add(reply, "error", e);
    debug("control: %s", error->message);
  }
  out = g_strdup_printf("%s\n", json_object_to_json_string_ext(reply, JSON_C_TO_STRING_PLAIN));
  json_object_put(reply);
  json_object_put(req);
  return out;
}

char *
control_reply(char *line, size_t len)
{
  if (len > 0 && line[len - 1] == '\r')
    line[--len] = '\0';
  if (len == 0)
    return NULL;                     /* blank lines are ignored */
  if (memchr(line, '\0', len))
    return g_strdup("{\"error\": {\"class\": \"BadRequest\", "
                    "\"desc\": \"request contains a NUL byte\"}}\n");
  return handle_line(line);
}

static bool
send_all(int fd, const char *s)
{
  size_t len = strlen(s), done = 0;

  while (done < len) {
    ssize_t r = send(fd, s + done, len - done, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;
    done += (size_t)r;
  }
  return true;
}

/* Before each receive: the time left of the client's IDLE_TIMEOUT for
 * the current request (since the last reply), as the socket's timeout;
 * false once it is over. */
static bool
arm_deadline(int fd, gint64 deadline)
{
  gint64 left = deadline - g_get_monotonic_time();
  struct timeval tv;

  if (left <= 0)
    return false;
  tv.tv_sec = left / G_USEC_PER_SEC;
  tv.tv_usec = left % G_USEC_PER_SEC;
  return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0;
}

static void *
ctl_thread(void *arg)
{
  int fd = GPOINTER_TO_INT(arg);
  g_autofree char *buf = g_malloc(MAX_LINE + 1);
  gint64 deadline = g_get_monotonic_time() + IDLE_TIMEOUT * G_USEC_PER_SEC;
  size_t have = 0;

  for (;;) {
    char *nl;
    ssize_t r;

    if (!arm_deadline(fd, deadline)) {
      debug("control: client idle for %d s; closing", IDLE_TIMEOUT);
      break;
    }
    r = recv(fd, buf + have, MAX_LINE - have, 0);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
      continue;                      /* the deadline check closes it */
    if (r <= 0)
      break;
    have += (size_t)r;
    while ((nl = memchr(buf, '\n', have))) {
      g_autofree char *reply = NULL;
      size_t n = (size_t)(nl - buf);

      *nl = '\0';
      reply = control_reply(buf, n);
      memmove(buf, nl + 1, have - (size_t)(nl + 1 - buf));
      have -= (size_t)(nl + 1 - buf);
      if (reply && !send_all(fd, reply))
        goto out;
      if (reply)
        deadline = g_get_monotonic_time() + IDLE_TIMEOUT * G_USEC_PER_SEC;
    }
    if (have == MAX_LINE) {
      send_all(fd, "{\"error\": {\"class\": \"BadRequest\", \"desc\": \"request longer than 64 KiB\"}}\n");
      break;
    }
  }
out:
  client_threads_done(&controls, fd);
  return NULL;
}

void
control_start(int fd)
{
  if (!client_threads_start(&controls, fd, "control", ctl_thread, GINT_TO_POINTER(fd))) {
    /* Say why before closing; never wait for a client that does not read. */
    static const char msg[] = "{\"error\": {\"class\": \"GenericError\", \"desc\": "
                              "\"too many control clients at once\"}}\n";

    (void)!send(fd, msg, sizeof msg - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    close(fd);
  }
}

void
control_stop_all(void)
{
  client_threads_stop_all(&controls);
}
