#!/usr/bin/env python3
"""A second SparseLoCo decoder and outer step, written from docs/wire-format.md alone
with Python's standard library, checked against the conformance vectors.

    python3 check.py [VECTORS_DIR]

Exits 0 when every vector agrees: each valid update decodes to its listed positions and
values, each invalid one is refused, each update refused by a run is refused by that run,
and each outer step turns the listed θ into the listed θ' bit for bit. It is also a worked
reading of the page for anyone writing a peer in another language.
"""

import json
import math
import struct
import sys
import zlib
from pathlib import Path

SEGMENT_CHUNKS = 256


class Invalid(Exception):
    """The update breaks a rule of the page."""


def f32(x):
    """Rounds a Python float (binary64) to binary32. One binary64 operation on binary32
    inputs followed by this rounding is the correctly rounded binary32 result."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_from_bits(b):
    return struct.unpack("<f", struct.pack("<I", b))[0]


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def from_hex(s):
    return f32_from_bits(int(s, 16))


def ceil_div(a, b):
    return -(-a // b)


class Bytes:
    def __init__(self, data, pos):
        self.data, self.pos = data, pos

    def take(self, n):
        if self.pos + n > len(self.data):
            raise Invalid("runs past the end of the update")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n):
        return int.from_bytes(self.take(n), "little")


class Bits:
    """Least-significant bit first: bit i is bit i % 8 of byte i // 8."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, n):
        if self.pos + n > 8 * len(self.data):
            raise Invalid("a chunk runs past the end of its segment")
        v = 0
        for i in range(n):
            p = self.pos + i
            v |= ((self.data[p >> 3] >> (p & 7)) & 1) << i
        self.pos += n
        return v


def k_for(length, chunk, k):
    if length == chunk:
        return k
    return min(length, max(1, ceil_div(k * length, chunk)))


def rice_parameter(length, k):
    mean_gap = (length - k) // k
    return mean_gap.bit_length() - 1 if mean_gap >= 1 else 0


def decode_chunk(bits, length, k, value_bits):
    """(position, value) for each kept entry of one chunk."""
    lo, hi = bits.read(16), bits.read(16)
    for h in (lo, hi):
        if h & 0x7F80 == 0x7F80:
            raise Invalid("a scale is not finite")
        if h & 0x8000:
            raise Invalid("a scale has its sign bit set")
    lo32, hi32 = f32_from_bits(lo << 16), f32_from_bits(hi << 16)
    if lo32 > hi32:
        raise Invalid("lo > hi")
    r = rice_parameter(length, k)
    max_q = (length >> r) + 1
    positions, p = [], -1
    for _ in range(k):
        q = 0
        while bits.read(1) == 0:
            q += 1
            if q > max_q:
                raise Invalid("a Rice quotient is out of range")
        p += 1 + ((q << r) | bits.read(r))
        if p >= length:
            raise Invalid("a position is outside its chunk")
        positions.append(p)
    m = value_bits - 1
    levels = 1 << m
    step = f32(f32(hi32 - lo32) / levels)
    out = []
    for p in positions:
        code = bits.read(value_bits)
        c = code & (levels - 1)
        value = f32(lo32 + f32((c + 0.5) * step))
        out.append((p, -value if code >> m else value))
    return out


def decode(buf):
    """((chunk, k, bits), [(name, dims, [(position, value), ...]), ...])."""
    if len(buf) < 4 or buf[:4] != b"SLCO":
        raise Invalid("bad magic")
    if len(buf) < 28:
        raise Invalid("shorter than 28 bytes")
    if int.from_bytes(buf[4:6], "little") != 1:
        raise Invalid("unknown version")
    body = buf[:-4]
    if zlib.crc32(body) != int.from_bytes(buf[-4:], "little"):
        raise Invalid("checksum mismatch")
    h = Bytes(body, 6)
    value_bits, flags = h.uint(1), h.uint(1)
    chunk, k, segment_chunks, count = h.uint(4), h.uint(4), h.uint(4), h.uint(4)
    if value_bits not in (2, 4, 8) or flags != 0:
        raise Invalid("value bits or flags")
    if not (1 <= chunk <= 1 << 20 and 1 <= k <= chunk and segment_chunks == SEGMENT_CHUNKS):
        raise Invalid("chunk, k or segment_chunks")
    tensors, names = [], set()
    for _ in range(count):
        name_len = h.uint(2)
        if not 1 <= name_len <= 1024:
            raise Invalid("name length")
        try:
            name = h.take(name_len).decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("name is not UTF-8")
        if name in names:
            raise Invalid("duplicate name")
        names.add(name)
        ndim = h.uint(1)
        if ndim > 8:
            raise Invalid("ndim above 8")
        dims, n = [], 1
        for _ in range(ndim):
            dims.append(h.uint(8))
            n *= dims[-1]
            if n >= 1 << 64:
                raise Invalid("the element count overflows u64")
        if n > 1 << 40:
            raise Invalid("more than 2^40 entries")
        per_segment = SEGMENT_CHUNKS * chunk
        lengths = [h.uint(4) for _ in range(ceil_div(n, per_segment))]
        entries = []
        for g, seg_len in enumerate(lengths):
            bits = Bits(h.take(seg_len))
            start = g * per_segment
            for at in range(start, min(start + per_segment, n), chunk):
                length = min(chunk, n - at)
                kept = decode_chunk(bits, length, k_for(length, chunk, k), value_bits)
                entries += [(at + p, v) for p, v in kept]
            if ceil_div(bits.pos, 8) != seg_len:
                raise Invalid("segment length disagrees with its content")
            if bits.read(8 * seg_len - bits.pos) != 0:
                raise Invalid("non-zero padding")
        tensors.append((name, dims, entries))
    if h.pos != len(body):
        raise Invalid("bytes after the last tensor")
    return (chunk, k, value_bits), tensors


