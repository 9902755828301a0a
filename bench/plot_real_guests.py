# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Charts of a bench/real-guests JSON result.

Usage: plot_real_guests.py RESULT.json OUTDIR
Writes real-guests-disk-io.png and real-guests-host-memory.png into OUTDIR.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src, out = sys.argv[1], sys.argv[2]
    with open(src) as f:
        r = json.load(f)
    env, runs = r["env"], r["runs"]
    title = "vtmem real guests: %s RAM, memtest %d MiB x %d, %s, %d CPUs" % (
        env["mem"], env["mb"], env["passes"], env["accel"].upper(), env["cpus"])
    vms = sorted({x["vms"] for x in runs})
    cfgs = [c for c in ("vtmem", "zswap", "disk") if any(x["config"] == c for x in runs)]

    def total(run, key):
        return sum(g[key] for g in run["guests"])

    # Disk I/O: grouped bars, one group per (N), bars per configuration.
    fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=100)
    width = 0.8 / (2 * len(cfgs))
    for ci, c in enumerate(cfgs):
        for ki, (key, hatch) in enumerate((("disk_sectors_written", ""),
                                           ("disk_sectors_read", "//"))):
            xs, ys = [], []
            for vi, n in enumerate(vms):
                run = next((x for x in runs if x["config"] == c and x["vms"] == n), None)
                if run:
                    xs.append(vi + (ci * 2 + ki - len(cfgs) + 0.5) * width)
                    ys.append(total(run, key) * 512 / 1048576)
            ax.bar(xs, ys, width, color="C%d" % ci, hatch=hatch, edgecolor="black",
                   linewidth=0.4,
                   label="%s %s" % (c, "written" if ki == 0 else "read"))
    ax.set_xticks(range(len(vms)))
    ax.set_xticklabels(["%d VM%s" % (n, "s" if n > 1 else "") for n in vms])
    ax.set_ylabel("swap-disk MiB (all guests)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(cfgs))
    fig.text(0.01, 0.01, "read and written: the guests' /proc/diskstats for the swap disk", fontsize=7, alpha=0.7)
    fig.tight_layout()
    path = os.path.join(out, "real-guests-disk-io.png")
    fig.savefig(path)
    plt.close(fig)
    print(path)

    # Host memory against guest pages held (vtmem runs, at peak host_used).
    vt = [x for x in runs if x["config"] == "vtmem" and x.get("stored_pages_at_peak")]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if vt:
        pages = [x["stored_pages_at_peak"] * 4096 / 1048576 for x in vt]
        used = [x["host_used_peak"] / 1048576 for x in vt]
        ax.plot(pages, used, "o", label="vtmemd host_used at its peak")
        for x, p, u in zip(vt, pages, used):
            ax.annotate("%d VM%s" % (x["vms"], "s" if x["vms"] > 1 else ""), (p, u),
                        textcoords="offset points", xytext=(5, -10), fontsize=8)
        m = max(pages) * 1.1
        ax.plot([0, m], [0, m], "k--", label="4 KiB per page (uncompressed)")
        ax.set_xlim(0, m)
        ax.set_ylim(0, m)
    ax.set_xlabel("guest pages held by vtmemd (MiB of 4 KiB pages)")
    ax.set_ylabel("host memory used (MiB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "real-guests-host-memory.png")
    fig.savefig(path)
    plt.close(fig)
    print(path)


if __name__ == "__main__":
    main()
