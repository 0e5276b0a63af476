#!/usr/bin/env python3
"""Client behaviours of dbproxy's compatibility suite, as real drivers produce them.

`python3 cases.py CASE DSN` runs one case against the server named by DSN (a libpq key=value
string) and prints its answers as JSON. `tests/compat.rs` runs every case once directly against
the primary and once through dbproxy (with a standby behind it) and asserts the same output, so a
case prints only what does not change between runs (no PIDs, OIDs or times, but comparisons of
them). `python3 cases.py --list` names the cases.
"""

import asyncio
import json
import sys
import threading

CASES = {}


def case(f):
    CASES[f.__name__] = f
    return f


def kv(dsn):
    """The key=value pairs of a libpq DSN (values without spaces or quotes)."""
    return dict(p.split("=", 1) for p in dsn.split())


def apg(dsn):
    """asyncpg's connect arguments for a libpq DSN."""
    d = kv(dsn)
    return dict(host=d["host"], port=int(d["port"]), user=d["user"], password=d.get("password"),
                database=d.get("dbname", "postgres"))


def rows(cur):
    return [list(r) for r in cur.fetchall()]


def recreate(c, table, columns):
    c.execute(f"drop table if exists {table}")
    c.execute(f"create table {table} ({columns})")


class Canceller:
    """Sends a cancel request every 50 ms until stopped: a cancel that arrives before the query
    starts is ignored by PostgreSQL, so repeating it (instead of sleeping first) is what makes the
    cancel land without guessing how long the query takes to start."""

    def __init__(self, cancel):
        self.cancel = cancel
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self):
        while not self.done.wait(0.05):
            self.cancel()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


@case
def psycopg_prepared(dsn):
    """psycopg 3 prepares every statement at once (prepare_threshold=0) as _pg3_N."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as c:
        recreate(c, "compat_prep", "id int primary key, v text")
        for i in range(3):
            c.execute("insert into compat_prep values (%s, %s)", (i, f"v{i}"))
        for _ in range(2):
            for i in range(3):
                out.append(c.execute("select v from compat_prep where id = %s", (i,)).fetchone())
        cur = c.cursor(binary=True)
        out.append(cur.execute("select %s::int8, %s::numeric, %s::text[]", (1, 2.5, ["a", "b"])).fetchone())
        out.append(cur.execute("select %s::int8, %s::numeric, %s::text[]", (2, 3.5, ["c"])).fetchone())
        try:
            c.execute("select v::int from compat_prep where id = %s", (1,))
        except psycopg.Error as e:
            out.append(e.sqlstate)
        out.append(c.execute("select count(*) from compat_prep").fetchone())
        c.execute("drop table compat_prep")
    return out


@case
def psycopg_prepared_in_transaction(dsn):
    """psycopg 3 prepared statements inside explicit transactions, committed and rolled back."""
    import psycopg

    out = []
    with psycopg.connect(dsn, prepare_threshold=0) as c:
        recreate(c, "compat_prep_tx", "id int")
        c.commit()
        for i in range(3):
            c.execute("insert into compat_prep_tx values (%s)", (i,))
            out.append(c.execute("select count(*) from compat_prep_tx").fetchone())
            if i == 1:
                c.rollback()
            else:
                c.commit()
        out.append(c.execute("select array_agg(id order by id) from compat_prep_tx").fetchone())
        c.rollback()
        c.autocommit = True
        out.append(c.execute("select array_agg(id order by id) from compat_prep_tx").fetchone())
        c.execute("drop table compat_prep_tx")
    return out


@case
def asyncpg_prepared(dsn):
    """asyncpg names its statements __asyncpg_stmt_N__, describes them, and uses binary formats."""
    import asyncpg

    async def main():
        c = await asyncpg.connect(**apg(dsn))
        try:
            await c.execute("drop table if exists compat_apg; create table compat_apg (id int primary key, v text)")
            await c.executemany("insert into compat_apg values ($1, $2)", [(i, f"v{i}") for i in range(5)])
            out = [await c.fetchval("select v from compat_apg where id = $1", i) for i in range(5)]
            st = await c.prepare("select id, v from compat_apg where id > $1 order by id")
            out.append([list(r) for r in await st.fetch(2)])
            out.append(list(await st.fetchrow(3)))
            out.append([a.name for a in st.get_attributes()])
            out.append(await c.fetchval("select $1::int[]", [1, 2, 3]))
            async with c.transaction():
                out.append([r["id"] async for r in c.cursor("select id from compat_apg order by id", prefetch=2)])
            try:
                await c.fetchval("select 1/$1", 0)
            except asyncpg.PostgresError as e:
                out.append(e.sqlstate)
            out.append(await c.fetchval("select count(*) from compat_apg"))
            await c.execute("drop table compat_apg")
            return out
        finally:
            await c.close()

    return asyncio.run(main())


@case
def asyncpg_copy(dsn):
    """asyncpg's binary COPY in and out."""
    import asyncpg

    async def main():
        c = await asyncpg.connect(**apg(dsn))
        try:
            await c.execute("drop table if exists compat_apg_copy; create table compat_apg_copy (id int, v text)")
            await c.copy_records_to_table("compat_apg_copy", records=[(i, f"r{i}") for i in range(50)])
            out = [await c.fetchval("select sum(id) from compat_apg_copy")]
            import io

            buf = io.BytesIO()
            await c.copy_from_query("select * from compat_apg_copy where id < 3 order by id", output=buf, format="csv")
            out.append(buf.getvalue().decode())
            await c.execute("drop table compat_apg_copy")
            return out
        finally:
            await c.close()

    return asyncio.run(main())


