//! Admin authentication: the bootstrap token, stored admin tokens, and JWTs exchanged for
//! either (HS256, 24 hours).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::tokens::{hash_token, random_token, verify};
use super::StoreError;
use crate::db::{now_ms, Db};
use crate::secret::Secret;

/// Lifetime of an exchanged JWT.
pub const JWT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Who is calling the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `bootstrap` or `admin:<name>`: what the audit log records as the actor.
    pub name: String,
    /// `bootstrap` or the admin token's id: what revocation checks.
    pub token_id: String,
}

/// Why a bearer credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid,
    Expired,
    Revoked,
}

impl AuthFailure {
    pub const fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
            AuthFailure::Expired => "expired",
            AuthFailure::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    tid: String,
    iat: i64,
    exp: i64,
}

const BOOTSTRAP: &str = "bootstrap";

/// Checks admin credentials.
#[derive(Clone)]
pub struct AdminAuth {
    db: Db,
    bootstrap_hash: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth { .. }")
    }
}

impl AdminAuth {
    pub fn new(db: Db, bootstrap: &Secret, jwt_secret: &Secret) -> Self {
        Self {
            db,
            bootstrap_hash: hash_token(bootstrap.expose()),
            encoding: EncodingKey::from_secret(jwt_secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(jwt_secret.expose().as_bytes()),
        }
    }

    /// Checks an `Authorization` header value.
    pub async fn authenticate(
        &self,
        header: Option<&str>,
    ) -> Result<Result<Principal, AuthFailure>, StoreError> {
        let Some(header) = header else {
            return Ok(Err(AuthFailure::Missing));
        };
        let Some(token) = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Ok(Err(AuthFailure::Invalid));
        };
        if token.matches('.').count() == 2 {
            return self.check_jwt(token).await;
        }
        if verify(token.as_bytes(), &self.bootstrap_hash) {
            return Ok(Ok(Principal {
                name: BOOTSTRAP.into(),
                token_id: BOOTSTRAP.into(),
            }));
        }
        let row = sqlx::query(
            "SELECT token_id, name, token_hash, revoked_at_ms FROM admin_tokens WHERE token_hash = $1",
        )
        .bind(hash_token(token))
        .fetch_optional(self.db.pool())
        .await?;
        let Some(row) = row else {
            return Ok(Err(AuthFailure::Invalid));
        };
        let stored: String = row.try_get("token_hash")?;
        if !verify(token.as_bytes(), &stored) {
            return Ok(Err(AuthFailure::Invalid));
        }
        if row.try_get::<Option<i64>, _>("revoked_at_ms")?.is_some() {
            return Ok(Err(AuthFailure::Revoked));
        }
        let name: String = row.try_get("name")?;
        Ok(Ok(Principal {
            name: format!("admin:{name}"),
            token_id: row.try_get("token_id")?,
        }))
    }

    async fn check_jwt(&self, token: &str) -> Result<Result<Principal, AuthFailure>, StoreError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = match jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation) {
            Ok(data) => data.claims,
            Err(e) => {
                return Ok(Err(match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthFailure::Expired,
                    _ => AuthFailure::Invalid,
                }))
            }
        };
        if claims.tid != BOOTSTRAP {
            let revoked = sqlx::query("SELECT revoked_at_ms FROM admin_tokens WHERE token_id = $1")
                .bind(&claims.tid)
                .fetch_optional(self.db.pool())
                .await?;
            match revoked {
                None => return Ok(Err(AuthFailure::Revoked)),
                Some(row) if row.try_get::<Option<i64>, _>("revoked_at_ms")?.is_some() => {
                    return Ok(Err(AuthFailure::Revoked))
                }
                Some(_) => {}
            }
        }
        Ok(Ok(Principal {
            name: claims.sub,
            token_id: claims.tid,
        }))
    }

    /// Issues a JWT for `principal` valid for `lifetime`. Returns it and its expiry (ms).
    pub fn issue_jwt(
        &self,
        principal: &Principal,
        lifetime: Duration,
    ) -> Result<(Secret, i64), StoreError> {
        let exp_ms = now_ms() + i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX / 2);
        self.issue_jwt_until(principal, exp_ms)
    }

    /// Issues a JWT for `principal` that expires at `exp_ms` (tests use a past time).
    pub fn issue_jwt_until(
        &self,
        principal: &Principal,
        exp_ms: i64,
    ) -> Result<(Secret, i64), StoreError> {
        let now = now_ms();
        let claims = Claims {
            sub: principal.name.clone(),
            tid: principal.token_id.clone(),
            iat: now / 1000,
            exp: exp_ms / 1000,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| StoreError::Corrupt(format!("signing a JWT: {e}")))?;
        Ok((Secret::new(token), exp_ms))
    }

    /// Creates a named admin token; returns it (shown once).
    pub async fn create_token(&self, name: &str) -> Result<Secret, StoreError> {
        let token = random_token();
        let id = format!("adm_{}", &hash_token(&random_token())[..16]);
        sqlx::query(
            "INSERT INTO admin_tokens (token_id, name, token_hash, created_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(name)
        .bind(hash_token(&token))
        .bind(now_ms())
        .execute(self.db.pool())
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                StoreError::Conflict(format!("an admin token named {name:?} exists"))
            }
            _ => StoreError::Db(e),
        })?;
        Ok(Secret::new(token))
    }

    /// Revokes a named admin token (and every JWT issued for it). False if none is active.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE admin_tokens SET revoked_at_ms = $2 WHERE name = $1 AND revoked_at_ms IS NULL",
        )
        .bind(name)
        .bind(now_ms())
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }
}
