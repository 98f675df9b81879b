/* fuzz-nbd-options: the NBD option negotiation (filterd/negotiate.c), the
 * state machine the daemon's negotiation loop drives for every client.
 *
 * Input: the bytes a client sends after the server's greeting.  They are
 * fed the way handshake.c feeds a socket: into the buffer the machine
 * offers, never more than it asks for, in pieces whose sizes come from
 * the machine (a real client's bytes may arrive split anywhere; the
 * machine only sees the sizes it asked for, so splitting differently
 * cannot change what it does).  Whatever it queues is taken as sent.
 *
 * Checks, after every input: the output is the 18-byte greeting followed
 * by well-formed option replies (reply magic, a length that fits), plus,
 * when NBD_OPT_EXPORT_NAME ended the negotiation, its 10- or 134-byte
 * answer; a negotiation that ends never asks for more bytes.
 *
 * The daemon state is set up once, as cbt-filterd --image memory:64M
 * --export-name fuzz --description ... --bitmap DIR/fuzz.bitmap would,
 * with a checkpoint in progress that has a point-in-time view, so the
 * fuzz@checkpoint export, its meta contexts and qemu:dirty-bitmap:cbt
 * all exist.  TLS is on (--tls=on): a STARTTLS is acknowledged and the
 * negotiation goes on as if the handshake had succeeded, so the rules for
 * options after TLS are covered; --tls=require and the TLS layer itself
 * are not.  Not covered: the socket I/O and deadlines of handshake.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cbt/util.h"
#include "fuzz-util.h"
#include "internal.h"

struct server srv;

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *why = NULL;
  g_autofree char *bitmap_path = NULL;
  const char *dir = fuzz_dir("nbd-options");
  struct tracking_config tc = {
    .name = "cbt",
    .crash_safe = false,
  };

  (void)argc;
  (void)argv;
  log_quiet = true;                  /* a line per refused input is noise */
  bitmap_path = fuzz_path("fuzz.bitmap");
  tc.path = bitmap_path;
  srv.image_path = "memory:64M";
  srv.export_name = "fuzz";
  srv.description = "a disk for the fuzzer";
  srv.scratch_dir = dir;
  srv.n_workers = 1;
  srv.tls_mode = TLS_ON;             /* STARTTLS is answered (see below) */
  if (cbt_image_open_memory("64M", false, &srv.image, &why) < 0) {
    fprintf(stderr, "fuzz-nbd-options: memory image: %s\n", why);
    abort();
  }
  srv.tracking = tracking_open(&tc, &error);
  if (!srv.tracking) {
    fprintf(stderr, "fuzz-nbd-options: %s\n", error->message);
    abort();
  }
  tracking_mark(srv.tracking, 0, 1 << 20);
  if (!tracking_checkpoint_begin(srv.tracking, SNAP_FULL, NULL, &error)) {
    fprintf(stderr, "fuzz-nbd-options: checkpoint-begin: %s\n", error->message);
    abort();
  }
  return 0;
}

/* The server's output must be the greeting and option replies, and at
 * the very end (@state NEGO_DONE) possibly EXPORT_NAME's answer. */
static void
check_output(const uint8_t *out, size_t len, enum nego_state state)
{
  size_t pos = 18;

  if (len < 18 || cbt_get_be64(out) != NBD_MAGIC ||
      cbt_get_be64(out + 8) != NBD_IHAVEOPT) {
    fprintf(stderr, "fuzz-nbd-options: no greeting\n");
    abort();
  }
  while (pos < len) {
    size_t left = len - pos;
    uint32_t dlen;

    if (left >= NBD_OPT_REPLY_HEADER_SIZE &&
        cbt_get_be64(out + pos) == NBD_REP_MAGIC) {
      dlen = cbt_get_be32(out + pos + 16);
      if (dlen > left - NBD_OPT_REPLY_HEADER_SIZE) {
        fprintf(stderr, "fuzz-nbd-options: reply at %zu claims %u bytes, %zu left\n",
                pos, dlen, left - NBD_OPT_REPLY_HEADER_SIZE);
        abort();
      }
      pos += NBD_OPT_REPLY_HEADER_SIZE + dlen;
      continue;
    }
    if (state == NEGO_DONE && (left == 10 || left == 134) &&
        cbt_get_be64(out + pos) == srv.image->size)
      return;
    fprintf(stderr, "fuzz-nbd-options: garbage in the output at %zu (%zu left)\n",
            pos, left);
    abort();
  }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  struct nego *n = nego_new("fuzz");
  g_autoptr(GByteArray) out = g_byte_array_new();
  size_t pos = 0, len;
  const void *o;

  for (;;) {
    void *buf;

    o = nego_output(n, &len);
    g_byte_array_append(out, o, (guint)len);
    nego_sent(n, len);
    if (nego_state(n) == NEGO_STARTTLS) {
      nego_tls_started(n);           /* as if the handshake succeeded */
      continue;
    }
    buf = nego_recv_buf(n, &len);
    if (nego_state(n) != NEGO_RUNNING) {
      if (len != 0) {
        fprintf(stderr, "fuzz-nbd-options: a finished negotiation asks for %zu bytes\n", len);
        abort();
      }
      break;
    }
    if (len == 0) {
      fprintf(stderr, "fuzz-nbd-options: a running negotiation asks for nothing\n");
      abort();
    }
    if (pos == size)
      break;
    len = MIN(len, size - pos);
    memcpy(buf, data + pos, len);
    nego_received(n, len);
    pos += len;
  }
  check_output(out->data, out->len, nego_state(n));
  nego_free(n);
  return 0;
}
