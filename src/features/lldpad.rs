//! lldpad's client interface for VDP 2.2 (IEEE 802.1Qbg ratified), spoken
//! directly: what `vdptool` sends and what lldpad answers, over lldpad's
//! abstract unix datagram socket (`@/com/intel/lldpad`, one per network
//! namespace).
//!
//! Owns the message encoding and decoding (plain functions, tested without
//! a daemon) and [`Lldpad`], a connection that sends one request and waits
//! for its outcome.
//!
//! One exchange, as lldpad 1.1 (Debian 12) does it:
//!
//! 1. `A80c4`: attach to the vdp22 module's events; lldpad answers `R00A`.
//! 2. `M000080c4C3 02 0000011c 03eth1 02 00000003` followed by the VSI as
//!    `<2-hex key length><key><4-hex value length><value>` pairs (`mode`,
//!    `mgrid2`, `typeid`, `typeidver`, `uuid`, `hints`, `filter`): the
//!    station's lldpad checks the request and answers `R<status>…`; status
//!    0 means it sent the request to the bridge over ECP.
//! 3. The bridge's answer arrives as an event, `M000080c4E16<4-hex length>`
//!    and the VSI again, whose `hints` field now carries the outcome: 0 is
//!    success; the low byte is the VDP response (1 to 5 the standard's
//!    reasons, 252 to 255 lldpad's own), the next byte lldpad's internal
//!    errors (keep-alive timeout, no ECP acknowledgement, transmit error).
//!
//! A query (`C3 01 00000015 … 04uuid<uuid>`) answers with the VSIs lldpad
//! holds for the interface, each prefixed by its 4-hex length.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::time::Instant;

/// lldpad's client socket, an abstract name (no leading NUL here).
pub const DEFAULT_SOCKET: &str = "/com/intel/lldpad";

/// lldpad's module id for VDP 2.2.
const MODULE_VDP22: u32 = 0x80c4;
/// The client interface's message version.
const MSG_VERSION: u8 = 3;
const CMD_GET: u8 = 1;
const CMD_SET: u8 = 2;
/// `op_arg | op_argval | op_config` with one filter (`1 << 8`), as vdptool sends.
const OPS_SET: u32 = 0x11c;
/// `op_local | op_arg | op_config`, as `vdptool -t -c uuid=…` sends.
const OPS_GET: u32 = 0x15;
/// The nearest-customer-bridge agent, the only one VDP runs on.
const AGENT_NCB: u8 = 2;
/// The VSI TLV (`-V assoc`).
const TLV_VSI: u32 = 3;
/// Event messages begin `M000080c4E16`.
const EVENT_HEADER: usize = 12;

/// The request a VSI stage sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Preassociate,
    Associate,
    Disassociate,
}

impl Mode {
    /// As lldpad spells it.
    pub fn clif(self) -> &'static str {
        match self {
            Mode::Preassociate => "preassoc",
            Mode::Associate => "assoc",
            Mode::Disassociate => "deassoc",
        }
    }

    /// As the standard (and operators) name it.
    pub fn request(self) -> &'static str {
        match self {
            Mode::Preassociate => "PREASSOCIATE",
            Mode::Associate => "ASSOCIATE",
            Mode::Disassociate => "DISASSOCIATE",
        }
    }
}

/// One VSI request: what identifies the VSI and its one filter entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsiRequest {
    pub mode: Mode,
    pub manager_id: u8,
    pub type_id: u32,
    pub type_version: u8,
    /// Lowercase UUID, checked by [`check_uuid`].
    pub instance: String,
    /// Lowercase `52:54:00:12:34:56`, checked by [`check_mac`].
    pub mac: String,
    /// 0: untagged (the bridge may choose).
    pub vlan: u16,
}

/// A VSI as lldpad reports it (a query's answer, or an event).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VsiReport {
    pub mode: String,
    pub type_id: String,
    pub type_version: String,
    pub instance: String,
    /// The outcome code (`hints` in lldpad's answer): 0 is success.
    pub code: Option<u32>,
    pub filters: Vec<String>,
}

