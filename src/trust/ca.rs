//! The cluster CA: `tern ca init` makes it, `tern ca issue` signs an
//! identity with it. Keys are written 0600 in folders made 0700.
//!
//! A certificate's subject carries the holder's name (CN) and role (OU);
//! its subject alternative names carry the name (agents are reached by it:
//! a client checks that the agent it reached is the host it meant) and
//! whatever else `--san` adds.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use super::Role;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
/// The files of an identity folder, as `--identity DIR` and `[tls]` read them.
pub const IDENTITY_CA: &str = "ca.pem";
pub const IDENTITY_CERT: &str = "cert.pem";
pub const IDENTITY_KEY: &str = "key.pem";

/// A CA is good for ten years; an identity for a year unless asked.
const CA_DAYS: i64 = 3650;
pub const DEFAULT_DAYS: u32 = 365;
const MAX_DAYS: u32 = 3650;

/// What `issue` is asked for.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub name: String,
    pub role: Role,
    /// More names or IP addresses the certificate is valid for.
    pub sans: Vec<String>,
    pub days: u32,
}

/// Make a cluster CA in `dir`. An existing CA is never overwritten: every
/// identity it signed would stop working.
pub fn init(dir: &Path) -> Result<PathBuf, String> {
    let key_path = dir.join(CA_KEY);
    if key_path.exists() || dir.join(CA_CERT).exists() {
        return Err(format!(
            "{} already holds a CA; remove it first to make a new one (every identity it issued would stop working)",
            dir.display()
        ));
    }
    make_private_dir(dir)?;
    let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, "tern cluster CA");
    subject.push(DnType::OrganizationName, "tern");
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_DAYS);
    params.serial_number = Some(serial());
    let ca = CertifiedIssuer::self_signed(params, key)
        .map_err(|e| format!("cannot sign the CA: {e}"))?;
    write_private(&key_path, &ca.key().serialize_pem())?;
    write_private(&dir.join(CA_CERT), &ca.pem())?;
    Ok(dir.join(CA_CERT))
}

/// Sign an identity with the CA in `ca_dir` and write it into
/// `out/NAME/{ca.pem,cert.pem,key.pem}`. Returns that folder.
pub fn issue(ca_dir: &Path, request: &IssueRequest, out: &Path) -> Result<PathBuf, String> {
    if request.days == 0 || request.days > MAX_DAYS {
        return Err(format!(
            "--days {}: must be between 1 and {MAX_DAYS}",
            request.days
        ));
    }
    let now = OffsetDateTime::now_utc();
    issue_between(
        ca_dir,
        request,
        out,
        now - Duration::hours(1),
        now + Duration::days(i64::from(request.days)),
    )
}

/// [`issue`] valid from `not_before` to `not_after`, whatever they are (an
/// identity already expired, or not yet valid, for the tests of what
/// refuses one); `request.days` is not read.
pub fn issue_between(
    ca_dir: &Path,
    request: &IssueRequest,
    out: &Path,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<PathBuf, String> {
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let ca_key_pem = read(&ca_dir.join(CA_KEY))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| format!("{}: not a key: {e}", ca_dir.join(CA_KEY).display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| {
        format!(
            "{}: not a CA certificate: {e}",
            ca_dir.join(CA_CERT).display()
        )
    })?;
    let folder = out.join(&request.name);
    if folder.join(IDENTITY_KEY).exists() {
        return Err(format!(
            "{} already holds an identity; remove it first to issue a new one",
            folder.display()
        ));
    }
    let mut params = identity_params(request)?;
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| format!("cannot sign the certificate of {}: {e}", request.name))?;
    make_private_dir(out)?;
    make_private_dir(&folder)?;
    write_private(&folder.join(IDENTITY_KEY), &key.serialize_pem())?;
    write_private(&folder.join(IDENTITY_CERT), &cert.pem())?;
    write_private(&folder.join(IDENTITY_CA), &ca_pem)?;
    Ok(folder)
}

