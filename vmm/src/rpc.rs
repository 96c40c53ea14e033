//! What the API thread asks of the VMM thread, and what it gets back. The API thread turns
//! one HTTP request into one [`VmmAction`], sends it with a [`VmmRequest`] over a channel,
//! writes an eventfd the VMM's event loop watches, and waits on the request's own reply
//! channel. The VMM thread answers each request as soon as it is read, never waiting on the
//! client, so a slow client holds up only the API thread.

use std::sync::mpsc::{Receiver, Sender};

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::resources::{
    BootSource, Drive, EntropyDevice, FullVmConfiguration, InstanceInfo, LoggerConfig,
    MachineConfig, MachineConfigUpdate, MetricsConfig, NetworkInterface, PartialDrive,
    PartialNetworkInterface, SerialConfig, VmState, Vsock,
};

/// One request for the VMM thread.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `PUT /actions` InstanceStart.
    StartInstance,
    /// `PUT /actions` SendCtrlAltDel.
    SendCtrlAltDel,
    /// `PUT /actions` FlushMetrics.
    FlushMetrics,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PATCH /vm`.
    SetVmState(VmState),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `PUT /serial`.
    PutSerial(SerialConfig),
}

impl VmmAction {
    /// The request as `METHOD /path` for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::GetInstanceInfo => "GET /",
            Self::StartInstance => "PUT /actions InstanceStart",
            Self::SendCtrlAltDel => "PUT /actions SendCtrlAltDel",
            Self::FlushMetrics => "PUT /actions FlushMetrics",
            Self::GetMachineConfig => "GET /machine-config",
            Self::PutMachineConfig(_) => "PUT /machine-config",
            Self::PatchMachineConfig(_) => "PATCH /machine-config",
            Self::GetVmConfig => "GET /vm/config",
            Self::SetVmState(_) => "PATCH /vm",
            Self::PutBootSource(_) => "PUT /boot-source",
            Self::PutDrive(_) => "PUT /drives",
            Self::PatchDrive(_) => "PATCH /drives",
            Self::PutNetworkInterface(_) => "PUT /network-interfaces",
            Self::PatchNetworkInterface(_) => "PATCH /network-interfaces",
            Self::PutVsock(_) => "PUT /vsock",
            Self::PutEntropy(_) => "PUT /entropy",
            Self::PutLogger(_) => "PUT /logger",
            Self::PutMetrics(_) => "PUT /metrics",
            Self::PutSerial(_) => "PUT /serial",
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum VmmData {
    /// Nothing to return (HTTP 204).
    Empty,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /machine-config`.
    MachineConfig(MachineConfig),
    /// `GET /vm/config`.
    VmConfig(Box<FullVmConfiguration>),
}

/// Why a request was refused; the text is the `fault_message` of a 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VmmActionError(pub String);

impl VmmActionError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// The VMM's answer to one request.
pub type VmmResponse = Result<VmmData, VmmActionError>;

/// One request in flight: the action and where its answer goes.
#[derive(Debug)]
pub struct VmmRequest {
    /// What to do.
    pub action: VmmAction,
    /// Where the answer goes.
    pub reply: Sender<VmmResponse>,
}

/// The VMM thread's end of the API channel.
pub struct ApiReceiver {
    /// Readable when requests are waiting.
    pub event: EventFd,
    /// The requests.
    pub requests: Receiver<VmmRequest>,
}

/// The API thread's end of the channel.
#[derive(Debug)]
pub struct ApiSender {
    event: EventFd,
    requests: Sender<VmmRequest>,
}

/// Why the VMM could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The VMM thread has stopped listening (it is shutting down).
    #[error("the VMM is shutting down")]
    Gone,
    /// The eventfd could not be written.
    #[error("cannot wake the VMM thread: {0}")]
    Wake(std::io::Error),
}

impl ApiSender {
    /// Sends `action` and waits for the VMM's answer.
    pub fn call(&self, action: VmmAction) -> Result<VmmResponse, SendError> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.requests
            .send(VmmRequest { action, reply })
            .map_err(|_| SendError::Gone)?;
        self.event.write(1).map_err(SendError::Wake)?;
        answer.recv().map_err(|_| SendError::Gone)
    }
}

/// A connected pair of channel ends.
pub fn channel() -> std::io::Result<(ApiSender, ApiReceiver)> {
    let event = EventFd::new(libc::EFD_NONBLOCK)?;
    let (tx, rx) = std::sync::mpsc::channel();
    Ok((
        ApiSender {
            event: event.try_clone()?,
            requests: tx,
        },
        ApiReceiver {
            event,
            requests: rx,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_gets_the_answer_the_vmm_sends() {
        let (tx, rx) = channel().unwrap();
        let t = std::thread::spawn(move || tx.call(VmmAction::GetMachineConfig));
        // The eventfd says a request is waiting; the request carries its reply channel.
        let mut waited = 0;
        while rx.event.read().is_err() {
            std::thread::sleep(std::time::Duration::from_millis(1));
            waited += 1;
            assert!(waited < 5000, "the API thread never woke the VMM");
        }
        let req = rx.requests.recv().unwrap();
        assert_eq!(req.action, VmmAction::GetMachineConfig);
        req.reply
            .send(Err(VmmActionError::new("no")))
            .expect("reply");
        let got = t.join().unwrap().unwrap();
        assert_eq!(got, Err(VmmActionError::new("no")));
    }

    #[test]
    fn a_call_after_the_vmm_is_gone_fails_cleanly() {
        let (tx, rx) = channel().unwrap();
        drop(rx);
        assert!(matches!(
            tx.call(VmmAction::GetInstanceInfo),
            Err(SendError::Gone)
        ));
    }
}
