-- Host metrics written by the collector, one row per host and sampling instant.
--
-- UNIQUE (host, sampled_at) makes every write idempotent: the collector re-sends its spool after an
-- outage or a restart with INSERT ... ON CONFLICT DO NOTHING, so a sample can never appear twice.
-- The same unique index, scanned backwards, serves "the latest sample of a host" and a host's short
-- history (WHERE host = $1 ORDER BY sampled_at DESC LIMIT n), so no second index is needed for them.
CREATE TABLE samples (
    -- Arrival order: lets tests (and operators) check that spooled samples were flushed in order.
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host            text             NOT NULL CHECK (host <> ''),
    sampled_at      timestamptz      NOT NULL,
    -- CPU utilisation over the interval that ends at sampled_at; NULL when it could not be measured.
    cpu_percent     double precision CHECK (cpu_percent BETWEEN 0 AND 100),
    load1           double precision NOT NULL,
    load5           double precision NOT NULL,
    load15          double precision NOT NULL,
    mem_total_bytes bigint           NOT NULL,
    mem_used_bytes  bigint           NOT NULL,
    swap_total_bytes bigint          NOT NULL,
    swap_used_bytes bigint           NOT NULL,
    -- [{"mount": "/", "fs_type": "ext4", "total_bytes": 1, "used_bytes": 1}, ...]
    disks           jsonb            NOT NULL DEFAULT '[]',
    -- [{"iface": "eth0", "rx_bytes": 1, "tx_bytes": 1}, ...]
    net             jsonb            NOT NULL DEFAULT '[]',
    uptime_seconds  double precision NOT NULL,
    process_count   integer          NOT NULL,
    inserted_at     timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT samples_host_sampled_at_key UNIQUE (host, sampled_at)
);

-- "Which hosts reported lately" (the webapp's front page) and retention deletes scan by time alone.
CREATE INDEX samples_sampled_at_idx ON samples (sampled_at);
