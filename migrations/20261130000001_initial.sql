-- Companion registry, initial schema.
-- Portable SQL: the same file runs on SQLite and PostgreSQL. Times are BIGINT milliseconds
-- since the Unix epoch; hashes are lowercase hex TEXT; ids are TEXT.

CREATE TABLE IF NOT EXISTS devices (
    device_id      TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    device_type    TEXT NOT NULL,
    -- comma-separated, sorted set of capabilities
    capabilities   TEXT NOT NULL,
    -- booleans are BIGINT 0/1: the sqlx Any driver cannot decode SQLite BOOLEAN
    enabled        BIGINT NOT NULL DEFAULT 1,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);

-- One current token per device: rotation replaces the row, so the old token stops at once.
CREATE TABLE IF NOT EXISTS device_tokens (
    device_id      TEXT PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    token_hash     TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);

-- Admin tokens besides the bootstrap one (`companion admin token create`).
CREATE TABLE IF NOT EXISTS admin_tokens (
    token_id       TEXT PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    token_hash     TEXT NOT NULL UNIQUE,
    created_at_ms  BIGINT NOT NULL,
    revoked_at_ms  BIGINT
);

-- One-time enrolment codes, stored hashed.
CREATE TABLE IF NOT EXISTS enrollments (
    code_hash      TEXT PRIMARY KEY,
    name_prefix    TEXT,
    uses_left      BIGINT NOT NULL,
    expires_at_ms  BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    created_by     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS enrollments_expires ON enrollments (expires_at_ms);

-- Each device's current persona.
CREATE TABLE IF NOT EXISTS device_personas (
    device_id       TEXT PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    persona_id      TEXT NOT NULL,
    switched_at_ms  BIGINT NOT NULL,
    switch_trigger  TEXT NOT NULL
);

-- The retained device configuration (`devices/{id}/config`), as JSON.
CREATE TABLE IF NOT EXISTS device_configs (
    device_id      TEXT PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    config_json    TEXT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);

-- Conversation history, bounded per device by the backend.
CREATE TABLE IF NOT EXISTS conversation_messages (
    message_id     TEXT PRIMARY KEY,
    device_id      TEXT NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    session_id     TEXT NOT NULL,
    persona_id     TEXT NOT NULL,
    role           TEXT NOT NULL,
    content        TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversation_messages_device_time
    ON conversation_messages (device_id, created_at_ms);

-- Every admin action, failed authentication, rotation and enrolment.
CREATE TABLE IF NOT EXISTS audit_log (
    audit_id     TEXT PRIMARY KEY,
    ts_ms        BIGINT NOT NULL,
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    target       TEXT,
    outcome      TEXT NOT NULL,
    remote_addr  TEXT,
    detail       TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log (ts_ms);
CREATE INDEX IF NOT EXISTS audit_log_action_time ON audit_log (action, ts_ms);

-- The last telemetry values per device.
CREATE TABLE IF NOT EXISTS telemetry_latest (
    device_id       TEXT PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,
    ts_ms           BIGINT NOT NULL,
    received_at_ms  BIGINT NOT NULL,
    uptime_s        BIGINT NOT NULL,
    battery_pct     DOUBLE PRECISION,
    cpu_temp_c      DOUBLE PRECISION,
    rssi_dbm        BIGINT,
    free_mem_kb     BIGINT,
    extra_json      TEXT
);

-- Presence from the broker edge and the retained status topic.
CREATE TABLE IF NOT EXISTS presence (
    device_id               TEXT PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    online                  BIGINT NOT NULL,
    last_seen_ms            BIGINT NOT NULL,
    connected_since_ms      BIGINT,
    last_disconnect_ms      BIGINT,
    last_disconnect_reason  TEXT,
    peer                    TEXT
);
CREATE INDEX IF NOT EXISTS presence_online ON presence (online);
