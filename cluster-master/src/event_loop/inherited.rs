//! Where the master's sockets come from: an inherited socket (socket activation) when one has
//! the address, a bind otherwise.

use cluster_core::{ListenError, ListenKey, ListenSpec, ServerId};

use super::EventLoop;
use crate::activation::Activation;
use crate::bind::{self, BoundSocket};
use crate::config::ListenSource;
use crate::server::Server;

fn dup_failed(e: std::io::Error) -> ListenError {
    ListenError {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
        context: "dup inherited socket".into(),
    }
}

/// The socket a `listen_fd` / `listen_inherited` entry passes to the workers.
pub(super) fn prebind(
    activation: &Activation,
    source: &ListenSource,
) -> Result<BoundSocket, ListenError> {
    match source {
        ListenSource::Bind(spec) => match activation.for_addr(&spec.addr) {
            Some(inherited) => inherited.map_err(dup_failed),
            None => bind::bind_spec(spec, false),
        },
        ListenSource::Inherited(name) => match activation.for_name(name) {
            Some(inherited) => inherited.map_err(dup_failed),
            None => Err(ListenError {
                errno: libc::ENOENT,
                context: format!("no inherited socket named {name} (LISTEN_FDNAMES)"),
            }),
        },
    }
}

impl EventLoop {
    /// A new server for a worker's `listen`: on the inherited socket with that address if
    /// there is one, else bound here.
    pub(super) fn bind_server(
        &self,
        sid: ServerId,
        key: ListenKey,
        spec: &ListenSpec,
        slot: usize,
    ) -> Result<Server, ListenError> {
        match self.activation.for_addr(&spec.addr) {
            Some(inherited) => {
                let socket = inherited.map_err(dup_failed)?;
                Server::adopt(
                    sid,
                    key,
                    spec,
                    self.cfg.policy,
                    &self.cfg.round_robin,
                    socket,
                )
            }
            None => Server::bind(sid, key, spec, self.cfg.policy, slot, &self.cfg.round_robin),
        }
    }
}
