//! KVM state: the VM (memory, interrupt controller, timer) and its vCPUs.

pub mod fault;
pub mod irq_routing;
pub mod vcpu;
pub mod vm;
