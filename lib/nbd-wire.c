/* NBD wire encoding and request validation.
 *
 * Pure functions: byte-order conversion of the fixed headers and the
 * checks every transmission request passes before it is dispatched.  The
 * daemon and the unit tests share them, so what the tests prove about
 * validation is what the server does.
 */
#include <endian.h>
#include <errno.h>
#include <string.h>

#include "cbt/nbd-proto.h"
#include "cbt/util.h"


void
cbt_nbd_request_decode(const uint8_t buf[NBD_REQUEST_SIZE],
                       struct cbt_nbd_request *req)
{
  req->magic = cbt_get_be32(buf);
  req->flags = cbt_get_be16(buf + 4);
  req->type = cbt_get_be16(buf + 6);
  req->cookie = cbt_get_be64(buf + 8);
  req->offset = cbt_get_be64(buf + 16);
  req->length = cbt_get_be32(buf + 24);
}

void
cbt_nbd_request_encode(const struct cbt_nbd_request *req,
                       uint8_t buf[NBD_REQUEST_SIZE])
{
  cbt_put_be32(buf, req->magic);
  cbt_put_be16(buf + 4, req->flags);
  cbt_put_be16(buf + 6, req->type);
  cbt_put_be64(buf + 8, req->cookie);
  cbt_put_be64(buf + 16, req->offset);
  cbt_put_be32(buf + 24, req->length);
}

void
cbt_nbd_simple_reply_encode(uint8_t buf[NBD_SIMPLE_REPLY_SIZE],
                            uint32_t error, uint64_t cookie)
{
  cbt_put_be32(buf, NBD_SIMPLE_REPLY_MAGIC);
  cbt_put_be32(buf + 4, error);
  cbt_put_be64(buf + 8, cookie);
}

void
cbt_nbd_chunk_header_encode(uint8_t buf[NBD_CHUNK_HEADER_SIZE],
                            uint16_t flags, uint16_t type,
                            uint64_t cookie, uint32_t length)
{
  cbt_put_be32(buf, NBD_STRUCTURED_REPLY_MAGIC);
  cbt_put_be16(buf + 4, flags);
  cbt_put_be16(buf + 6, type);
  cbt_put_be64(buf + 8, cookie);
  cbt_put_be32(buf + 16, length);
}

void
cbt_nbd_opt_reply_encode(uint8_t buf[NBD_OPT_REPLY_HEADER_SIZE],
                         uint32_t option, uint32_t reply, uint32_t length)
{
  cbt_put_be64(buf, NBD_REP_MAGIC);
  cbt_put_be32(buf + 8, option);
  cbt_put_be32(buf + 12, reply);
  cbt_put_be32(buf + 16, length);
}

/* Flags each command may carry; anything else is EINVAL. */
static uint16_t
allowed_flags(uint16_t type, const struct cbt_nbd_caps *caps)
{
  switch (type) {
  case NBD_CMD_READ:
    return caps->structured_replies ? NBD_CMD_FLAG_DF : 0;
  case NBD_CMD_WRITE:
  case NBD_CMD_TRIM:
    return NBD_CMD_FLAG_FUA;
  case NBD_CMD_WRITE_ZEROES:
    return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE |
           (caps->fast_zero ? NBD_CMD_FLAG_FAST_ZERO : 0);
  case NBD_CMD_BLOCK_STATUS:
    return NBD_CMD_FLAG_REQ_ONE;
  default:
    return 0;
  }
}

uint32_t
cbt_nbd_request_validate(const struct cbt_nbd_request *req,
                         const struct cbt_nbd_caps *caps)
{
  uint64_t end;
  bool writes = false;

  switch (req->type) {
  case NBD_CMD_READ:
  case NBD_CMD_CACHE:
  case NBD_CMD_BLOCK_STATUS:
    break;
  case NBD_CMD_WRITE:
  case NBD_CMD_TRIM:
  case NBD_CMD_WRITE_ZEROES:
    writes = true;
    break;
  case NBD_CMD_FLUSH:
  case NBD_CMD_DISC:
    /* No range: offset and length must be zero. */
    if (req->flags != 0 || req->offset != 0 || req->length != 0)
      return NBD_EINVAL;
    return NBD_SUCCESS;
  default:
    return NBD_EINVAL;
  }

  if (req->flags & ~allowed_flags(req->type, caps))
    return NBD_EINVAL;
  if (req->type == NBD_CMD_BLOCK_STATUS && caps->n_meta_contexts == 0)
    return NBD_EINVAL;

  /* A WRITE payload or READ buffer is capped; commands without payload may
   * span the whole export. */
  if ((req->type == NBD_CMD_READ || req->type == NBD_CMD_WRITE) &&
      req->length > caps->max_block)
    return NBD_EOVERFLOW;
  if (req->length == 0 && req->type == NBD_CMD_BLOCK_STATUS)
    return NBD_EINVAL;

  if (__builtin_add_overflow(req->offset, (uint64_t)req->length, &end))
    return NBD_EINVAL;
  if (end > caps->export_size)
    return writes ? NBD_ENOSPC : NBD_EINVAL;

  if (writes && caps->read_only)
    return NBD_EPERM;
  return NBD_SUCCESS;
}

const char *
cbt_nbd_cmd_name(uint16_t type)
{
  switch (type) {
  case NBD_CMD_READ: return "READ";
  case NBD_CMD_WRITE: return "WRITE";
  case NBD_CMD_DISC: return "DISC";
  case NBD_CMD_FLUSH: return "FLUSH";
  case NBD_CMD_TRIM: return "TRIM";
  case NBD_CMD_CACHE: return "CACHE";
  case NBD_CMD_WRITE_ZEROES: return "WRITE_ZEROES";
  case NBD_CMD_BLOCK_STATUS: return "BLOCK_STATUS";
  default: return "unknown";
  }
}

const char *
cbt_nbd_err_name(uint32_t err)
{
  switch (err) {
  case NBD_SUCCESS: return "success";
  case NBD_EPERM: return "EPERM";
  case NBD_EIO: return "EIO";
  case NBD_ENOMEM: return "ENOMEM";
  case NBD_EINVAL: return "EINVAL";
  case NBD_ENOSPC: return "ENOSPC";
  case NBD_EOVERFLOW: return "EOVERFLOW";
  case NBD_ENOTSUP: return "ENOTSUP";
  case NBD_ESHUTDOWN: return "ESHUTDOWN";
  default: return "unknown error";
  }
}

uint32_t
cbt_nbd_errno_to_wire(int err)
{
  switch (err) {
  case 0: return NBD_SUCCESS;
  case EPERM: case EROFS: case EACCES: return NBD_EPERM;
  case ENOMEM: return NBD_ENOMEM;
  case EINVAL: return NBD_EINVAL;
  case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
  case EOVERFLOW: return NBD_EOVERFLOW;
  case ENOTSUP: return NBD_ENOTSUP;
  case ESHUTDOWN: return NBD_ESHUTDOWN;
  default: return NBD_EIO;
  }
}
