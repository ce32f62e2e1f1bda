//! Worker processes: spawning one (channel, `LISTEN_FDS`, pidfd, output pipes, all registered
//! with the poll) and reading the lines it writes.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;

use cluster_core::{WorkerId, env};
use cluster_ipc::Limits;
use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::{
    EventLoop, KIND_PIDFD, KIND_STDERR, KIND_STDOUT, Source, WorkerRec, deregister_channel, token,
};
use crate::channel::WorkerChannel;
use crate::events::{Event, WorkerState};
use crate::{MasterError, Protocol, sys};

pub(super) fn is_resource_shortage(e: &MasterError) -> bool {
    matches!(e, MasterError::Io { source, .. } if matches!(
        source.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM)
    ))
}

/// A line longer than this is delivered in pieces rather than buffered without bound.
const MAX_LINE: usize = 64 * 1024;
/// Reads (of 8 KiB) from one output pipe per pass before the others get a turn.
const MAX_OUTPUT_READS: usize = 16;
/// Reads from the pipes of a worker that has exited: what it left in them (64 KiB each
/// unless enlarged). A grandchild still writing gets its pipe closed after that.
pub(super) const MAX_OUTPUT_READS_AT_EXIT: usize = 64;

#[derive(Debug)]
pub(super) struct OutputPipe {
    file: File,
    buf: Vec<u8>,
}

