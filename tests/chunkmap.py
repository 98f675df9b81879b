"""Where a backup file's guest data lies in its checksum chunks, for the
tests that damage one chunk and read around it.

cbt backup copies over several connections, so a qcow2 file's data
clusters are in the order they arrived, not in guest order: which guest
bytes a chunk holds is read from `qemu-img map` of the file.

    import chunkmap
    m = chunkmap.Map(path)               # the file's data extents
    g = m.guest_of(host)                 # guest offset stored at file offset @host
    m.chunk_of(guest)                    # chunk holding guest byte @guest, or None
    m.clusters(64 << 20, 65536)          # (guest, chunk) of each data cluster

Tests run with PYTHONPATH pointing at tests/ (functions.sh exports it).
"""
import bisect
import json
import subprocess

CHUNK = 64 << 20                        # REPO_CHUNK_SIZE


class Map:
    def __init__(self, path, chunk=CHUNK):
        out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", path],
                             check=True, capture_output=True, text=True).stdout
        self.chunk = chunk
        # (guest start, length, host start), data only, by guest offset.
        self.ext = sorted((e["start"], e["length"], e["offset"]) for e in json.loads(out)
                          if e.get("data") and e.get("offset") is not None)
        self.starts = [e[0] for e in self.ext]

    def guest_of(self, host):
        for g, n, h in self.ext:
            if h <= host < h + n:
                return g + (host - h)
        raise SystemExit(f"no guest offset is stored at file offset {host}")

    def chunk_of(self, guest):
        i = bisect.bisect_right(self.starts, guest) - 1
        if i < 0:
            return None
        g, n, h = self.ext[i]
        return (h + guest - g) // self.chunk if guest < g + n else None

    def clusters(self, size, cluster):
        """(guest offset, chunk) of every data cluster of a disk of @size."""
        return [(g, c) for g in range(0, size, cluster)
                if (c := self.chunk_of(g)) is not None]
