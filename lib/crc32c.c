/* Software CRC32C (Castagnoli), slicing-by-8.
 *
 * Eight 256-entry tables let the main loop consume eight bytes per step
 * with table lookups only; the head and tail bytes go one at a time through
 * table 0.  The tables are computed once, on first use, under
 * pthread_once, so any thread may call cbt_crc32c() at any time.
 *
 * Bytes are fed in order regardless of host byte order: the 8-byte step
 * loads its input byte by byte, so the result is the same on big- and
 * little-endian hosts.
 */
#include <pthread.h>

#include "cbt/crc32c.h"

#define CRC32C_POLY_REFLECTED 0x82F63B78u

static uint32_t crc_table[8][256];
static pthread_once_t crc_table_once = PTHREAD_ONCE_INIT;

static void
crc_table_init(void)
{
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;

    for (int k = 0; k < 8; k++)
      c = (c & 1) ? (c >> 1) ^ CRC32C_POLY_REFLECTED : c >> 1;
    crc_table[0][i] = c;
  }
  /* Table t advances a byte's contribution by t further zero bytes. */
  for (uint32_t i = 0; i < 256; i++)
    for (int t = 1; t < 8; t++)
      crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^
                        crc_table[0][crc_table[t - 1][i] & 0xff];
}

uint32_t
cbt_crc32c(uint32_t crc, const void *buf, size_t len)
{
  const uint8_t *p = buf;

  pthread_once(&crc_table_once, crc_table_init);
  crc = ~crc;
  while (len >= 8) {
    uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 |
                         (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);

    crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
          crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
          crc_table[3][p[4]] ^ crc_table[2][p[5]] ^
          crc_table[1][p[6]] ^ crc_table[0][p[7]];
    p += 8;
    len -= 8;
  }
  while (len--)
    crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
  return ~crc;
}
