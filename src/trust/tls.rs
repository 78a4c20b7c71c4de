//! TLS settings from identity files: what an agent serves with, what a
//! client (CLI, console, a peer agent) connects with, and the one place an
//! inventory address becomes an endpoint.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, ServerTlsConfig};

use super::Identity;
use super::ca::{IDENTITY_CA, IDENTITY_CERT, IDENTITY_KEY};
use crate::config::{HostEntry, TlsConfig};

/// The PEM files of one identity, read and checked.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub identity: Identity,
    ca: String,
    cert: String,
    key: String,
}

impl IdentityFiles {
    /// Read `dir/{ca.pem,cert.pem,key.pem}`, as `tern ca issue` wrote them.
    pub fn load_dir(dir: &Path) -> Result<IdentityFiles, String> {
        IdentityFiles::load(&TlsConfig {
            ca: dir.join(IDENTITY_CA),
            cert: dir.join(IDENTITY_CERT),
            key: dir.join(IDENTITY_KEY),
        })
    }

    pub fn load(files: &TlsConfig) -> Result<IdentityFiles, String> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let (ca, cert, key) = (read(&files.ca)?, read(&files.cert)?, read(&files.key)?);
        first_pem_certificate(&ca).map_err(|e| format!("{}: {e}", files.ca.display()))?;
        let identity =
            Identity::from_pem(&cert).map_err(|e| format!("{}: {e}", files.cert.display()))?;
        if !key.contains("PRIVATE KEY") {
            return Err(format!("{}: not a PEM private key", files.key.display()));
        }
        Ok(IdentityFiles {
            identity,
            ca,
            cert,
            key,
        })
    }

    /// When this identity's certificate expires, seconds since the epoch.
    pub fn not_after(&self) -> Result<i64, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.cert.as_bytes())
            .map_err(|e| format!("cannot read the certificate: {e}"))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| format!("cannot read the certificate: {e}"))?;
        Ok(cert.validity().not_after.timestamp())
    }

    fn tonic_identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert, &self.key)
    }

    /// An agent serves with its identity and accepts only clients whose
    /// certificate the cluster CA signed.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.tonic_identity())
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// Connect as this identity to the agent of `host`, which must present
    /// a certificate of the cluster CA naming `host`.
    pub fn client_for(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(self.tonic_identity())
            .domain_name(host)
    }
}

/// The endpoint of `entry`'s agent: TLS for an `https://` address (with
/// `tls`, or refused without it), plaintext for `http://`.
pub fn endpoint(entry: &HostEntry, tls: Option<&IdentityFiles>) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(entry.address.clone()).map_err(|e| {
        format!(
            "host {}: address {:?} is not a valid URI: {e}",
            entry.name, entry.address
        )
    })?;
    if !entry.address.starts_with("https://") {
        return Ok(endpoint);
    }
    let Some(tls) = tls else {
        return Err(format!(
            "host {} is at {}, which needs an identity: give --identity DIR (or TERN_IDENTITY), \
             a folder `tern ca issue` wrote",
            entry.name, entry.address
        ));
    };
    endpoint
        .tls_config(tls.client_for(&entry.name))
        .map_err(|e| format!("host {}: TLS settings refused: {e}", entry.name))
}

/// The DER bytes of the first certificate in a PEM text.
pub fn first_pem_certificate(pem: &str) -> Result<Vec<u8>, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if block.label != "CERTIFICATE" {
        return Err(format!(
            "a PEM {} where a CERTIFICATE was expected",
            block.label
        ));
    }
    Ok(block.contents)
}
