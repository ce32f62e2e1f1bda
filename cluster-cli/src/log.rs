//! The master's log lines. The formats are an interface (tests and people parse them; they
//! are listed in `spawn --help`), so they are built here, in one place, and unit-tested.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

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

/// Message lines shown per worker per [`MESSAGE_WINDOW`]; the rest are counted and summed up
/// in one line, so a worker sending millions of messages cannot flood the log or make it lag.
pub const MESSAGES_SHOWN_PER_WINDOW: u32 = 5;
/// The period of the message summaries.
pub const MESSAGE_WINDOW: Duration = Duration::from_secs(1);

/// One worker's message lines in the current window.
#[derive(Debug)]
struct MessageRate {
    since: Instant,
    shown: u32,
    hidden: u64,
    hidden_bytes: u64,
}

/// Turns events into lines; remembers each worker's pid (only `Fork` and `Exit` carry it).
#[derive(Debug, Default)]
pub struct EventLog {
    pids: HashMap<WorkerId, u32>,
    messages: HashMap<WorkerId, MessageRate>,
}

impl EventLog {
    fn who(&self, w: WorkerId) -> String {
        match self.pids.get(&w) {
            Some(pid) => format!("worker {w} (pid {pid})"),
            None => format!("worker {w} (pid ?)"),
        }
    }

    /// Summaries of the message lines held back in windows that have ended by `now` (all of
    /// them with `now` = `None`, at the end of a run).
    pub fn message_summaries(&mut self, now: Option<Instant>) -> Vec<Line> {
        let mut ended: Vec<(WorkerId, MessageRate)> = Vec::new();
        self.messages.retain(|w, r| {
            let over = now.is_none_or(|t| t.saturating_duration_since(r.since) >= MESSAGE_WINDOW);
            if over {
                ended.push((
                    *w,
                    MessageRate {
                        since: r.since,
                        shown: r.shown,
                        hidden: r.hidden,
                        hidden_bytes: r.hidden_bytes,
                    },
                ));
            }
            !over
        });
        ended.sort_by_key(|(w, _)| *w);
        ended
            .into_iter()
            .filter(|(_, r)| r.hidden > 0)
            .map(|(w, r)| {
                master(format!(
                    "{} sent {} more messages ({} bytes) not shown, in {}ms",
                    self.who(w),
                    r.hidden,
                    r.hidden_bytes,
                    now.unwrap_or_else(Instant::now)
                        .saturating_duration_since(r.since)
                        .as_millis()
                ))
            })
            .collect()
    }

    /// The line for a user message, or `None` when this worker's window has shown enough.
    fn message(&mut self, worker: WorkerId, bytes: usize, now: Instant) -> Option<String> {
        let rate = self.messages.entry(worker).or_insert(MessageRate {
            since: now,
            shown: 0,
            hidden: 0,
            hidden_bytes: 0,
        });
        if rate.shown < MESSAGES_SHOWN_PER_WINDOW {
            rate.shown += 1;
            Some(format!("message from {}: {bytes} bytes", self.who(worker)))
        } else {
            rate.hidden += 1;
            rate.hidden_bytes += bytes as u64;
            None
        }
    }

    /// The line for an event (`None` for events not logged, and for messages past the rate).
    pub fn line(&mut self, ev: &Event) -> Option<Line> {
        let text = match ev {
            Event::Fork { worker, slot, pid } => {
                self.pids.insert(*worker, *pid);
                format!("worker {worker} (pid {pid}) forked in slot {slot}")
            }
            Event::Online { worker } => format!("{} online", self.who(*worker)),
            Event::Ready { worker } => format!("{} ready (READY=1)", self.who(*worker)),
            Event::Status { worker, status } => {
                format!("{} status: {status}", self.who(*worker))
            }
            Event::Listening { worker, addr, .. } => {
                format!("{} listening on {addr}", self.who(*worker))
            }
            Event::Message { worker, payload } => {
                self.message(*worker, payload.len(), Instant::now())?
            }
            Event::HandleClosed { worker } => format!(
                "{} sent a handle with a message: the master closes handles from workers \
                 (events carry no fds; logged once)",
                self.who(*worker)
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
            // The run's one verdict says it, with the reason (see `spawn`).
            Event::Stopped { .. } => return None,
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
                    clean: true,
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
                    clean: false,
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
        assert_eq!(log.line(&Event::Stopped { clean: true }), None);
        assert_eq!(signal_name(15), "SIGTERM");
    }

    #[test]
    fn messages_past_the_rate_are_summed_up_once_per_window() {
        let mut log = EventLog::default();
        let w = WorkerId(3);
        let t = Instant::now();
        let shown: Vec<Option<String>> = (0..8).map(|_| log.message(w, 10, t)).collect();
        assert_eq!(shown.iter().filter(|l| l.is_some()).count(), 5);
        assert_eq!(
            shown[0].as_deref(),
            Some("message from worker 3 (pid ?): 10 bytes")
        );
        assert!(log.message_summaries(Some(t)).is_empty(), "window not over");
        let later = t + MESSAGE_WINDOW;
        let lines = log.message_summaries(Some(later));
        assert_eq!(
            lines,
            vec![master(
                "worker 3 (pid ?) sent 3 more messages (30 bytes) not shown, in 1000ms"
            )]
        );
        // A new window shows messages again.
        assert!(log.message(w, 1, later).is_some());
        assert!(log.message_summaries(None).is_empty(), "nothing hidden");
        assert_eq!(signal_name(999), "signal 999");
    }
}
