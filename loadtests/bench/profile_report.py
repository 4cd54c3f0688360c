"""Summarize a py-spy ``--format raw`` profile (collapsed stacks): self time, cumulative time, call tree.

    py-spy record --pid PID --duration 10 --rate 250 --nonblocking --format raw -o gw.txt
    python -m loadtests.bench.profile_report gw.txt --top 15 --root ModelInfer --root HttpApp.__call__

Frames are aggregated by function (``name (file)``, line numbers dropped). Percentages are of all
samples in the file (py-spy leaves idle threads out unless ``--idle`` was given).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def _frame(raw: str) -> str:
    raw = raw.strip()
    raw = _LINE.sub(")", raw)
    # shorten site-packages paths: keep the package-relative part
    return re.sub(r"\(.*?(?:site-packages|lib/python3\.\d+)/", "(", raw)


def parse(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """Collapsed stacks ``f1;f2;...;leaf COUNT`` -> [(frames root-first, count)]."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        if not line or " " not in line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        if frames:
            stacks.append((frames, n))
    return stacks


def self_time(stacks: Sequence[tuple[list[str], int]]) -> Counter:
    out: Counter = Counter()
    for frames, n in stacks:
        out[frames[-1]] += n
    return out


def cumulative_time(stacks: Sequence[tuple[list[str], int]]) -> Counter:
    out: Counter = Counter()
    for frames, n in stacks:
        for f in set(frames):
            out[f] += n
    return out


@dataclass
class Node:
    name: str
    total: int = 0
    children: dict[str, Node] = field(default_factory=dict)


def call_tree(stacks: Sequence[tuple[list[str], int]], root: str) -> Node:
    """Merge every stack at its first frame containing ``root`` into one tree."""
    top = Node(root)
    for frames, n in stacks:
        idx = next((i for i, f in enumerate(frames) if root in f), None)
        if idx is None:
            continue
        top.total += n
        node = top
        for f in frames[idx + 1 :]:
            node = node.children.setdefault(f, Node(f))
            node.total += n
    return top


def render_tree(node: Node, total: int, min_pct: float = 2.0, depth: int = 0, max_depth: int = 12) -> list[str]:
    lines = []
    if depth == 0:
        lines.append(f"{100 * node.total / total:5.1f}%  {node.name}")
    if depth >= max_depth:
        return lines
    for child in sorted(node.children.values(), key=lambda c: -c.total):
        pct = 100 * child.total / total
        if pct < min_pct:
            continue
        lines.append(f"{pct:5.1f}%  {'  ' * (depth + 1)}{child.name}")
        lines += render_tree(child, total, min_pct, depth + 1, max_depth)
    return lines


def report(path: Path, top: int = 15, roots: Sequence[str] = (), min_pct: float = 2.0) -> str:
    """The text report: top self, top cumulative, and a tree under each root."""
    stacks = parse(path.read_text(encoding="utf-8", errors="replace").splitlines())
    total = sum(n for _, n in stacks) or 1
    out = [f"{path.name}: {total} samples"]
    out.append(f"\ntop {top} by self time")
    for name, n in self_time(stacks).most_common(top):
        out.append(f"{100 * n / total:6.1f}%  {name}")
    out.append(f"\ntop {top} by cumulative time")
    for name, n in cumulative_time(stacks).most_common(top):
        out.append(f"{100 * n / total:6.1f}%  {name}")
    for root in roots:
        tree = call_tree(stacks, root)
        if tree.total:
            out.append(f"\ncall tree under '{root}' (>= {min_pct}% of all samples)")
            out += render_tree(tree, total, min_pct)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.profile_report", description=__doc__.split("\n")[0])
    p.add_argument("profile", type=Path, help="py-spy --format raw output")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--root", action="append", default=[], help="print the call tree under frames containing this")
    p.add_argument("--min-pct", type=float, default=2.0)
    args = p.parse_args(argv)
    print(report(args.profile, args.top, args.root, args.min_pct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
