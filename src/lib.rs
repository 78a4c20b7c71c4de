//! Tern: live migration of QEMU guests between hosts.
//!
//! `protocol` is the five-phase protocol as pure state machines; `agent` runs it
//! over gRPC with real IO; `features` and `hypervisor` are what it acts on;
//! `cli` is the client side of the command line; `demo` the embedded cluster.

pub mod proto {
    //! Generated from `proto/tern/v1/*.proto`.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tern.v1");
}

pub mod agent;
pub mod cli;
pub mod config;
pub mod console;
pub mod demo;
pub mod features;
pub mod hypervisor;
pub mod protocol;
pub mod simulation;
