use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_core::{ListenSpec, Policy};

use crate::round_robin::RoundRobinConfig;
use crate::supervisor::RestartPolicy;
use crate::{Master, MasterError};

/// Servers one worker may hold unless [`MasterBuilder::max_servers_per_worker`] says otherwise.
pub const DEFAULT_MAX_SERVERS_PER_WORKER: usize = 32;

/// The ack timeout of native workers unless [`MasterBuilder::ack_timeout`] says otherwise.
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// The ack timeout of Node workers unless [`MasterBuilder::ack_timeout`] says otherwise: long
/// enough for a healthy event loop blocked by a long synchronous handler, short enough that a
/// worker stuck in a loop for good does not hold its in-flight clients for ever.
const DEFAULT_NODE_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// A ready delay that suits most programs which neither speak the channel nor send `READY=1`
/// (the CLI's default for them); see [`MasterBuilder::ready_delay`].
pub const DEFAULT_READY_DELAY: Duration = Duration::from_secs(1);

/// Configures and starts a [`Master`].
///
/// ```no_run
/// use cluster_master::MasterBuilder;
/// let master = MasterBuilder::new("./my-worker").workers(4).start()?;
/// master.shutdown()?;
/// master.wait()?;
/// # Ok::<(), cluster_master::MasterError>(())
/// ```
#[derive(Clone, Debug)]
pub struct MasterBuilder {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) workers: usize,
    pub(crate) policy: Policy,
    pub(crate) round_robin: RoundRobinConfig,
    pub(crate) restart: RestartPolicy,
    pub(crate) shutdown_timeout: Duration,
    /// `None`: the default for the protocol ([`MasterBuilder::effective_ack_timeout`]).
    pub(crate) ack_timeout: Option<Duration>,
    pub(crate) defer_accept: bool,
    pub(crate) loop_scheduling: LoopScheduling,
    pub(crate) coalesce: Option<Coalesce>,
    pub(crate) ready_timeout: Duration,
    pub(crate) capture_output: bool,
    pub(crate) max_frame: usize,
    pub(crate) listen_fds: Vec<(String, ListenSource)>,
    pub(crate) max_servers_per_worker: usize,
    pub(crate) stop_signal: i32,
    pub(crate) ready_delay: Option<Duration>,
    pub(crate) watchdog: Option<Duration>,
    pub(crate) notify_systemd: bool,
    pub(crate) socket_activation: bool,
    pub(crate) reap_orphans: bool,
    pub(crate) protocol: crate::Protocol,
}

/// For workers that answer hand-offs one at a time (Node workers,
/// [`Protocol::Node`](crate::Protocol::Node)): when every worker that round-robin connections
/// go to has at least `min_unanswered` hand-offs whose answers the master has not read (the
/// worker is busy with earlier connections and has not read these yet, or answered a moment
/// ago), a connection dealt now would mostly queue behind them. The master's loop then sleeps
/// up to `delay` before it waits again, so that what arrives meanwhile is accepted and dealt in
/// one pass, rather than being woken for each connection, each wake-up preempting a busy
/// worker (a context switch and cold caches for both). Like a NIC's interrupt coalescing, it
/// trades a bounded delay (at most [`Coalesce::MAX_DELAY`]) for fewer wake-ups, and only under
/// load: a worker with fewer (an idle one, any at low load, one the stall rule passes over
/// with fewer) turns it off. Nothing waits past a due timer, and the next pass reads whatever
/// arrived during the pause (epoll keeps the readiness). Under `Connection: close` load with
/// Node workers it took the master's CPU per request from 21-25 µs to 12-17 µs and
/// throughput up 2-7 %, at a p99 within the spread of sets (docs/node.md). Native workers
/// answer a whole read's hand-offs in one frame, which the loop reads as it comes: a pause
/// saves them no wake-up, so they never count as behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coalesce {
    /// The longest pause before a wait, at most [`Coalesce::MAX_DELAY`] (a longer one is
    /// taken as that). Keep it below what a worker spends on `min_unanswered` connections, or
    /// it may run out of work meanwhile.
    pub delay: Duration,
    /// Unanswered hand-offs every worker must have for a pause (at least 1).
    pub min_unanswered: usize,
}

impl Coalesce {
    /// The cap on [`Coalesce::delay`]: a pause holds up everything else the loop does
    /// (commands, stops, worker exits), so it stays as short as the loop's other lazy reads.
    pub const MAX_DELAY: Duration = Duration::from_millis(1);
}

impl Default for Coalesce {
    /// 300 µs and 3: a Node `http` worker spends about 90-95 µs of CPU per short connection,
    /// so three unread ones outlast the pause.
    fn default() -> Self {
        Coalesce {
            delay: Duration::from_micros(300),
            min_unanswered: 3,
        }
    }
}

