#!/usr/bin/env python3
"""Rewrite a percentage of a qcow2 image's allocated data with random bytes.

The guest disk is cut into WRITE-sized aligned units; a unit counts as
allocated when `qemu-img map` reports data in it. A seeded random choice of
PCT percent of those units is overwritten in place through `qemu-io`, the
way a running VM changes its disk (allocated clusters are rewritten where
they are, new clusters are appended). The data is random, hence
incompressible, and different for every unit. Deterministic for a seed. With --of-disk, PCT is a share of the virtual
disk (1% of a 4 GiB disk: 655 writes of 64 KiB), still written over
allocated units: the scattered-write scenario of bench/scattered.sh.
"""
import argparse
import json
import math
import os
import random
import subprocess
import tempfile


def allocated_units(image, unit):
    """Sorted start offsets of the unit-aligned ranges holding data."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", image],
        check=True, capture_output=True, text=True).stdout
    units = set()
    for ext in json.loads(out):
        if not ext.get("data") or ext.get("zero"):
            continue
        first = ext["start"] // unit
        last = (ext["start"] + ext["length"] - 1) // unit
        units.update(range(first, last + 1))
    return [u * unit for u in sorted(units)]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("image")
    ap.add_argument("--pct", type=float, default=1.0)
    ap.add_argument("--write-kib", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--of-disk", action="store_true",
                    help="PCT is of the virtual disk size, not of the allocated units "
                         "(the units written are still picked among the allocated ones)")
    args = ap.parse_args()
    unit = args.write_kib * 1024
    units = allocated_units(args.image, unit)
    rng = random.Random(args.seed)
    if args.of_disk:
        size = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "qcow2", args.image],
            check=True, capture_output=True, text=True).stdout)["virtual-size"]
        count = min(len(units), max(1, math.ceil(size * args.pct / 100 / unit)))
    else:
        count = max(1, math.ceil(len(units) * args.pct / 100))
    picked = sorted(rng.sample(units, count))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["qemu-io", "-f", "qcow2"]
        for n, offset in enumerate(picked):
            path = os.path.join(tmp, f"{n}.bin")
            with open(path, "wb") as f:
                f.write(rng.randbytes(unit))
            cmd += ["-c", f"write -q -s {path} {offset} {unit}"]
        subprocess.run(cmd + [args.image], check=True)
    print(f"rewrote {count} of {len(units)} allocated {args.write_kib} KiB "
          f"units ({count * unit} bytes)")


if __name__ == "__main__":
    main()
