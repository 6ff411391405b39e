-- Several replicas on one database (cluster.enabled): who is alive, who owns which device.
CREATE TABLE IF NOT EXISTS replicas (
    id              TEXT PRIMARY KEY,
    alive_until_ms  BIGINT NOT NULL,
    started_at_ms   BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS device_owners (
    device_id  TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    since_ms   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS device_owners_owner ON device_owners (owner);
