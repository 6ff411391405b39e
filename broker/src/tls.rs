//! TLS material for the device-facing listener: configured files, or a development CA and
//! server certificate generated on first start into `{data_dir}/tls/` and reused afterwards.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::settings::TlsFiles;

/// Why the TLS material could not be loaded or generated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no private key")]
    NoKey { path: PathBuf },
    #[error("mqtt.tls.cert and mqtt.tls.key must be set together")]
    HalfConfigured,
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("building the TLS server configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server configuration plus where its files live (the CA is what devices must trust).
#[derive(Clone)]
pub struct TlsMaterial {
    pub server_config: Arc<rustls::ServerConfig>,
    /// The CA to hand to devices. For configured certificates this is the certificate file
    /// itself (its chain ends in whatever CA issued it).
    pub ca_pem_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem_path", &self.ca_pem_path)
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const CERT_FILE: &str = "server.pem";
const KEY_FILE: &str = "server.key";

/// Loads the configured certificate and key, or generates (first start) / reuses (later
/// starts) a development CA and server certificate under `{data_dir}/tls/`.
pub fn load_or_generate(
    files: &TlsFiles,
    data_dir: &Path,
    hosts: &[String],
) -> Result<TlsMaterial, TlsError> {
    let (ca, cert, key) = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => (cert.clone(), cert.clone(), key.clone()),
        (None, None) => {
            let dir = data_dir.join("tls");
            let paths = (dir.join(CA_FILE), dir.join(CERT_FILE), dir.join(KEY_FILE));
            if !(paths.0.exists() && paths.1.exists() && paths.2.exists()) {
                generate(&dir, hosts)?;
            }
            paths
        }
        _ => return Err(TlsError::HalfConfigured),
    };
    let server_config = server_config(&cert, &key)?;
    Ok(TlsMaterial {
        server_config,
        ca_pem_path: ca,
        cert_path: cert,
        key_path: key,
    })
}

/// Builds a rustls server configuration (ring provider, TLS 1.2 and 1.3) from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    let key = read_key(key)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_owned(),
        })
}

fn generate(dir: &Path, hosts: &[String]) -> Result<(), TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };

    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Companion development CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    names.extend(hosts.iter().filter(|h| !h.is_empty()).cloned());
    names.dedup();
    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Companion MQTT broker");
    params.distinguished_name = dn;
    let server_cert = params.signed_by(&server_key, &issuer)?;

    write_file(
        &dir.join(CA_KEY_FILE),
        ca_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(
        &dir.join(KEY_FILE),
        server_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(&dir.join(CERT_FILE), server_cert.pem().as_bytes(), false)?;
    // The CA file is written last: its presence marks a complete set.
    write_file(&dir.join(CA_FILE), ca_cert.pem().as_bytes(), false)?;
    tracing::info!(dir = %dir.display(), "generated development CA and server certificate");
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_material_is_reused_and_the_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let first =
            load_or_generate(&TlsFiles::default(), dir.path(), &["pi.example".into()]).unwrap();
        let ca = fs::read(&first.ca_pem_path).unwrap();
        let second = load_or_generate(&TlsFiles::default(), dir.path(), &[]).unwrap();
        assert_eq!(ca, fs::read(&second.ca_pem_path).unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&first.key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn configured_files_take_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let generated = load_or_generate(&TlsFiles::default(), dir.path(), &[]).unwrap();
        let files = TlsFiles {
            cert: Some(generated.cert_path.clone()),
            key: Some(generated.key_path.clone()),
        };
        let other = tempfile::tempdir().unwrap();
        let configured = load_or_generate(&files, other.path(), &[]).unwrap();
        assert_eq!(configured.cert_path, generated.cert_path);
        assert!(!other.path().join("tls").exists());
    }
}
