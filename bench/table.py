#!/usr/bin/env python3
"""Format the benchmark results as a markdown table.

Reads RESULTS (lines `tool<TAB>metric<TAB>value`, as run.sh writes them)
and prints one row per measurement with vbackup's value, each peer's value
and peer/vbackup ratios. Ratios above 1 mean vbackup is faster, smaller or
lighter. Missing values (a tool not run) show as `n/a`.
"""
import argparse
import csv

PEERS = ("restic", "borg")

# (metric key, row label, unit kind)
ROWS = [
    ("full_time", "1. Full backup, time (s)", "secs"),
    ("full_rss", "1. Full backup, peak RSS (MiB)", "mib"),
    ("unchanged_time", "2. Re-backup unchanged, time (s)", "secs"),
    ("unchanged_rss", "2. Re-backup unchanged, peak RSS (MiB)", "mib"),
    ("changed_time", "3. Backup after change, time (s)", "secs"),
    ("changed_rss", "3. Backup after change, peak RSS (MiB)", "mib"),
    ("changed_pct", "3. Backup after change, % of the tool's own full backup time", "pct"),
    ("restore_time", "4. Restore latest, time (s)", "secs"),
    ("restore_rss", "4. Restore latest, peak RSS (MiB)", "mib"),
    ("restore_check", "4. Restored image equals source", "text"),
    ("stream_time", "4b. Restore streamed to /dev/null, time (s)", "secs"),
    ("stream_rss", "4b. Restore streamed to /dev/null, peak RSS (MiB)", "mib"),
    ("repo_full", "5. Repo size after full backup (MiB)", "mib"),
    ("repo_grow_unchanged", "5. Repo growth by re-backup (MiB)", "mib"),
    ("repo_grow_changed", "5. Repo growth by changed backup (MiB)", "mib"),
    ("repo_final", "5. Repo size at end (MiB)", "mib"),
]


def load(path):
    """{tool: {metric: value}} from the results file."""
    data = {}
    with open(path, newline="") as f:
        for tool, metric, value in csv.reader(f, delimiter="\t"):
            data.setdefault(tool, {})[metric] = value
    return data


def show(value, kind):
    """One cell: a number with 2 decimals, or the text itself."""
    if value is None:
        return "n/a"
    if kind == "text":
        return value
    number = float(value)
    # Small sizes (repository growth) need a third decimal to not read as 0.
    return f"{number:.3f}" if kind == "mib" and abs(number) < 1 else f"{number:.2f}"


def ratio(peer, ours, kind):
    """peer/vbackup, or a dash when it is undefined."""
    if kind == "text" or peer is None or ours is None:
        return "-"
    if float(ours) == 0:
        return "-" if float(peer) == 0 else "inf"
    return f"{float(peer) / float(ours):.2f}x"


def table(data):
    """The table as a list of markdown lines."""
    head = ["Scenario", "vbackup", *PEERS, *(f"{p}/vbackup" for p in PEERS)]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for key, label, kind in ROWS:
        ours = data.get("vbackup", {}).get(key)
        peers = [data.get(p, {}).get(key) for p in PEERS]
        cells = [label, show(ours, kind), *(show(v, kind) for v in peers),
                 *(ratio(v, ours, kind) for v in peers)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results")
    ap.add_argument("header", help="markdown lines printed above the table")
    args = ap.parse_args()
    with open(args.header) as f:
        print(f.read().rstrip("\n"))
    print()
    print("\n".join(table(load(args.results))))
    print()
    print("Ratios are peer/vbackup: above 1 means vbackup is faster, "
          "smaller or uses less memory.")


if __name__ == "__main__":
    main()
