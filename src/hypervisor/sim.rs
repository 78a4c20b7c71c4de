//! The simulated hypervisor (placeholder until written).