def refusal_by_run(run, update):
    """Why a run with `run`'s settings and tensors would not apply `update`, or None."""
    config, tensors = update
    if config != (run["chunk"], run["k"], run["bits"]):
        return "codec settings differ"
    have = {name: dims for name, dims, _ in tensors}
    want = {t["name"]: t["shape"] for t in run["tensors"]}
    if set(have) != set(want):
        return "tensors differ"
    if any(have[n] != want[n] for n in want):
        return "shapes differ"
    return None


def weighted_mean(live, n):
    total = 0.0
    for _, weight, _ in live:
        total = f32(total + weight)
    out = [0.0] * n
    for _, weight, entries in live:
        scale = f32(weight / total)
        for p, v in entries:
            out[p] = f32(out[p] + f32(scale * v))
    return out


def median_norm(live, n, per_segment):
    norms = []
    for _, _, entries in live:
        sums = {}
        for p, v in entries:  # binary64, in position order, one partial sum per segment
            sums[p // per_segment] = sums.get(p // per_segment, 0.0) + v * v
        total = 0.0
        for g in sorted(sums):
            total += sums[g]
        norms.append(math.sqrt(total))
    ranked = sorted(norms)
    half = len(ranked) // 2
    median = ranked[half] if len(ranked) % 2 else (ranked[half - 1] + ranked[half]) / 2
    out, selected = [0.0] * n, [0.0] * n
    for (_, weight, entries), norm in zip(live, norms):
        clip = f32(median / norm) if norm > median else 1.0
        scale = f32(weight * clip)
        for p, v in entries:
            out[p] = f32(out[p] + f32(scale * v))
            selected[p] = f32(selected[p] + weight)
    return [f32(o / s) if s > 0 else o for o, s in zip(out, selected)]


def outer_step(vector, root):
    """θ' per tensor name, from the vector's θ, updates, weights and α."""
    peers = []
    for u in vector["updates"]:
        (chunk, _, _), tensors = decode((root / u["update"]).read_bytes())
        weight = from_hex(u["weight"])
        if weight > 0:
            number = int(u["peer"][1:])
            peers.append((number, weight, {name: e for name, _, e in tensors}))
    peers.sort(key=lambda p: p[0])  # ascending numeric peer id
    alpha = from_hex(vector["alpha"])
    after = {}
    for t in vector["tensors"]:
        theta = [from_hex(x) for x in t["before"]]
        live = [(number, w, entries[t["name"]]) for number, w, entries in peers]
        if vector["rule"] == "weighted-mean":
            step = weighted_mean(live, len(theta))
        else:
            step = median_norm(live, len(theta), SEGMENT_CHUNKS * chunk)
        after[t["name"]] = [f32(x - f32(alpha * s)) for x, s in zip(theta, step)]
    return after


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    index = json.loads((root / "index.json").read_text())
    failures = []
    for v in index["valid"]:
        expected = json.loads((root / v["decoded"]).read_text())
        config, tensors = decode((root / v["update"]).read_bytes())
        if config != (expected["chunk"], expected["k"], expected["bits"]):
            failures.append(f"{v['name']}: settings {config}")
        for (name, dims, entries), want in zip(tensors, expected["tensors"]):
            got = ([p for p, _ in entries], ["%08x" % f32_bits(x) for _, x in entries])
            if (name, dims) != (want["name"], want["shape"]) or got != (want["positions"], want["values"]):
                failures.append(f"{v['name']}: tensor {name} decodes differently")
        if len(tensors) != len(expected["tensors"]):
            failures.append(f"{v['name']}: {len(tensors)} tensors")
    for v in index["invalid"]:
        try:
            decode((root / v["update"]).read_bytes())
            failures.append(f"{v['name']}: accepted, but {v['rule']}")
        except Invalid:
            pass
    for v in index["refused_by_run"]:
        if refusal_by_run(v["run"], decode((root / v["update"]).read_bytes())) is None:
            failures.append(f"{v['name']}: the run accepts it, but {v['rule']}")
    for v in index["outer_steps"]:
        vector = json.loads((root / v["vector"]).read_text())
        after = outer_step(vector, root)
        for t in vector["tensors"]:
            got = ["%08x" % f32_bits(x) for x in after[t["name"]]]
            wrong = sum(g != w for g, w in zip(got, t["after"]))
            if wrong:
                failures.append(f"outer step {v['name']}: {t['name']} differs at {wrong} entries")
    counts = {key: len(index[key]) for key in ("valid", "invalid", "refused_by_run", "outer_steps")}
    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print(f"every vector agrees: {counts}")


if __name__ == "__main__":
    main()