impl VsiReport {
    /// Whether lldpad reports this VSI associated with the bridge's consent.
    pub fn is_associated(&self) -> bool {
        self.mode == Mode::Associate.clif() && self.code == Some(0)
    }
}

/// One message from lldpad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The answer to the request just sent: lldpad's status and the rest.
    Reply { status: u8, body: String },
    /// An unsolicited VSI event (the bridge answered, or dropped a VSI).
    Event(VsiReport),
}

fn pair(key: &str, value: &str) -> String {
    format!("{:02x}{key}{:04x}{value}", key.len(), value.len())
}

fn header(cmd: u8, ops: u32, ifname: &str) -> String {
    format!(
        "M{MODULE_VDP22:08x}C{MSG_VERSION:1x}{cmd:02x}{ops:08x}{:02x}{ifname}{AGENT_NCB:02x}{TLV_VSI:08x}",
        ifname.len()
    )
}

/// The attach message that subscribes to vdp22 events.
pub fn attach_command() -> String {
    format!("A{MODULE_VDP22:x}")
}

/// The message that sends `request` out of `ifname`.
pub fn set_command(ifname: &str, request: &VsiRequest) -> String {
    let filter = format!("{}-{}", request.vlan, request.mac);
    let mut message = header(CMD_SET, OPS_SET, ifname);
    for (key, value) in [
        ("mode", request.mode.clif().to_string()),
        ("mgrid2", request.manager_id.to_string()),
        ("typeid", request.type_id.to_string()),
        ("typeidver", request.type_version.to_string()),
        ("uuid", request.instance.clone()),
        ("hints", "none".to_string()),
        ("filter", filter),
    ] {
        message.push_str(&pair(key, &value));
    }
    message
}

/// The message that asks for VSI `instance` on `ifname`.
pub fn get_command(ifname: &str, instance: &str) -> String {
    let mut message = header(CMD_GET, OPS_GET, ifname);
    message.push_str(&pair("uuid", instance));
    message
}

fn hex(text: &str, what: &str) -> Result<usize, String> {
    usize::from_str_radix(text, 16).map_err(|_| format!("{what} {text:?} is not hexadecimal"))
}

/// Split `text` at `n` bytes, or say what was cut short.
fn take<'a>(text: &'a str, n: usize, what: &str) -> Result<(&'a str, &'a str), String> {
    if text.len() < n || !text.is_char_boundary(n) {
        return Err(format!("{what} cut short"));
    }
    Ok(text.split_at(n))
}

/// Decode a VSI's `<keylen><key><valuelen><value>` pairs.
pub fn parse_vsi(mut text: &str) -> Result<VsiReport, String> {
    let mut vsi = VsiReport::default();
    while !text.is_empty() {
        let (len, rest) = take(text, 2, "key length")?;
        let (key, rest) = take(rest, hex(len, "key length")?, "key")?;
        let (len, rest) = take(rest, 4, "value length")?;
        let (value, rest) = take(rest, hex(len, "value length")?, "value")?;
        text = rest;
        match key {
            "mode" => vsi.mode = value.to_string(),
            "typeid" => vsi.type_id = value.to_string(),
            "typeidver" => vsi.type_version = value.to_string(),
            "uuid" => vsi.instance = value.to_ascii_lowercase(),
            "hints" => vsi.code = value.parse().ok(),
            "filter" => vsi.filters.push(value.to_string()),
            _ => {}
        }
    }
    Ok(vsi)
}

/// Decode a list of VSIs, each prefixed by its 4-hex length.
pub fn parse_vsi_list(mut text: &str) -> Result<Vec<VsiReport>, String> {
    let mut list = Vec::new();
    while !text.is_empty() {
        let (len, rest) = take(text, 4, "VSI length")?;
        let (vsi, rest) = take(rest, hex(len, "VSI length")?, "VSI")?;
        list.push(parse_vsi(vsi)?);
        text = rest;
    }
    Ok(list)
}

