#!/usr/bin/env python3
"""Create a sparse qcow2 image: SIZE bytes virtual, PLACES regions of
KIB KiB of seeded random (incompressible) data spread evenly over it, each
at an offset that is not chunk-aligned, written through `qemu-io` as a
guest would; the rest is never written (unallocated). Prints what it wrote.
"""
import argparse
import json
import os
import random
import subprocess
import tempfile


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("image")
    ap.add_argument("--size", required=True, help="virtual size for qemu-img, e.g. 1T")
    ap.add_argument("--places", type=int, default=64)
    ap.add_argument("--kib", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", args.image, args.size], check=True)
    info = subprocess.run(["qemu-img", "info", "--output=json", args.image],
                          check=True, capture_output=True, text=True).stdout
    size = json.loads(info)["virtual-size"]
    rng = random.Random(args.seed)
    length = args.kib * 1024
    step = size // args.places
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["qemu-io", "-f", "qcow2"]
        for n in range(args.places):
            # 64 KiB-aligned (a qcow2 cluster), anywhere in the first half
            # of its slot, so regions straddle 4 MiB chunks.
            offset = n * step + rng.randrange(0, max(1, step // 2 // 65536)) * 65536
            path = os.path.join(tmp, f"{n}.bin")
            with open(path, "wb") as f:
                f.write(rng.randbytes(length))
            cmd += ["-c", f"write -q -s {path} {offset} {length}"]
        subprocess.run(cmd + [args.image], check=True)
    print(f"{args.places} regions of {args.kib} KiB of random data "
          f"({args.places * length} bytes) in a {size}-byte virtual disk")


if __name__ == "__main__":
    main()
