//! Kernel tests: real namespaces, real eBPF, every broken state of the lab reproduced.
//! Built as one self-contained test binary so the same suite can run inside VMs with other kernels.
//! Each test skips with a printed reason when it cannot run here (not root, no binary).

mod agents;
mod cluster;
mod fix;
mod follow;
mod generated;
mod kernels;
mod kube;
mod lab;
mod layouts;
mod node_shape;
mod services;
mod validate;
mod watch;
