//! The master's log lines. The formats are an interface (tests and people parse them; they
//! are listed in `spawn --help`), so they are built here, in one place, and unit-tested.

use std::collections::HashMap;
use std::io::Write;

use cluster_core::WorkerId;
use cluster_master::Event;

/// One line to print, and where.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    pub stderr: bool,
    pub text: String,
}

impl Line {
    pub fn out(text: String) -> Line {
        Line {
            stderr: false,
            text,
        }
    }

    /// Writes the line. Stdout is line-buffered by std even into a pipe, so each line is
    /// flushed as it is written and a reader can wait on it. Write errors (a closed pipe)
    /// are ignored: losing the log must not take the master and its workers down.
    pub fn print(&self) {
        if self.stderr {
            let _ = writeln!(std::io::stderr().lock(), "{}", self.text);
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", self.text);
            let _ = out.flush();
        }
    }
}

/// A `[master] ...` line on stdout.
pub fn master(text: impl AsRef<str>) -> Line {
    Line::out(format!("[master] {}", text.as_ref()))
}

/// A signal's name for the log (`SIGTERM`), or its number when unknown.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_owned())
}

/// Turns events into lines; remembers each worker's pid (only `Fork` and `Exit` carry it).
#[derive(Debug, Default)]
pub struct EventLog {
    pids: HashMap<WorkerId, u32>,
}

impl EventLog {
    fn who(&self, w: WorkerId) -> String {
        match self.pids.get(&w) {
            Some(pid) => format!("worker {w} (pid {pid})"),
            None => format!("worker {w} (pid ?)"),
        }
    }

    /// The line for an event (`None` for events not logged).
    pub fn line(&mut self, ev: &Event) -> Option<Line> {
        let text = match ev {
            Event::Fork { worker, slot, pid } => {
                self.pids.insert(*worker, *pid);
                format!("worker {worker} (pid {pid}) forked in slot {slot}")
            }
            Event::Online { worker } => format!("{} online", self.who(*worker)),
            Event::Listening { worker, addr, .. } => {
                format!("{} listening on {addr}", self.who(*worker))
            }
            Event::Message { worker, payload } => format!(
                "message from {}: {} bytes",
                self.who(*worker),
                payload.len()
            ),
            Event::Disconnect { worker } => format!("{} channel closed", self.who(*worker)),
            Event::Dropped { worker, reason } => {
                format!("{} dropped: {reason}", self.who(*worker))
            }
            Event::Exit {
                worker,
                pid,
                code,
                signal,
                exited_after_disconnect,
                ..
            } => {
                self.pids.remove(worker);
                let how = match (code, signal) {
                    (Some(c), _) => format!("exited with code {c}"),
                    (None, Some(s)) => format!("exited on signal {s} ({})", signal_name(*s)),
                    (None, None) => "exited".to_owned(),
                };
                let why = if *exited_after_disconnect {
                    "after disconnect"
                } else {
                    "crashed"
                };
                format!("worker {worker} (pid {pid}) {how}, {why}")
            }
            Event::Restarting { slot, after } => {
                format!("slot {slot} restarting in {}ms", after.as_millis())
            }
            Event::SlotErrored { slot, reason } => format!("slot {slot} errored: {reason}"),
            Event::Output {
                worker,
                pid,
                stderr,
                line,
            } => {
                return Some(Line {
                    stderr: *stderr,
                    text: format!("[worker {worker} pid {pid}] {line}"),
                });
            }
            Event::ReloadDone => "reload done".to_owned(),
            Event::ReloadFailed { reason } => format!("reload failed: {reason}"),
            Event::Stopped { clean } => {
                format!("stopped ({})", if *clean { "clean" } else { "not clean" })
            }
            // Events added to the library later are still worth a line.
            other => format!("event {other:?}"),
        };
        Some(master(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_core::{BoundAddr, ServerId};
    use std::time::Duration;

    fn text(log: &mut EventLog, ev: Event) -> String {
        log.line(&ev).unwrap().text
    }

    #[test]
    fn formats_are_stable() {
        let mut log = EventLog::default();
        let w = WorkerId(3);
        assert_eq!(
            text(
                &mut log,
                Event::Fork {
                    worker: w,
                    slot: 2,
                    pid: 12345
                }
            ),
            "[master] worker 3 (pid 12345) forked in slot 2"
        );
        assert_eq!(
            text(&mut log, Event::Online { worker: w }),
            "[master] worker 3 (pid 12345) online"
        );
        assert_eq!(
            text(
                &mut log,
                Event::Listening {
                    worker: w,
                    server: ServerId(1),
                    addr: BoundAddr::Inet("127.0.0.1:8000".parse().unwrap()),
                }
            ),
            "[master] worker 3 (pid 12345) listening on 127.0.0.1:8000"
        );
        let out = log
            .line(&Event::Output {
                worker: w,
                pid: 12345,
                stderr: true,
                line: "oops".into(),
            })
            .unwrap();
        assert_eq!(
            out,
            Line {
                stderr: true,
                text: "[worker 3 pid 12345] oops".into()
            }
        );
        assert_eq!(
            text(
                &mut log,
                Event::Exit {
                    worker: w,
                    slot: 2,
                    pid: 12345,
                    code: Some(0),
                    signal: None,
                    exited_after_disconnect: true,
                }
            ),
            "[master] worker 3 (pid 12345) exited with code 0, after disconnect"
        );
        assert_eq!(
            text(
                &mut log,
                Event::Exit {
                    worker: WorkerId(4),
                    slot: 0,
                    pid: 7,
                    code: None,
                    signal: Some(9),
                    exited_after_disconnect: false,
                }
            ),
            "[master] worker 4 (pid 7) exited on signal 9 (SIGKILL), crashed"
        );
        // The pid is forgotten after the exit.
        assert_eq!(
            text(&mut log, Event::Online { worker: w }),
            "[master] worker 3 (pid ?) online"
        );
        assert_eq!(
            text(
                &mut log,
                Event::Restarting {
                    slot: 1,
                    after: Duration::from_millis(120)
                }
            ),
            "[master] slot 1 restarting in 120ms"
        );
        assert_eq!(
            text(
                &mut log,
                Event::SlotErrored {
                    slot: 1,
                    reason: "x".into()
                }
            ),
            "[master] slot 1 errored: x"
        );
        assert_eq!(text(&mut log, Event::ReloadDone), "[master] reload done");
        assert_eq!(
            text(&mut log, Event::Stopped { clean: true }),
            "[master] stopped (clean)"
        );
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(999), "signal 999");
    }
}
