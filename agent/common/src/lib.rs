//! Small pieces shared by the netd daemon's crates and the `netd-cni` plugin. The plugin runs
//! once per pod and must stay small, so it does not link the daemon; what both need lives here.

pub mod addr;
pub mod fdpass;
pub mod report;
pub mod subnet_env;
