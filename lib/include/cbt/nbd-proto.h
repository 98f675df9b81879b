/* NBD protocol constants and wire encodings shared by cbt-filterd and the
 * cbt CLI.
 *
 * Values follow the NBD protocol document (fixed newstyle negotiation,
 * structured replies, meta contexts).  Every multi-byte field on the wire
 * is big-endian; the structs below are the decoded host-order forms and the
 * cbt_nbd_*_decode/encode helpers in nbd-wire.c convert to and from bytes,
 * so no code ever casts a network buffer to a struct.
 */
#ifndef CBT_NBD_PROTO_H
#define CBT_NBD_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Handshake. */
#define NBD_MAGIC                    UINT64_C(0x4e42444d41474943) /* "NBDMAGIC" */
#define NBD_IHAVEOPT                 UINT64_C(0x49484156454f5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC                UINT64_C(0x0003e889045565a9)

#define NBD_FLAG_FIXED_NEWSTYLE      (1u << 0)
#define NBD_FLAG_NO_ZEROES           (1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE    (1u << 0)
#define NBD_FLAG_C_NO_ZEROES         (1u << 1)

/* Transmission flags (per export). */
#define NBD_FLAG_HAS_FLAGS           (1u << 0)
#define NBD_FLAG_READ_ONLY           (1u << 1)
#define NBD_FLAG_SEND_FLUSH          (1u << 2)
#define NBD_FLAG_SEND_FUA            (1u << 3)
#define NBD_FLAG_ROTATIONAL          (1u << 4)
#define NBD_FLAG_SEND_TRIM           (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES   (1u << 6)
#define NBD_FLAG_SEND_DF             (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN      (1u << 8)
#define NBD_FLAG_SEND_RESIZE         (1u << 9)
#define NBD_FLAG_SEND_CACHE          (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO      (1u << 11)

/* Options. */
#define NBD_OPT_EXPORT_NAME          1
#define NBD_OPT_ABORT                2
#define NBD_OPT_LIST                 3
#define NBD_OPT_PEEK_EXPORT          4
#define NBD_OPT_STARTTLS             5
#define NBD_OPT_INFO                 6
#define NBD_OPT_GO                   7
#define NBD_OPT_STRUCTURED_REPLY     8
#define NBD_OPT_LIST_META_CONTEXT    9
#define NBD_OPT_SET_META_CONTEXT     10
#define NBD_OPT_EXTENDED_HEADERS     11

/* Option replies. */
#define NBD_REP_ACK                  1
#define NBD_REP_SERVER               2
#define NBD_REP_INFO                 3
#define NBD_REP_META_CONTEXT         4
#define NBD_REP_FLAG_ERROR           (1u << 31)
#define NBD_REP_ERR_UNSUP            (NBD_REP_FLAG_ERROR | 1)
#define NBD_REP_ERR_POLICY           (NBD_REP_FLAG_ERROR | 2)
#define NBD_REP_ERR_INVALID          (NBD_REP_FLAG_ERROR | 3)
#define NBD_REP_ERR_PLATFORM         (NBD_REP_FLAG_ERROR | 4)
#define NBD_REP_ERR_TLS_REQD         (NBD_REP_FLAG_ERROR | 5)
#define NBD_REP_ERR_UNKNOWN          (NBD_REP_FLAG_ERROR | 6)
#define NBD_REP_ERR_SHUTDOWN         (NBD_REP_FLAG_ERROR | 7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD  (NBD_REP_FLAG_ERROR | 8)
#define NBD_REP_ERR_TOO_BIG          (NBD_REP_FLAG_ERROR | 9)

/* NBD_REP_INFO types. */
#define NBD_INFO_EXPORT              0
#define NBD_INFO_NAME                1
#define NBD_INFO_DESCRIPTION         2
#define NBD_INFO_BLOCK_SIZE          3

/* Transmission. */
#define NBD_REQUEST_MAGIC            UINT32_C(0x25609513)
#define NBD_SIMPLE_REPLY_MAGIC       UINT32_C(0x67446698)
#define NBD_STRUCTURED_REPLY_MAGIC   UINT32_C(0x668e33ef)

#define NBD_CMD_READ                 0
#define NBD_CMD_WRITE                1
#define NBD_CMD_DISC                 2
#define NBD_CMD_FLUSH                3
#define NBD_CMD_TRIM                 4
#define NBD_CMD_CACHE                5
#define NBD_CMD_WRITE_ZEROES         6
#define NBD_CMD_BLOCK_STATUS         7

#define NBD_CMD_FLAG_FUA             (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE         (1u << 1)
#define NBD_CMD_FLAG_DF              (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE         (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO       (1u << 4)