@case
def asyncpg_cancel(dsn):
    """asyncpg cancels a query whose wait_for timed out, and the connection goes on."""
    import asyncpg

    async def main():
        c = await asyncpg.connect(**apg(dsn))
        out = []
        try:
            for sql in ["select pg_sleep(30)", "select pg_sleep(30) from (select 1 for update) s"]:
                try:
                    await asyncio.wait_for(c.fetchval(sql), 0.5)
                    out.append("finished")
                except asyncio.TimeoutError:
                    out.append("timed out")
                out.append(await c.fetchval("select 1"))
            return out
        finally:
            await c.close()

    return asyncio.run(main())


@case
def psycopg_copy(dsn):
    """COPY FROM STDIN and TO STDOUT, text and binary, and a COPY that fails midway."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as c:
        recreate(c, "compat_copy", "id int, v text")
        with c.cursor().copy("copy compat_copy from stdin") as cp:
            for i in range(100):
                cp.write_row((i, f"row {i}"))
        out.append(c.execute("select count(*), sum(id) from compat_copy").fetchone())
        got = []
        with c.cursor().copy("copy compat_copy to stdout") as cp:
            got = list(cp.rows())
        out.append([len(got), got[:2]])
        with c.cursor().copy("copy (select id, v from compat_copy where id < 3 order by id) to stdout (format binary)") as cp:
            cp.set_types(["int4", "text"])
            out.append(list(cp.rows()))
        try:
            with c.cursor().copy("copy compat_copy from stdin") as cp:
                cp.write(b"1\tok\nnot a number\tbad\n")
        except psycopg.Error as e:
            out.append(e.sqlstate)
        out.append(c.execute("select count(*) from compat_copy").fetchone())
        c.execute("drop table compat_copy")
    return out


@case
def psycopg2_copy_and_large_objects(dsn):
    """psycopg2's copy_expert, and large objects through libpq's lo_* (FunctionCall messages)."""
    import io

    import psycopg2

    out = []
    c = psycopg2.connect(dsn)
    try:
        cur = c.cursor()
        cur.execute("drop table if exists compat_lo; create table compat_lo (id int, v text)")
        cur.copy_expert("copy compat_lo from stdin with (format csv)", io.StringIO("1,a\n2,b\n"))
        c.commit()
        buf = io.StringIO()
        cur.copy_expert("copy compat_lo to stdout with (format csv)", buf)
        out.append(buf.getvalue())
        c.commit()
        lo = c.lobject(0, "wb")
        oid = lo.oid
        lo.write(b"hello large object " * 1000)
        lo.close()
        c.commit()
        lo = c.lobject(oid, "rb")
        out.append(len(lo.read()))
        lo.seek(6)
        out.append(lo.read(5).decode())
        lo.close()
        c.commit()
        c.autocommit = True
        cur.execute("select length(lo_get(%s)), convert_from(lo_get(%s, 0, 5), 'UTF8')", (oid, oid))
        out.append(list(cur.fetchone()))
        cur.execute("select lo_unlink(%s)", (oid,))
        out.append(cur.fetchone()[0])
        cur.execute("select count(*) from pg_largeobject_metadata where oid = %s", (oid,))
        out.append(cur.fetchone()[0])
        cur.execute("drop table compat_lo")
    finally:
        c.close()
    return out


@case
def psycopg_large_objects_sql(dsn):
    """Large objects made and read with the server-side functions, in autocommit."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as c:
        oid = c.execute("select lo_from_bytea(0, 'large object bytes')").fetchone()[0]
        out.append(c.execute("select convert_from(lo_get(%s), 'UTF8')", (oid,)).fetchone())
        c.execute("select lo_put(%s, 0, 'LARGE')", (oid,))
        out.append(c.execute("select convert_from(lo_get(%s), 'UTF8')", (oid,)).fetchone())
        with c.transaction():
            fd = c.execute("select lo_open(%s, 262144)", (oid,)).fetchone()[0]
            out.append(c.execute("select loread(%s, 5)", (fd,)).fetchone())
        out.append(c.execute("select lo_unlink(%s)", (oid,)).fetchone())
    return out


