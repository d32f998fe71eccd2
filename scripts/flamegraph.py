#!/usr/bin/env python3
"""Folds `perf script` output (a profile recorded with -g) into one line per stack,
and draws it as a flamegraph SVG; prints the heaviest functions, self and total.

    perf record -F 499 -g --call-graph dwarf -p PID -o perf.data -- sleep 20
    perf script -i perf.data | scripts/flamegraph.py --title "etcdmux, mixed" out

writes out.folded (unless --no-folded), out.svg and out.txt (the summary);
`--from-folded` reads a .folded file instead. No dependencies.

A stripped Go binary (Debian's etcd) has no symbol table for perf, but keeps Go's
own function table (.gopclntab): `--go-binary /usr/bin/etcd` names its frames from
that. Record Go with frame pointers (`perf record -g`), not dwarf: the binary has no
unwind tables.
"""
import argparse
import collections
import html
import bisect
import re
import struct
import sys
import zlib

FRAME = re.compile(r"^\s*([0-9a-f]+)\s+(.*?)(?:\+0x[0-9a-f]+)?(?:\s+\(([^)]*)\))?$")


class GoSymbols:
    """Function names of a Go (1.18+, 64-bit, little-endian ELF) binary from its
    .gopclntab, looked up by the file offset perf prints for an unknown frame."""

    def __init__(self, path):
        self.path = path
        data = open(path, "rb").read()
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", data, 0x28)
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHH", data, 0x38)
        # PT_LOAD segments: (file offset, vaddr, size), to turn perf's offsets into addresses.
        self.loads = []
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * 56)
            if p_type == 1:
                self.loads.append((p_offset, p_vaddr, p_filesz))
        sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names_off = sections[shstrndx][4]

        def name(sec):
            start = names_off + sec[0]
            return data[start:data.index(b"\0", start)].decode()

        tab = next((s for s in sections if name(s) == ".gopclntab"), None)
        if tab is None:
            raise ValueError(f"{path}: no .gopclntab section (not a Go binary?)")
        t = data[tab[4]:tab[4] + tab[5]]
        magic, = struct.unpack_from("<I", t, 0)
        if magic not in (0xFFFFFFF0, 0xFFFFFFF1):
            raise ValueError(f"{path}: .gopclntab magic {magic:#x}: only Go 1.18 and later are read")
        nfunc, _, text_start, funcname_off, _, _, _, pcln_off = struct.unpack_from("<QQQQQQQQ", t, 8)
        self.entries, self.names = [], []
        for i in range(nfunc):
            entry_off, func_off = struct.unpack_from("<II", t, pcln_off + 8 * i)
            name_off, = struct.unpack_from("<i", t, pcln_off + func_off + 4)
            start = funcname_off + name_off
            self.entries.append(text_start + entry_off)
            self.names.append(t[start:t.index(b"\0", start)].decode("utf-8", "replace"))
        self.end = text_start + struct.unpack_from("<I", t, pcln_off + 8 * nfunc)[0]

    def lookup(self, file_offset):
        for off, vaddr, size in self.loads:
            if off <= file_offset < off + size:
                addr = file_offset - off + vaddr
                break
        else:
            return None
        i = bisect.bisect_right(self.entries, addr) - 1
        return self.names[i] if 0 <= i and addr < self.end else None


def fold(lines, go=None):
    """Stacks (root first) and their sample counts."""
    stacks = collections.Counter()
    cur = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip() or not line[0].isspace():
            if cur:
                stacks[tuple(reversed(cur))] += 1
            cur = []
            continue
        m = FRAME.match(line)
        if m:
            name = m.group(2).strip() or "[unknown]"
            if name == "[unknown]" and go and m.group(3) == go.path:
                name = go.lookup(int(m.group(1), 16)) or name
            if name == "[unknown]" and m.group(3):
                name = "[" + m.group(3).rsplit("/", 1)[-1] + "]"
            cur.append(name.replace(";", ":"))
    if cur:
        stacks[tuple(reversed(cur))] += 1
    return stacks


# Groups of frames whose share is worth a line of its own: a sample counts for a
# group when any frame of its stack matches (so groups overlap).
GROUPS = [
    ("h2 (HTTP/2: frames, streams, flow control)", r"^(<)?h2::"),
    ("h2 stream store (stream lookup by id)", r"^(<)?h2::proto::streams::store::"),
    ("h2 flow control", r"^(<)?h2::proto::streams::flow_control::|^(<)?h2::proto::streams::prioritize::Prioritize>::(assign|reclaim|try_assign)"),
    ("h2 send scheduling (prioritize)", r"^(<)?h2::proto::streams::prioritize::"),
    ("hyper", r"^(<)?hyper(_util)?::"),
    ("tonic", r"^(<)?tonic::"),
    ("prost (encode/decode)", r"^(<)?prost::|::encode_raw|::merge_field"),
    ("etcdmux::watch", r"^(<)?etcdmux::watch::"),
    ("etcdmux::ops", r"^(<)?etcdmux::ops::"),
    ("etcdmux::upstream", r"^(<)?etcdmux::upstream::"),
    ("tokio runtime", r"^(<)?tokio::runtime::"),
    ("memory allocation (malloc/free)", r"^(__libc_)?(malloc|free|realloc|calloc|cfree)$|^_int_(malloc|free)|^malloc_consolidate"),
    ("kernel: network send/receive", r"^(tcp_|__tcp_|sock_|__sys_(send|recv)|inet_|ip_)"),
    ("kernel: futex (lock waits, wakeups)", r"futex"),
    ("go: garbage collector", r"^runtime\.(gcBgMarkWorker|gcDrain|scanobject|markroot|gcAssistAlloc|bgsweep|sweepone)"),
    ("go: grpc", r"^google\.golang\.org/grpc"),
    ("go: http2 framer", r"^golang\.org/x/net/http2"),
    ("etcd: mvcc", r"^go\.etcd\.io/etcd/mvcc"),
    ("etcd: mvcc compaction", r"mvcc\.\(\*store\)\.(scheduleCompaction|compact)|mvcc\.\(\*treeIndex\)\.Compact|mvcc\.\(\*keyIndex\)\.compact"),
    ("etcd: watch", r"^go\.etcd\.io/etcd/(mvcc\.\(\*watch|mvcc\.\(watch|etcdserver/api/v3rpc\.\(\*serverWatchStream)"),
    ("etcd: Range calls", r"^go\.etcd\.io/etcd/etcdserver\.\(\*EtcdServer\)\.Range$"),
    ("etcd: Txn calls", r"^go\.etcd\.io/etcd/etcdserver\.\(\*EtcdServer\)\.Txn$"),
    ("etcd: raft/wal/backend commit", r"^go\.etcd\.io/etcd/(raft|wal|mvcc/backend)"),
    ("etcd: grpc-proxy", r"^go\.etcd\.io/etcd/proxy/grpcproxy"),
]


