//! Unmodified Node.js programs as workers: the master speaks Node's own cluster IPC (JSON
//! lines with `SCM_RIGHTS`, `json` serialization) as a second [`crate::WorkerChannel`], so the
//! handles, the server table, supervision, reload and scaling work unchanged.
//!
//! - `codec`: the pure mapping between Node's lines and [`cluster_core::Message`], holding
//!   the state only Node needs (seq/ack correlation, `key` strings, the `data` echo,
//!   handle ACKs).
//! - `channel`: the socket side (line framing with a length cap, fds paired with
//!   `NODE_HANDLE` lines, an output queue that survives `EAGAIN`).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::process::Command;
use std::str::FromStr;

use cluster_core::WorkerId;

mod channel;
mod codec;

pub(crate) use channel::NodeChannel;
pub(crate) use codec::SharedServerData;

/// Which IPC protocol the workers speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// cluster-rs's own framed protocol (workers built on `cluster-worker`).
    #[default]
    Native,
    /// Node.js's cluster protocol: the program is `node` running an unmodified script.
    Node,
}

impl Protocol {
    /// What `auto` picks for a command line: [`Protocol::Node`] when the program is
    /// `node`/`nodejs` (by basename, also as `env node ...`), or a script whose `#!` line names
    /// one of them; [`Protocol::Native`] otherwise.
    pub fn detect(program: &Path, args: &[impl AsRef<OsStr>]) -> Protocol {
        let is_node = |p: &OsStr| {
            Path::new(p)
                .file_name()
                .is_some_and(|n| n == "node" || n == "nodejs")
        };
        if is_node(program.as_os_str()) {
            return Protocol::Node;
        }
        if Path::new(program).file_name().is_some_and(|n| n == "env") {
            // `env [-S] [NAME=VALUE...] node ...`
            let first = args.iter().map(AsRef::as_ref).find(|a| {
                !a.to_string_lossy().starts_with('-') && !a.to_string_lossy().contains('=')
            });
            return match first {
                Some(p) if is_node(p) => Protocol::Node,
                _ => Protocol::Native,
            };
        }
        match shebang(program) {
            Some(line) if line.split_whitespace().any(|w| is_node(OsStr::new(w))) => Protocol::Node,
            _ => Protocol::Native,
        }
    }
}

/// The `#!` line of `program`, if it is a readable script (resolved through `PATH` when the
/// name has no slash).
fn shebang(program: &Path) -> Option<String> {
    let path = if program.components().count() > 1 {
        program.to_path_buf()
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })?
    };
    let mut head = [0u8; 256];
    let n = File::open(path).ok()?.read(&mut head).ok()?;
    let head = head.get(..n)?;
    let rest = head.strip_prefix(b"#!")?;
    let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(Protocol::Native),
            "node" => Ok(Protocol::Node),
            other => Err(format!("unknown protocol {other:?} (native or node)")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Native => "native",
            Protocol::Node => "node",
        })
    }
}

/// Gives a Node worker its channel at fd `channel_fd` with Node's env contract: the fd, the
/// worker id (which makes `require('cluster')` load the worker half) and `json` serialization.
pub(crate) fn spawn_channel(
    cmd: &mut Command,
    channel_fd: i32,
    id: WorkerId,
    max_line: usize,
    shared: &SharedServerData,
) -> io::Result<NodeChannel> {
    cmd.env("NODE_CHANNEL_FD", channel_fd.to_string())
        .env("NODE_UNIQUE_ID", id.0.to_string())
        .env("NODE_CHANNEL_SERIALIZATION_MODE", "json");
    let stream = cluster_ipc::spawn_with_stream(cmd, channel_fd)?;
    Ok(NodeChannel::new(stream, max_line, shared.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: [&str; 0] = [];

    #[test]
    fn auto_detects_node_by_name_env_and_shebang() {
        assert_eq!(
            Protocol::detect(Path::new("node"), &["app.js"]),
            Protocol::Node
        );
        assert_eq!(
            Protocol::detect(Path::new("/usr/bin/nodejs"), &NONE),
            Protocol::Node
        );
        assert_eq!(
            Protocol::detect(Path::new("/usr/bin/env"), &["-S", "A=1", "node", "app.js"]),
            Protocol::Node
        );
        assert_eq!(
            Protocol::detect(Path::new("env"), &["python3"]),
            Protocol::Native
        );
        assert_eq!(
            Protocol::detect(Path::new("/bin/sh"), &["-c", "node"]),
            Protocol::Native
        );
        let dir = std::env::temp_dir().join(format!("cluster-node-detect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("app");
        std::fs::write(&script, "#!/usr/bin/env node\nconsole.log(1)\n").unwrap();
        assert_eq!(Protocol::detect(&script, &NONE), Protocol::Node);
        std::fs::write(&script, "#!/bin/sh\necho node\n").unwrap();
        assert_eq!(Protocol::detect(&script, &NONE), Protocol::Native);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
