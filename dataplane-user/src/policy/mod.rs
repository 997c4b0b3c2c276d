//! Network policy: the Calico selector language, and the compiler from policies and endpoints
//! to the BPF policy maps.

pub mod compile;
pub mod resolve;
pub mod selector;
