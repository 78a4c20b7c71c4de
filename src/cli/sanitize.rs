//! Text from the network on an operator's terminal. Agents pass on what
//! peers and drivers said (causes, errors, details, names); a string with an
//! escape sequence in it could repaint the console, retitle the window, hide
//! a line or fake one. [`terminal_safe`] takes such sequences and every other
//! control character out; [`Sanitize`] applies it to every string of a
//! message. Both are applied where answers arrive: replies and status
//! messages in [`super::client::Agent`], and every event of a Watch stream
//! ([`super::client::WatchStream`]). The console and the CLI print nothing
//! from an agent that has not passed through there.

use std::borrow::Cow;

use crate::proto;

/// `text` without terminal control: escape sequences (CSI, OSC, DCS and
/// the like, with their parameters), C0 and C1 control characters except
/// newline and tab, DEL, and the bidirectional overrides that make a line
/// read differently from what it says.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            if !unsafe_char(c) {
                out.push(c);
            }
            continue;
        }
        match chars.next() {
            // CSI: parameters and intermediates up to a final byte.
            Some('[') => {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            // OSC, DCS, SOS, PM, APC: a string up to BEL or ST (ESC \).
            Some(']' | 'P' | 'X' | '^' | '_') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' {
                        if chars.peek() == Some(&'\\') {
                            chars.next();
                        }
                        break;
                    }
                }
            }
            // Any other escape is ESC and one character (ESC c resets).
            _ => {}
        }
    }
    out.into()
}

