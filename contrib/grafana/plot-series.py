#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""plot-series.py: draw the vtmem dashboard's main panels from a recorded
metrics series (scripts/record-metrics), with the dashboard's queries
evaluated over consecutive scrapes (rates as differences per second).

Usage: contrib/grafana/plot-series.py SERIES.jsonl OUT.png

Needs matplotlib (bench/host-path shows how to get it into a venv).
"""

import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = re.compile(r'(\w+)="([^"]*)"')


def load(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    return [r["t"] for r in rows], [r["samples"] for r in rows]


def parse(series):
    name, _, rest = series.partition("{")
    return name, dict(LABELS.findall(rest))


def select(samples, name, **want):
    """{label tuple: value} of `name` whose labels include `want`."""
    out = {}
    for s, v in samples.items():
        n, labels = parse(s)
        if n == name and all(labels.get(k) == x for k, x in want.items()):
            out[tuple(sorted(labels.items()))] = v
    return out


def value(samples, name, **want):
    return sum(select(samples, name, **want).values())


def vms(all_samples):
    return sorted({dict(k)["vm"] for s in all_samples for k in select(s, "vtmem_vm_connected")})


def rate(ts, all_samples, name, **want):
    xs, ys = [], []
    for i in range(1, len(ts)):
        dt = ts[i] - ts[i - 1]
        if dt > 0:
            xs.append(ts[i])
            ys.append(max(0.0, value(all_samples[i], name, **want) - value(all_samples[i - 1], name, **want)) / dt)
    return xs, ys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ts, ss = load(sys.argv[1])
    names = vms(ss)
    mib = 2 ** 20
    fig, ax = plt.subplots(2, 3, figsize=(15, 7.5))
    fig.suptitle("vtmem dashboard panels, rendered from a recorded run "
                 "(2 guests of 128 MiB swapping 192 MiB each; web1 quota 64 MiB; host limit 160 MiB)",
                 fontsize=11)

    a = ax[0][0]
    a.plot(ts, [value(s, "vtmem_host_used_bytes") / mib for s in ss], label="used")
    a.plot(ts, [value(s, "vtmem_host_limit_bytes") / mib for s in ss], "--", label="limit")
    a.plot(ts, [value(s, "vtmem_data_bytes") / mib for s in ss], label="page data")
    a.set_title("Host memory against the limit")
    a.set_ylabel("MiB")

    a = ax[0][1]
    for vm in names:
        for kind in ("persistent", "ephemeral"):
            ys = [value(s, "vtmem_vm_pages", vm=vm, kind=kind) for s in ss]
            if any(ys):
                a.plot(ts, ys, label=f"{vm} {kind}")
    a.set_title("Pages per VM")

    a = ax[0][2]
    for vm in names:
        a.plot(*rate(ts, ss, "vtmem_vm_puts_total", vm=vm, result="stored"), label=f"{vm} puts stored")
        a.plot(*rate(ts, ss, "vtmem_vm_gets_total", vm=vm, result="hit"), ":", label=f"{vm} get hits")
    a.set_title("Puts and gets per VM")
    a.set_ylabel("per second")

    a = ax[1][0]
    for vm in names:
        for reason in ("over_quota", "no_space", "frozen", "other"):
            xs, ys = rate(ts, ss, "vtmem_vm_puts_total", vm=vm, result=reason)
            if any(ys):
                a.plot(xs, ys, label=f"{vm} {reason}")
    a.set_title("Refused puts by reason")
    a.set_ylabel("per second")

    a = ax[1][1]
    for vm in names:
        xs, hits = rate(ts, ss, "vtmem_vm_gets_total", vm=vm, result="hit")
        _, alls = rate(ts, ss, "vtmem_vm_gets_total", vm=vm)
        pts = [(x, h / t) for x, h, t in zip(xs, hits, alls) if t > 0]
        if pts:
            a.plot([p[0] for p in pts], [100 * p[1] for p in pts], ".", label=vm)
    a.set_ylim(0, 105)
    a.set_title("Get hit rate per VM")
    a.set_ylabel("%")

    a = ax[1][2]
    a.plot(ts, [value(s, "vtmem_compression_ratio") for s in ss], label="compression")
    a.plot(ts, [value(s, "vtmem_dedup_ratio") for s in ss], label="dedup")
    a.set_title("Compression and dedup ratios")

    for row in ax:
        for a in row:
            a.set_xlabel("seconds")
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=90)
    print(f"plot-series: {len(ts)} scrapes of {', '.join(names)} -> {sys.argv[2]}")


if __name__ == "__main__":
    main()
