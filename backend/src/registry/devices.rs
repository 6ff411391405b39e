//! Devices and their tokens in the database.

use std::collections::BTreeSet;

use companion_schema::DeviceId;
use rand::Rng;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::model::{capabilities_from_db, capabilities_to_db, Capability, DeviceName, DeviceType};
use super::tokens::{hash_token, random_token};
use super::StoreError;
use crate::db::{now_ms, Db};
use crate::secret::Secret;

/// What registration asks for.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Chosen by the caller, or generated from the name when `None`.
    pub device_id: Option<DeviceId>,
    pub name: DeviceName,
    pub device_type: DeviceType,
    pub capabilities: BTreeSet<Capability>,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    pub device_id: DeviceId,
    pub name: String,
    pub device_type: String,
    pub capabilities: Vec<Capability>,
    pub enabled: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A device's stored credential, for authentication.
#[derive(Debug, Clone)]
pub struct Credential {
    pub enabled: bool,
    pub token_hash: String,
}

const DEVICE_COLUMNS: &str =
    "d.device_id, d.name, d.device_type, d.capabilities, d.enabled, d.created_at_ms, d.updated_at_ms";

fn device_from_row(row: &AnyRow) -> Result<Device, StoreError> {
    let id: String = row.try_get("device_id")?;
    let caps: String = row.try_get("capabilities")?;
    Ok(Device {
        device_id: DeviceId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        name: row.try_get("name")?,
        device_type: row.try_get("device_type")?,
        capabilities: capabilities_from_db(&caps).into_iter().collect(),
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

/// A device id made from the name: `kitchen-pi-x7k2m9qa`.
pub fn generate_device_id(name: &str) -> DeviceId {
    let mut slug = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            slug.push(c);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
        if slug.len() >= 40 {
            break;
        }
    }
    let slug = slug.trim_matches('-');
    let slug = if slug.is_empty() || slug.starts_with(companion_broker::RESERVED_CLIENT_ID_PREFIX) {
        "device"
    } else {
        slug
    };
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut rng = rand::rng();
    let suffix: String = (0..8)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    // The slug is ≤ 40 characters of the id grammar, so this always parses.
    DeviceId::parse(&format!("{slug}-{suffix}")).unwrap_or_else(|_| {
        DeviceId::parse(&format!("device-{suffix}")).expect("literal id is valid")
    })
}

/// Device rows and tokens.
#[derive(Clone, Debug)]
pub struct DeviceStore {
    db: Db,
}

impl DeviceStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Registers a device and returns its token, shown only this once.
    pub async fn create(&self, new: &NewDevice) -> Result<(Device, Secret), StoreError> {
        let attempts = if new.device_id.is_some() { 1 } else { 4 };
        for _ in 0..attempts {
            let id = new
                .device_id
                .clone()
                .unwrap_or_else(|| generate_device_id(new.name.as_str()));
            match self.insert(&id, new).await {
                Err(StoreError::Conflict(_)) if new.device_id.is_none() => continue,
                other => return other,
            }
        }
        Err(StoreError::Conflict(
            "could not generate a free device id".into(),
        ))
    }

    async fn insert(&self, id: &DeviceId, new: &NewDevice) -> Result<(Device, Secret), StoreError> {
        let now = now_ms();
        let token = random_token();
        let mut tx = self.db.pool().begin().await?;
        sqlx::query(
            "INSERT INTO devices (device_id, name, device_type, capabilities, enabled, created_at_ms, updated_at_ms)
             VALUES ($1, $2, $3, $4, 1, $5, $5)",
        )
        .bind(id.as_str())
        .bind(new.name.as_str())
        .bind(new.device_type.as_str())
        .bind(capabilities_to_db(&new.capabilities))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::from_insert(e, id))?;
        sqlx::query(
            "INSERT INTO device_tokens (device_id, token_hash, created_at_ms) VALUES ($1, $2, $3)",
        )
        .bind(id.as_str())
        .bind(hash_token(&token))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let device = Device {
            device_id: id.clone(),
            name: new.name.as_str().to_owned(),
            device_type: new.device_type.as_str().to_owned(),
            capabilities: new.capabilities.iter().copied().collect(),
            enabled: true,
            created_at_ms: now,
            updated_at_ms: now,
        };
        Ok((device, Secret::new(token)))
    }

    pub async fn get(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.device_id = $1"
        )))
        .bind(id.as_str())
        .fetch_optional(self.db.pool())
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// Devices ordered by id, after `cursor`; `online` filters by presence.
    pub async fn list(
        &self,
        limit: u32,
        cursor: Option<&DeviceId>,
        online: Option<bool>,
    ) -> Result<Vec<Device>, StoreError> {
        let after = cursor.map(|c| c.as_str()).unwrap_or("");
        let rows = match online {
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.device_id > $1
                     ORDER BY d.device_id LIMIT $2"
                )))
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(self.db.pool())
                .await?
            }
            Some(online) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices d
                     LEFT JOIN presence p ON p.device_id = d.device_id
                     WHERE d.device_id > $1 AND COALESCE(p.online, 0) = $2
                     ORDER BY d.device_id LIMIT $3"
                )))
                .bind(after)
                .bind(i64::from(online))
                .bind(i64::from(limit))
                .fetch_all(self.db.pool())
                .await?
            }
        };
        rows.iter().map(device_from_row).collect()
    }

    /// Changes name and/or enabled. `None` when the device does not exist.
    pub async fn update(
        &self,
        id: &DeviceId,
        name: Option<&DeviceName>,
        enabled: Option<bool>,
    ) -> Result<Option<Device>, StoreError> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE devices SET
                name = COALESCE($2, name),
                enabled = COALESCE($3, enabled),
                updated_at_ms = $4
             WHERE device_id = $1",
        )
        .bind(id.as_str())
        .bind(name.map(|n| n.as_str().to_owned()))
        .bind(enabled.map(i64::from))
        .bind(now)
        .execute(self.db.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.get(id).await
    }

    /// Deletes the device and everything that belongs to it. False if it did not exist.
    pub async fn delete(&self, id: &DeviceId) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM devices WHERE device_id = $1")
            .bind(id.as_str())
            .execute(self.db.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Replaces the device's token; the old one stops working at once. `None` if no device.
    pub async fn rotate_token(&self, id: &DeviceId) -> Result<Option<Secret>, StoreError> {
        let token = random_token();
        let done = sqlx::query(
            "UPDATE device_tokens SET token_hash = $2, created_at_ms = $3 WHERE device_id = $1",
        )
        .bind(id.as_str())
        .bind(hash_token(&token))
        .bind(now_ms())
        .execute(self.db.pool())
        .await?;
        Ok((done.rows_affected() > 0).then(|| Secret::new(token)))
    }

    /// The stored credential, for authentication.
    pub async fn credential(&self, id: &DeviceId) -> Result<Option<Credential>, StoreError> {
        let row = sqlx::query(
            "SELECT d.enabled, t.token_hash FROM devices d
             JOIN device_tokens t ON t.device_id = d.device_id
             WHERE d.device_id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(self.db.pool())
        .await?;
        row.map(|r| {
            Ok(Credential {
                enabled: r.try_get::<i64, _>("enabled")? != 0,
                token_hash: r.try_get("token_hash")?,
            })
        })
        .transpose()
    }

    pub async fn count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM devices")
            .fetch_one(self.db.pool())
            .await?
            .try_get("n")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_follow_the_grammar_and_differ() {
        for name in [
            "Kitchen Pi",
            "",
            "!!!",
            "Ünïcödé",
            &"long name ".repeat(20),
            "companion-internal x",
        ] {
            let a = generate_device_id(name);
            let b = generate_device_id(name);
            assert_ne!(a, b);
            assert!(a.as_str().len() <= 64);
            assert!(
                !a.as_str()
                    .starts_with(companion_broker::RESERVED_CLIENT_ID_PREFIX),
                "{a}"
            );
        }
        assert!(generate_device_id("Kitchen Pi")
            .as_str()
            .starts_with("kitchen-pi-"));
    }
}