/// Decode one datagram from lldpad.
pub fn parse_message(text: &str) -> Result<Message, String> {
    if let Some(rest) = text.strip_prefix('R') {
        let (status, body) = take(rest, 2, "status")?;
        let status = u8::from_str_radix(status, 16)
            .map_err(|_| format!("status {status:?} is not hexadecimal"))?;
        return Ok(Message::Reply {
            status,
            body: body.to_string(),
        });
    }
    if text.starts_with('M') && text.as_bytes().get(9) == Some(&b'E') {
        let (_, rest) = take(text, EVENT_HEADER, "event header")?;
        let (len, rest) = take(rest, 4, "event length")?;
        let (vsi, _) = take(rest, hex(len, "event length")?, "event")?;
        return Ok(Message::Event(parse_vsi(vsi)?));
    }
    Err(format!("unexpected message {:?}", preview(text)))
}

/// The VSIs in a query's reply body (`C3 01 ops ifname tlvid` then the list).
pub fn parse_get_reply(body: &str) -> Result<Vec<VsiReport>, String> {
    // C, version, command, ops: 12 characters; then the interface name.
    let (_, rest) = take(body, 12, "reply header")?;
    let (len, rest) = take(rest, 2, "interface length")?;
    let (_, rest) = take(rest, hex(len, "interface length")?, "interface")?;
    let (_, list) = take(rest, 8, "TLV id")?;
    parse_vsi_list(list)
}

fn preview(text: &str) -> String {
    text.chars().take(80).collect()
}

/// What lldpad's client-interface status means (its `cmd_status` and the
/// vdp22 additions, as lldpad 1.1 numbers them).
pub fn status_meaning(status: u8) -> &'static str {
    match status {
        0 => "success",
        1 => "failed",
        2 => "interface not found or not active",
        3 => "no LLDP agent for the interface",
        4 => "invalid command",
        5 => "invalid parameters",
        6 => "peer feature not present",
        7 => "client interface version not compatible",
        8 => "interface not capable",
        9 => "not applicable (is the interface in bridge role?)",
        10 => "access denied",
        11 => "the TLV does not support this agent",
        13 => "VDP not supported on the interface (no EVB exchange with the bridge yet)",
        14 => "lldpad is out of memory",
        15 => "a request for this VSI is still in progress",
        _ => "unknown status",
    }
}

/// What a VDP outcome code means: the bridge's response in the low byte,
/// lldpad's own errors in the next.
pub fn code_meaning(code: u32) -> String {
    let response = code & 0xff;
    let internal = (code >> 8) & 0xff;
    let reason = match response {
        0 => "success".to_string(),
        252 => "disassociated by the bridge".to_string(),
        253 => "the bridge timed out".to_string(),
        254 => "rejected by the bridge, which kept the previous state".to_string(),
        255 => "no response from the bridge".to_string(),
        // The standard's reasons, with its hard-error bit (0x10).
        r => {
            let why = match r & 0x0f {
                1 => "invalid VDP TLV format",
                2 => "insufficient resources at the bridge",
                3 => "the bridge cannot reach its VSI manager",
                4 => "other failure",
                5 => "invalid VLAN, group id or MAC address",
                _ => "unknown reason",
            };
            if r & 0x10 != 0 {
                format!("{why}, hard error")
            } else {
                why.to_string()
            }
        }
    };
    let mut parts = vec![reason];
    for (bit, what) in [
        (1, "keep-alive timeout"),
        (2, "no acknowledgement from the bridge"),
        (4, "transmission error"),
    ] {
        if internal & bit != 0 {
            parts.push(what.to_string());
        }
    }
    parts.join("; ")
}

/// A syntactically valid UUID (8-4-4-4-12 hex digits), lowercased.
pub fn check_uuid(text: &str) -> Result<String, String> {
    let groups: Vec<&str> = text.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    let ok = groups.len() == shape.len()
        && groups
            .iter()
            .zip(shape)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok || groups.iter().all(|g| g.bytes().all(|b| b == b'0')) {
        return Err(format!("VSI instance {text:?} is not a UUID"));
    }
    Ok(text.to_ascii_lowercase())
}

