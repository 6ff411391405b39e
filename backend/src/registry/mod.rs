//! The device registry: devices and tokens, enrolment codes, admin credentials.

pub mod admin;
pub mod devices;
pub mod enrollments;
pub mod model;
pub mod tokens;

pub use admin::{AdminAuth, Principal};
pub use devices::{Credential, Device, DeviceStore, NewDevice};
pub use enrollments::EnrollmentStore;

use companion_schema::DeviceId;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

impl StoreError {
    fn from_insert(e: sqlx::Error, id: &DeviceId) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(format!("device {id} already exists"))
            }
            _ => StoreError::Db(e),
        }
    }
}
