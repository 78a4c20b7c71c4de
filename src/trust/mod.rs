//! Who may do what: the cluster CA and the identities it issues (`ca`), the
//! TLS settings built from them (`tls`), and the roles the agent enforces.
//!
//! An identity is a certificate from the cluster CA whose subject carries
//! the holder's name (CN) and role (OU). The agent reads both from the
//! client certificate a verified TLS connection presented; nothing the
//! caller says about itself in a request is trusted.

pub mod ca;
pub mod tls;

use std::fmt;

use x509_parser::prelude::{FromDer, X509Certificate};

/// What an identity may do. Each role may do what the one before it may;
/// `Agent` is apart: the Peer service only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
    Agent,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Admin, Role::Agent];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Agent => "agent",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Whether this role may do what `needed` may.
    pub fn may(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Agent, Role::Agent) => true,
            (Role::Agent, _) | (_, Role::Agent) => false,
            (have, needed) => have >= needed,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling: the name and role of a verified certificate, or a
/// plaintext caller (an agent without `[tls]`: loopback, or `insecure`),
/// who may do anything, as before identities existed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Verified(Identity),
    Plaintext,
}

impl Caller {
    /// The caller may do what `needed` may, or the refusal says which role
    /// it takes and which the caller has.
    pub fn check(&self, needed: Role) -> Result<(), String> {
        match self {
            Caller::Plaintext => Ok(()),
            Caller::Verified(id) if id.role.may(needed) => Ok(()),
            Caller::Verified(id) => Err(format!(
                "{} is {} {}: this needs the {needed} role",
                id.name,
                article(id.role),
                id.role
            )),
        }
    }

    /// The host a verified agent certificate names; `None` for plaintext.
    pub fn host(&self) -> Option<&str> {
        match self {
            Caller::Verified(id) => Some(&id.name),
            Caller::Plaintext => None,
        }
    }

    /// As the audit trail writes it.
    pub fn who(&self) -> (&str, &str) {
        match self {
            Caller::Verified(id) => (&id.name, id.role.as_str()),
            Caller::Plaintext => ("(plaintext)", "any"),
        }
    }
}

fn article(role: Role) -> &'static str {
    match role {
        Role::Admin | Role::Agent | Role::Operator => "an",
        Role::Viewer => "a",
    }
}

/// The name and role a certificate of the cluster CA carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

impl Identity {
    /// Read the name (CN) and role (OU) of a DER certificate. The caller
    /// has verified it against the cluster CA; this only reads it.
    pub fn from_der(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("the certificate cannot be read: {e}"))?;
        let subject = cert.subject();
        let text = |attr: Option<&x509_parser::x509::AttributeTypeAndValue>| {
            attr.and_then(|a| a.as_str().ok()).map(str::to_string)
        };
        let name = text(subject.iter_common_name().next())
            .ok_or("the certificate names no holder (no CN)")?;
        let role_text = text(subject.iter_organizational_unit().next())
            .ok_or_else(|| format!("the certificate of {name} carries no role (no OU)"))?;
        let role = Role::parse(&role_text).ok_or_else(|| {
            format!("the certificate of {name} carries an unknown role {role_text:?}")
        })?;
        Ok(Identity { name, role })
    }

    /// The identity of a PEM certificate (a client reads its own).
    pub fn from_pem(pem: &str) -> Result<Identity, String> {
        let der = tls::first_pem_certificate(pem)?;
        Identity::from_der(&der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_may_what_the_roles_below_it_may_and_agents_only_peer() {
        use Role::*;
        let may = |have: Role| {
            Role::ALL
                .into_iter()
                .filter(|n| have.may(*n))
                .collect::<Vec<_>>()
        };
        assert_eq!(may(Viewer), vec![Viewer]);
        assert_eq!(may(Operator), vec![Viewer, Operator]);
        assert_eq!(may(Admin), vec![Viewer, Operator, Admin]);
        assert_eq!(may(Agent), vec![Agent]);
    }

    #[test]
    fn a_refusal_names_the_role_needed_and_the_one_held() {
        let viewer = Caller::Verified(Identity {
            name: "ana".into(),
            role: Role::Viewer,
        });
        assert_eq!(
            viewer.check(Role::Operator).unwrap_err(),
            "ana is a viewer: this needs the operator role"
        );
        assert!(viewer.check(Role::Viewer).is_ok());
        assert!(Caller::Plaintext.check(Role::Admin).is_ok());
    }

    #[test]
    fn roles_parse_as_they_print() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }
}
