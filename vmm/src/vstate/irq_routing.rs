//! The VM's GSI routing table (KVM_SET_GSI_ROUTING), for MSI-X: each vector of a PCI device
//! has its own GSI (from [`MSI_GSI_START`](boot::layout::MSI_GSI_START)) with an irqfd, and
//! the route of that GSI carries the message the guest wrote in the vector's MSI-X table
//! entry.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, including the routes KVM_CREATE_IRQCHIP set
//! up for the PIC and the IOAPIC, so the table here always starts with those (GSIs 0..15 to
//! both a PIC pin and the IOAPIC pin of the same number, GSIs 16..23 to the IOAPIC, as KVM's
//! default routing has them) and every change sends all of it. Changes come from vCPU threads
//! (the guest writing a table entry) and are serialized by one lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// GSIs routed to the in-kernel IOAPIC's pins.
pub const IOAPIC_GSIS: u32 = 24;
/// Most routes KVM takes (KVM_MAX_IRQ_ROUTES).
pub const MAX_ROUTES: usize = 4096;

/// An MSI message: where the device writes and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    /// The message address (low 32 bits).
    pub address_lo: u32,
    /// The message address (high 32 bits).
    pub address_hi: u32,
    /// The message data.
    pub data: u32,
}

/// Why the routing table could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// A GSI that belongs to the IOAPIC.
    #[error("GSI {0} is an IOAPIC pin, not an MSI route")]
    IoapicGsi(u32),
    /// The table is full.
    #[error("the GSI routing table is full ({MAX_ROUTES} routes)")]
    Full,
    /// KVM refused the table.
    #[error("KVM_SET_GSI_ROUTING: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
}

/// The routing table of one VM.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiRoute>>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// KVM's default routes for the PIC and IOAPIC.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::with_capacity(40);
    for gsi in 0..IOAPIC_GSIS {
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    v
}

impl GsiRouting {
    /// The table of `vm`, holding the default routes (KVM's own until the first change).
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// Routes `gsi` to the MSI `route`, or removes its route (`None`: an irqfd on it then
    /// raises nothing). Sends the whole table to KVM; on error nothing changed.
    pub fn set_msi(&self, gsi: u32, route: Option<MsiRoute>) -> Result<(), RoutingError> {
        if gsi < IOAPIC_GSIS {
            return Err(RoutingError::IoapicGsi(gsi));
        }
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        let before = msi.get(&gsi).copied();
        if before == route {
            return Ok(());
        }
        match route {
            Some(r) => {
                msi.insert(gsi, r);
            }
            None => {
                msi.remove(&gsi);
            }
        }
        let result = self.send(&msi);
        if result.is_err() {
            match before {
                Some(r) => msi.insert(gsi, r),
                None => msi.remove(&gsi),
            };
        }
        result
    }

    /// The MSI routes now, by GSI.
    pub fn msi_routes(&self) -> BTreeMap<u32, MsiRoute> {
        self.msi.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn send(&self, msi: &BTreeMap<u32, MsiRoute>) -> Result<(), RoutingError> {
        let mut entries = default_routes();
        for (&gsi, r) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = r.address_lo;
            e.u.msi.address_hi = r.address_hi;
            e.u.msi.data = r.data;
            entries.push(e);
        }
        if entries.len() > MAX_ROUTES {
            return Err(RoutingError::Full);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| RoutingError::Full)?;
        self.vm.set_gsi_routing(&table)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvms() {
        let r = default_routes();
        assert_eq!(r.len(), 40);
        // SAFETY: irqchip entries only, whose union holds `irqchip`.
        let pins: Vec<(u32, u32, u32)> = r
            .iter()
            .map(|e| unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert!(pins.contains(&(0, KVM_IRQCHIP_IOAPIC, 0)));
        assert!(pins.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!pins.iter().any(|p| p.0 >= 16 && p.1 != KVM_IRQCHIP_IOAPIC));
    }

    #[test]
    fn msi_routes_reach_kvm_and_ioapic_gsis_are_refused() {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let routing = GsiRouting::new(Arc::new(vm));
        let r = MsiRoute {
            address_lo: 0xfee0_0000,
            address_hi: 0,
            data: 0x4041,
        };
        routing.set_msi(24, Some(r)).expect("route GSI 24");
        routing.set_msi(25, Some(r)).expect("route GSI 25");
        assert_eq!(routing.msi_routes().len(), 2);
        routing.set_msi(24, None).expect("remove GSI 24");
        assert_eq!(
            routing.msi_routes().keys().copied().collect::<Vec<_>>(),
            [25]
        );
        assert!(matches!(
            routing.set_msi(5, Some(r)),
            Err(RoutingError::IoapicGsi(5))
        ));
    }
}
