#!/usr/bin/env python3
"""Readiness probes for the local services, using only the standard library.

    probe.py kafka HOST PORT [BROKERS]
                               Kafka: ApiVersions, then a Metadata request
                               that must list a broker; given BROKERS, it
                               must list that many, and every partition must
                               have that many replicas in sync (or all of
                               them, when it has fewer).
    probe.py mongo HOST PORT   MongoDB wire protocol: OP_MSG `hello` that must
                               answer ok: 1.
    probe.py mongo-drop HOST PORT DATABASE
                               Drops DATABASE (`dropDatabase`); for the
                               benchmarks, which start each run empty.
    probe.py mongo-count HOST PORT DATABASE COLLECTION
                               Prints the number of documents in COLLECTION.

Exit status 0 when the service answers; otherwise 1 with the reason on stderr.
Used by scripts/services (`up`, `status`) and bench/run.
"""

import socket
import struct
import sys

TIMEOUT_S = 3.0


def recv_exact(sock, n):
    """Read exactly n bytes or raise."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buf += chunk
    return buf


# --- Kafka -----------------------------------------------------------------

def kafka_request(sock, api_key, api_version, correlation_id, body):
    """Send one request with a v1 header (non-flexible) and return the
    response body after the correlation id."""
    client_id = b"services-probe"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", recv_exact(sock, 4))
    data = recv_exact(sock, size)
    (got_id,) = struct.unpack(">i", data[:4])
    if got_id != correlation_id:
        raise ValueError(f"correlation id {got_id} != {correlation_id}")
    return data[4:]


def int32_array(body, pos):
    """An array of int32 at pos: (list, position after it)."""
    (n,) = struct.unpack(">i", body[pos:pos + 4])
    pos += 4
    n = max(n, 0)
    return list(struct.unpack(f">{n}i", body[pos:pos + 4 * n])), pos + 4 * n


def kafka_probe(host, port, want=None):
    """ApiVersions v0 (answered by every broker version) tells which Metadata
    versions the broker takes; Metadata v4..v7 then must list a broker. With
    `want`, a node of a cluster is ready once it lists `want` brokers and no
    partition has fewer in-sync replicas (a restarted broker that has not
    caught up yet would otherwise count as back)."""
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        body = kafka_request(sock, 18, 0, 1, b"")
        (error,) = struct.unpack(">h", body[:2])
        if error != 0:
            raise ValueError(f"ApiVersions error code {error}")
        (count,) = struct.unpack(">i", body[2:6])
        versions = {}
        for i in range(count):
            key, lo, hi = struct.unpack(">hhh", body[6 + 6 * i: 12 + 6 * i])
            versions[key] = (lo, hi)
        if 3 not in versions:
            raise ValueError("broker does not offer Metadata")
        lo, hi = versions[3]
        usable = [v for v in range(4, 8) if lo <= v <= hi]
        if not usable:
            raise ValueError(f"no Metadata version in 4..7 (broker offers {lo}..{hi})")
        # topics = null (all topics), allow_auto_topic_creation = false
        version = usable[0]
        body = kafka_request(sock, 3, version, 2, struct.pack(">ib", -1, 0))
        pos = 4  # throttle_time_ms
        (brokers,) = struct.unpack(">i", body[pos:pos + 4])
        pos += 4
        listed = []
        for _ in range(brokers):
            node_id, hlen = struct.unpack(">ih", body[pos:pos + 6])
            pos += 6
            bhost = body[pos:pos + hlen].decode()
            pos += hlen
            (bport, rlen) = struct.unpack(">ih", body[pos:pos + 6])
            pos += 6 + max(rlen, 0)
            listed.append(f"{node_id}@{bhost}:{bport}")
        if not listed:
            raise ValueError("metadata lists no broker yet")
        if want is None:
            return "brokers " + ",".join(listed)
        want = int(want)
        if len(listed) < want:
            raise ValueError(f"metadata lists {len(listed)} of {want} brokers: " + ",".join(listed))
        (clen,) = struct.unpack(">h", body[pos:pos + 2])
        pos += 2 + max(clen, 0) + 4  # cluster_id, controller_id
        (topics,) = struct.unpack(">i", body[pos:pos + 4])
        pos += 4
        partitions, short = 0, []
        for _ in range(topics):
            (_, nlen) = struct.unpack(">hh", body[pos:pos + 4])
            pos += 4
            topic = body[pos:pos + nlen].decode()
            pos += nlen + 1  # name, is_internal
            (count,) = struct.unpack(">i", body[pos:pos + 4])
            pos += 4
            for _ in range(count):
                (_, index) = struct.unpack(">hi", body[pos:pos + 6])
                pos += 10 + (4 if version >= 7 else 0)  # error, index, leader, epoch
                replicas, pos = int32_array(body, pos)
                isr, pos = int32_array(body, pos)
                if version >= 5:
                    _, pos = int32_array(body, pos)  # offline replicas
                partitions += 1
                if len(isr) < min(want, len(replicas)):
                    short.append(f"{topic}-{index}")
        if short:
            raise ValueError(f"{len(short)} of {partitions} partitions have fewer than {want}"
                             f" replicas in sync, e.g. {short[0]}")
        return "brokers " + ",".join(listed) + f"; {partitions} partitions in sync"


# --- MongoDB wire protocol -----------------------------------------------

def bson_doc(pairs):
    """Encode a flat document of str -> int32 | str values."""
    out = b""
    for key, value in pairs:
        k = key.encode() + b"\x00"
        if isinstance(value, int):
            out += b"\x10" + k + struct.pack("<i", value)
        else:
            v = value.encode() + b"\x00"
            out += b"\x02" + k + struct.pack("<i", len(v)) + v
    return struct.pack("<i", len(out) + 5) + out + b"\x00"


# Fixed sizes of the BSON types we may meet at the top level of a reply.
FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
         0x7F: 0, 0xFF: 0}


def bson_top_level(doc):
    """Return the top-level fields of a BSON document (scalars decoded for
    double, int32, int64, bool and string; others as None)."""
    fields = {}
    pos = 4
    end = struct.unpack("<i", doc[:4])[0] - 1
    while pos < end:
        etype = doc[pos]
        pos += 1
        name_end = doc.index(b"\x00", pos)
        name = doc[pos:name_end].decode()
        pos = name_end + 1
        value = None
        if etype == 0x01:
            (value,) = struct.unpack("<d", doc[pos:pos + 8])
        elif etype == 0x10:
            (value,) = struct.unpack("<i", doc[pos:pos + 4])
        elif etype == 0x12:
            (value,) = struct.unpack("<q", doc[pos:pos + 8])
        elif etype == 0x08:
            value = doc[pos] == 1
        if etype in FIXED:
            pos += FIXED[etype]
        elif etype in (0x02, 0x0D, 0x0E):  # string, code, symbol
            (n,) = struct.unpack("<i", doc[pos:pos + 4])
            value = doc[pos + 4:pos + 3 + n].decode(errors="replace")
            pos += 4 + n
        elif etype in (0x03, 0x04):  # document, array
            (n,) = struct.unpack("<i", doc[pos:pos + 4])
            pos += n
        elif etype == 0x05:  # binary
            (n,) = struct.unpack("<i", doc[pos:pos + 4])
            pos += 5 + n
        elif etype == 0x0B:  # regex: two cstrings
            pos = doc.index(b"\x00", doc.index(b"\x00", pos) + 1) + 1
        else:
            raise ValueError(f"unexpected BSON type 0x{etype:02x}")
        fields[name] = value
    return fields


def mongo_command(host, port, pairs, timeout=TIMEOUT_S):
    """Sends one OP_MSG command; returns the top-level fields of a reply
    that says ok: 1."""
    msg = struct.pack("<I", 0) + b"\x00" + bson_doc(pairs)
    header = struct.pack("<iiii", 16 + len(msg), 1, 0, 2013)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(header + msg)
        length, _, _, opcode = struct.unpack("<iiii", recv_exact(sock, 16))
        data = recv_exact(sock, length - 16)
    if opcode != 2013 or data[4] != 0:
        raise ValueError(f"unexpected reply (opcode {opcode})")
    reply = bson_top_level(data[5:])
    if reply.get("ok") != 1:
        raise ValueError(f"{pairs[0][0]} not ok: {reply.get('errmsg')!r}")
    return reply


def mongo_probe(host, port):
    """OP_MSG {hello: 1, $db: "admin"}; the reply must say ok: 1."""
    reply = mongo_command(host, port, [("hello", 1), ("$db", "admin")])
    return f"maxWireVersion {reply.get('maxWireVersion')}"


def mongo_count(host, port, database, collection):
    """OP_MSG {count: COLLECTION, $db: DATABASE}; prints n."""
    reply = mongo_command(host, port, [("count", collection), ("$db", database)], timeout=120.0)
    n = reply.get("n")
    if n is None:
        raise ValueError("count: no n in the reply")
    return str(int(n))


def mongo_drop(host, port, database):
    """OP_MSG {dropDatabase: 1, $db: DATABASE}."""
    mongo_command(host, port, [("dropDatabase", 1), ("$db", database)], timeout=60.0)
    return f"dropped {database}"


def main(argv):
    """Run the probe named by argv[1] against HOST PORT."""
    probes = {"kafka": kafka_probe, "mongo": mongo_probe, "mongo-drop": mongo_drop,
              "mongo-count": mongo_count}
    arity = {"kafka": (4, 5), "mongo-drop": (5,), "mongo-count": (6,)}
    if len(argv) < 2 or argv[1] not in probes or len(argv) not in arity.get(argv[1], (4,)):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        detail = probes[argv[1]](argv[2], int(argv[3]), *argv[4:])
    except (OSError, ValueError, struct.error, IndexError) as exc:
        print(f"{argv[1]} probe: {exc}", file=sys.stderr)
        return 1
    print(detail)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
