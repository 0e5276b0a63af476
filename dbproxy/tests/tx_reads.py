#!/usr/bin/env python3
"""psycopg2 the way ORMs use it, for dbproxy's tests/tx_reads.rs.

`python3 tx_reads.py DSN`: with autocommit off (psycopg2's default: it sends BEGIN before a
transaction's first statement), several connections each run a read-only transaction, then one
runs a transaction that reads, writes and reads again. Prints JSON: the ports that answered the
reads (`read_ports`), the port that ran the write and the read after it.
"""

import json
import sys

import psycopg2


def main(dsn):
    read_ports = []
    conns = [psycopg2.connect(dsn) for _ in range(6)]
    for c in conns:
        with c.cursor() as cur:
            cur.execute("select inet_server_port()")
            read_ports.append(cur.fetchone()[0])
            cur.execute("select count(*) from t")
            cur.fetchone()
        c.commit()
    c = conns[0]
    with c.cursor() as cur:
        cur.execute("select count(*) from t")
        cur.fetchone()
        cur.execute("insert into t values (100, 'x') returning inet_server_port()")
        write_port = cur.fetchone()[0]
        cur.execute("select v, inet_server_port() from t where id = 100")
        read_after_write = list(cur.fetchone())
    c.commit()
    for c in conns:
        c.close()
    print(json.dumps({
        "read_ports": sorted(set(read_ports)),
        "write_port": write_port,
        "read_after_write": read_after_write,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
