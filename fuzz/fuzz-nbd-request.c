/* fuzz-nbd-request: the transmission request path of the NBD server
 * (lib/nbd-wire.c), the bytes a client sends after negotiation.
 *
 * Input: a 16-byte prefix of what the connection negotiated, then the
 * stream of requests:
 *   bytes 0-7   export size (big-endian)
 *   bytes 8-11  max_block: largest READ/WRITE payload (big-endian)
 *   byte  12    bit 0 read-only, bit 1 structured replies, bit 2 fast
 *               zero; bits 4-7 the number of meta contexts selected
 *   bytes 13-15 ignored
 *   then 28-byte request headers; a WRITE header is followed by its
 *   payload (as on the wire: the stream stays in step only if it is
 *   consumed), capped at what is left.
 * Each header is decoded and validated against the caps, as the worker
 * does (a bad magic ends the stream, as it drops the connection).
 *
 * Checked beyond "no crash": encode(decode(x)) == x, and a request the
 * validator accepts really satisfies the NBD spec's rules, checked here
 * independently: a known command, only the flags the command and the
 * negotiation allow, the range inside the export (computed without
 * overflow), READ/WRITE payloads within max_block, no change to a
 * read-only export, BLOCK_STATUS only with a meta context and a non-zero
 * length, FLUSH/DISC without flags or range.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cbt/nbd-proto.h"
#include "cbt/util.h"
#include "fuzz-util.h"

#define PREFIX 16

static void
fail(const char *what, const struct cbt_nbd_request *r)
{
  fprintf(stderr, "fuzz-nbd-request: %s: type %u flags 0x%x offset %llu length %u\n",
          what, r->type, r->flags, (unsigned long long)r->offset, r->length);
  abort();
}

/* The spec's rules for an accepted request (see the top of the file). */
static void
check_accepted(const struct cbt_nbd_request *r, const struct cbt_nbd_caps *c)
{
  unsigned __int128 end = (unsigned __int128)r->offset + r->length;
  uint16_t ok_flags = 0;
  bool changes = false, ranged = true;

  switch (r->type) {
  case NBD_CMD_READ:
    ok_flags = c->structured_replies ? NBD_CMD_FLAG_DF : 0;
    break;
  case NBD_CMD_WRITE:
  case NBD_CMD_TRIM:
    ok_flags = NBD_CMD_FLAG_FUA;
    changes = true;
    break;
  case NBD_CMD_WRITE_ZEROES:
    ok_flags = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE |
               (c->fast_zero ? NBD_CMD_FLAG_FAST_ZERO : 0);
    changes = true;
    break;
  case NBD_CMD_BLOCK_STATUS:
    ok_flags = NBD_CMD_FLAG_REQ_ONE;
    if (c->n_meta_contexts == 0 || r->length == 0)
      fail("BLOCK_STATUS accepted without a context or with length 0", r);
    break;
  case NBD_CMD_CACHE:
    break;
  case NBD_CMD_FLUSH:
  case NBD_CMD_DISC:
    ranged = false;
    if (r->offset || r->length)
      fail("FLUSH/DISC accepted with a range", r);
    break;
  default:
    fail("unknown command accepted", r);
  }
  if (r->flags & ~ok_flags)
    fail("flag accepted that the command or negotiation does not allow", r);
  if (ranged && end > c->export_size)
    fail("range past the end of the export accepted", r);
  if ((r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) && r->length > c->max_block)
    fail("payload larger than max_block accepted", r);
  if (changes && c->read_only)
    fail("change to a read-only export accepted", r);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  struct cbt_nbd_caps caps = { 0 };
  size_t pos = PREFIX;

  if (size < PREFIX)
    return 0;
  caps.export_size = cbt_get_be64(data);
  caps.max_block = cbt_get_be32(data + 8);
  caps.read_only = data[12] & 1;
  caps.structured_replies = data[12] & 2;
  caps.fast_zero = data[12] & 4;
  caps.n_meta_contexts = data[12] >> 4;

  while (size - pos >= NBD_REQUEST_SIZE) {
    struct cbt_nbd_request req;
    uint8_t again[NBD_REQUEST_SIZE];
    uint32_t err, payload;

    cbt_nbd_request_decode(data + pos, &req);
    cbt_nbd_request_encode(&req, again);
    if (memcmp(again, data + pos, NBD_REQUEST_SIZE) != 0)
      fail("encode(decode(x)) != x", &req);
    pos += NBD_REQUEST_SIZE;
    if (req.magic != NBD_REQUEST_MAGIC)
      break;                          /* the server drops the connection */
    err = cbt_nbd_request_validate(&req, &caps);
    if (err == NBD_SUCCESS)
      check_accepted(&req, &caps);
    else if (!cbt_nbd_err_name(err))
      fail("an error without a name", &req);
    if (!cbt_nbd_cmd_name(req.type))
      fail("a command without a name", &req);
    payload = cbt_nbd_request_payload(&req);
    pos += payload < size - pos ? payload : size - pos;
  }
  return 0;
}
