#!/usr/bin/env python3
"""psycopg2 the way ORMs use it, and asyncpg's transactions, for dbproxy's tests/tx_reads.rs.

`python3 tx_reads.py DSN`: with autocommit off (psycopg2's default: it sends BEGIN before a
transaction's first statement), several connections each run a read-only transaction, then one
runs a transaction that reads, writes and reads again. Prints JSON: the ports that answered the
reads (`read_ports`), the port that ran the write and the read after it; then the same with
asyncpg (`async with conn.transaction()`, extended protocol): `asyncpg_read_ports`,
`asyncpg_write_port`, `asyncpg_read_after_write`.
"""

import asyncio
import json
import sys

import asyncpg
import psycopg2


def kv(dsn):
    return dict(p.split("=", 1) for p in dsn.split())


async def with_asyncpg(dsn):
    d = kv(dsn)
    args = dict(host=d["host"], port=int(d["port"]), user=d["user"], password=d["password"],
                database=d["dbname"], server_settings={"application_name": d["application_name"]})
    conns = [await asyncpg.connect(**args) for _ in range(6)]
    ports = set()
    for c in conns:
        async with c.transaction():
            ports.add(await c.fetchval("select inet_server_port()"))
            await c.fetchval("select count(*) from t")
    c = conns[0]
    async with c.transaction():
        await c.fetchval("select count(*) from t")
        write_port = await c.fetchval("insert into t values (101, 'y') returning inet_server_port()")
        row = await c.fetchrow("select v, inet_server_port() from t where id = $1", 101)
    for c in conns:
        await c.close()
    return sorted(ports), write_port, list(row)


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
    a_ports, a_write, a_row = asyncio.run(with_asyncpg(dsn))
    print(json.dumps({
        "read_ports": sorted(set(read_ports)),
        "write_port": write_port,
        "read_after_write": read_after_write,
        "asyncpg_read_ports": a_ports,
        "asyncpg_write_port": a_write,
        "asyncpg_read_after_write": a_row,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