/// A unicast MAC address `xx:xx:xx:xx:xx:xx`, lowercased.
pub fn check_mac(text: &str) -> Result<String, String> {
    let octets: Vec<&str> = text.split(':').collect();
    let ok = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    let multicast = octets
        .first()
        .and_then(|o| u8::from_str_radix(o, 16).ok())
        .is_some_and(|b| b & 1 == 1);
    if !ok || multicast || octets.iter().all(|o| *o == "00") {
        return Err(format!("{text:?} is not a unicast MAC address"));
    }
    Ok(text.to_ascii_lowercase())
}

/// Why an exchange with lldpad failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClifError {
    /// No lldpad listens on the socket (in this network namespace).
    Unreachable(String),
    /// lldpad refused the request itself, with its status.
    Refused(u8),
    /// lldpad sent the request; the bridge's answer (or lldpad's verdict)
    /// is not the one asked for.
    Rejected { asked: Mode, vsi: VsiReport },
    /// No answer within the timeout; `accepted`: lldpad took the request
    /// and the bridge did not answer in time.
    Timeout { accepted: bool },
    /// Anything else: a socket error, a garbled message.
    Other(String),
}

/// A connection to one lldpad, for one exchange at a time.
pub struct Lldpad {
    socket: UnixDatagram,
}

static CLIENTS: AtomicU64 = AtomicU64::new(0);

impl Lldpad {
    /// Connect to lldpad's abstract socket `name` and attach to its VDP
    /// events, within `deadline`. The socket belongs to the network
    /// namespace of the calling thread.
    pub async fn connect(name: &str, deadline: Instant) -> Result<Lldpad, ClifError> {
        let local = format!(
            "{name}/tern-{}-{}",
            std::process::id(),
            CLIENTS.fetch_add(1, Ordering::Relaxed)
        );
        let io = |e: std::io::Error| ClifError::Unreachable(e.to_string());
        let local = SocketAddr::from_abstract_name(local.as_bytes()).map_err(io)?;
        let remote = SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?;
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&local).map_err(io)?;
        socket.connect_addr(&remote).map_err(io)?;
        socket.set_nonblocking(true).map_err(io)?;
        let socket = UnixDatagram::from_std(socket).map_err(io)?;
        let lldpad = Lldpad { socket };
        match lldpad.request(&attach_command(), deadline).await? {
            (0, _) => Ok(lldpad),
            (status, _) => Err(ClifError::Refused(status)),
        }
    }

    async fn send(&self, message: &str) -> Result<(), ClifError> {
        self.socket.send(message.as_bytes()).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                ClifError::Unreachable(e.to_string())
            } else {
                ClifError::Other(format!("cannot send to lldpad: {e}"))
            }
        })?;
        Ok(())
    }

    async fn receive(&self, deadline: Instant) -> Result<Option<Message>, ClifError> {
        let mut buffer = vec![0u8; 8192];
        match tokio::time::timeout_at(deadline, self.socket.recv(&mut buffer)).await {
            Err(_) => Ok(None),
            Ok(Err(e)) => Err(ClifError::Other(format!("cannot read from lldpad: {e}"))),
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buffer[..n]);
                parse_message(&text)
                    .map(Some)
                    .map_err(|e| ClifError::Other(format!("lldpad answered oddly: {e}")))
            }
        }
    }

    /// Send `message` and wait for lldpad's reply (events in between are
    /// dropped: they belong to earlier requests).
    async fn request(&self, message: &str, deadline: Instant) -> Result<(u8, String), ClifError> {
        self.send(message).await?;
        loop {
            match self.receive(deadline).await? {
                None => return Err(ClifError::Timeout { accepted: false }),
                Some(Message::Reply { status, body }) => return Ok((status, body)),
                Some(Message::Event(_)) => {}
            }
        }
    }

    /// Send `request` out of `ifname` and wait until the bridge's answer
    /// for this VSI comes back through lldpad.
    pub async fn exchange(
        &self,
        ifname: &str,
        request: &VsiRequest,
        deadline: Instant,
    ) -> Result<VsiReport, ClifError> {
        let (status, _) = self
            .request(&set_command(ifname, request), deadline)
            .await?;
        if status != 0 {
            return Err(ClifError::Refused(status));
        }
        loop {
            match self.receive(deadline).await? {
                None => return Err(ClifError::Timeout { accepted: true }),
                Some(Message::Event(vsi)) if vsi.instance == request.instance => {
                    return if vsi.mode == request.mode.clif() && vsi.code == Some(0) {
                        Ok(vsi)
                    } else {
                        Err(ClifError::Rejected {
                            asked: request.mode,
                            vsi,
                        })
                    };
                }
                // Another VSI's news, or a stray reply.
                Some(_) => {}
            }
        }
    }

    /// What lldpad holds for VSI `instance` on `ifname`, if anything.
    pub async fn query(
        &self,
        ifname: &str,
        instance: &str,
        deadline: Instant,
    ) -> Result<Option<VsiReport>, ClifError> {
        match self
            .request(&get_command(ifname, instance), deadline)
            .await?
        {
            (0, body) => Ok(parse_get_reply(&body)
                .map_err(|e| ClifError::Other(format!("lldpad answered oddly: {e}")))?
                .into_iter()
                .find(|v| v.instance == instance)),
            (status, _) => Err(ClifError::Refused(status)),
        }
    }
}