def summary(stacks, n=40):
    total = sum(stacks.values()) or 1
    own, incl = collections.Counter(), collections.Counter()
    groups, groups_self = collections.Counter(), collections.Counter()
    compiled = [(name, re.compile(rx)) for name, rx in GROUPS]
    for st, c in stacks.items():
        own[st[-1]] += c
        for f in set(st):
            incl[f] += c
        for name, rx in compiled:
            if any(rx.search(f) for f in st):
                groups[name] += c
            if rx.search(st[-1]):
                groups_self[name] += c
    out = [f"{total} samples", "", "self %   function"]
    out += [f"{100 * c / total:6.2f}   {f[:150]}" for f, c in own.most_common(n)]
    out += ["", "total %  function"]
    out += [f"{100 * c / total:6.2f}   {f[:150]}" for f, c in incl.most_common(n)]
    out += ["", "total %  self %   group (total: a frame of the group anywhere on the stack; self: the sampled frame)"]
    out += [
        f"{100 * groups[name] / total:6.2f}   {100 * groups_self[name] / total:6.2f}   {name}"
        for name, _ in GROUPS
        if groups[name]
    ]
    return "\n".join(out) + "\n"


def color(name):
    h = zlib.crc32(name.encode())
    if name.startswith("[k]") or "kernel" in name or name.startswith(("do_", "__x64", "entry_SYSCALL", "tcp_", "sock_")):
        return f"rgb({200 + h % 55},{120 + h % 60},{40 + h % 40})"
    return f"rgb({220 + h % 35},{80 + h % 120},{30 + h % 50})"


def svg(stacks, title, width=1600, row=16):
    """A flamegraph: the root at the bottom, each frame as wide as its samples."""
    total = sum(stacks.values()) or 1
    tree = {}
    for st, c in stacks.items():
        node = tree
        for f in st:
            e = node.setdefault(f, [0, {}])
            e[0] += c
            node = e[1]
    depth = max((len(s) for s in stacks), default=0)
    height = (depth + 3) * row
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="11">',
        f'<rect width="100%" height="100%" fill="#fafafa"/><text x="10" y="14" font-size="13">{html.escape(title)} ({total} samples)</text>',
    ]
    scale = (width - 20) / total

    def draw(node, x, level):
        for name, (c, kids) in sorted(node.items()):
            w = c * scale
            if w >= 1.0:
                y = height - (level + 1) * row
                label = html.escape(name)
                pct = 100 * c / total
                parts.append(
                    f'<g><title>{label} ({c} samples, {pct:.2f}%)</title>'
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" fill="{color(name)}"/>'
                )
                chars = int(w / 6.5)
                if chars >= 3:
                    text = name if len(name) <= chars else name[: chars - 2] + ".."
                    parts.append(f'<text x="{x + 2:.1f}" y="{y + row - 4}">{html.escape(text)}</text>')
                parts.append("</g>")
                draw(kids, x, level + 1)
            x += w

    draw(tree, 10.0, 0)
    parts.append("</svg>")
    return "\n".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output path without extension")
    ap.add_argument("--title", default="profile")
    ap.add_argument("--from-folded", action="store_true", help="stdin holds folded stacks, not perf script output")
    ap.add_argument("--no-folded", action="store_true", help="do not write out.folded (it is large)")
    ap.add_argument("--folded-to", help="write the folded stacks here instead of out.folded")
    ap.add_argument("--go-binary", help="a stripped Go binary whose frames to name from its .gopclntab")
    a = ap.parse_args()
    if a.from_folded:
        stacks = collections.Counter()
        for line in sys.stdin:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if stack and n.isdigit():
                stacks[tuple(stack.split(";"))] += int(n)
    else:
        stacks = fold(sys.stdin, GoSymbols(a.go_binary) if a.go_binary else None)
    if a.folded_to or not a.no_folded:
        with open(a.folded_to or a.out + ".folded", "w") as f:
            for st, c in stacks.most_common():
                f.write(";".join(st) + f" {c}\n")
    with open(a.out + ".svg", "w") as f:
        f.write(svg(stacks, a.title))
    with open(a.out + ".txt", "w") as f:
        f.write(summary(stacks))
    print(f"{sum(stacks.values())} samples -> {a.out}.svg, .txt")


if __name__ == "__main__":
    main()
