//! One-time enrolment codes: an admin creates one; a device exchanges it for credentials.
//! Codes are stored hashed, expire, and are used up atomically.

use rand::Rng;
use sqlx::Row;

use super::tokens::hash_token;
use super::StoreError;
use crate::db::{now_ms, Db};
use crate::secret::Secret;

/// Longest allowed code lifetime: 7 days.
pub const MAX_EXPIRES_IN_S: u64 = 7 * 24 * 3600;

/// Why a code was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedeemError {
    Unknown,
    Expired,
    UsedUp,
}

impl RedeemError {
    pub const fn as_str(self) -> &'static str {
        match self {
            RedeemError::Unknown => "unknown_code",
            RedeemError::Expired => "expired_code",
            RedeemError::UsedUp => "used_code",
        }
    }
}

/// A code as created.
#[derive(Debug)]
pub struct NewCode {
    pub code: Secret,
    pub expires_at_ms: i64,
}

/// A redeemed code's settings.
#[derive(Debug, Clone)]
pub struct Redeemed {
    pub name_prefix: Option<String>,
}

/// A human-typable code: 4 groups of 4 from an unambiguous alphabet (80 bits).
pub fn generate_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..4)
        .map(|_| {
            (0..4)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Codes are compared case-insensitively and without surrounding blanks.
fn normalise(code: &str) -> String {
    code.trim().to_ascii_uppercase()
}

#[derive(Clone, Debug)]
pub struct EnrollmentStore {
    db: Db,
}

impl EnrollmentStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn create(
        &self,
        expires_in_s: u64,
        uses: u32,
        name_prefix: Option<&str>,
        created_by: &str,
    ) -> Result<NewCode, StoreError> {
        let code = generate_code();
        let now = now_ms();
        let expires_at_ms =
            now.saturating_add(i64::try_from(expires_in_s).unwrap_or(i64::MAX / 2) * 1000);
        sqlx::query(
            "INSERT INTO enrollments (code_hash, name_prefix, uses_left, expires_at_ms, created_at_ms, created_by)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(hash_token(&normalise(&code)))
        .bind(name_prefix.map(str::to_owned))
        .bind(i64::from(uses))
        .bind(expires_at_ms)
        .bind(now)
        .bind(created_by)
        .execute(self.db.pool())
        .await?;
        Ok(NewCode {
            code: Secret::new(code),
            expires_at_ms,
        })
    }

    /// Uses the code once, atomically.
    pub async fn redeem(&self, code: &str) -> Result<Result<Redeemed, RedeemError>, StoreError> {
        let hash = hash_token(&normalise(code));
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE enrollments SET uses_left = uses_left - 1
             WHERE code_hash = $1 AND uses_left > 0 AND expires_at_ms > $2",
        )
        .bind(&hash)
        .bind(now)
        .execute(self.db.pool())
        .await?;
        let row = sqlx::query(
            "SELECT name_prefix, uses_left, expires_at_ms FROM enrollments WHERE code_hash = $1",
        )
        .bind(&hash)
        .fetch_optional(self.db.pool())
        .await?;
        let Some(row) = row else {
            return Ok(Err(RedeemError::Unknown));
        };
        if done.rows_affected() == 1 {
            return Ok(Ok(Redeemed {
                name_prefix: row.try_get("name_prefix")?,
            }));
        }
        let expires_at_ms: i64 = row.try_get("expires_at_ms")?;
        if expires_at_ms <= now {
            Ok(Err(RedeemError::Expired))
        } else {
            Ok(Err(RedeemError::UsedUp))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_grouped_and_normalised() {
        let c = generate_code();
        assert_eq!(c.len(), 19);
        assert_eq!(c.split('-').count(), 4);
        assert_eq!(normalise(&format!("  {}\n", c.to_lowercase())), c);
    }
}