/// How the event loop thread is scheduled ([`MasterBuilder::loop_scheduling`]).
///
/// The choice matters when every CPU is busy: a connection arriving then wakes the loop, and
/// under `SCHED_OTHER` the woken loop preempts whatever runs, a worker mostly. Each such
/// preemption costs the loop and the worker a context switch and cold caches; under
/// `SCHED_BATCH` the loop waits instead until a running task blocks (a worker that ran out
/// of work, the one that most needs the next connection) or a scheduler tick comes, then
/// accepts and deals everything that came meanwhile in one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopScheduling {
    /// `SCHED_OTHER` throughout, as the master was started.
    Normal,
    /// `SCHED_BATCH` throughout. The price is paid when *other* CPU-bound processes share the
    /// machine: the loop no longer preempts them either, so an accept may wait for a tick
    /// (4 ms at `HZ=250`), and beside two busy loops, throughput at 4 concurrent clients
    /// fell by 27-47 % (docs/node.md). A master started as `SCHED_BATCH` already (`chrt -b`)
    /// is left so; one started under another policy (idle, real-time) fails to start with
    /// [`MasterError::SchedulingPolicy`](crate::MasterError::SchedulingPolicy).
    Batch,
    /// `SCHED_BATCH` for the waits where it gains and should starve no worker, `SCHED_OTHER`
    /// for the others (the default; see [`BatchWhileBehind`]). A master started under any
    /// policy but `SCHED_OTHER` is left under it.
    BatchWhileBehind(BatchWhileBehind),
}

impl Default for LoopScheduling {
    fn default() -> Self {
        LoopScheduling::BatchWhileBehind(BatchWhileBehind::default())
    }
}

/// When [`LoopScheduling::BatchWhileBehind`] waits as `SCHED_BATCH`: only while both hold.
///
/// - Every worker that round-robin connections are dealt to has at least `min_unanswered`
///   hand-offs it has not answered (as for [`Coalesce`], native workers never count as
///   behind): each has that much work queued, so a loop that runs a little later starves
///   none of them, and one that preempts a worker only slows it.
/// - Processes outside the cluster used at most `max_foreign_cpu_percent` of the CPU time
///   of the CPUs the loop may run on (from `/proc/stat` and the cluster's own
///   `/proc/PID/stat`; steal time left out) in the last measured window (250 ms to 2 s,
///   sampled only while the workers are behind). A loop that does not preempt a busy
///   stranger waits a tick for it, while its workers, out of connections, idle: that is the
///   loss [`LoopScheduling::Batch`] has beside busy loops.
///
/// Measured with Node `http` workers on 2 cores (docs/node.md): about +10 % `Connection:
/// close` throughput at saturation, and beside two busy loops the same as
/// [`LoopScheduling::Normal`] at every concurrency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchWhileBehind {
    /// Unanswered hand-offs every worker must have (at least 1).
    pub min_unanswered: usize,
    /// The most CPU time, in percent of that of the CPUs the loop may run on, that processes
    /// outside the cluster may have used (100 or more: never looked at). A load generator on the same
    /// machine counts: `wrk` driving the cluster to saturation on 2 cores used 22-29 %.
    pub max_foreign_cpu_percent: u8,
}

impl Default for BatchWhileBehind {
    /// 3, as for [`Coalesce`], and 40 %: busy strangers beside a saturated cluster on 2 cores
    /// used 46-70 %.
    fn default() -> Self {
        BatchWhileBehind {
            min_unanswered: 3,
            max_foreign_cpu_percent: 40,
        }
    }
}

/// Where a socket passed to the workers as `LISTEN_FDS` comes from.
#[derive(Clone, Debug)]
pub(crate) enum ListenSource {
    /// Bound by the master (unless an inherited socket has the address).
    Bind(ListenSpec),
    /// Inherited by the master under this `LISTEN_FDNAMES` name.
    Inherited(String),
}

impl MasterBuilder {
    /// A master that runs `program` as its workers.
    pub fn new(program: impl AsRef<Path>) -> Self {
        Self {
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            workers: 1,
            policy: Policy::RoundRobin,
            round_robin: RoundRobinConfig::default(),
            restart: RestartPolicy::default(),
            shutdown_timeout: Duration::from_secs(30),
            ack_timeout: None,
            defer_accept: false,
            loop_scheduling: LoopScheduling::default(),
            coalesce: Some(Coalesce::default()),
            ready_timeout: Duration::from_secs(30),
            capture_output: false,
            max_frame: cluster_ipc::frame::DEFAULT_MAX_FRAME,
            listen_fds: Vec::new(),
            max_servers_per_worker: DEFAULT_MAX_SERVERS_PER_WORKER,
            stop_signal: libc::SIGTERM,
            ready_delay: None,
            watchdog: None,
            notify_systemd: false,
            socket_activation: false,
            reap_orphans: false,
            protocol: crate::Protocol::Native,
        }
    }

