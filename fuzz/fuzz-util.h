/* Helpers shared by the fuzz targets (fuzz/README.md).
 *
 * Targets whose code under test opens files by path get a private
 * directory, created once per process under /dev/shm (a tmpfs, so the
 * fdatasync calls of the code under test cost nothing) or $TMPDIR, and
 * removed with everything in it when the process exits.  Nothing a target
 * does ever touches a file outside it.
 */
#ifndef CBT_FUZZ_UTIL_H
#define CBT_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* libFuzzer's entry points (defined by each target). */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* The process's private directory ("cbt-fuzz-@name.XXXXXX"), created on
 * the first call; aborts if it cannot be made (the fuzzer cannot run). */
const char *fuzz_dir(const char *name);

/* @dir/@file, g_free'd by the caller. */
char *fuzz_path(const char *file);

/* Replace @path with exactly @len bytes of @data; aborts on failure (a
 * full tmpfs is the machine's problem, not a finding). */
void fuzz_write_file(const char *path, const void *data, size_t len);

/* Remove every file in the private directory (not the directory). */
void fuzz_clear_dir(void);

#endif
