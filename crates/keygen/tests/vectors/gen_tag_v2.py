#!/usr/bin/env python3
"""Independent implementation of dqkd's key confirmation tag and metadata version 2,
written from docs/keygen-protocol.md alone (sections "Extraction", "Key confirmation" and
"Metadata"). It shares no code with the Rust crate and uses only the standard library.

    python3 gen_tag_v2.py            print the vectors
    python3 gen_tag_v2.py --write    rewrite tag_v2.txt next to this script
    python3 gen_tag_v2.py --check    exit 1 unless tag_v2.txt equals what this computes

The Rust test tests/vectors.rs checks the crate against tag_v2.txt. The inputs are fixed
(derived from SHA-256 of labels), so the file only changes if this script's reading of the
document changes; never regenerate it to make a Rust test pass.
"""
import hashlib
import os
import struct
import sys

# --- GF(2^8), AES polynomial, and the Cauchy matrix (doc: "Extraction") ---------------

def gmul(a, b):
    p = 0
    while b:
        if b & 1:
            p ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return p


def ginv(a):
    return next(x for x in range(1, 256) if gmul(a, x) == 1)


def extract(n, c, blocks, m):
    rows = n - c
    M = [[ginv(i ^ (rows + j)) for j in range(n)] for i in range(rows)]
    L = -(-m // rows)
    assert all(len(b) == L for b in blocks)
    out = bytearray()
    for i in range(L):
        for r in range(rows):
            acc = 0
            for j in range(n):
                acc ^= gmul(M[r][j], blocks[j][i])
            out.append(acc)
    return bytes(out[:m])


# --- GF(2^128) and the tag (doc: "Key confirmation") ------------------------------------

R = (1 << 128) | (1 << 7) | (1 << 2) | (1 << 1) | 1  # x^128 + x^7 + x^2 + x + 1


def elem(b16):
    """16 bytes -> field element: bit i of the big-endian integer is the coefficient of x^i."""
    assert len(b16) == 16
    return int.from_bytes(b16, "big")


def fmul(a, b):
    # Carry-less product, then reduction modulo R.
    p = 0
    for i in range(128):
        if (b >> i) & 1:
            p ^= a << i
    for d in range(254, 127, -1):
        if (p >> d) & 1:
            p ^= R << (d - 128)
    return p


def tag(key, key_id, k_mac, mask):
    m = len(key)
    q = -(-m // 16)
    padded = key + bytes(16 * q - m)
    X = [padded[16 * i:16 * i + 16] for i in range(q)]
    X.append(key_id)
    X.append(struct.pack(">QQ", 8 * m, 128))
    K = elem(k_mac)
    h = 0
    for x in X:
        h = fmul(h ^ elem(x), K)
    return (h ^ elem(mask)).to_bytes(16, "big")


def key_and_tag(n, c, blocks, m, key_id):
    """The m + 32 extracted bytes are key || k_mac || mask."""
    e = extract(n, c, blocks, m + 32)
    key, k_mac, mask = e[:m], e[m:m + 16], e[m + 16:]
    return key, tag(key, key_id, k_mac, mask)


def block_len(n, c, m):
    return -(-(m + 32) // (n - c))


# --- Metadata version 2 (doc: "Metadata") -----------------------------------------------

def encode_v2(n, c, expires, ranges, keys):
    out = bytearray([2, n, c])
    out += struct.pack(">Q", expires)
    for server_id, pool_id, offset, length in ranges:
        sid = server_id.encode()
        out += bytes([len(sid)]) + sid + pool_id + struct.pack(">QQ", offset, length)
    out += struct.pack(">I", len(keys))
    for key_id, size_bits, block_offset, confirm in keys:
        out += key_id + struct.pack(">IQ", size_bits, block_offset) + confirm
    return bytes(out)


# --- Fixed inputs -----------------------------------------------------------------------

def stream(label, length):
    out = b""
    k = 0
    while len(out) < length:
        out += hashlib.sha256(f"dqkd-kat-v2-{label}-{k}".encode()).digest()
        k += 1
    return out[:length]


def vectors():
    lines = [
        "# dqkd key confirmation (tag) and metadata version 2; made by gen_tag_v2.py",
        "# tag   key key_id k_mac mask tag                         (hex)",
        "# key   n c m key_id blocks(comma, server order) key tag  (blocks: ceil((m+32)/(n-c)) bytes)",
        "# batch ranges(comma, whole ranges, server order) wire keys(comma)",
    ]
    for idx, m in enumerate([1, 8, 15, 16, 17, 32, 64, 100]):
        key = stream(f"tag-key-{idx}", m)
        key_id = stream(f"tag-id-{idx}", 16)
        k_mac = stream(f"tag-kmac-{idx}", 16)
        mask = stream(f"tag-mask-{idx}", 16)
        lines.append(" ".join(["tag", key.hex(), key_id.hex(), k_mac.hex(), mask.hex(),
                               tag(key, key_id, k_mac, mask).hex()]))
    # Edge cases: k_mac = 0 gives tag = mask; mask = 0 gives the bare hash.
    key, key_id = stream("edge-key", 32), stream("edge-id", 16)
    for k_mac, mask in [(bytes(16), stream("edge-mask", 16)), (stream("edge-kmac", 16), bytes(16))]:
        lines.append(" ".join(["tag", key.hex(), key_id.hex(), k_mac.hex(), mask.hex(),
                               tag(key, key_id, k_mac, mask).hex()]))
    for idx, (n, c, m) in enumerate([(2, 1, 16), (3, 1, 32), (3, 1, 33), (3, 0, 32),
                                     (3, 2, 8), (4, 1, 17), (5, 2, 128), (10, 1, 64)]):
        L = block_len(n, c, m)
        blocks = [stream(f"key-{idx}-{j}", L) for j in range(n)]
        key_id = stream(f"key-id-{idx}", 16)
        key, t = key_and_tag(n, c, blocks, m, key_id)
        lines.append(" ".join(["key", str(n), str(c), str(m), key_id.hex(),
                               ",".join(b.hex() for b in blocks), key.hex(), t.hex()]))
    # One batch of three keys (256, 128 and 1024 bits) sharing one range per server, with
    # a gap of 5 bytes before the second key and 3 spare bytes at the end of each range.
    n, c = 3, 1
    sizes = [32, 16, 128]
    offsets, pos = [], 0
    for i, m in enumerate(sizes):
        pos += 5 if i == 1 else 0
        offsets.append(pos)
        pos += block_len(n, c, m)
    range_len = pos + 3
    ranges_bytes = [stream(f"batch-range-{j}", range_len) for j in range(n)]
    ranges = [(f"E{j + 1}", stream(f"batch-pool-{j}", 16), 4096 * (j + 1), range_len)
              for j in range(n)]
    entries, keys = [], []
    for i, (m, off) in enumerate(zip(sizes, offsets)):
        L = block_len(n, c, m)
        blocks = [r[off:off + L] for r in ranges_bytes]
        key_id = stream(f"batch-id-{i}", 16)
        key, t = key_and_tag(n, c, blocks, m, key_id)
        entries.append((key_id, 8 * m, off, t))
        keys.append(key)
    wire = encode_v2(n, c, 1_800_000_000, ranges, entries)
    lines.append(" ".join(["batch", ",".join(r.hex() for r in ranges_bytes), wire.hex(),
                           ",".join(k.hex() for k in keys)]))
    return "\n".join(lines) + "\n"


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tag_v2.txt")
    text = vectors()
    if "--write" in sys.argv:
        with open(path, "w") as f:
            f.write(text)
    elif "--check" in sys.argv:
        with open(path) as f:
            if f.read() != text:
                print(f"{path} differs from what gen_tag_v2.py computes", file=sys.stderr)
                sys.exit(1)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
