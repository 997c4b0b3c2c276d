//! Network policy: the Calico selector language, and the compiler from policies and endpoints
//! to the BPF policy maps.

pub mod compile;
pub mod incremental;
pub mod resolve;
pub mod selector;