#define NBD_REPLY_FLAG_DONE          (1u << 0)
#define NBD_REPLY_TYPE_NONE          0
#define NBD_REPLY_TYPE_OFFSET_DATA   1
#define NBD_REPLY_TYPE_OFFSET_HOLE   2
#define NBD_REPLY_TYPE_BLOCK_STATUS  5
#define NBD_REPLY_TYPE_ERROR         ((1u << 15) | 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET  ((1u << 15) | 2)

/* Error values on the wire (not host errno values). */
#define NBD_SUCCESS                  0
#define NBD_EPERM                    1
#define NBD_EIO                      5
#define NBD_ENOMEM                   12
#define NBD_EINVAL                   22
#define NBD_ENOSPC                   28
#define NBD_EOVERFLOW                75
#define NBD_ENOTSUP                  95
#define NBD_ESHUTDOWN                108

/* Meta context "base:allocation" flags. */
#define NBD_STATE_HOLE               (1u << 0)
#define NBD_STATE_ZERO               (1u << 1)
/* Meta context "qemu:dirty-bitmap:NAME" flag (QEMU's convention). */
#define NBD_STATE_DIRTY              (1u << 0)

#define NBD_META_BASE_ALLOCATION     "base:allocation"
#define NBD_META_DIRTY_PREFIX        "qemu:dirty-bitmap:"

/* Sizes of the fixed wire headers. */
#define NBD_REQUEST_SIZE             28
#define NBD_SIMPLE_REPLY_SIZE        16
#define NBD_CHUNK_HEADER_SIZE        20
#define NBD_OPT_HEADER_SIZE          16
#define NBD_OPT_REPLY_HEADER_SIZE    20

/* Limits we advertise and enforce. */
#define CBT_NBD_MIN_BLOCK            1u
#define CBT_NBD_PREF_BLOCK           4096u
#define CBT_NBD_MAX_BLOCK            (32u * 1024 * 1024)
#define CBT_NBD_MAX_OPTION_LEN       (64u * 1024)   /* longest option we read */
#define CBT_NBD_MAX_NAME_LEN         4096u          /* per the spec */

/* A decoded transmission request. */
struct cbt_nbd_request {
  uint32_t magic;
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint64_t offset;
  uint32_t length;
};

/* What a connection has negotiated, for validation. */
struct cbt_nbd_caps {
  uint64_t export_size;
  uint32_t max_block;          /* largest READ/WRITE payload accepted */
  bool read_only;
  bool structured_replies;
  bool fast_zero;              /* export can honour NBD_CMD_FLAG_FAST_ZERO */
  unsigned n_meta_contexts;    /* selected with SET_META_CONTEXT */
};

/* Decoders read exactly the fixed header size from @buf. */
void cbt_nbd_request_decode(const uint8_t buf[NBD_REQUEST_SIZE],
                            struct cbt_nbd_request *req);
void cbt_nbd_request_encode(const struct cbt_nbd_request *req,
                            uint8_t buf[NBD_REQUEST_SIZE]);
void cbt_nbd_simple_reply_encode(uint8_t buf[NBD_SIMPLE_REPLY_SIZE],
                                 uint32_t error, uint64_t cookie);
void cbt_nbd_chunk_header_encode(uint8_t buf[NBD_CHUNK_HEADER_SIZE],
                                 uint16_t flags, uint16_t type,
                                 uint64_t cookie, uint32_t length);
void cbt_nbd_opt_reply_encode(uint8_t buf[NBD_OPT_REPLY_HEADER_SIZE],
                              uint32_t option, uint32_t reply,
                              uint32_t length);

/* Validate a decoded request against what the connection negotiated.
 *
 * Returns NBD_SUCCESS or the NBD error to send back (the connection stays
 * usable: the caller still has to consume a WRITE payload, see
 * cbt_nbd_request_payload).  Never fails on magic: a bad magic is a broken
 * stream and the caller drops the connection before calling this.
 */
uint32_t cbt_nbd_request_validate(const struct cbt_nbd_request *req,
                                  const struct cbt_nbd_caps *caps);

/* Bytes of payload that follow @req on the wire (the WRITE data), whatever
 * the validation outcome: the stream stays in sync only if they are read. */
static inline uint32_t
cbt_nbd_request_payload(const struct cbt_nbd_request *req)
{
  return req->type == NBD_CMD_WRITE ? req->length : 0;
}

/* Name of a command or an NBD error, for logs. */
const char *cbt_nbd_cmd_name(uint16_t type);
const char *cbt_nbd_err_name(uint32_t err);
/* Map a host errno (positive) to the NBD error to send. */
uint32_t cbt_nbd_errno_to_wire(int err);

#endif
