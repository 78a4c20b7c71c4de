//! The test guest (guest/tern-guest.S) builds into an ELF32 multiboot kernel,
//! and the helpers tests use to talk to it parse what QEMU prints.

#[path = "common/guest.rs"]
mod guest;

#[test]
fn builds_an_elf32_multiboot_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let elf = guest::build(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(&elf).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF");
    assert_eq!(
        bytes[4], 1,
        "not ELF32 (QEMU's multiboot loader refuses ELF64)"
    );
    assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), 3, "not EM_386");

    // The multiboot header: 4-byte aligned in the first 8 KiB, and
    // magic + flags + checksum == 0.
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let header = (0..bytes.len().min(8192) - 12)
        .step_by(4)
        .find(|&i| word(i) == 0x1BAD_B002)
        .expect("no multiboot magic 0x1BADB002 in the first 8 KiB");
    let sum = word(header)
        .wrapping_add(word(header + 4))
        .wrapping_add(word(header + 8));
    assert_eq!(sum, 0, "bad multiboot checksum");
}

#[test]
fn build_errors_name_the_tool() {
    let err = guest::build(std::path::Path::new("/nonexistent/dir")).unwrap_err();
    assert!(err.starts_with("as "), "{err}");
}

#[test]
fn parses_xp_replies() {
    assert_eq!(
        guest::parse_xp("0000000000007000: 0x000000000000002a\r\n"),
        Some(42)
    );
    assert_eq!(
        guest::parse_xp("0000000000007008: 0xffffffffffffffff"),
        Some(u64::MAX)
    );
    assert_eq!(guest::parse_xp(""), None);
    assert_eq!(guest::parse_xp("Cannot access memory\r\n"), None);
    assert_eq!(guest::parse_xp("0000000000007000: garbage"), None);
}

#[test]
fn cmdline_sets_the_working_set() {
    assert_eq!(guest::cmdline(16), "ws=16");
    assert_eq!(guest::cmdline(200), "ws=200");
}
