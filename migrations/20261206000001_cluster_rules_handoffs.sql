-- Several replicas (cluster.enabled) run one rule set: the last one put (REST or a replica's
-- edited rule file), numbered so each replica notices a newer one.
CREATE TABLE IF NOT EXISTS cluster_rules (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    toml           TEXT NOT NULL,
    version        BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);

-- Rebalancing: a replica hands devices to the one they hash to once it is up and receiving.
ALTER TABLE replicas ADD COLUMN receiving_until_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_owners ADD COLUMN handoff_cutoff_ms BIGINT;
