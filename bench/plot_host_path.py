# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Charts of a `vtmem-guestsim multivm` JSON result.

Usage: plot_host_path.py RESULT.json OUTDIR
Writes host-path-throughput.png, host-path-bytes-per-page.png and
host-path-dedup.png into OUTDIR.
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
    steps = r["steps"]
    vms = [s["vms"] for s in steps]
    title = "vtmem host path, %d CPUs%s" % (r["cpus"], " (--quick)" if r["quick"] else "")

    def chart(name, ylabel, series, note=None, ylim0=True):
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for label, ys, style in series:
            ax.plot(vms, ys, style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(vms)
        ax.set_xticklabels([str(v) for v in vms])
        ax.set_xlabel("VMs (one dedup group, one thread and socket each)")
        ax.set_ylabel(ylabel)
        if ylim0:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.set_title(title, fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=8)
        if note:
            fig.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path)
        plt.close(fig)
        print(path)

    lim = r["limit"]["pages_per_s"]
    chart(
        "host-path-throughput.png",
        "pages per second (all VMs)",
        [
            ("puts/s", [s["put_per_s"] for s in steps], "o-"),
            ("gets/s (all verified)", [s["get_per_s"] for s in steps], "s-"),
            ("1-core hash+lz4+copy limit", [lim for _ in steps], "k--"),
        ],
        note="batch %d, %d in flight per VM, %d pages per VM"
        % (r["batch"], r["depth"], steps[0]["pages_per_vm"]),
    )
    chart(
        "host-path-bytes-per-page.png",
        "host bytes per guest page",
        [("host_used / stored pages", [s["host_bytes_per_page"] for s in steps], "o-"),
         ("4096 (uncompressed)", [4096 for _ in steps], "k--")],
    )
    chart(
        "host-path-dedup.png",
        "ratio",
        [
            ("dedup ratio", [s["dedup_ratio"] for s in steps], "o-"),
            ("compression ratio", [s["compression_ratio"] for s in steps], "s-"),
        ],
    )


if __name__ == "__main__":
    main()
