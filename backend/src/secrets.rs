//! Generated secrets in the data dir: the bootstrap admin token. Files are created with mode
//! 0600 and reused on later starts; their contents are never logged.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::RngCore;

use crate::secret::Secret;
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is empty; delete it to generate a new one")]
    Empty { path: PathBuf },
}

/// 256 random bits, URL-safe base64 without padding (43 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Where the bootstrap admin token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Configured,
    Generated(PathBuf),
    Existing(PathBuf),
}

/// The bootstrap admin token: `admin.token` when configured, else `{data_dir}/admin-token`,
/// generated on first start.
pub fn bootstrap_admin_token(settings: &Settings) -> Result<(Secret, TokenSource), SecretError> {
    if let Some(token) = &settings.admin.token {
        return Ok((token.clone(), TokenSource::Configured));
    }
    let path = settings.data_dir.join("admin-token");
    let (secret, created) = read_or_create(&path, random_token)?;
    let source = if created {
        TokenSource::Generated(path)
    } else {
        TokenSource::Existing(path)
    };
    Ok((secret, source))
}

/// The JWT signing key: `admin.jwt_secret` when configured, else `{data_dir}/jwt-secret`.
pub fn jwt_secret(settings: &Settings) -> Result<Secret, SecretError> {
    if let Some(secret) = &settings.admin.jwt_secret {
        return Ok(secret.clone());
    }
    read_or_create(&settings.data_dir.join("jwt-secret"), random_token).map(|(s, _)| s)
}

/// Reads a secret file, or creates it (mode 0600) with `make()`. Returns whether it was created.
pub fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> String,
) -> Result<(Secret, bool), SecretError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| SecretError::Write {
            path: dir.to_owned(),
            source,
        })?;
    }
    let value = make();
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut file) => {
            file.write_all(value.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all())
                .map_err(|source| SecretError::Write {
                    path: path.to_owned(),
                    source,
                })?;
            Ok((Secret::new(value), true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
                path: path.to_owned(),
                source,
            })?;
            let text = text.trim();
            if text.is_empty() {
                return Err(SecretError::Empty {
                    path: path.to_owned(),
                });
            }
            Ok((Secret::new(text), false))
        }
        Err(source) => Err(SecretError::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_generated_token_is_written_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            data_dir: dir.path().join("data"),
            ..Settings::default()
        };
        let (first, src) = bootstrap_admin_token(&settings).unwrap();
        let path = dir.path().join("data/admin-token");
        assert_eq!(src, TokenSource::Generated(path.clone()));
        assert_eq!(first.expose().len(), 43);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (second, src) = bootstrap_admin_token(&settings).unwrap();
        assert_eq!(src, TokenSource::Existing(path));
        assert_eq!(first, second);
    }

    #[test]
    fn tokens_are_distinct() {
        assert_ne!(random_token(), random_token());
    }
}