@case
def psycopg_notify(dsn):
    """LISTEN on one connection, NOTIFY and pg_notify from another."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        a.execute("listen compat_ch")
        b.execute("notify compat_ch, 'one'")
        b.execute("select pg_notify('compat_ch', 'two')")
        with b.transaction():
            b.execute("notify compat_ch, 'three'")
        for n in a.notifies(timeout=10, stop_after=3):
            out.append([n.channel, n.payload])
        a.execute("unlisten compat_ch")
        b.execute("notify compat_ch, 'not heard'")
        out.append([n.payload for n in a.notifies(timeout=0.3)])
    return out


@case
def asyncpg_notify(dsn):
    """asyncpg's add_listener."""
    import asyncpg

    async def main():
        a = await asyncpg.connect(**apg(dsn))
        b = await asyncpg.connect(**apg(dsn))
        got = asyncio.Queue()
        try:
            await a.add_listener("compat_apg_ch", lambda _c, _pid, ch, payload: got.put_nowait([ch, payload]))
            await b.execute("notify compat_apg_ch, 'hello'")
            await b.fetchval("select pg_notify('compat_apg_ch', $1)", "again")
            return [await asyncio.wait_for(got.get(), 10) for _ in range(2)]
        finally:
            await a.close()
            await b.close()

    return asyncio.run(main())