    /// Appends an argument for the worker program.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments for the worker program.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for every worker (on top of the master's environment).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// How many workers (slots) to run. At least one.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// The IPC protocol the workers speak: [`crate::Protocol::Node`] runs unmodified Node.js
    /// programs (`node app.js`) as workers. Default: native.
    pub fn protocol(mut self, protocol: crate::Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// How listening sockets are shared.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Round-robin tuning: credit window, queue bound, retries, queue timeout.
    pub fn round_robin(mut self, config: RoundRobinConfig) -> Self {
        self.round_robin = config;
        self
    }

    /// Hand-offs in flight per worker (1 is Node's rule).
    pub fn window(mut self, window: usize) -> Self {
        self.round_robin.window = window.max(1);
        self
    }

    /// How long a worker may leave a hand-off unanswered and still be dealt more (see
    /// [`RoundRobinConfig::stall_after`]); `None`: only the window limits it.
    pub fn stall_after(mut self, stall_after: Option<Duration>) -> Self {
        self.round_robin.stall_after = stall_after;
        self
    }

    /// Restart and give-up rules for crashed workers.
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// How long a disconnecting worker may take to finish before it is killed.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long a worker may leave a hand-off unanswered before it is considered stuck and
    /// killed (its connections go to the others). Each hand-off has its own deadline: answering
    /// others does not extend it.
    ///
    /// Default 10 s for native workers and 60 s for Node workers ([`crate::Protocol::Node`]):
    /// a Node worker answers only between handlers, so a long synchronous one (a big
    /// `JSON.parse`, a `*Sync` call) delays every answer while the worker is healthy; Node's
    /// own primary never kills a worker for it, it just stops handing it connections.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = Some(timeout);
        self
    }

    /// `TCP_DEFER_ACCEPT` on every TCP listener the master binds, whatever the workers ask
    /// (see [`ListenSpec::defer_accept`](cluster_core::ListenSpec::defer_accept)): a connection
    /// is accepted and handed off only once its client has sent data. For workers whose
    /// clients speak first (HTTP, as Node `http` apps): one wake-up of the master and of the
    /// worker per connection instead of one for the connection and one for its request.
    /// Never for protocols where the server speaks first. Off by default.
    pub fn defer_accept(mut self, on: bool) -> Self {
        self.defer_accept = on;
        self
    }

    /// How the event loop thread is scheduled (see [`LoopScheduling`]); by default
    /// `SCHED_BATCH` while every worker is behind and the machine serves mostly this cluster
    /// ([`BatchWhileBehind`]). The loop's own policy is not passed on: workers start under
    /// the policy the master was started with.
    pub fn loop_scheduling(mut self, scheduling: LoopScheduling) -> Self {
        self.loop_scheduling = scheduling;
        self
    }

    /// `true`: [`LoopScheduling::Batch`]; `false`: [`LoopScheduling::Normal`].
    pub fn batch_scheduling(self, on: bool) -> Self {
        self.loop_scheduling(if on {
            LoopScheduling::Batch
        } else {
            LoopScheduling::Normal
        })
    }

    /// Lets connections gather while every worker is behind (see [`Coalesce`]); `None`: the
    /// loop waits for the next event at once after every pass. On by default.
    pub fn coalesce(mut self, coalesce: Option<Coalesce>) -> Self {
        self.coalesce = coalesce;
        self
    }

    /// The ack timeout in force: the one set, or the default for the workers' protocol.
    pub(crate) fn effective_ack_timeout(&self) -> Duration {
        self.ack_timeout.unwrap_or(match self.protocol {
            crate::Protocol::Native => DEFAULT_ACK_TIMEOUT,
            crate::Protocol::Node => DEFAULT_NODE_ACK_TIMEOUT,
        })
    }

    /// How long a new worker in a rolling reload may take to become ready (listening, or
    /// `READY=1`).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Capture each worker's stdout and stderr and deliver them line by line as
    /// [`crate::Event::Output`] instead of letting workers inherit the master's.
    pub fn capture_output(mut self, capture: bool) -> Self {
        self.capture_output = capture;
        self
    }

    /// The cap on a frame from a worker.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// How many servers one worker may hold at once (default 32). A `listen` past it fails in
    /// the worker with `EMFILE`, so a worker cannot make the master open sockets without
    /// bound.
    pub fn max_servers_per_worker(mut self, n: usize) -> Self {
        self.max_servers_per_worker = n.max(1);
        self
    }

