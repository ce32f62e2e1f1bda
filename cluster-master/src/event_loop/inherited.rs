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

/// The socket a `listen_fd` / `listen_inherited` entry passes to the workers. `defer_accept`
/// (the master's setting) applies to a TCP address, bound or adopted; a socket inherited by
/// name keeps what its unit set.
pub(super) fn prebind(
    activation: &Activation,
    source: &ListenSource,
    defer_accept: bool,
) -> Result<BoundSocket, ListenError> {
    match source {
        ListenSource::Bind(spec) => {
            let bound = match activation.for_addr(&spec.addr) {
                Some(inherited) => inherited.map_err(dup_failed)?,
                None => bind::bind_spec(spec, false)?,
            };
            if defer_accept && matches!(spec.addr, cluster_core::ListenAddr::Tcp(_)) {
                bind::set_defer_accept(std::os::fd::AsFd::as_fd(&bound.fd))?;
            }
            Ok(bound)
        }
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