@case
def psycopg_backend_pid(dsn):
    """The process id a client got at login (BackendKeyData) is its server's: pg_backend_pid()
    and pg_stat_activity agree, a NOTIFY names it as sender, pg_terminate_backend of it ends that
    client's session (and no other), and cancel still reaches it."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        pa, pb = a.info.backend_pid, b.info.backend_pid
        out.append(a.execute("select pg_backend_pid() = %s", (pa,)).fetchone())
        out.append(b.execute("select count(*) from pg_stat_activity where pid = %s", (pa,)).fetchone())
        a.execute("listen compat_pid_ch")
        b.execute("notify compat_pid_ch, 'from b'")
        a.execute("notify compat_pid_ch, 'from a'")
        got = sorted([n.payload, n.pid == pb, n.pid == pa] for n in a.notifies(timeout=10, stop_after=2))
        out.append(got)
        with Canceller(a.cancel_safe):
            try:
                a.execute("select pg_sleep(30)")
                out.append("finished")
            except psycopg.errors.QueryCanceled as e:
                out.append(e.sqlstate)
        out.append(a.execute("select pg_backend_pid() = %s", (pa,)).fetchone())
        out.append(b.execute("select pg_terminate_backend(%s, 10000)", (pa,)).fetchone())
        try:
            a.execute("select 1")
            out.append("still alive")
        except psycopg.OperationalError as e:
            out.append([type(e).__name__, e.sqlstate, a.closed])
        out.append(b.execute("select pg_backend_pid() = %s", (pb,)).fetchone())
    return out


@case
def asyncpg_backend_pid(dsn):
    """asyncpg's get_server_pid() is its server's process id, and a listener callback gets it
    as the sender of a NOTIFY."""
    import asyncpg

    async def main():
        a = await asyncpg.connect(**apg(dsn))
        b = await asyncpg.connect(**apg(dsn))
        got = asyncio.Queue()
        try:
            pa, pb = a.get_server_pid(), b.get_server_pid()
            out = [await a.fetchval("select pg_backend_pid() = $1", pa)]
            await a.add_listener("compat_apg_pid", lambda _c, pid, _ch, payload: got.put_nowait([payload, pid == pb]))
            await b.execute("notify compat_apg_pid, 'hello'")
            out.append(await asyncio.wait_for(got.get(), 10))
            out.append(await b.fetchval("select count(*) from pg_stat_activity where pid = $1", pa))
            return out
        finally:
            await a.close()
            await b.close()

    return asyncio.run(main())


@case
def psycopg_cancel(dsn):
    """Connection.cancel_safe() during a read (balanced) and during a transaction (primary)."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as c:
        for sql in ["select pg_sleep(30)", "begin; select pg_sleep(30)"]:
            with Canceller(c.cancel_safe):
                try:
                    c.execute(sql)
                    out.append("finished")
                except psycopg.errors.QueryCanceled as e:
                    out.append(e.sqlstate)
            out.append(str(c.info.transaction_status))
            c.execute("rollback")
            out.append(c.execute("select 1").fetchone())
    return out


@case
def psycopg_tpc(dsn):
    """Two-phase commit with psycopg 3's tpc API: prepared transactions left by connections that
    went away are recovered, then one committed and one rolled back; and a prepare-then-commit
    on one connection."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as c:
        recreate(c, "compat_tpc", "id int")
    for i, bqual in [(1, "one"), (2, "two")]:
        c = psycopg.connect(dsn)
        c.tpc_begin(c.xid(42, "compat-gtrid", bqual))
        c.execute("insert into compat_tpc values (%s)", (i,))
        c.tpc_prepare()
        c.close()
    with psycopg.connect(dsn, autocommit=True) as c:
        xids = sorted((x for x in c.tpc_recover() if x.gtrid == "compat-gtrid"), key=lambda x: x.bqual)
        out.append([[x.format_id, x.gtrid, x.bqual, x.database] for x in xids])
        out.append(c.execute("select count(*) from pg_prepared_xacts where gid like '%%compat%%'").fetchone())
        c.tpc_commit(xids[0])
        c.tpc_rollback(xids[1])
        out.append(c.execute("select array_agg(id order by id) from compat_tpc").fetchone())
        c.autocommit = False
        c.tpc_begin(c.xid(43, "compat-own", "x"))
        c.execute("insert into compat_tpc values (3)")
        c.tpc_prepare()
        c.tpc_commit()
        out.append(c.execute("select array_agg(id order by id) from compat_tpc").fetchone())
        c.rollback()
        c.autocommit = True
        out.append(c.execute("select count(*) from pg_prepared_xacts").fetchone())
        c.execute("drop table compat_tpc")
    return out


@case
def psycopg_cursor_with_hold(dsn):
    """A named cursor WITH HOLD fetched from after its transaction committed (psycopg 3)."""
    import psycopg

    out = []
    with psycopg.connect(dsn) as c:
        with c.cursor("compat_hold", withhold=True) as cur:
            cur.execute("select generate_series(1, 10)")
            out.append(cur.fetchmany(3))
            c.commit()
            out.append(cur.fetchmany(3))
            out.append(cur.fetchall())
        c.commit()
    with psycopg.connect(dsn, autocommit=True) as c:
        with c.cursor("compat_hold_auto", withhold=True) as cur:
            cur.execute("select generate_series(1, 5)")
            out.append(cur.fetchmany(2))
            out.append(c.execute("select count(*) from pg_cursors").fetchone())
            out.append(cur.fetchall())
    return out


@case
def psycopg2_cursor_with_hold(dsn):
    """psycopg2's named cursors, with and without hold."""
    import psycopg2

    out = []
    c = psycopg2.connect(dsn)
    try:
        cur = c.cursor("compat_hold2", withhold=True)
        cur.itersize = 4
        cur.execute("select generate_series(1, 10)")
        out.append(cur.fetchmany(3))
        c.commit()
        out.append([r[0] for r in cur])
        cur.close()
        cur = c.cursor("compat_nohold")
        cur.execute("select generate_series(1, 3)")
        out.append(cur.fetchall())
        c.commit()
    finally:
        c.close()
    return out