/// A deadline `timeout` from now.
pub fn deadline(timeout: Duration) -> Instant {
    Instant::now() + timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(mode: Mode) -> VsiRequest {
        VsiRequest {
            mode,
            manager_id: 0,
            type_id: 5,
            type_version: 1,
            instance: "6b3a1c2e-0000-4000-8000-000000000001".into(),
            mac: "52:54:00:12:34:56".into(),
            vlan: 0,
        }
    }

    #[test]
    fn set_command_is_byte_for_byte_what_vdptool_sends() {
        // Captured from `vdptool -i vs0 -r -T -V assoc -c mode=assoc
        // -c mgrid2=0 -c typeid=5 -c typeidver=1 -c uuid=… -c hints=none
        // -c filter=0-52:54:00:12:34:56` against lldpad 1.1.
        assert_eq!(
            set_command("vs0", &request(Mode::Associate)),
            "M000080c4C3020000011c03vs0020000000304mode0005assoc06mgrid20001006typeid0001509typeidver0001104uuid00246b3a1c2e-0000-4000-8000-00000000000105hints0004none06filter00130-52:54:00:12:34:56"
        );
        let pre = set_command("vs0", &request(Mode::Preassociate));
        assert!(pre.contains("04mode0008preassoc06"), "{pre}");
        let tagged = set_command(
            "eth1",
            &VsiRequest {
                vlan: 42,
                ..request(Mode::Disassociate)
            },
        );
        assert!(
            tagged.starts_with("M000080c4C3020000011c04eth102"),
            "{tagged}"
        );
        assert!(tagged.contains("04mode0007deassoc"), "{tagged}");
        assert!(
            tagged.ends_with("06filter001442-52:54:00:12:34:56"),
            "{tagged}"
        );
    }

    #[test]
    fn get_and_attach_commands_match_vdptool() {
        assert_eq!(
            get_command("vs0", "6b3a1c2e-0000-4000-8000-000000000001"),
            "M000080c4C3010000001503vs0020000000304uuid00246b3a1c2e-0000-4000-8000-000000000001"
        );
        assert_eq!(attach_command(), "A80c4");
    }

    #[test]
    fn an_event_decodes_to_the_vsi_and_its_outcome() {
        let event = "M000080c4E16009204mode0005assoc06mgrid20001006typeid0001509typeidver0001104uuid00246b3a1c2e-0000-4000-8000-00000000000205hints0001006filter00130-52:54:00:12:34:57";
        let Message::Event(vsi) = parse_message(event).unwrap() else {
            panic!("not an event");
        };
        assert_eq!(vsi.mode, "assoc");
        assert_eq!(vsi.instance, "6b3a1c2e-0000-4000-8000-000000000002");
        assert_eq!(
            (vsi.type_id.as_str(), vsi.type_version.as_str()),
            ("5", "1")
        );
        assert_eq!(vsi.code, Some(0));
        assert_eq!(vsi.filters, ["0-52:54:00:12:34:57"]);
        assert!(vsi.is_associated());
    }

    #[test]
    fn replies_decode_with_their_status_and_query_lists() {
        assert_eq!(
            parse_message("R00A").unwrap(),
            Message::Reply {
                status: 0,
                body: "A".into()
            }
        );
        assert_eq!(
            parse_message("R0fC3020000011c03vs000000003").unwrap(),
            Message::Reply {
                status: 15,
                body: "C3020000011c03vs000000003".into()
            }
        );
        let Message::Reply { body, .. } = parse_message("R00C3010000001503vs000000003009204mode0005assoc06mgrid20001006typeid0001509typeidver0001104uuid00246b3a1c2e-0000-4000-8000-00000000000105hints0001006filter00130-52:54:00:12:34:56").unwrap() else {
            panic!("not a reply");
        };
        let list = parse_get_reply(&body).unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].is_associated());
        // Nothing held: the body ends after the TLV id.
        assert_eq!(parse_get_reply("C3010000001503vs000000003").unwrap(), []);
    }

    #[test]
    fn garbled_messages_are_errors_not_panics() {
        for bad in [
            "",
            "R",
            "Rzz",
            "X00",
            "M000080c4E16",
            "M000080c4E16ffff04mode",
            "M000080c4E1600100",
            "M000080c4E16000a04mo",
        ] {
            assert!(parse_message(bad).is_err(), "{bad:?}");
        }
        assert!(parse_vsi("zz").is_err());
        assert!(parse_vsi("04mode00").is_err());
        assert!(parse_get_reply("C301").is_err());
        // Multi-byte text cut inside a character.
        assert!(parse_vsi("02é").is_err());
    }

    #[test]
    fn codes_name_the_bridge_reason_and_lldpads_own_errors() {
        assert_eq!(code_meaning(0), "success");
        assert_eq!(code_meaning(2), "insufficient resources at the bridge");
        assert_eq!(
            code_meaning(0x12),
            "insufficient resources at the bridge, hard error"
        );
        assert_eq!(code_meaning(5), "invalid VLAN, group id or MAC address");
        // Seen from lldpad 1.1 when the bridge is gone: 0x2ff, 0x300.
        assert_eq!(
            code_meaning(767),
            "no response from the bridge; no acknowledgement from the bridge"
        );
        assert_eq!(
            code_meaning(768),
            "success; keep-alive timeout; no acknowledgement from the bridge"
        );
        assert_eq!(
            status_meaning(15),
            "a request for this VSI is still in progress"
        );
        assert_eq!(status_meaning(5), "invalid parameters");
        assert_eq!(status_meaning(200), "unknown status");
    }

    #[test]
    fn uuids_and_macs_are_checked_and_lowercased() {
        assert_eq!(
            check_uuid("6B3A1C2E-0000-4000-8000-000000000001").unwrap(),
            "6b3a1c2e-0000-4000-8000-000000000001"
        );
        for bad in [
            "",
            "6b3a1c2e",
            "6b3a1c2e-0000-4000-8000-00000000000g",
            "6b3a1c2e-0000-4000-8000-0000000000011",
            "00000000-0000-0000-0000-000000000000",
            "6b3a1c2e-0000-4000-8000-000000000001,hints",
        ] {
            assert!(check_uuid(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_mac("52:54:00:AB:34:56").unwrap(), "52:54:00:ab:34:56");
        for bad in [
            "",
            "52:54:00:12:34",
            "52-54-00-12-34-56",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "52:54:00:12:34:5g",
        ] {
            assert!(check_mac(bad).is_err(), "{bad:?}");
        }
    }
}
