//! `cluster-cli spawn`: build a master from the arguments, forward signals to it, print its
//! events, and turn how it ended into an exit status.
//!
//! Threads: the master's own event loop (inside cluster-master); a signal thread that reads
//! signal-hook's iterator (no logic runs in a signal handler) and commands the master through
//! a [`MasterControl`]; and this thread, which blocks on the master's events, prints them and
//! judges the stop.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::thread;
use std::time::{Duration, Instant};

use cluster_master::{
    Coalesce, Event, Master, MasterBuilder, MasterControl, MasterError, Protocol, RestartPolicy,
};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU};
use signal_hook::iterator::Signals;

use crate::args::{DEFAULT_HELLO_PORT, ListenArg, ProtocolChoice, SpawnArgs, WorkerCount};
use crate::cpus;
use crate::log::{self, EventLog};

pub fn run(a: SpawnArgs) -> Result<(), String> {
    let workers = match a.workers {
        WorkerCount::Auto => cpus::available(),
        WorkerCount::Fixed(n) => n,
    };
    let (program, args): (PathBuf, Vec<OsString>) = match a.program() {
        Some((p, rest)) => (p, rest.to_vec()),
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find this executable to run the hello worker: {e}"))?;
            let args = vec![
                "hello".into(),
                "--host".into(),
                a.host.to_string().into(),
                "--port".into(),
                a.port.unwrap_or(DEFAULT_HELLO_PORT).to_string().into(),
            ];
            (exe, args)
        }
    };
    let shutdown_timeout = Duration::from_millis(a.shutdown_timeout);
    let initial_delay = Duration::from_millis(a.restart_delay);
    let restart = RestartPolicy {
        initial_delay,
        // A cap below the first delay would make the first delay meaningless.
        max_delay: Duration::from_millis(a.restart_max_delay).max(initial_delay),
        min_uptime: Duration::from_millis(a.min_uptime),
        max_fast_crashes: a.max_restarts,
        ..RestartPolicy::default()
    };
    let (protocol, why) = match a.protocol {
        ProtocolChoice::Fixed(p) => (p, "--protocol node"),
        ProtocolChoice::Auto => (
            Protocol::detect(&program, &args),
            "auto: the program is node",
        ),
    };
    let mut builder = MasterBuilder::new(&program)
        .protocol(protocol)
        .args(&args)
        .workers(workers)
        .policy(a.policy)
        .window(a.window)
        .stall_after((a.stall_after > 0).then(|| Duration::from_millis(a.stall_after)))
        .restart_policy(restart)
        .shutdown_timeout(shutdown_timeout)
        .max_servers_per_worker(a.max_servers_per_worker)
        .stop_signal(a.stop_signal)
        .notify_systemd(true)
        .ready_timeout(Duration::from_millis(a.ready_timeout))
        .defer_accept(a.defer_accept)
        .loop_scheduling(a.loop_scheduling())
        .coalesce((a.coalesce_us > 0).then(|| Coalesce {
            delay: Duration::from_micros(a.coalesce_us),
            min_unanswered: a.coalesce_min,
        }))
        .capture_output(true);
    if let Some(ms) = a.ack_timeout {
        builder = builder.ack_timeout(Duration::from_millis(ms));
    }
    // The ready delay is for programs that may not speak the channel: the hello worker and
    // Node programs do, and would be taken for ready before they listen.
    if a.program().is_some() && protocol != Protocol::Node {
        builder = builder.ready_delay(Duration::from_millis(a.ready_delay));
    }
    if let Some(ms) = a.watchdog {
        builder = builder.watchdog(Duration::from_millis(ms));
    }
    if let (Some(_), Some(port)) = (a.program(), a.port) {
        // The platform convention (Heroku, Cloud Run, ...) for "serve here".
        builder = builder.env("PORT", port.to_string());
    }
    for (k, v) in &a.env {
        builder = builder.env(k, v);
    }
    builder = builder.socket_activation(true);
    for (i, listen) in a.listen.iter().enumerate() {
        builder = match listen {
            ListenArg::Addr(spec) => builder.listen_fd(format!("listen{i}"), spec.clone()),
            ListenArg::Inherited(name) => builder.listen_inherited(name),
        };
    }

    // Signals are registered before any worker exists: a TERM that arrives during start-up
    // must mean "stop gracefully", not the default action that would orphan the workers.
    let signals = Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let sig_handle = signals.handle();

    let shown: Vec<String> = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect();
    // `--listen` sockets are served by the workers themselves: no policy applies to them.
    let sharing = if a.listen.is_empty() {
        format!("policy {}", a.policy)
    } else {
        "sockets passed as LISTEN_FDS".to_owned()
    };
    log::master(format!(
        "pid {}: starting {workers} workers: {} ({sharing})",
        std::process::id(),
        shown.join(" "),
    ))
    .print();

    if protocol == Protocol::Node {
        log::master(format!("workers speak Node's cluster protocol ({why})")).print();
    }

    let master = match builder.start() {
        Ok(m) => m,
        Err(e) => {
            sig_handle.close();
            return Err(format!("cannot start the master: {e}"));
        }
    };
    for (name, addr) in master.inherited_sockets() {
        log::master(format!("inherited {addr} as {name} (socket activation)")).print();
    }
    // After the bind, so a port-0 `--listen` shows the port it got. Events (forks first) are
    // printed only from `sup.run` on, so these lines still come before them.
    for (i, (name, addr)) in master.listen_fds().iter().enumerate() {
        log::master(format!(
            "pre-bound {addr} as fd {} (LISTEN_FDNAMES name {name})",
            3 + i
        ))
        .print();
    }
    let stop = Arc::new(AtomicU8::new(Stop::Running as u8));
    let mut policy = SignalPolicy {
        control: master.control(),
        stop: Arc::clone(&stop),
        slots: workers,
        shutdown_timeout,
    };
    // The signal thread acts on signals itself through a control handle, so the main thread
    // can block on the master's events without polling.
    let sig_thread = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = signals;
            for sig in signals.forever() {
                policy.on_signal(sig);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    let mut sup = Supervisor {
        stop,
        unclean: Vec::new(),
        stopped_clean: None,
    };
    sup.run(&master);
    sig_handle.close();
    let _ = sig_thread.join();
    // One verdict, printed once: the `stopped` line and the exit status say the same.
    let verdict = sup.verdict(master.wait());
    match &verdict {
        Ok(()) => log::master("stopped (clean)").print(),
        Err(reason) => log::master(format!("stopped (not clean: {reason})")).print(),
    }
    verdict
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Stop {
    Running = 0,
    Graceful = 1,
    Forced = 2,
}

impl Stop {
    fn load(cell: &AtomicU8) -> Stop {
        match cell.load(Ordering::Acquire) {
            0 => Stop::Running,
            1 => Stop::Graceful,
            _ => Stop::Forced,
        }
    }
}

/// The signal thread's state: what each signal means given how far the stop has gone.
#[derive(Debug)]
struct SignalPolicy {
    control: MasterControl,
    stop: Arc<AtomicU8>,
    /// Slots not removed, as far as our own TTIN/TTOU tell (the master keeps at least one).
    slots: usize,
    shutdown_timeout: Duration,
}

/// What a signal asks of the master.
#[derive(Debug, Clone, Copy)]
enum SignalAct {
    Shutdown,
    ForceShutdown,
    Reload,
    Fork,
    RemoveOne,
    Nothing,
}

impl SignalPolicy {
    /// Says what `sig` does, then does it. Said afterwards, the line could come after the
    /// events the act causes, which the main thread prints as they come.
    fn on_signal(&mut self, sig: i32) {
        let name = log::signal_name(sig);
        let (text, act) = match sig {
            SIGTERM | SIGINT | SIGQUIT => match Stop::load(&self.stop) {
                Stop::Running => {
                    self.stop.store(Stop::Graceful as u8, Ordering::Release);
                    (
                        format!(
                            "{name}: graceful shutdown (SIGKILL after {}ms; send again to force)",
                            self.shutdown_timeout.as_millis()
                        ),
                        SignalAct::Shutdown,
                    )
                }
                Stop::Graceful => {
                    self.stop.store(Stop::Forced as u8, Ordering::Release);
                    (
                        format!("{name} again: forced shutdown (SIGKILL now)"),
                        SignalAct::ForceShutdown,
                    )
                }
                Stop::Forced => (
                    format!("{name}: already stopping by force"),
                    SignalAct::Nothing,
                ),
            },
            _ if Stop::load(&self.stop) != Stop::Running => {
                (format!("{name} ignored: stopping"), SignalAct::Nothing)
            }
            SIGHUP => (format!("{name}: rolling reload"), SignalAct::Reload),
            SIGTTIN => {
                self.slots += 1;
                (
                    format!("{name}: adding a worker (now {})", self.slots),
                    SignalAct::Fork,
                )
            }
            SIGTTOU if self.slots <= 1 => (
                format!("{name} ignored: one worker left"),
                SignalAct::Nothing,
            ),
            SIGTTOU => {
                self.slots -= 1;
                (
                    format!("{name}: removing a worker (now {})", self.slots),
                    SignalAct::RemoveOne,
                )
            }
            _ => (format!("{name} ignored"), SignalAct::Nothing),
        };
        log::master(text).print();
        let master = &self.control;
        let done = match act {
            SignalAct::Shutdown => master.shutdown(),
            SignalAct::ForceShutdown => master.force_shutdown(),
            SignalAct::Reload => master.reload(),
            SignalAct::Fork => master.fork(),
            SignalAct::RemoveOne => master.remove_one(),
            SignalAct::Nothing => Ok(()),
        };
        if let Err(e) = done {
            log::master(format!("{name}: not done: {e}")).print();
        }
    }
}

/// What the main thread knows about the run, to judge the stop.
#[derive(Debug)]
struct Supervisor {
    stop: Arc<AtomicU8>,
    /// Exits during the stop that were not clean (exit 0 after disconnect, or death by the
    /// stop signal).
    unclean: Vec<String>,
    stopped_clean: Option<bool>,
}

impl Supervisor {
    fn run(&mut self, master: &Master) {
        let mut log = EventLog::default();
        loop {
            let ev = match master.events().recv_timeout(log::MESSAGE_WINDOW) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    for line in log.message_summaries(Some(Instant::now())) {
                        line.print();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            for line in log.message_summaries(Some(Instant::now())) {
                line.print();
            }
            if matches!(ev, Event::Stopped { .. }) {
                for line in log.message_summaries(None) {
                    line.print();
                }
            } else if let Some(line) = log.line(&ev) {
                line.print();
            }
            match ev {
                // A stop is clean only if every worker left by itself with status 0.
                Event::Exit {
                    worker,
                    pid,
                    code,
                    signal,
                    clean,
                    ..
                } if Stop::load(&self.stop) != Stop::Running && !clean => {
                    let how = match (code, signal) {
                        (Some(c), _) => format!("exited with code {c}"),
                        (None, Some(s)) => format!("was killed by {}", log::signal_name(s)),
                        (None, None) => "ended".to_owned(),
                    };
                    self.unclean
                        .push(format!("worker {worker} (pid {pid}) {how}"));
                }
                Event::Stopped { clean } => {
                    self.stopped_clean = Some(clean);
                    return;
                }
                _ => {}
            }
        }
    }
    /// The exit status: `Ok` only for a graceful stop where every worker left cleanly.
    fn verdict(&self, result: Result<(), MasterError>) -> Result<(), String> {
        match result {
            Err(e @ MasterError::AllSlotsErrored { .. }) => {
                Err(format!("workers cannot start: {e}"))
            }
            Err(e) => Err(format!("master failed: {e}")),
            Ok(()) => match Stop::load(&self.stop) {
                Stop::Forced => Err("stopped by force: workers were killed".into()),
                Stop::Running => Err("the master stopped without being asked to".into()),
                Stop::Graceful => {
                    if let Some(first) = self.unclean.first() {
                        Err(format!(
                            "shutdown was not clean: {first}{}",
                            match self.unclean.len() - 1 {
                                0 => String::new(),
                                n => format!(" (and {n} more)"),
                            }
                        ))
                    } else if self.stopped_clean == Some(false) {
                        Err("shutdown was not clean: connections were closed unserved".into())
                    } else {
                        Ok(())
                    }
                }
            },
        }
    }
}