    /// Readiness for programs that do not speak the channel: every worker gets
    /// `NOTIFY_SOCKET`, and one that sends `READY=1` there is ready (as `Listening` makes a
    /// native worker ready). With a ready delay, one that has not said `Online` is also ready
    /// this long after it started (zero: at once; [`DEFAULT_READY_DELAY`] suits most).
    ///
    /// Off by default, and only for programs known not to speak the channel: a slow native or
    /// Node worker would be taken for ready before it listens (a reload would then stop the
    /// worker it replaces too early). A worker that says `Online` is ready only once it
    /// listens or sends `READY=1`, even if the delay had passed.
    pub fn ready_delay(mut self, delay: Duration) -> Self {
        self.ready_delay = Some(delay);
        self
    }

    /// Gives every worker `WATCHDOG_USEC`: a worker that does not send `WATCHDOG=1` to
    /// `NOTIFY_SOCKET` within `period` (from becoming ready, then from each ping) is killed as hung
    /// and restarted.
    pub fn watchdog(mut self, period: Duration) -> Self {
        self.watchdog = Some(period);
        self
    }

    /// Report to the service manager that started this process, if it set `NOTIFY_SOCKET`
    /// (systemd's `Type=notify` or `Type=notify-reload`): `READY=1` once every worker is
    /// ready, `RELOADING=1` with `MONOTONIC_USEC` when [`crate::MasterControl::reload`] is
    /// called and `READY=1` when the reload ends, `STOPPING=1` on shutdown, `STATUS=` lines,
    /// and `WATCHDOG=1` from the event loop at half `WATCHDOG_USEC`. Off by default: an
    /// embedder may speak to its manager itself.
    pub fn notify_systemd(mut self, enabled: bool) -> Self {
        self.notify_systemd = enabled;
        self
    }

    /// The signal that asks a worker which does not speak the channel (it never said
    /// `Online`: a `LISTEN_FDS` program, any program) to stop, sent with the `Disconnect`
    /// that such a worker cannot read; SIGKILL follows after the shutdown timeout. A worker
    /// that exits 0 or dies of this very signal has stopped cleanly, as systemd counts it.
    /// Default `SIGTERM`.
    pub fn stop_signal(mut self, signal: i32) -> Self {
        self.stop_signal = signal;
        self
    }

    /// Pre-binds `spec` in the master and passes it to every worker the systemd way
    /// (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, fds from 3), for programs that do not
    /// speak the cluster protocol. Such a worker is ready once it sends `READY=1` or, if one
    /// is set, the [`MasterBuilder::ready_delay`] has passed: set one for programs that do not
    /// notify, or a reload waits for them until its ready timeout.
    pub fn listen_fd(mut self, name: impl Into<String>, spec: ListenSpec) -> Self {
        self.listen_fds
            .push((name.into(), ListenSource::Bind(spec)));
        self
    }

    /// Passes the socket this master inherited under `LISTEN_FDNAMES` name `name` (see
    /// [`MasterBuilder::socket_activation`]) to every worker the way
    /// [`MasterBuilder::listen_fd`] passes the sockets it binds, under the same name.
    pub fn listen_inherited(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.listen_fds
            .push((name.clone(), ListenSource::Inherited(name)));
        self
    }

    /// Reap orphaned descendants: the master makes itself a child subreaper, so that the
    /// children a worker leaves behind are reparented to it, and waits for them when they exit
    /// instead of leaving zombies. As PID 1 (a container's init) the master does this whether
    /// asked or not, since orphans are reparented to it anyway. Every exited child of the
    /// process that is not a worker is reaped, so an embedder that runs children of its own
    /// must not rely on waiting for them itself.
    pub fn reap_orphans(mut self, enabled: bool) -> Self {
        self.reap_orphans = enabled;
        self
    }

    /// Adopt the sockets a service manager passed to this process (`LISTEN_FDS`,
    /// `LISTEN_PID`, `LISTEN_FDNAMES`; systemd's socket activation) as the master's own: a
    /// worker's `listen` on an inherited socket's address gets that socket instead of a bind,
    /// as does a [`MasterBuilder::listen_fd`] spec for that address. Off by default: the
    /// descriptors are taken over (made close-on-exec and owned by the master) at start.
    pub fn socket_activation(mut self, enabled: bool) -> Self {
        self.socket_activation = enabled;
        self
    }

    /// Binds the pre-bound sockets, spawns the workers and starts the event loop thread.
    pub fn start(self) -> Result<Master, MasterError> {
        Master::start(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_workers_get_a_longer_ack_timeout_unless_one_is_set() {
        let native = MasterBuilder::new("w");
        assert_eq!(native.effective_ack_timeout(), Duration::from_secs(10));
        let node = MasterBuilder::new("node").protocol(crate::Protocol::Node);
        assert_eq!(node.effective_ack_timeout(), Duration::from_secs(60));
        let set = node.ack_timeout(Duration::from_millis(300));
        assert_eq!(set.effective_ack_timeout(), Duration::from_millis(300));
    }
}