fn unsafe_char(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A message whose strings are made [`terminal_safe`] in place.
pub trait Sanitize {
    fn sanitize(&mut self);
}

impl Sanitize for String {
    fn sanitize(&mut self) {
        if let Cow::Owned(safe) = terminal_safe(self) {
            *self = safe;
        }
    }
}

impl<T: Sanitize> Sanitize for Vec<T> {
    fn sanitize(&mut self) {
        self.iter_mut().for_each(Sanitize::sanitize);
    }
}

impl<T: Sanitize> Sanitize for Option<T> {
    fn sanitize(&mut self) {
        if let Some(inner) = self {
            inner.sanitize();
        }
    }
}

/// Messages without text.
impl Sanitize for () {
    fn sanitize(&mut self) {}
}

/// `Sanitize` for a message: every field that holds text, directly or in
/// a message of its own. A field left out here would reach the terminal
/// raw: the test below finds any, nested up to three levels.
macro_rules! sanitize_fields {
    ($($t:ty { $($field:ident),* $(,)? })*) => {$(
        impl Sanitize for $t {
            fn sanitize(&mut self) {
                $(self.$field.sanitize();)*
            }
        }
    )*};
}

sanitize_fields! {
    proto::MigrationRecord { id, vm, source, destination, running_on, error, features, attempt_id, cookies, convergence, completion_note, recovery, repairs }
    proto::RepairRecord { feature, stages, host, result, error, who }
    proto::Convergence { reason }
    proto::PostcopyRecovery { error }
    proto::FeatureRecord { name, error, detail }
    proto::CookieRecord { name, summary }
    proto::Host { name, address, features, feature_state, pending_rollbacks, faults, hypervisor, warnings, security }
    proto::FeatureState { feature, vm, state }
    proto::PendingRollback { attempt_id, migration_id, vm, feature, stage, error }
    proto::FaultSettings { feature, fail }
    proto::Vm { name, host, features, migration_id }
    proto::FeatureRef { name, driver }
    proto::Snapshot { host, vms, migrations, evacuations }
    proto::Progress { migration_id, attempt_id, convergence }
    proto::LogLine { level, migration_id, text }
    proto::EvacuationRecord { id, host, exclude, vms }
    proto::EvacuationVm { vm, migration_id, host, waiting, attempts, required }
    proto::EvacuationAttempt { destination, failed_feature, error }
    proto::ListMigrationsReply { migrations, next_page_token }
    proto::ListEvacuationsReply { evacuations, next_page_token }
    proto::ListVmsReply { vms, next_page_token }
    proto::RollbackReply { done, still_pending }
    proto::Event { host, kind }
    proto::AuditEntry { host, who, role, action, target, result }
    proto::ListAuditReply { entries }
    proto::CheckReply { vm, source, destination, checks }
    proto::AdmissionCheck { name, host, detail }
    proto::AttemptLogLine { level, host, attempt_id, text }
    proto::AttemptLogsReply { host, lines }
    proto::DoctorCheck { name, detail, fix }
    proto::DoctorReply { host, checks }
    proto::MeasureLinkReply { check, address }
}

impl Sanitize for proto::event::Kind {
    fn sanitize(&mut self) {
        use proto::event::Kind;
        match self {
            Kind::Snapshot(m) => m.sanitize(),
            Kind::Migration(m) => m.sanitize(),
            Kind::Progress(m) => m.sanitize(),
            Kind::HostChanged(m) => m.sanitize(),
            Kind::Vm(m) => m.sanitize(),
            Kind::VmRemoved(m) => m.sanitize(),
            Kind::Log(m) => m.sanitize(),
            Kind::Evacuation(m) => m.sanitize(),
            Kind::Audit(m) => m.sanitize(),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn escape_sequences_and_controls_are_taken_out_and_plain_text_kept() {
        for (input, expected) in [
            ("plain text, ünïcode ✓", "plain text, ünïcode ✓"),
            ("two\nlines\tand a tab", "two\nlines\tand a tab"),
            ("\u{1b}[2J\u{1b}[Hfake prompt", "fake prompt"),
            ("red \u{1b}[31;1mbold\u{1b}[0m end", "red bold end"),
            ("\u{1b}]0;owned title\u{7}after", "after"),
            (
                "\u{1b}]8;;http://evil\u{1b}\\link\u{1b}]8;;\u{1b}\\",
                "link",
            ),
            ("\u{1b}Pdevice control\u{1b}\\x", "x"),
            ("reset\u{1b}c!", "reset!"),
            ("over\rwrite\u{8}\u{7}\u{7f}", "overwrite"),
            ("c1 \u{9b}31m csi", "c1 31m csi"),
            ("abc\u{202e}fed\u{2066}", "abcfed"),
            ("unterminated \u{1b}]0;title", "unterminated "),
            ("trailing \u{1b}", "trailing "),
        ] {
            assert_eq!(terminal_safe(input), expected, "{input:?}");
        }
        assert!(matches!(terminal_safe("plain"), Cow::Borrowed(_)));
    }

    /// Protobuf bytes that put `ESC[31m` in field `path[last]` inside the
    /// messages at `path[..last]` (each a length-delimited field).
    fn nested(path: &[u32]) -> Vec<u8> {
        let mut bytes = b"\x1b[31mX".to_vec();
        for &field in path.iter().rev() {
            let mut outer = Vec::new();
            prost::encoding::encode_key(
                field,
                prost::encoding::WireType::LengthDelimited,
                &mut outer,
            );
            prost::encoding::encode_varint(bytes.len() as u64, &mut outer);
            outer.extend_from_slice(&bytes);
            bytes = outer;
        }
        bytes
    }

    /// Every way to reach a string field of `T` within `depth` nested
    /// messages (field numbers up to 20) decodes with an escape in it; after
    /// `sanitize` none may be left. A string field missing from
    /// `sanitize_fields!` fails here.
    fn no_field_left_raw<T: Message + Default + Sanitize>(what: &str, depth: usize) {
        let mut paths: Vec<Vec<u32>> = (1..=20).map(|f| vec![f]).collect();
        let mut reached = std::collections::BTreeSet::new();
        for level in 1..=depth {
            for path in &paths {
                let Ok(mut message) = T::decode(nested(path).as_slice()) else {
                    continue;
                };
                if message.encode_to_vec().contains(&0x1b) {
                    reached.insert(level);
                    message.sanitize();
                    assert!(
                        !message.encode_to_vec().contains(&0x1b),
                        "{what}: field path {path:?} keeps an escape after sanitize"
                    );
                }
            }
            paths = paths
                .iter()
                .flat_map(|p| (1..=20).map(move |f| [p.clone(), vec![f]].concat()))
                .collect();
        }
        // The probe reaches text as deep as asked: it tests nested
        // messages, not only the top one.
        assert!(
            reached.contains(&depth),
            "{what}: no string field at depth {depth} (reached {reached:?})"
        );
    }

    #[test]
    fn every_text_field_of_what_agents_send_is_sanitised() {
        // Depths: as deep as each message nests text (an Event's snapshot's
        // evacuation's VM's attempt is the deepest, at 5).
        no_field_left_raw::<proto::Event>("Event", 4);
        no_field_left_raw::<proto::Snapshot>("Snapshot", 4);
        no_field_left_raw::<proto::MigrationRecord>("MigrationRecord", 2);
        no_field_left_raw::<proto::Host>("Host", 2);
        no_field_left_raw::<proto::EvacuationRecord>("EvacuationRecord", 3);
        no_field_left_raw::<proto::ListMigrationsReply>("ListMigrationsReply", 3);
        no_field_left_raw::<proto::ListVmsReply>("ListVmsReply", 3);
        no_field_left_raw::<proto::ListEvacuationsReply>("ListEvacuationsReply", 4);
        no_field_left_raw::<proto::RollbackReply>("RollbackReply", 2);
        no_field_left_raw::<proto::AttemptLogsReply>("AttemptLogsReply", 2);
        no_field_left_raw::<proto::DoctorReply>("DoctorReply", 2);
        no_field_left_raw::<proto::MeasureLinkReply>("MeasureLinkReply", 2);
    }
}
