#!/usr/bin/env python3
"""Run a command and record the peak summed RSS of all its descendants.

`/usr/bin/time -f %M` reports the largest single process only, so a tool
that works with helper processes (vbackup reads qcow2 through a private
qemu-nbd) would look lighter than it is. This wrapper samples the resident
memory of every descendant of the command every 100 ms (often enough for runs of seconds, rarely enough not to steal CPU from the tools measured), sums it, and writes
the peak in KiB to OUT. The command itself (usually /usr/bin/time) is not
counted. Exits with the command's status.

Usage: peak_rss.py OUT COMMAND [ARG...]
"""
import os
import subprocess
import sys
import time

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def processes():
    """{pid: (parent pid, rss in KiB)} of all live processes."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/statm") as f:
                rss_pages = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        table[int(name)] = (ppid, rss_pages * PAGE_KIB)
    return table


def descendants_rss(root):
    """Summed RSS (KiB) of all descendants of root, root excluded."""
    table = processes()
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        total += table[pid][1]
        todo.extend(children.get(pid, []))
    return total


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, cmd = sys.argv[1], sys.argv[2:]
    proc = subprocess.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, descendants_rss(proc.pid))
        time.sleep(0.1)
    with open(out, "w") as f:
        f.write(f"{peak}\n")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
