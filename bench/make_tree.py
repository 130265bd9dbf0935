#!/usr/bin/env python3
"""Build the file tree that becomes the benchmark disk's filesystem.

Picks a deterministic random sample of the regular files under SRC until
their total size reaches BUDGET bytes, and recreates them under DEST with
their relative paths. Files are hard-linked when SRC and DEST share a
filesystem (no copy), else copied. Sampling across the whole tree (rather
than taking the first N bytes in path order) gives a realistic mix of
binaries, libraries, text and already-compressed data.
"""
import argparse
import os
import random
import shutil
import sys


def list_files(src):
    """All regular files under src as (relative path, size), sorted."""
    files = []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if os.path.stat.S_ISREG(st.st_mode) and st.st_size > 0:
                files.append((os.path.relpath(path, src), st.st_size))
    return files


def sample(files, budget, seed):
    """A seeded random subset of files adding up to at most budget bytes."""
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total + files[i][1] > budget:
            continue  # would overshoot: a smaller file may still fit
        chosen.append(i)
        total += files[i][1]
        if total >= budget * 0.99:
            break
    return sorted(chosen), total


def place(src, dest, rel):
    """Hard-link (or copy, across filesystems) src/rel to dest/rel."""
    target = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.link(os.path.join(src, rel), target)
    except OSError:
        shutil.copy2(os.path.join(src, rel), target)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("budget", type=int, help="bytes of file data to select")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    files = list_files(args.src)
    chosen, total = sample(files, args.budget, args.seed)
    if total < args.budget * 0.9:
        sys.exit(f"{args.src} holds only {total} bytes of files, "
                 f"{args.budget} wanted: choose a larger BENCH_SRC")
    for i in chosen:
        place(args.src, args.dest, files[i][0])
    print(f"{len(chosen)} files, {total} bytes")


if __name__ == "__main__":
    main()