@case
def psycopg_startup_parameters(dsn):
    """application_name and options at startup, the ParameterStatus values a client sees, and
    application_name changed later."""
    import psycopg

    out = []
    opts = "-c search_path=compat_s,public -c work_mem=3MB -c DateStyle=German"
    with psycopg.connect(dsn, autocommit=True, application_name="compat_app", options=opts) as c:
        for p in ["application_name", "DateStyle", "client_encoding", "TimeZone", "IntervalStyle",
                  "standard_conforming_strings", "integer_datetimes", "is_superuser",
                  "session_authorization", "server_encoding", "in_hot_standby",
                  "default_transaction_read_only", "server_version"]:
            out.append([p, c.info.parameter_status(p)])
        q = "select current_setting('application_name'), current_setting('search_path'), " \
            "current_setting('work_mem'), current_setting('DateStyle'), '2024-01-31'::date::text"
        out.append(c.execute(q).fetchone())
        c.execute("set application_name = 'compat_renamed'")
        out.append(c.info.parameter_status("application_name"))
        out.append(c.execute(q).fetchone())
    return out


@case
def asyncpg_server_settings(dsn):
    """asyncpg's server_settings become startup parameters."""
    import asyncpg

    async def main():
        c = await asyncpg.connect(**apg(dsn), server_settings={"application_name": "compat_apg", "work_mem": "5MB"})
        try:
            return [c.get_settings().application_name, await c.fetchval("select current_setting('work_mem')"),
                    await c.fetchval("select current_setting('application_name')")]
        finally:
            await c.close()

    return asyncio.run(main())


@case
def psycopg_pipeline_autocommit(dsn):
    """psycopg 3 pipeline mode in autocommit: writes and reads, one Sync at the end."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as c:
        recreate(c, "compat_pipe", "id int primary key")
        with c.pipeline():
            for i in range(5):
                c.execute("insert into compat_pipe values (%s)", (i,))
            cur = c.execute("select count(*) from compat_pipe")
        out.append(cur.fetchone())
        with c.pipeline() as p:
            curs = [c.execute("select %s::int * 2", (i,)) for i in range(3)]
            p.sync()
            out.append([x.fetchone() for x in curs])
        c.execute("drop table compat_pipe")
    return out


@case
def psycopg_pipeline_transaction(dsn):
    """psycopg 3 pipeline mode in a transaction: BEGIN, SAVEPOINT and INSERT go out before any
    Sync, with a read fetched (a flush request) between them."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as c:
        recreate(c, "compat_pipe_tx", "id int primary key")
    with psycopg.connect(dsn) as c:
        with c.pipeline():
            out.append(c.execute("select count(*) from compat_pipe_tx").fetchone())
            with c.transaction():
                c.execute("insert into compat_pipe_tx values (1)")
            c.execute("insert into compat_pipe_tx values (2)")
            out.append(c.execute("select array_agg(id order by id) from compat_pipe_tx").fetchone())
        c.commit()
        out.append(c.execute("select count(*) from compat_pipe_tx").fetchone())
        c.rollback()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("drop table compat_pipe_tx")
    return out


