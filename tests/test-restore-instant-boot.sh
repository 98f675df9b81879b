#!/usr/bin/env bash
# A TCG guest boots from a disk that cbt restore --instant is still
# copying.  The disk (1 GiB, sparse) holds a hand-made boot sector that
# prints a line on the serial port, reads the disk's last sector through
# the BIOS (int 13h, extended read) and prints the text it finds there.
# Both are in the backup only: the disk the backup was taken from is
# wiped afterwards.  The restore copies at 1 MiB/s, so the last sector is
# far from copied when the guest reads it: it comes from the backup on
# demand (status counts the bytes read from the backup).  The check is
# the serial output, with a hang guard, not a time limit.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-system-x86_64 jq
export CBT_FILTERD             # cbt restore --instant runs it

disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
size=$((1 << 30))
truncate -s $size "$disk"

# The boot sector: 16-bit code assembled from this (GNU as, .code16):
#   cli; xor ax,ax; mov ds,ax; mov ss,ax; mov sp,0x7c00; sti; cld
#   mov si,msg1; call print
#   mov dl,0x80; mov ah,0x42; mov si,dap; int 0x13; jc fail  ; LBA -> 0000:8000
#   mov si,0x8000; call print; jmp halt
#   fail: mov si,msgfail; call print
#   halt: cli; hlt; jmp halt
#   print: mov dx,0x3f8; 1: lodsb; test al,al; jz 2f; out dx,al; jmp 1b; 2: ret
#   dap: .byte 16,0; .word 1, 0x8000, 0; lba: .quad 0       ; at offset 67
#   msg1: .asciz "cbt boot sector\r\n"; msgfail: .asciz "disk read failed\r\n"
"$PYTHON" - "$tmp/mbr.bin" "$tmp/last.bin" $((size / 512 - 1)) <<'PYEOF'
import struct, sys
code = bytes.fromhex(
    "fa31c08ed88ed0bc007cfbfcbe4b7ce81d00b280b442be3b7ccd137208be0080e80c00"
    "eb06be5d7ce80400faf4ebfcbaf803ac84c07403eeebf8c31000010000800000000000"
    "000000000063627420626f6f7420736563746f720d0a006469736b2072656164206661"
    "696c65640d0a00")
mbr = bytearray(code.ljust(510, b"\0") + b"\x55\xaa")
mbr[67:75] = struct.pack("<Q", int(sys.argv[3]))
open(sys.argv[1], "wb").write(mbr)
open(sys.argv[2], "wb").write(b"CBT-INSTANT-RESTORE-BOOTED\r\n".ljust(512, b"\0"))
PYEOF

start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
dpid=$pid
dd if="$tmp/mbr.bin" of="$disk" conv=notrunc status=none
dd if="$tmp/last.bin" of="$disk" bs=512 seek=$((size / 512 - 1)) conv=notrunc status=none
cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full >/dev/null 2>&1 ||
    die "cbt backup failed"
# The machine is gone: only the backup has the boot sector now.
qio -f raw "$uri" -c "write -z 0 64k" -c "write -z $((size - 65536)) 64k"
stop_filterd "$dpid"

out=$tmp/restored.qcow2
isock=$tmp/instant.sock
ictl=$tmp/instant-ctl.sock
"$CBT_CLI" restore --instant --repo "$repo" --output "$out" --socket "$isock" \
    --control "$ictl" --pid-file "$tmp/instant.pid" --rate 1M >"$tmp/instant.log" 2>&1 &
ipid=$!
_daemon_log[$ipid]=$tmp/instant.log
cleanup_fn _kill_daemon "$ipid"
wait_for_word "$tmp/instant.pid" "$ipid" "$ipid"

serial=$tmp/serial.txt
: >"$serial"
# The guest halts for good after printing; it is killed once the serial
# output is in (wait_for_word's 60 s are the hang guard).
qemu-system-x86_64 -accel tcg -machine pc -m 64 -nographic \
    -nodefaults -no-reboot -serial "file:$serial" -monitor none \
    -drive "file.driver=nbd,file.server.type=unix,file.server.path=$isock,format=raw,if=ide" \
    </dev/null >"$tmp/qemu.log" 2>&1 &
qpid=$!
cleanup_fn _kill_daemon "$qpid"
wait_for_word "$serial" 'CBT-INSTANT-RESTORE-BOOTED\|disk read failed' "$qpid"
grep -q "cbt boot sector" "$serial" || die "no boot sector line: $(cat "$serial")"
grep -q "CBT-INSTANT-RESTORE-BOOTED" "$serial" ||
    die "the guest could not read its disk's last sector: $(cat "$serial")"
_kill_daemon "$qpid" || true

st=$(ctl "$ictl" '{"execute":"status"}' | jq -c '.return.restore')
json_true '.complete == false and ."source-read-bytes" > 0' "$st" ||
    die "the guest's reads were not served from the backup: $st"
stop_filterd "$ipid"
echo ok
