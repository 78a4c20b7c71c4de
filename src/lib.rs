//! Tern: live migration of QEMU guests between hosts.
//!
//! `protocol` is the five-phase protocol as pure state machines; `host` is
//! what one host decides around them, also sans-IO; `agent` carries the host
//! core's actions out with real IO (gRPC, SQLite, the hypervisor), and
//! `simulation` with simulated ones; `features` and `hypervisor` are what it acts on;
//! `cli` is the client side of the command line; `demo` the embedded cluster.

pub mod proto {
    //! Generated from `proto/tern/v1/*.proto`.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tern.v1");

    /// The Console service's schema (console.proto and its imports), as
    /// server reflection serves it.
    pub const CONSOLE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/console_descriptor.bin"));
}

pub mod agent;
pub mod cli;
pub mod config;
pub mod console;
pub mod demo;
pub mod features;
pub mod host;
pub mod hypervisor;
pub mod protocol;
pub mod simulation;
pub mod trust;