fn identity_params(request: &IssueRequest) -> Result<CertificateParams, String> {
    let mut names = vec![request.name.clone()];
    names.extend(request.sans.iter().cloned());
    names.dedup();
    if let Some(bad) = names.iter().find(|n| {
        n.parse::<std::net::IpAddr>().is_err()
            && rustls_pki_types::ServerName::try_from(n.as_str()).is_err()
    }) {
        return Err(format!(
            "{bad:?}: each of the certificate's names must be a host name or an IP address"
        ));
    }
    let mut params = CertificateParams::new(names.clone()).map_err(|e| {
        format!(
            "{}: each of the certificate's names must be a host name or an IP address: {e}",
            names.join(", ")
        )
    })?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, request.name.as_str());
    subject.push(DnType::OrganizationalUnitName, request.role.as_str());
    subject.push(DnType::OrganizationName, "tern");
    params.distinguished_name = subject;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if request.role == Role::Agent {
        // An agent serves and also calls its peers.
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = true;
    debug_assert!(
        params
            .subject_alt_names
            .iter()
            .any(|s| matches!(s, SanType::DnsName(_) | SanType::IpAddress(_)))
    );
    Ok(params)
}

fn serial() -> SerialNumber {
    let bytes: [u8; 16] = rand::random();
    // Positive, as DER wants a serial number.
    let mut bytes = bytes.to_vec();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn make_private_dir(dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Write a file only its owner may read; an existing one is replaced.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::trust::Identity;

    fn request(name: &str, role: Role) -> IssueRequest {
        IssueRequest {
            name: name.into(),
            role,
            sans: vec!["127.0.0.1".into()],
            days: 30,
        }
    }

    #[test]
    fn an_issued_identity_carries_its_name_and_role_in_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca).unwrap();
        let folder = issue(&ca, &request("hv-a", Role::Agent), &dir.path().join("ids")).unwrap();
        for file in [IDENTITY_CA, IDENTITY_CERT, IDENTITY_KEY] {
            let mode = std::fs::metadata(folder.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        assert_eq!(
            std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let cert = std::fs::read_to_string(folder.join(IDENTITY_CERT)).unwrap();
        assert_eq!(
            Identity::from_pem(&cert).unwrap(),
            Identity {
                name: "hv-a".into(),
                role: Role::Agent
            }
        );
    }

    #[test]
    fn a_ca_or_an_identity_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca).unwrap();
        let first = std::fs::read_to_string(ca.join(CA_KEY)).unwrap();
        assert!(init(&ca).unwrap_err().contains("already holds a CA"));
        assert_eq!(std::fs::read_to_string(ca.join(CA_KEY)).unwrap(), first);
        let ids = dir.path().join("ids");
        issue(&ca, &request("ana", Role::Operator), &ids).unwrap();
        let err = issue(&ca, &request("ana", Role::Admin), &ids).unwrap_err();
        assert!(err.contains("already holds an identity"), "{err}");
        let cert = std::fs::read_to_string(ids.join("ana").join(IDENTITY_CERT)).unwrap();
        assert_eq!(Identity::from_pem(&cert).unwrap().role, Role::Operator);
    }

    #[test]
    fn bad_requests_are_refused_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let ids = dir.path().join("ids");
        let err = issue(&ca, &request("ana", Role::Viewer), &ids).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
        init(&ca).unwrap();
        let mut zero = request("ana", Role::Viewer);
        zero.days = 0;
        assert!(issue(&ca, &zero, &ids).unwrap_err().contains("--days 0"));
        let mut bad_san = request("ana", Role::Viewer);
        bad_san.sans = vec!["not a name".into()];
        assert!(
            issue(&ca, &bad_san, &ids)
                .unwrap_err()
                .contains("host name or an IP address")
        );
        assert!(!ids.join("ana").exists());
    }
}