impl EventLoop {
    /// Spawns worker `id` for `slot` and registers its channel, pidfd and output pipes. Returns
    /// whether it is ready at once (never, today: see supervision's ready delay).
    pub(super) fn spawn_worker(&mut self, id: WorkerId, slot: usize) -> Result<bool, MasterError> {
        let n_listen = self.prebound.len();
        let channel_fd = env::DEFAULT_CHANNEL_FD + n_listen as i32;
        let mut cmd = if n_listen > 0 {
            // LISTEN_PID must be the worker's own pid, known only after fork; a shell sets it
            // and execs in place, so the pid is the same.
            let mut c = std::process::Command::new("/bin/sh");
            c.arg("-c")
                .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"");
            c.arg(&self.cfg.program);
            let names: Vec<&str> = self.prebound.iter().map(|(n, ..)| n.as_str()).collect();
            c.env("LISTEN_FDS", n_listen.to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            c
        } else {
            std::process::Command::new(&self.cfg.program)
        };
        if n_listen == 0 {
            // Sockets passed to the master itself are not the worker's.
            cmd.env_remove("LISTEN_FDS")
                .env_remove("LISTEN_PID")
                .env_remove("LISTEN_FDNAMES");
        }
        // The master's own watchdog is not the worker's; the worker gets its own below.
        cmd.env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
        cmd.args(&self.cfg.args)
            .envs(self.cfg.env.iter().map(|(k, v)| (k, v)))
            .env("NOTIFY_SOCKET", self.notify.address())
            .env(env::WORKER_ID, id.0.to_string())
            .env(env::CHANNEL_FD, channel_fd.to_string())
            .env(env::WORKER_SLOT, slot.to_string())
            .stdin(Stdio::null());
        if let Some(period) = self.cfg.watchdog {
            cmd.env("WATCHDOG_USEC", period.as_micros().to_string());
        }
        if self.cfg.capture_output {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut channel: Box<dyn WorkerChannel> = match self.cfg.protocol {
            Protocol::Native => {
                let limits = Limits {
                    max_frame: self.cfg.max_frame,
                    accept_fds: false,
                };
                Box::new(
                    cluster_ipc::spawn_with_channel(&mut cmd, channel_fd, limits)
                        .map_err(|e| MasterError::io("socketpair", e.into()))?,
                )
            }
            Protocol::Node => Box::new(
                crate::node::spawn_channel(
                    &mut cmd,
                    channel_fd,
                    id,
                    self.cfg.max_frame,
                    &self.node_server_data,
                )
                .map_err(|e| MasterError::io("socketpair", e))?,
            ),
        };
        if n_listen > 0 {
            let fds: Vec<_> = self.prebound.iter().map(|(_, fd, _)| fd.as_fd()).collect();
            sys::inherit_listen_fds(&mut cmd, &fds, env::DEFAULT_CHANNEL_FD)
                .map_err(|e| MasterError::io("prepare LISTEN_FDS", e))?;
            sys::term_with_master(&mut cmd);
        }
        // Its own process group: a terminal's Ctrl-C (sent to the foreground group) reaches the
        // master alone, which stops the workers in order instead of having them crash.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        sys::cloexec_from(&mut cmd, channel_fd + 1);
        if self.workers_need_normal_policy {
            sys::normal_policy_in_child(&mut cmd);
        }
        let mut child = cmd.spawn().map_err(|e| MasterError::io("spawn", e))?;
        // Dropping the command closes our copy of the child's channel end, so that the child's
        // exit shows up as EOF here.
        drop(cmd);
        let pid = child.id();
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(MasterError::io("pidfd_open", e));
            }
        };
        self.register_channel(&mut channel, id)
            .map_err(|e| MasterError::io("register worker", e))
            .inspect_err(|_| {
                let _ = child.kill();
                let _ = child.wait();
            })?;
        let registered = self.poll.registry().register(
            &mut SourceFd(&pidfd.as_raw_fd()),
            token(KIND_PIDFD, id.0),
            Interest::READABLE,
        );
        if let Err(e) = registered {
            deregister_channel(&mut self.channels, &self.poll, &mut channel);
            let _ = child.kill();
            let _ = child.wait();
            return Err(MasterError::io("register worker", e));
        }
        let stdout = child
            .stdout
            .take()
            .and_then(|p| self.register_pipe(OwnedFd::from(p), token(KIND_STDOUT, id.0)));
        let stderr = child
            .stderr
            .take()
            .and_then(|p| self.register_pipe(OwnedFd::from(p), token(KIND_STDERR, id.0)));
        self.fleet.workers.insert(
            id,
            WorkerRec {
                id,
                slot,
                pid,
                child,
                pidfd,
                channel: Some(channel),
                state: WorkerState::Spawned,
                exited_after_disconnect: false,
                servers: Vec::new(),
                stdout,
                stderr,
                held_message: None,
                listen_failure: None,
                dropping: false,
                stop_signal_sent: None,
                spoke_channel: false,
                last_status: None,
                watching_writable: false,
            },
        );
        self.emit(Event::Fork {
            worker: id,
            slot,
            pid,
        });
        // Even a LISTEN_FDS worker, which holds its sockets from the first instruction, is
        // ready only once it says so or the ready delay has passed: until then it may be
        // loading what it needs to answer.
        Ok(false)
    }

    fn register_pipe(&self, fd: OwnedFd, tok: Token) -> Option<OutputPipe> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).ok()?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).ok()?;
        self.poll
            .registry()
            .register(&mut SourceFd(&fd.as_raw_fd()), tok, Interest::READABLE)
            .ok()?;
        Some(OutputPipe {
            file: File::from(fd),
            buf: Vec::new(),
        })
    }

    pub(super) fn output_ready(&mut self, id: WorkerId, stderr: bool) {
        self.read_output(id, stderr, MAX_OUTPUT_READS);
    }

    /// Reads up to `max_reads` chunks of a worker's stdout or stderr and emits its lines. A
    /// normal pass stops when the embedder has no room for more lines (the worker's writes
    /// then block on the full pipe) or at the bound (so a worker writing without pause cannot
    /// hold the loop), and is resumed later; the last read of an exited worker takes what is
    /// left whatever the room.
    pub(super) fn read_output(&mut self, id: WorkerId, stderr: bool, max_reads: usize) {
        let source = Source::Output { worker: id, stderr };
        let final_read = max_reads == MAX_OUTPUT_READS_AT_EXIT;
        let mut chunk = [0u8; 8192];
        let mut lines = Vec::new();
        let mut closed = false;
        let mut drained = false;
        let mut reads = 0;
        while reads < max_reads {
            if !final_read && !self.room_for_bulk(source) {
                drained = true;
                break;
            }
            let Some(p) = self.fleet.workers.get_mut(&id).and_then(|w| {
                if stderr {
                    w.stderr.as_mut()
                } else {
                    w.stdout.as_mut()
                }
            }) else {
                return;
            };
            reads += 1;
            match p.file.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    p.buf.extend_from_slice(&chunk[..n]);
                    while let Some(pos) = p.buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = p.buf.drain(..=pos).collect();
                        lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
                    }
                    if p.buf.len() > MAX_LINE {
                        lines.push(String::from_utf8_lossy(&p.buf).into_owned());
                        p.buf.clear();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            // Emitted as they come, so the room check before the next read counts them.
            let pid = self.fleet.workers.get(&id).map_or(0, |w| w.pid);
            for line in lines.drain(..) {
                self.emit(Event::Output {
                    worker: id,
                    pid,
                    stderr,
                    line,
                });
            }
        }
        let Some(w) = self.fleet.workers.get_mut(&id) else {
            return;
        };
        let pid = w.pid;
        let pipe = if stderr { &mut w.stderr } else { &mut w.stdout };
        if closed && let Some(p) = pipe.take() {
            if !p.buf.is_empty() {
                lines.push(String::from_utf8_lossy(&p.buf).into_owned());
            }
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&p.file.as_raw_fd()));
        } else if !drained && !final_read && !self.unread.contains(&source) {
            self.unread.push(source);
        }
        for line in lines {
            self.emit(Event::Output {
                worker: id,
                pid,
                stderr,
                line,
            });
        }
    }
}