@case
def psycopg_pipeline_error(dsn):
    """An error in a pipeline before any Sync reaches the client at once (PostgreSQL sends it
    when the client asks for results with a flush request)."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as c:
        with c.pipeline() as p:
            c.execute("select 1")
            try:
                c.execute("select 1/0").fetchone()
            except psycopg.Error as e:
                out.append(e.sqlstate)
            try:
                c.execute("select 2").fetchone()
            except psycopg.Error as e:
                out.append(type(e).__name__)
            try:
                p.sync()
            except psycopg.Error as e:
                out.append(type(e).__name__)
        out.append(c.execute("select 3").fetchone())
    return out


@case
def sql_prepare_execute(dsn):
    """SQL-level PREPARE, EXECUTE and DEALLOCATE (psycopg2, simple protocol)."""
    import psycopg2

    out = []
    c = psycopg2.connect(dsn)
    c.autocommit = True
    try:
        cur = c.cursor()
        cur.execute("prepare compat_q(int) as select $1 + 1")
        cur.execute("execute compat_q(41)")
        out.append(cur.fetchone()[0])
        cur.execute("select name, statement from pg_prepared_statements order by name")
        out.append(rows(cur))
        cur.execute("deallocate compat_q")
        try:
            cur.execute("execute compat_q(1)")
        except psycopg2.Error as e:
            out.append(e.pgcode)
        for name in ["compat_a", "compat_b", "compat_c"]:
            cur.execute(f"prepare {name} as select '{name}'")
        cur.execute("execute compat_b")
        out.append(cur.fetchone()[0])
        cur.execute("deallocate compat_a")
        cur.execute("prepare compat_a as select 'again'")
        cur.execute("execute compat_a")
        out.append(cur.fetchone()[0])
        cur.execute("select name from pg_prepared_statements order by prepare_time")
        out.append([r[0] for r in cur.fetchall()])
        cur.execute("prepare compat_r as select 1; prepare compat_s as select 2")
        cur.execute("deallocate all")
        cur.execute("select count(*) from pg_prepared_statements")
        out.append(cur.fetchone()[0])
    finally:
        c.close()
    return out


@case
def psycopg_prepared_statements_view(dsn):
    """pg_prepared_statements as a client sees it: its statements (reads that may have run on a
    standby, writes on the primary), in prepare_time order, after psycopg evicted the oldest
    from its cache (prepared_max) with DEALLOCATE; and SQL PREPARE among them."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as c:
        c.prepared_max = 3
        recreate(c, "compat_psv", "id int")
        queries = ["select 1 + %s", "insert into compat_psv values (%s)", "select 2 + %s", "select 3 + %s",
                   "select count(*) + %s from compat_psv"]
        for q in queries:
            c.execute(q, (1,))
        c.execute("prepare compat_psv_sql as select 42")
        c.execute("select 4 + %s", (1,))
        view = "select name, statement, from_sql from pg_prepared_statements order by prepare_time, name"
        out.append(rows(c.execute(view, prepare=False)))
        out.append(c.execute("execute compat_psv_sql", prepare=False).fetchone())
        c.execute("deallocate all", prepare=False)
        out.append(rows(c.execute(view, prepare=False)))
        c.execute("drop table compat_psv", prepare=False)
    return out


