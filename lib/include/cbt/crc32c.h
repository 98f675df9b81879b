/* CRC32C (Castagnoli) in software.
 *
 * Used for every checksum in the bitmap file (bitmap-format.md).  The
 * polynomial is 0x1EDC6F41 (reflected 0x82F63B78), initial value and final
 * XOR 0xFFFFFFFF, as in iSCSI, ext4 and btrfs; the check value of the ASCII
 * string "123456789" is 0xE3069283.
 */
#ifndef CBT_CRC32C_H
#define CBT_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continue a CRC32C over @len bytes of @buf.  Start with @crc = 0; feed the
 * result back in to checksum data given in pieces (zlib's crc32 style: the
 * pre- and post-inversion happen inside).  Thread-safe. */
uint32_t cbt_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