@case
def node_local_state(dsn):
    """Views and functions about the server that answers: a client must see the primary's."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as c:
        for q in [
            "select count(*) from pg_stat_activity where pid = pg_backend_pid()",
            "select count(*) > 0 from pg_locks where pid = pg_backend_pid()",
            "show transaction_read_only",
            "select current_setting('transaction_read_only'), current_setting('in_hot_standby')",
            "select pg_current_wal_lsn() is not null, txid_current_if_assigned() is null",
            "select count(*) from pg_prepared_xacts",
            "select state from pg_stat_activity where pid = pg_backend_pid()",
            "select setting from pg_settings where name = 'transaction_read_only'",
        ]:
            out.append([q, c.execute(q).fetchone()])
    return out


@case
def unlogged_tables(dsn):
    """Reads of unlogged tables, which a standby refuses to read: right after CREATE UNLOGGED
    TABLE, prepared, joined, in a transaction, after ALTER ... SET LOGGED and SET UNLOGGED, and
    over asyncpg."""
    import asyncpg
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as c:
        c.execute("drop table if exists compat_unlogged")
        c.execute("create unlogged table compat_unlogged (id int primary key, v text)")
        out.append(c.execute("select count(*) from compat_unlogged").fetchone())
        c.execute("insert into compat_unlogged select g, 'v' || g from generate_series(1, 5) g")
        for i in (1, 2, 3):
            out.append(c.execute("select v from compat_unlogged where id = %s", (i,)).fetchone())
        out.append(c.execute("select count(*) from pg_class p join compat_unlogged u on u.id = p.oid::int").fetchone())
        with c.transaction():
            out.append(c.execute("select count(*) from compat_unlogged").fetchone())
        out.append(c.execute("select sum(id) from \"compat_unlogged\"").fetchone())
        c.execute("alter table compat_unlogged set logged")
        out.append(c.execute("select count(*) from compat_unlogged").fetchone())
        c.execute("alter table compat_unlogged set unlogged")
        out.append(c.execute("select count(*) from compat_unlogged").fetchone())
        with c.pipeline():
            curs = [c.execute("select v from compat_unlogged where id = %s", (i,)) for i in (4, 5)]
        out.append([x.fetchone() for x in curs])

    async def apg_reads():
        a = await asyncpg.connect(**apg(dsn))
        try:
            return [await a.fetchval("select count(*) from compat_unlogged"),
                    await a.fetchval("select v from compat_unlogged where id = $1", 5)]
        finally:
            await a.close()

    out.append(asyncio.run(apg_reads()))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("drop table compat_unlogged")
    return out


@case
def psycopg_encoding_parameters(dsn):
    """Non-UTF-8 client encodings with non-ASCII values passed as parameters."""
    import psycopg

    out = []
    samples = {"LATIN9": "café €", "LATIN1": "naïve ß", "WIN1252": "“quoted” €", "KOI8R": "привет",
               "WIN1251": "привет", "EUC_JP": "日本語", "SJIS": "表示 ソ", "BIG5": "許功蓋", "GBK": "中文",
               "UTF8": "ünïcödé ✓"}
    with psycopg.connect(dsn, autocommit=True) as c:
        recreate(c, "compat_enc", "enc text, v text")
    for enc, s in samples.items():
        with psycopg.connect(dsn, autocommit=True, client_encoding=enc) as c:
            out.append([enc, c.info.encoding, c.info.parameter_status("client_encoding")])
            out.append(c.execute("select %s::text, length(%s::text)", (s, s)).fetchone())
            c.execute("insert into compat_enc values (%s, %s)", (enc, s))
            out.append(c.execute("select v = %s from compat_enc where enc = %s", (s, enc)).fetchone())
    with psycopg.connect(dsn, autocommit=True) as c:
        out.append(rows(c.execute("select enc, v from compat_enc order by enc")))
        c.execute("drop table compat_enc")
    return out


ENCODED_SAMPLES = {"LATIN9": "café €", "LATIN1": "naïve ß", "WIN1252": "“quoted” €", "KOI8R": "привет",
                   "EUC_JP": "日本語", "SJIS": "表示 ソ", "BIG5": "許功蓋", "UTF8": "ünïcödé ✓"}


def encoded_text_statements(s, enc):
    """Statements with `s` written into their text (so the bytes sent are in `enc`): a read that
    dbproxy may balance, a write, a read of it, a SET and a BEGIN with non-ASCII text, and an
    error whose message quotes the text."""
    lit = s.replace("'", "''")
    return [
        f"select '{lit}'::text, length('{lit}'), octet_length('{lit}'::text) > 0 /* {lit} */",
        f"insert into compat_enc_text values ('{enc}', '{lit}')",
        f"select enc from compat_enc_text where v = '{lit}'",
        f"set application_name = 'app {lit}'",
        "select current_setting('application_name')",
        f"/* {lit} */ begin",
        f"select count(*) from compat_enc_text where v <> '{lit}'",
        "commit",
        f"select '{lit}'::int",
    ]


@case
def encoding_query_text_simple(dsn):
    """Query text with non-ASCII characters in non-UTF-8 client encodings, over the simple
    protocol (psycopg2 sends every query with PQexec), SQL PREPARE/EXECUTE included."""
    import psycopg2

    out = []
    c = psycopg2.connect(dsn)
    c.autocommit = True
    c.cursor().execute("drop table if exists compat_enc_text; create table compat_enc_text (enc text, v text)")
    c.close()
    for enc, s in ENCODED_SAMPLES.items():
        c = psycopg2.connect(dsn)
        c.autocommit = True
        try:
            c.set_client_encoding(enc)
            cur = c.cursor()
            out.append([enc, c.encoding])
            for q in encoded_text_statements(s, enc):
                try:
                    cur.execute(q)
                    out.append(rows(cur) if cur.description else cur.statusmessage)
                except psycopg2.Error as e:
                    out.append([e.pgcode, e.pgerror.splitlines()[0]])
            lit = s.replace("'", "''")
            cur.execute(f"prepare compat_enc_p(text) as select $1 || ' {lit}'")
            cur.execute(f"execute compat_enc_p('{lit}')")
            out.append(rows(cur))
            cur.execute("deallocate compat_enc_p")
        finally:
            c.close()
    c = psycopg2.connect(dsn)
    c.autocommit = True
    cur = c.cursor()
    cur.execute("select enc, v from compat_enc_text order by enc")
    out.append(rows(cur))
    cur.execute("drop table compat_enc_text")
    c.close()
    return out


@case
def encoding_query_text_extended(dsn):
    """Query text with non-ASCII characters in non-UTF-8 client encodings, over the extended
    protocol (psycopg 3 with every statement prepared, named _pg3_N), in and out of pipelines."""
    import psycopg

    out = []
    with psycopg.connect(dsn, autocommit=True) as c:
        recreate(c, "compat_enc_text", "enc text, v text")
    for enc, s in ENCODED_SAMPLES.items():
        with psycopg.connect(dsn, autocommit=True, client_encoding=enc, prepare_threshold=0) as c:
            out.append([enc, c.info.encoding])
            for q in encoded_text_statements(s, enc):
                try:
                    cur = c.execute(q.replace("%", "%%"))
                    out.append(cur.fetchall() if cur.description else cur.statusmessage)
                except psycopg.Error as e:
                    out.append([e.sqlstate, str(e).splitlines()[0]])
            lit = s.replace("'", "''")
            with c.pipeline():
                curs = [c.execute(f"select %s::text || ' {lit}'", (str(i),)) for i in range(2)]
            out.append([x.fetchone() for x in curs])
    with psycopg.connect(dsn, autocommit=True) as c:
        out.append(rows(c.execute("select enc, v from compat_enc_text order by enc")))
        c.execute("drop table compat_enc_text")
    return out


@case
def sqlalchemy_orm(dsn):
    """SQLAlchemy's ORM over psycopg 3: create, insert, query, update in sessions."""
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "compat_sa_item"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    d = kv(dsn)
    url = sa.URL.create("postgresql+psycopg", username=d["user"], password=d.get("password"),
                        host=d["host"], port=int(d["port"]), database=d.get("dbname", "postgres"))
    engine = sa.create_engine(url)
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([Item(id=i, name=f"item {i}") for i in range(5)])
            s.commit()
        with Session(engine) as s:
            item = s.get(Item, 3)
            item.name = "renamed"
            s.commit()
            out = [[i.id, i.name] for i in s.scalars(sa.select(Item).order_by(Item.id))]
        Base.metadata.drop_all(engine)
        return out
    finally:
        engine.dispose()


def main():
    if sys.argv[1:] == ["--list"]:
        print("\n".join(CASES))
        return
    name, dsn = sys.argv[1], sys.argv[2]
    print(json.dumps(CASES[name](dsn), default=str, ensure_ascii=False))


if __name__ == "__main__":
    main()
